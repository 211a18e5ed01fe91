"""SmoothQuant, cross-layer equalization and bias correction: the math against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.algorithms.bias_correction import corrected_bias, output_mean_shift
from lowbit.algorithms.equalization import Layer, channel_ranges, equalize_chain, equalization_scales
from lowbit.algorithms.smoothquant import smooth_activation_producer, smooth_weights, smoothing_scales
from lowbit.errors import LowbitError
from lowbit.numerics import dequantize, qparams_for, quantize
from lowbit.spec import QuantSpec

rng = np.random.default_rng(0)


def conv2d(x, w, b=None, groups=1):
    """Reference NCHW convolution, stride 1, 'same' padding for odd kernels."""
    n, c, h, wd = x.shape
    o, i_per_g, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    out = np.zeros((n, o, h, wd))
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        patch = xp[:, g * i_per_g:(g + 1) * i_per_g]
        for dy in range(kh):
            for dx in range(kw):
                out[:, oc] += np.einsum("nchw,c->nhw", patch[:, :, dy:dy + h, dx:dx + wd], w[oc, :, dy, dx])
        if b is not None:
            out[:, oc] += b[oc]
    return out


# ----------------------------------------------------------------------------- SmoothQuant

def test_smoothquant_keeps_the_float_output_and_flattens_activation_outliers():
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[:, 3] *= 60.0  # an outlier channel, as in transformer LayerNorm outputs
    gamma, beta = rng.uniform(0.5, 1.5, 16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    w_q, w_k = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    y = x * gamma + beta
    s = smoothing_scales(np.abs(y).max(0), [w_q, w_k], alpha=0.5)
    new_gamma, new_beta = smooth_activation_producer(gamma, beta, s)
    y_smoothed = x * new_gamma + new_beta
    for w in (w_q, w_k):
        np.testing.assert_allclose(y_smoothed @ smooth_weights(w, s), y @ w, rtol=1e-4, atol=1e-4)
    # The formula itself: s_j = max|X_j|^a / max|W_j|^(1-a), W_j over both weights.
    w_max = np.maximum(np.abs(w_q).max(1), np.abs(w_k).max(1))
    np.testing.assert_allclose(s, np.abs(y).max(0) ** 0.5 / w_max ** 0.5, rtol=1e-5)
    ratio = lambda a: a.max() / np.median(a)  # noqa: E731
    assert ratio(np.abs(y_smoothed).max(0)) < ratio(np.abs(y).max(0)) / 3


def test_smoothquant_alpha_extremes_and_bad_input():
    act = np.array([1.0, 4.0, 0.0])
    w = np.array([[2.0, 1.0], [1.0, 1.0], [3.0, 1.0]])
    np.testing.assert_allclose(smoothing_scales(act, [w], alpha=1.0), [1.0, 4.0, 1.0])  # dead channel: 1
    np.testing.assert_allclose(smoothing_scales(act, [w], alpha=0.0), [0.5, 1.0, 1.0])
    np.testing.assert_allclose(smoothing_scales(act, [w.T], alpha=1.0, input_axis=1), [1.0, 4.0, 1.0])
    with pytest.raises(LowbitError, match="alpha"):
        smoothing_scales(act, [w], alpha=1.5)
    with pytest.raises(LowbitError, match="input channels"):
        smoothing_scales(act[:2], [w])


def test_smoothquant_reduces_int8_error_of_an_outlier_activation():
    x = rng.standard_normal((256, 32)).astype(np.float32)
    x[:, 5] *= 100.0
    w = rng.standard_normal((32, 16)).astype(np.float32)
    spec_a = QuantSpec("int8", symmetric=True)

    def int8_matmul(a, b):
        qa, qw = qparams_for(a, spec_a), _per_column(b)
        return dequantize(quantize(a, qa), qa) @ dequantize(quantize(b, qw), qw)

    s = smoothing_scales(np.abs(x).max(0), [w])
    plain = np.abs(int8_matmul(x, w) - x @ w).mean()
    smoothed = np.abs(int8_matmul(x / s, smooth_weights(w, s)) - x @ w).mean()
    assert smoothed < plain / 2


def _per_column(w):
    from lowbit.spec import per_channel
    return qparams_for(w, QuantSpec("int8", granularity=per_channel(1)))


# ----------------------------------------------------------------------------- equalization

def _relu(x):
    return np.maximum(x, 0.0)


def test_cle_keeps_a_relu_conv_chain_identical_and_equalizes_ranges():
    x = rng.standard_normal((2, 3, 6, 6))
    c = 8
    w1 = rng.standard_normal((c, 3, 1, 1)) * rng.uniform(0.01, 5.0, (c, 1, 1, 1))  # wildly different channels
    b1 = rng.standard_normal(c)
    w2 = rng.standard_normal((c, 1, 3, 3)) * rng.uniform(0.01, 5.0, (c, 1, 1, 1))  # depthwise
    b2 = rng.standard_normal(c)
    w3 = rng.standard_normal((4, c, 1, 1))
    b3 = rng.standard_normal(4)

    def net(l1, l2, l3):
        h = _relu(conv2d(x, l1.weight, l1.bias))
        h = _relu(conv2d(h, l2.weight, l2.bias, groups=c))
        return conv2d(h, l3.weight, l3.bias)

    layers = [Layer(w1, b1, 1), Layer(w2, b2, 0), Layer(w3, b3, 1)]
    new, scales = equalize_chain(layers)
    np.testing.assert_allclose(net(*new), net(*layers), rtol=1e-4, atol=1e-4)
    assert len(scales) == 2 and all(s.shape == (c,) for s in scales)
    # After convergence each pair has matching per-channel ranges on both sides.
    np.testing.assert_allclose(channel_ranges(new[0].weight, 0), channel_ranges(new[1].weight, 0), rtol=1e-2)
    np.testing.assert_allclose(channel_ranges(new[1].weight, 0), channel_ranges(new[2].weight, 1), rtol=1e-2)
    before = channel_ranges(w2, 0)
    after = channel_ranges(new[1].weight, 0)
    assert after.max() / after.min() < before.max() / before.min() / 5


def test_cle_single_pair_scales_formula():
    w1 = np.array([[4.0, 1.0], [1.0, 0.5]])
    w2 = np.array([[1.0, 2.0], [0.5, 8.0]])
    s = equalization_scales(w1, w2, w2_in_axis=1)
    np.testing.assert_allclose(s, [np.sqrt(4.0 / 1.0), np.sqrt(1.0 / 8.0)])
    with pytest.raises(LowbitError, match="directly connected"):
        equalization_scales(w1, np.ones((2, 3)), w2_in_axis=1)


# ----------------------------------------------------------------------------- bias correction

def test_bias_correction_matches_the_numpy_mean_shift_and_reduces_mean_error():
    c_in, c_out = 6, 5
    x = rng.standard_normal((64, c_in, 5, 5)) + rng.uniform(-2, 3, (1, c_in, 1, 1))  # nonzero channel means
    w = rng.standard_normal((c_out, c_in, 1, 1)) * rng.uniform(0.01, 3.0, (c_out, 1, 1, 1))
    b = rng.standard_normal(c_out)
    qp = qparams_for(w.astype(np.float32), QuantSpec("int4", symmetric=True))  # coarse: visible shift
    wq = np.asarray(dequantize(quantize(w.astype(np.float32), qp), qp), np.float64)
    mean = x.mean(axis=(0, 2, 3))
    expected = np.einsum("oc,c->o", (wq - w)[:, :, 0, 0], mean)
    np.testing.assert_allclose(output_mean_shift(w, wq, mean), expected, rtol=1e-6, atol=1e-9)
    new_b = corrected_bias(b, w, wq, mean)
    ref = conv2d(x, w, b)
    err_before = np.abs((conv2d(x, wq, b) - ref).mean(axis=(0, 2, 3))).mean()
    err_after = np.abs((conv2d(x, wq, new_b) - ref).mean(axis=(0, 2, 3))).mean()
    assert err_after < err_before / 20


def test_bias_correction_depthwise_groups():
    c = 4
    w = rng.standard_normal((c, 1, 3, 3))
    wq = w + rng.normal(0, 0.1, w.shape)
    mean = rng.standard_normal(c)
    expected = (wq - w).reshape(c, -1).sum(1) * mean
    np.testing.assert_allclose(output_mean_shift(w, wq, mean, groups=c), expected, rtol=1e-9)
    np.testing.assert_allclose(corrected_bias(None, w, wq, mean, groups=c), -expected, rtol=1e-5)
    with pytest.raises(LowbitError, match="input channels"):
        output_mean_shift(w, wq, mean[:2], groups=c)
