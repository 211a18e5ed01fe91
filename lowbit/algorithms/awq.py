"""AWQ: activation-aware weight quantization (Lin et al., 2023).

A few input channels carry much larger activations than the rest; their weights matter most.
AWQ multiplies those weight columns by a per-input-channel scale s > 1 before rounding (so they
get relatively finer steps) and divides the layer's input by s, which is folded into the op
that produces it (a norm, a linear, an activation), so the float model computes the same thing:

    y = x @ W.T = (x / s) @ (W * s).T      and the stored weight is Q(W * s).

Two searches, both scored by the layer's output error on calibration inputs:
1. scales s = mean|x|^alpha (normalized), alpha on a grid in [0, 1) (alpha = 0 is plain RTN);
2. clipping: per scale group, the weight range shrunk by a ratio in [1 - max_shrink, 1].

The output error of a weight error D is trace(D G D^T) with G = X^T X / n, so only the
streaming Gram matrix of the inputs is needed (`hessian.HessianAccumulator.gram`), never the
activations themselves. The clipping search scores each scale group by its own block of G.

Weight layout: `[out_features, in_features]`, see `weight_layout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.weight_layout import (QuantizedWeight, as_weight_matrix, quantized_from_qparams,
                                             shrunk_range_qparams, weight_qparams_for, weight_spec)
from lowbit.errors import LowbitError
from lowbit.numerics import dequantize, quantize, tensor_range
from lowbit.spec import QuantSpec


@dataclass
class AWQResult:
    """Per-input-channel `scales` (divide the producing op's output by them; all ones when no
    scale search ran), the chosen `alpha`, and each weight quantized as Q(W * scales)."""

    scales: torch.Tensor
    alpha: float
    weights: list[QuantizedWeight]


def awq_quantize(weights, gram, abs_mean, spec: QuantSpec, *, n_grid: int = 20, search_scales: bool = True,
                 clip: bool = True, max_shrink: float = 0.5, n_clip_grid: int = 20,
                 names: list[str] | None = None) -> AWQResult:
    """AWQ for one or more `[out, in]` weights that read the same input (e.g. q, k and v).

    `gram` is X^T X / n `[in, in]` and `abs_mean` mean|x| `[in]` of that input. The scale is
    shared by all weights (one producing op feeds them); `search_scales=False` keeps s = 1 for
    inputs whose producer cannot absorb a scale (clipping search only)."""
    if isinstance(weights, (list, tuple)):
        weight_list = list(weights)
    else:
        weight_list = [weights]
    names = names or [f"weight {i}" for i in range(len(weight_list))]
    matrices = [as_weight_matrix(w, n) for w, n in zip(weight_list, names)]
    spec = weight_spec(spec, "AWQ")
    n_in = matrices[0].shape[1]
    if any(m.shape[1] != n_in for m in matrices):
        raise LowbitError("AWQ weights that share a scale must have the same number of input features; "
                          "group only the layers that read the same input")
    device = matrices[0].device
    G = _checked(gram, (n_in, n_in), "the Gram matrix X^T X / n", device)
    magnitude = _checked(abs_mean, (n_in,), "the mean |x| per channel", device)

    scales, alpha = torch.ones(n_in, device=device), 0.0
    if search_scales:
        scales, alpha = search_awq_scales(matrices, G, magnitude, spec, n_grid=n_grid)
    quantized = []
    for matrix in matrices:
        scaled = matrix * scales[None, :]
        if clip:
            quantized.append(clip_search(scaled, G / torch.outer(scales, scales), spec,
                                         max_shrink=max_shrink, n_grid=n_clip_grid))
        else:
            quantized.append(quantized_from_qparams(scaled, weight_qparams_for(scaled, spec)))
    return AWQResult(scales, alpha, quantized)


def search_awq_scales(matrices: list[torch.Tensor], gram: torch.Tensor, abs_mean: torch.Tensor, spec: QuantSpec,
                      *, n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """The scales s = mean|x|^alpha (normalized around 1) with the least total output error of
    the round-to-nearest quantized weights; alpha = 0 (s = 1) is on the grid, so the result is
    never worse than RTN on the calibration inputs."""
    base = abs_mean.clamp(min=1e-4)
    best = (math.inf, torch.ones_like(base), 0.0)
    for step in range(n_grid):
        alpha = step / n_grid
        s = base.pow(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        error = 0.0
        for matrix in matrices:
            scaled = matrix * s[None, :]
            qp = weight_qparams_for(scaled, spec)
            effective = dequantize(quantize(scaled, qp), qp) / s[None, :]
            error += output_error(effective - matrix, gram)
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean squared output change, summed over outputs, of a weight change `delta` [out, in]:
    trace(delta G delta^T) = mean_n ||x_n delta^T||^2."""
    return float(((delta @ gram) * delta).sum())


def clip_search(matrix: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, *, max_shrink: float = 0.5,
                n_grid: int = 20) -> QuantizedWeight:
    """Quantize `matrix` with each scale group's range shrunk by the ratio (from 1 down to
    1 - max_shrink) that gives that group the least output error under `gram`.

    Values outside a shrunk range saturate at the grid's edge (that is the clipping)."""
    if not 0 <= max_shrink < 1:
        raise LowbitError(f"AWQ max_shrink must lie in [0, 1), not {max_shrink}; 0.5 is usual")
    matrix = as_weight_matrix(matrix)
    spec = weight_spec(spec, "AWQ clipping")
    gram = _checked(gram, (matrix.shape[1],) * 2, "the Gram matrix X^T X / n", matrix.device)
    lo, hi = tensor_range(matrix, spec)
    ratios = [1.0 - max_shrink * step / n_grid for step in range(n_grid)]
    qp = shrunk_range_qparams(matrix, lo, hi, spec, ratios, lambda delta: _errors_per_scale(delta, gram, spec))
    return quantized_from_qparams(matrix, qp)


def _errors_per_scale(delta: torch.Tensor, gram: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Output error of `delta` attributed to each scale group, in the qparams' compact layout:
    [out, n_groups] for groups (the diagonal blocks of G), [out] per channel, () per tensor."""
    kind = spec.granularity.kind
    if kind == "group":
        size = spec.granularity.group_size
        n_out, n_in = delta.shape
        n_groups = math.ceil(n_in / size)
        pad = n_groups * size - n_in
        padded = torch.nn.functional.pad(delta, (0, pad)).view(n_out, n_groups, size)
        g = torch.nn.functional.pad(gram, (0, pad, 0, pad))
        blocks = torch.stack([g[i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(n_groups)])
        return torch.einsum("ogk,gkl,ogl->og", padded, blocks, padded)
    per_row = ((delta @ gram) * delta).sum(dim=1)
    return per_row if kind == "channel" else per_row.sum()


def _checked(value, shape: tuple[int, ...], what: str, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to(device, torch.float32)
    if tuple(tensor.shape) != shape:
        raise LowbitError(f"{what} has shape {tuple(tensor.shape)}, expected {shape}; "
                          "collect it from the inputs of these layers")
    if not bool(torch.isfinite(tensor).all()):
        raise LowbitError(f"{what} contains NaN or infinite values; check the calibration activations")
    return tensor


# ----------------------------------------------------------------------------- lowbit.weight_algorithms hooks

def input_scales(matrices: list[torch.Tensor], statistics, spec: QuantSpec, options) -> tuple[torch.Tensor, float]:
    """The scale search on weights that read one input (the adapter multiplies them by the scales
    and divides the input by them)."""
    return search_awq_scales(matrices, statistics.gram.float(), statistics.abs_mean.float(), weight_spec(spec, "AWQ"),
                             n_grid=options.awq_grid)


def quantize_group(matrices, statistics, spec: QuantSpec, options, names: list[str]) -> list[QuantizedWeight]:
    """Round the (already scaled) matrices: the clipping search under the Gram matrix of their
    (already scaled) input, or round to nearest without `options.awq_clip`."""
    resolved = weight_spec(spec, "AWQ")
    if not options.awq_clip:
        return [rtn_quantize(matrix, resolved, name) for matrix, name in zip(matrices, names)]
    return [clip_search(matrix, statistics.gram.float(), resolved) for matrix in matrices]
