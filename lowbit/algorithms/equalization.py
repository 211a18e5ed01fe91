"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), framework-free.

Two consecutive layers y = W2 f(W1 x + b1) + b2 with f positively homogeneous (identity, ReLU:
f(x / s) = f(x) / s for s > 0) compute the same function after, for each channel i between them,

    W1[i] /= s_i,   b1[i] /= s_i,   W2[:, i] *= s_i.

With s_i = sqrt(r1_i / r2_i) (r = max |w| of the channel on each side) both layers end up with
the same per-channel range sqrt(r1_i r2_i), so one per-tensor int8 scale fits every channel far
better: the fix for depthwise nets whose folded-BatchNorm channel ranges span orders of magnitude.

ReLU6 is not homogeneous (min(x / s, 6) != min(x, 6) / s), so equalizing through it changes the
network. Like the paper, callers replace ReLU6 by ReLU on equalized pairs (the activation ranges
are then calibrated from data); `equalize_chain` only does the weight math.

Layout convention: W1 has its output channels on axis 0 (ONNX Conv / Gemm-with-transB and
PyTorch Conv/Linear); W2 has the shared channels on `w2_in_axis` (1 for a dense conv/linear,
0 for a depthwise conv, whose output channel i reads only input channel i).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

# Scales are clipped so a dead channel (all-zero weights on one side) cannot blow up the other.
MIN_SCALE, MAX_SCALE = 1e-4, 1e4


@dataclass
class Layer:
    """One layer of a chain: weight, optional bias, and where its input channels sit."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    in_axis: int = 1  # 1: dense (O, I, ...); 0: depthwise (C, 1, ...)


def channel_ranges(weight: np.ndarray, axis: int) -> np.ndarray:
    """max |w| of every slice along `axis`."""
    moved = np.moveaxis(np.abs(np.asarray(weight, np.float64)), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def equalization_scales(w1: np.ndarray, w2: np.ndarray, *, w2_in_axis: int = 1) -> np.ndarray:
    """s_i = sqrt(r1_i / r2_i) for the channels between W1 (axis 0) and W2 (axis `w2_in_axis`)."""
    r1 = channel_ranges(w1, 0)
    r2 = channel_ranges(w2, w2_in_axis)
    if r1.shape != r2.shape:
        raise LowbitError(f"layer 1 has {r1.shape[0]} output channels but layer 2 reads {r2.shape[0]} on axis "
                          f"{w2_in_axis}; equalize only directly connected layers")
    scales = np.ones_like(r1)
    live = (r1 > 0) & (r2 > 0)
    scales[live] = np.sqrt(r1[live] / r2[live])
    return np.clip(scales, MIN_SCALE, MAX_SCALE)


def rescale_pair(first: Layer, second: Layer, scales: np.ndarray) -> tuple[Layer, Layer]:
    """The pair with channel i of `first` divided by s_i and of `second` multiplied by it."""
    s = np.asarray(scales, np.float64)
    shape1 = (-1,) + (1,) * (first.weight.ndim - 1)
    w1 = (first.weight / s.reshape(shape1)).astype(np.float32)
    b1 = None if first.bias is None else (first.bias / s).astype(np.float32)
    shape2 = [1] * second.weight.ndim
    shape2[second.in_axis] = -1
    w2 = (second.weight * s.reshape(shape2)).astype(np.float32)
    return Layer(w1, b1, first.in_axis), Layer(w2, second.bias, second.in_axis)


def equalize_chain(layers: Sequence[Layer], *, iterations: int = 20, tolerance: float = 1e-4
                   ) -> tuple[list[Layer], list[np.ndarray]]:
    """Equalize every consecutive pair of a chain, sweeping until the scales settle.

    A middle layer (e.g. a depthwise conv between two 1x1 convs) is rescaled from both sides, so
    one sweep is not a fixed point; a few sweeps converge. Returns the new layers and, per pair,
    the accumulated scales (the factor channel i of layer k was divided by)."""
    current = [Layer(np.asarray(l.weight, np.float32), None if l.bias is None else np.asarray(l.bias, np.float32),
                     l.in_axis) for l in layers]
    total = [np.ones(channel_ranges(l.weight, 0).shape[0]) for l in current[:-1]]
    for _ in range(iterations):
        largest_change = 0.0
        for k in range(len(current) - 1):
            s = equalization_scales(current[k].weight, current[k + 1].weight, w2_in_axis=current[k + 1].in_axis)
            current[k], current[k + 1] = rescale_pair(current[k], current[k + 1], s)
            total[k] = total[k] * s
            largest_change = max(largest_change, float(np.max(np.abs(np.log(s)))))
        if largest_change < tolerance:
            break
    return current, total


__all__ = ["Layer", "channel_ranges", "equalization_scales", "equalize_chain", "rescale_pair"]
