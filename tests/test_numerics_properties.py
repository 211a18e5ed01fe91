"""Property tests for lowbit.numerics: error bounds, idempotence, monotonicity, packing, float
formats against real NumPy / PyTorch casts, and the torch path (bit-equal values, STE and scale
gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.numerics import (
    QParams,
    dequantize,
    expand_to,
    fake_quantize,
    pack,
    packed_nbytes,
    qparams_for,
    quantize,
    quantize_dynamic,
    round_to_float_format,
    unpack,
)
from lowbit.spec import Granularity, QuantSpec, per_channel, per_group

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS32 = float(np.finfo(np.float32).eps)

int_dtypes = st.builds(
    lambda signed, bits: f"{'' if signed else 'u'}int{bits}", st.booleans(), st.integers(2, 16)
)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7)


@st.composite
def tensors(draw, shape=None, magnitude=None):
    """float32 arrays whose values span a random decade, so scales from 1e-6 to 1e4 appear."""
    shape = shape or draw(shapes)
    magnitude = magnitude or 10.0 ** draw(st.integers(-6, 4))
    values = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    return (values * np.float32(magnitude)).astype(np.float32)


@st.composite
def granularities(draw, ndim: int, token_ok: bool = True):
    kinds = ["tensor", "channel", "group"] + (["token"] if token_ok else [])
    kind = draw(st.sampled_from(kinds))
    axis = draw(st.integers(-ndim, ndim - 1))
    if kind == "channel":
        return per_channel(axis)
    if kind == "group":
        return per_group(draw(st.integers(1, 5)), axis)
    return Granularity(kind)


@st.composite
def specs_and_tensors(draw, token_ok: bool = True):
    x = draw(tensors())
    granularity = draw(granularities(x.ndim, token_ok))
    spec = QuantSpec(
        draw(int_dtypes),
        symmetric=draw(st.booleans()),
        narrow_range=draw(st.booleans()),
        granularity=granularity,
        dynamic=granularity.kind == "token",
    )
    return spec, x


# --------------------------------------------------------------------------- integer grids

@FAST
@given(specs_and_tensors())
def test_in_range_round_trip_error_is_at_most_half_a_step(case):
    spec, x = case
    qp = qparams_for(x, spec)
    q = quantize(x, qp)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    scale = expand_to(np.asarray(qp.scale), x.shape, spec)
    error = np.abs(dequantize(q, qp) - x)
    # Half a step, plus float32 rounding of the scale and the products across the grid's span.
    bound = scale * (0.5 + 8 * EPS32 * (spec.qmax - spec.qmin))
    assert (error <= bound).all(), float((error / scale).max())


@FAST
@given(specs_and_tensors())
def test_fake_quantize_is_idempotent(case):
    spec, x = case
    qp = qparams_for(x, spec)
    once = fake_quantize(x, qp)
    np.testing.assert_array_equal(fake_quantize(once, qp), once)
    np.testing.assert_array_equal(once, dequantize(quantize(x, qp), qp))


@FAST
@given(
    int_dtypes,
    st.floats(2.0**-13, 1024.0, width=32),
    st.floats(0, 1),
    hnp.arrays(np.float32, st.integers(2, 50), elements=st.floats(-1e5, 1e5, width=32)),
)
def test_quantize_is_monotonic(dtype, scale, zero_point_position, values):
    spec = QuantSpec(dtype, symmetric=False)
    zero_point = spec.qmin + round(zero_point_position * (spec.qmax - spec.qmin))
    qp = QParams(spec, np.float32(scale), np.int32(zero_point))
    ordered = np.sort(values)
    q = quantize(ordered, qp).astype(np.int64)
    assert (np.diff(q) >= 0).all()
    assert (np.diff(fake_quantize(ordered, qp)) >= 0).all()


@FAST
@given(specs_and_tensors(token_ok=False))
def test_binary_and_ternary_stay_on_their_levels(case):
    _, x = case
    for kind, levels in (("binary", {-1, 1}), ("ternary", {-1, 0, 1})):
        spec = QuantSpec(kind, granularity=case[0].granularity)
        qp = qparams_for(x, spec)
        q = quantize(x, qp)
        assert set(np.unique(q).tolist()) <= levels
        scale = expand_to(np.asarray(qp.scale), x.shape, spec)
        assert np.array_equal(dequantize(q, qp), q.astype(np.float32) * scale)


# --------------------------------------------------------------------------- packing

@FAST
@given(st.integers(1, 8), st.booleans(), st.integers(0, 41), st.data())
def test_pack_unpack_round_trip(bits, signed, count, data):
    if bits == 1:
        low, high = (-1, 1) if signed else (0, 1)
    else:
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = np.array(data.draw(st.lists(st.integers(low, high), min_size=count, max_size=count)), np.int64)
    if bits == 1 and signed:
        values = np.where(values >= 0, 1, -1)  # the signed 1-bit grid is binary +-1
    packed = pack(values, bits, signed=signed)
    assert packed.dtype == np.uint8
    assert len(packed) == packed_nbytes(count, bits) == -(-count * bits // 8)
    restored = unpack(packed, bits, count, signed=signed)
    np.testing.assert_array_equal(restored.astype(np.int64), values)


def test_pack_layout_is_little_endian_within_bytes():
    # Element 0 in the low nibble, as ONNX int4: [1, -2] -> 0xE1.
    assert pack(np.array([1, -2]), 4).tolist() == [0xE1]
    assert pack(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1, signed=False).tolist() == [0b00001101, 1]
    assert pack(np.array([3, 0, 1, 2]), 2, signed=False).tolist() == [0b10010011]


def test_pack_rejects_values_that_do_not_fit():
    from lowbit.errors import SpecError

    with pytest.raises(SpecError, match="do not fit in 4 bits"):
        pack(np.array([8]), 4)
    with pytest.raises(SpecError, match="1..8-bit"):
        pack(np.array([1]), 9)


# --------------------------------------------------------------------------- float formats

def _finite_floats(limit: float):
    return st.floats(-limit, limit, width=32, allow_nan=False, allow_subnormal=True)


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=_finite_floats(65504.0)))
def test_fp16_equals_numpy_cast(x):
    np.testing.assert_array_equal(round_to_float_format(x, "fp16"), x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    "dtype, torch_dtype, limit",
    [("bf16", torch.bfloat16, float(np.float32(3.38e38))), ("fp8_e4m3", torch.float8_e4m3fn, 448.0),
     ("fp8_e5m2", torch.float8_e5m2, 57344.0)],
)
@FAST
@given(data=st.data())
def test_float_formats_equal_torch_casts(dtype, torch_dtype, limit, data):
    magnitude = data.draw(st.sampled_from([limit, 1.0, 2.0**-6, 2.0**-14]))
    x = data.draw(hnp.arrays(np.float32, st.integers(1, 64), elements=_finite_floats(magnitude)))
    expected = torch.from_numpy(x).to(torch_dtype).to(torch.float32).numpy()
    actual = round_to_float_format(x, dtype)
    # Compare bits, so signed zeros must match as well.
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def test_float_format_overflow():
    x = np.array([1e6, -1e6, np.inf, -np.inf, 65520.0, 65519.0], np.float32)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(round_to_float_format(x, "fp16"), expected)
    bf16 = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_to_float_format(x, "bf16"), bf16)
    # fp8 saturates (ONNX Cast default), so overflow and inf land on the largest finite value.
    assert round_to_float_format(x, "fp8_e4m3").tolist()[:4] == [448.0, -448.0, 448.0, -448.0]
    assert round_to_float_format(x, "fp8_e5m2").tolist()[:4] == [57344.0, -57344.0, 57344.0, -57344.0]
    assert np.isnan(round_to_float_format(np.array([np.nan], np.float32), "fp8_e4m3")).all()


# --------------------------------------------------------------------------- torch path

@FAST
@given(specs_and_tensors())
def test_torch_fake_quantize_equals_numpy_bit_for_bit(case):
    spec, x = case
    qp = qparams_for(x, spec)
    qp_torch = qparams_for(torch.from_numpy(x), spec)
    # Scale and zero point come out the same from either array kind.
    np.testing.assert_array_equal(qp_torch.scale.numpy(), np.asarray(qp.scale))
    np.testing.assert_array_equal(qp_torch.zero_point.numpy(), np.asarray(qp.zero_point))
    expected = fake_quantize(x, qp)
    actual = fake_quantize(torch.from_numpy(x), qp_torch)
    assert isinstance(actual, torch.Tensor) and actual.dtype == torch.float32
    np.testing.assert_array_equal(actual.numpy().view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(quantize(torch.from_numpy(x), qp).numpy(), quantize(x, qp))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"])
def test_torch_float_fake_quantize_equals_numpy(dtype):
    x = (np.random.default_rng(5).standard_normal((4, 9)) * 30).astype(np.float32)
    spec = QuantSpec(dtype, granularity=per_channel(0))
    qp = qparams_for(x, spec)
    actual = fake_quantize(torch.from_numpy(x), qparams_for(torch.from_numpy(x), spec))
    np.testing.assert_array_equal(actual.numpy(), fake_quantize(x, qp))


@FAST
@given(specs_and_tensors(), st.floats(0.3, 1.5))
def test_straight_through_gradient_is_one_inside_and_zero_outside(case, shrink):
    spec, x = case
    qp = qparams_for(x, spec)
    # Shrink the scale so some values fall outside the clipping range.
    qp = QParams(spec, (np.asarray(qp.scale) * np.float32(shrink)).astype(np.float32), qp.zero_point)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    fake_quantize(xt, qp).sum().backward()
    scale = expand_to(np.asarray(qp.scale), x.shape, spec)
    zero_point = expand_to(np.asarray(qp.zero_point), x.shape, spec)
    unclipped = np.rint(x / scale) + zero_point
    inside = (unclipped >= spec.qmin) & (unclipped <= spec.qmax)
    np.testing.assert_array_equal(xt.grad.numpy(), inside.astype(np.float32))


@pytest.mark.parametrize("granularity", [Granularity("tensor"), per_channel(1), per_group(3, 1)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_gets_the_lsq_gradient(granularity, symmetric):
    spec = QuantSpec("int4", symmetric=symmetric, granularity=granularity)
    x = (np.random.default_rng(2).standard_normal((5, 8)) * 2).astype(np.float32)
    qp = qparams_for(x, spec)
    scale = torch.tensor(np.asarray(qp.scale) * 0.7, requires_grad=True)  # 0.7: some clipping
    fake_quantize(torch.from_numpy(x), QParams(spec, scale, torch.from_numpy(np.asarray(qp.zero_point)))).sum().backward()
    # LSQ: d/ds [(clip(round(x/s) + z) - z) * s] = (q - z) - x/s inside, (q - z) when clipped.
    s = expand_to(scale.detach().numpy().astype(np.float64), x.shape, spec)
    z = expand_to(np.asarray(qp.zero_point, np.float64), x.shape, spec)
    unclipped = np.rint(x / s) + z
    q = np.clip(unclipped, spec.qmin, spec.qmax)
    inside = (unclipped >= spec.qmin) & (unclipped <= spec.qmax)
    per_element = (q - z) - np.where(inside, x / s, 0.0)
    assert inside.mean() < 1  # the case exercises both branches
    expected = _reduce_to_compact(per_element, spec, scale.shape)
    np.testing.assert_allclose(scale.grad.numpy(), expected, rtol=1e-4, atol=1e-4)


def _reduce_to_compact(values: np.ndarray, spec: QuantSpec, compact: torch.Size) -> np.ndarray:
    """Sum per-element gradients over the elements that share each scale."""
    g = spec.granularity
    if g.kind == "tensor":
        return values.sum()
    if g.kind == "channel":
        return values.sum(axis=tuple(i for i in range(values.ndim) if i != g.axis % values.ndim))
    out = np.zeros(tuple(compact))
    for j in range(out.shape[1]):
        out[:, j] = values[:, j * g.group_size:(j + 1) * g.group_size].sum(axis=1)
    return out


def test_per_token_dynamic_quantization_uses_one_scale_per_row():
    x = np.array([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0]], np.float32)
    q, qp = quantize_dynamic(x, QuantSpec("int8", granularity=Granularity("token"), dynamic=True))
    np.testing.assert_allclose(np.asarray(qp.scale).reshape(-1), [2.0 / 127, 100.0 / 127], rtol=1e-7)
    np.testing.assert_array_equal(q, [[64, -127, 32], [127, 4, -64]])


@FAST
@given(st.integers(1, 6), st.integers(1, 13), st.integers(1, 5), st.data())
def test_binary_group_scale_is_the_mean_magnitude_of_each_group(rows, cols, group, data):
    """Including a partial last group: its mean counts only its real elements."""
    x = data.draw(tensors(shape=(rows, cols), magnitude=3.0))
    qp = qparams_for(x, QuantSpec("binary", granularity=per_group(group, 1)))
    expected = np.stack(
        [np.abs(x[:, j:j + group]).astype(np.float64).mean(axis=1) for j in range(0, cols, group)], axis=1
    )
    expected = np.where(expected == 0, 1.0, expected)  # an all-zero group gets scale 1
    np.testing.assert_allclose(np.asarray(qp.scale), expected, rtol=1e-6, atol=float(np.finfo(np.float32).tiny))


def test_binary_quantize_of_infinite_inputs_keeps_the_sign():
    qp = QParams(QuantSpec("binary"), np.float32(0.5), np.int32(0))
    assert quantize(np.array([np.inf, -np.inf, -0.0], np.float32), qp).tolist() == [1, -1, 1]
    assert quantize(torch.tensor([np.inf, -np.inf]), qp).tolist() == [1, -1]


@pytest.mark.parametrize("dtype", ["int2", "uint3", "int4", "uint4", "int8", "uint8", "int12", "int16", "uint15", "uint16"])
def test_torch_quantize_returns_the_numpy_values_for_every_width(dtype):
    x = np.linspace(-3, 5, 41, dtype=np.float32)
    qp = qparams_for(x, QuantSpec(dtype, symmetric=False))
    q = quantize(torch.from_numpy(x), qp)
    np.testing.assert_array_equal(q.numpy(), quantize(x, qp))
    np.testing.assert_array_equal(dequantize(q, qp).numpy(), dequantize(quantize(x, qp), qp))
