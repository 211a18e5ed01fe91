"""The weight layout every algorithm in this package shares, and the quantized result.

Layout convention (that of `torch.nn.Linear`): a weight is a matrix `[out_features, in_features]`;
the layer computes `y = x @ W.T`. Per-channel scales run along axis 0 (one per output feature);
per-group scales cover `group_size` consecutive *input* features of one row (axis 1), the layout
of ONNX blocked quantization and of int4 GPU kernels. Activation statistics (Hessians, channel
magnitudes) are indexed by input feature, so they line up with the columns of W.

Weights may be NumPy arrays or torch tensors; algorithms compute in torch float32 on the
weight's device (a GPU when the caller put the weight there, the CPU otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError, SpecError
from lowbit.numerics import QParams, choose_qparams, dequantize, qparams_for, quantize, tensor_range
from lowbit.spec import QuantSpec

MSE_SHRINK = 0.25  # the MSE clip search tries ranges from 100% down to 75% of max|w| ...
MSE_GRID = 16  # ... in this many steps


@dataclass
class QuantizedWeight:
    """A weight on a quantization grid.

    `weight` is the dequantized float32 matrix `[out, in]` (what the quantized layer computes
    with); `values` are the integers on the grid and `qparams` the scales and zero points in
    compact layout, so `dequantize(values, qparams) == weight` exactly."""

    weight: torch.Tensor
    values: torch.Tensor
    qparams: QParams

    def check_on_grid(self) -> bool:
        """True when re-quantizing the weight with its own qparams gives the same integers."""
        return bool(torch.equal(quantize(self.weight, self.qparams), self.values))


def weight_spec(spec: QuantSpec, algorithm: str) -> QuantSpec:
    """`spec` with its axis resolved for the `[out, in]` layout; integer grids only."""
    kind = spec.dtype_info.kind
    if kind != "int":
        raise SpecError(f"{algorithm} quantizes to integer grids, not {spec.dtype}; "
                        "use an int2..int8 weight type (or round-to-nearest for other formats)")
    if spec.dynamic:
        raise SpecError(f"{algorithm} quantizes weights, which are static; drop dynamic=True from the weight spec")
    if spec.granularity.kind == "token":
        raise SpecError(f"{algorithm} needs per-tensor, per-channel or per-group weights, not per-token")
    resolved = spec.with_axis(1 if spec.granularity.kind == "group" else 0)
    axis = resolved.granularity.axis
    if spec.granularity.kind == "group" and axis not in (1, -1):
        raise SpecError(f"{algorithm} groups run along the input features (axis 1), not axis {axis}")
    if spec.granularity.kind == "channel" and axis not in (0, -2):
        raise SpecError(f"{algorithm} per-channel scales run along the output features (axis 0), not axis {axis}")
    return resolved


def as_weight_matrix(weight, name: str = "weight") -> torch.Tensor:
    """A float32 torch copy of a 2-d weight `[out, in]`, validated (finite, non-empty)."""
    # np.array copies: ONNX initializers arrive as read-only views, which torch warns about.
    matrix = torch.from_numpy(np.array(weight, dtype=np.float32)) if isinstance(weight, np.ndarray) else weight.detach()
    if matrix.ndim != 2:
        raise LowbitError(f"{name} must be a 2-d matrix [out_features, in_features], got shape {tuple(matrix.shape)}; "
                          "reshape convolution kernels to [out, in * kernel] first")
    if 0 in matrix.shape:
        raise LowbitError(f"{name} is empty (shape {tuple(matrix.shape)}); there is nothing to quantize")
    matrix = matrix.to(torch.float32).clone()
    if not bool(torch.isfinite(matrix).all()):
        raise LowbitError(f"{name} contains NaN or infinite values; fix the model before quantizing")
    return matrix


def quantized_from_qparams(matrix: torch.Tensor, qparams: QParams) -> QuantizedWeight:
    """Round `matrix` onto the grid of `qparams` (values outside the range saturate)."""
    values = quantize(matrix, qparams)
    return QuantizedWeight(dequantize(values, qparams), values, qparams)


def uses_full_grid(spec: QuantSpec) -> bool:
    """Whether weights of `spec` get the full-grid scale (see `weight_qparams`)."""
    info = spec.dtype_info
    return info.kind == "int" and info.signed and spec.symmetric and not spec.narrow_range and info.bits < 8


def weight_qparams(lo, hi, spec: QuantSpec) -> QParams:
    """`numerics.choose_qparams` for weights, using the whole grid of symmetric signed types
    below 8 bits: scale = max|w| / ((qmax - qmin) / 2), i.e. max|w| / 7.5 for int4, so the
    grid's -8 level is used and the step is 7% finer than max|w| / 7 (the largest positive
    weight saturates at +7, half a step off). This is compressed-tensors' (llm-compressor's)
    symmetric scale. int8 keeps max|w| / 127: the gain is 0.4% there, and many int8 kernels
    expect weights in [-127, 127]."""
    qp = choose_qparams(lo, hi, spec)
    if not uses_full_grid(spec):
        return qp
    amax = torch.maximum(torch.as_tensor(lo).abs(), torch.as_tensor(hi).abs())
    scale = torch.as_tensor(qp.scale)
    full = amax / ((spec.qmax - spec.qmin) / 2)  # divided exactly so, as compressed-tensors does
    # Where choose_qparams replaced a zero or vanishing range by its safe scale, keep that one.
    return QParams(spec, torch.where(scale * spec.qmax > amax * (1 + 1e-6), scale, full), qp.zero_point)


def weight_qparams_for(matrix: torch.Tensor, spec: QuantSpec, name: str = "weight", *, mse: bool = False) -> QParams:
    """Weight qparams from `matrix`'s ranges (`weight_qparams`), integer grids only through it;
    other formats (fp8, binary, ternary) use `numerics.qparams_for`. With `mse`, each scale
    group's range is shrunk by the ratio in [1 - MSE_SHRINK, 1] (MSE_GRID steps) with the least
    squared rounding error of its own weights: an outlier weight then stops stretching the
    step of all the others (the MSE observer of llm-compressor and of the GPTQ reference)."""
    if spec.dtype_info.kind != "int":
        return qparams_for(matrix, spec, name)
    lo, hi = tensor_range(matrix, spec, name)
    if not mse:
        return weight_qparams(lo, hi, spec)
    ratios = [1.0 - MSE_SHRINK * step / MSE_GRID for step in range(MSE_GRID + 1)]
    return shrunk_range_qparams(matrix, lo, hi, spec, ratios, lambda delta: squared_error_per_scale(delta, spec))


def shrunk_range_qparams(matrix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                         ratios: list[float], errors_per_scale) -> QParams:
    """Qparams of `matrix` with each scale group's range [lo, hi] shrunk by the ratio among `ratios`
    whose rounding error `errors_per_scale(dequantized - matrix)` (one value per scale group) is
    least. The one clip search behind the MSE clip here and AWQ's output-error clip."""
    best_error = best_ratio = None
    for ratio in ratios:
        qp = weight_qparams(lo * ratio, hi * ratio, spec)
        error = errors_per_scale(dequantize(quantize(matrix, qp), qp) - matrix)
        if best_error is None:
            best_error, best_ratio = error, torch.full_like(error, ratio)
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio = torch.where(better, torch.full_like(error, ratio), best_ratio)
    best_ratio = best_ratio.to(lo.dtype)
    return weight_qparams(lo * best_ratio, hi * best_ratio, spec)


def squared_error_per_scale(delta: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Sum of `delta**2` over each scale group of a `[out, in]` matrix, in the qparams' compact
    layout: [out, n_groups] for groups, [out] per channel, () per tensor."""
    kind = spec.granularity.kind
    squared = delta.pow(2)
    if kind == "group":
        size = spec.granularity.group_size
        n_out, n_in = delta.shape
        n_groups = -(-n_in // size)
        return torch.nn.functional.pad(squared, (0, n_groups * size - n_in)).view(n_out, n_groups, size).sum(-1)
    if kind == "channel":
        return squared.sum(dim=1)
    return squared.sum()
