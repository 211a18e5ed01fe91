"""SmoothQuant scale migration (Xiao et al. 2023, "SmoothQuant"), framework-free.

A linear layer computes Y = X W with X: (tokens, K) and W: (K, N). Transformer activations have
a few input channels j with huge magnitudes (outliers), so a per-tensor int8 grid for X wastes
almost all its levels on them. Per input channel j, divide X_j by s_j and multiply row j of W by
s_j: Y = (X diag(1/s)) (diag(s) W) is unchanged in exact arithmetic, but the outliers move from
the activation (hard to quantize, one scale per tensor) into the weight (easy, per-channel scales
along N still fit every column). With

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

alpha = 0.5 balances both ranges; higher alpha moves more difficulty into the weights.

Several layers reading the same X (a transformer's Q/K/V projections) share one s: max|W_j| is
taken over all their weights. The caller folds 1/s into whatever produces X (LayerNorm's gamma
and beta) and multiplies the weights with `smooth_weights`; this module only does the math.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lowbit.errors import LowbitError

DEFAULT_ALPHA = 0.5
# Channels that never fired (max |X_j| = 0) or all-zero weight rows get scale 1: nothing to move.
_TINY = 1e-8


def smoothing_scales(activation_absmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float = DEFAULT_ALPHA,
                     *, input_axis: int = 0, min_scale: float = 1e-5, max_scale: float = 1e5) -> np.ndarray:
    """Per-input-channel scales s (shape (K,)) for layers sharing one input.

    activation_absmax: max |X_j| over the calibration data, shape (K,).
    weights: the layers' weights, each with the input channel (K) on `input_axis`
    (0 for ONNX MatMul's (K, N); 1 for PyTorch Linear's (N, K)).
    alpha: migration strength in [0, 1]. The result is clipped to [min_scale, max_scale] so a
    degenerate channel cannot produce inf/0 scales."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha must be between 0 and 1, got {alpha}; 0.5 is the usual choice")
    if not weights:
        raise LowbitError("SmoothQuant needs at least one weight that reads the activation")
    act = np.abs(np.asarray(activation_absmax, dtype=np.float64)).reshape(-1)
    channels = act.shape[0]
    weight_absmax = np.zeros(channels, dtype=np.float64)
    for w in weights:
        w = np.asarray(w, dtype=np.float64)
        moved = np.moveaxis(w, input_axis, 0)
        if moved.shape[0] != channels:
            raise LowbitError(f"weight has {moved.shape[0]} input channels on axis {input_axis} but the "
                              f"activation has {channels}; pass the input-channel axis of the weight")
        weight_absmax = np.maximum(weight_absmax, np.abs(moved).reshape(channels, -1).max(axis=1))
    scales = np.ones(channels, dtype=np.float64)
    live = (act > _TINY) & (weight_absmax > _TINY)
    scales[live] = act[live] ** alpha / weight_absmax[live] ** (1.0 - alpha)
    return np.clip(scales, min_scale, max_scale).astype(np.float32)


def smooth_weights(weight: np.ndarray, scales: np.ndarray, *, input_axis: int = 0) -> np.ndarray:
    """diag(s) W: every input-channel slice of `weight` multiplied by its scale."""
    shape = [1] * np.ndim(weight)
    shape[input_axis] = -1
    return (np.asarray(weight, np.float32) * np.asarray(scales, np.float32).reshape(shape)).astype(np.float32)


def smooth_activation_producer(gamma: np.ndarray, beta: np.ndarray | None, scales: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray | None]:
    """LayerNorm-style affine producer y = gamma * x_hat + beta, divided by s channel-wise."""
    s = np.asarray(scales, np.float32)
    new_gamma = (np.asarray(gamma, np.float32) / s).astype(np.float32)
    new_beta = None if beta is None else (np.asarray(beta, np.float32) / s).astype(np.float32)
    return new_gamma, new_beta


__all__ = ["DEFAULT_ALPHA", "smooth_activation_producer", "smooth_weights", "smoothing_scales"]
