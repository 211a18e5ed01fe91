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
from lowbit.numerics import QParams, dequantize, quantize
from lowbit.spec import QuantSpec


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
