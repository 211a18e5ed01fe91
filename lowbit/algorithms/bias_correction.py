"""Bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2), framework-free.

Quantizing a weight W to W_q = W + dW shifts the layer's output mean: E[y_q] - E[y] = dW E[x].
The shift is systematic (the same for every input), so it survives averaging and accumulates
through the network; per-tensor int8 on depthwise convs makes it large. Subtracting dW E[x] from
the bias removes it exactly in expectation. E[x] is the per-channel mean of the layer's input,
measured on calibration data with the float model (the paper derives it from BatchNorm
statistics instead; measuring works for any layer).

Layout: weight (O, I / groups, k...) as in ONNX Conv and Gemm-with-transB / PyTorch; for a plain
(K, N) MatMul weight, pass its transpose.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError


def output_mean_shift(weight: np.ndarray, quantized_weight: np.ndarray, input_mean: np.ndarray, *,
                      groups: int = 1) -> np.ndarray:
    """dW E[x] per output channel: how much the quantized layer's output mean moved.

    input_mean: mean of each input channel, shape (I,). The spatial kernel sums over (padding at
    the borders makes this approximate for k > 1, exact in the interior)."""
    w = np.asarray(weight, np.float64)
    dw = np.asarray(quantized_weight, np.float64) - w
    mean = np.asarray(input_mean, np.float64).reshape(-1)
    out_channels, in_per_group = w.shape[0], (w.shape[1] if w.ndim > 1 else 1)
    if out_channels % groups or mean.shape[0] != in_per_group * groups:
        raise LowbitError(f"weight {w.shape} with {groups} group(s) does not read {mean.shape[0]} input channels; "
                          "pass the per-channel mean of this layer's input")
    dw = dw.reshape(out_channels, in_per_group, -1).sum(axis=2)  # (O, I/g): kernel taps add up
    per_group = out_channels // groups
    shift = np.empty(out_channels)
    for g in range(groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        shift[rows] = dw[rows] @ mean[g * in_per_group:(g + 1) * in_per_group]
    return shift


def corrected_bias(bias: np.ndarray | None, weight: np.ndarray, quantized_weight: np.ndarray,
                   input_mean: np.ndarray, *, groups: int = 1) -> np.ndarray:
    """bias - dW E[x] (a zero bias when the layer had none)."""
    shift = output_mean_shift(weight, quantized_weight, input_mean, groups=groups)
    base = np.zeros_like(shift) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    return (base - shift).astype(np.float32)


__all__ = ["corrected_bias", "output_mean_shift"]
