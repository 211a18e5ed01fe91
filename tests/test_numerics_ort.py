"""lowbit.numerics against ONNX Runtime's own QuantizeLinear / DequantizeLinear kernels.

ONNX Runtime is the oracle: every case builds a one-node opset-21 graph, runs it on the CPU
execution provider and demands bit-exact agreement with `quantize` / `dequantize` given the same
scale and zero point. Scales and zero points go to ONNX in lowbit's compact layout unchanged, so
a layout mismatch would make ONNX Runtime reject the graph.

int4 / uint4: ONNX Runtime 1.31 quantizes to int4 on CPU, but its Python binding cannot return an
int4 array, so the quantized output passes through an exact Cast to int8 / uint8; dequantization
takes int8 input cast to int4 in-graph, and also lowbit-packed bytes as an int4 initializer.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lowbit.numerics import (
    QParams,
    choose_qparams,
    compact_shape,
    dequantize,
    expand_to,
    pack,
    qparams_for,
    quantize,
    storage_dtype,
)
from lowbit.spec import Granularity, QuantSpec, per_channel, per_group

ONNX_TYPES = {
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int16": TensorProto.INT16,
    "uint16": TensorProto.UINT16,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
}
DTYPES = list(ONNX_TYPES)
# ONNX Runtime's Python binding has no NumPy type for int4; these byte types carry it.
_CARRIER = {"int4": TensorProto.INT8, "uint4": TensorProto.UINT8}


def _session(nodes, inputs, outputs, initializers) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _node_attrs(spec: QuantSpec) -> dict:
    g = spec.granularity
    if g.kind == "channel":
        return {"axis": g.axis}
    if g.kind == "group":
        return {"axis": g.axis, "block_size": g.group_size}
    return {}


def _param_tensors(qp: QParams) -> tuple[list, list]:
    """Scale and zero point as ONNX tensors in lowbit's compact layout. The scale is a graph
    input (so arbitrary float32 bits, denormals included, reach the kernel untouched); the zero
    point is an initializer of the quantized type, as exporters write it."""
    scale = np.asarray(qp.scale, dtype=np.float32)
    zero_point = np.asarray(qp.zero_point).astype(np.int64)
    elem = ONNX_TYPES[qp.spec.dtype]
    zp_tensor = helper.make_tensor("zp", elem, zero_point.shape, zero_point.reshape(-1).tolist())
    scale_input = helper.make_tensor_value_info("scale", TensorProto.FLOAT, scale.shape)
    return [scale_input], [zp_tensor]


def ort_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    dtype = qp.spec.dtype
    scale_inputs, inits = _param_tensors(qp)
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **_node_attrs(qp.spec))]
    out_type = ONNX_TYPES[dtype]
    if dtype in _CARRIER:
        out_type = _CARRIER[dtype]
        nodes.append(helper.make_node("Cast", ["q"], ["out"], to=out_type))
    else:
        nodes[0].output[0] = "out"
    sess = _session(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)] + scale_inputs,
        [helper.make_tensor_value_info("out", out_type, x.shape)],
        inits,
    )
    return sess.run(None, {"x": x, "scale": np.asarray(qp.scale, dtype=np.float32)})[0]


def ort_dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    dtype = qp.spec.dtype
    scale_inputs, inits = _param_tensors(qp)
    in_type = ONNX_TYPES[dtype]
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["out"], **_node_attrs(qp.spec))]
    if dtype in _CARRIER:
        in_type = _CARRIER[dtype]
        nodes.insert(0, helper.make_node("Cast", ["q_in"], ["q"], to=ONNX_TYPES[dtype]))
    q_name = "q_in" if dtype in _CARRIER else "q"
    sess = _session(
        nodes,
        [helper.make_tensor_value_info(q_name, in_type, q.shape)] + scale_inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, q.shape)],
        inits,
    )
    return sess.run(None, {q_name: q, "scale": np.asarray(qp.scale, dtype=np.float32)})[0]


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Float32 arrays equal bit for bit (so -0.0 vs 0.0 and NaN payloads count)."""
    assert actual.dtype == expected.dtype == np.float32
    assert actual.shape == expected.shape
    mismatch = actual.view(np.uint32) != expected.view(np.uint32)
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} mismatches, first at {np.argwhere(mismatch)[0]}: "
        f"{actual[mismatch][0]!r} vs {expected[mismatch][0]!r}"
    )


def check_against_ort(x: np.ndarray, qp: QParams) -> np.ndarray:
    """quantize and dequantize agree with ONNX Runtime; returns lowbit's integers."""
    q = quantize(x, qp)
    q_ort = ort_quantize(x, qp)
    assert q.dtype == storage_dtype(qp.spec)
    np.testing.assert_array_equal(q.astype(np.int64), q_ort.astype(np.int64))
    assert_bits_equal(dequantize(q, qp), ort_dequantize(q, qp))
    return q


def _random_qparams(spec: QuantSpec, shape: tuple[int, ...], rng: np.random.Generator, magnitude: float) -> QParams:
    """Unrelated random scales and zero points (not derived from the data), spanning the grid."""
    cshape = compact_shape(shape, spec)
    scale = (magnitude / (spec.qmax - spec.qmin) * rng.uniform(0.3, 3.0, size=cshape)).astype(np.float32)
    if spec.symmetric:
        zero_point = np.zeros(cshape, np.int32) + (0 if spec.qmin < 0 else (spec.qmin + spec.qmax + 1) // 2)
    else:
        zero_point = rng.integers(spec.qmin, spec.qmax + 1, size=cshape).astype(np.int32)
    return QParams(spec, np.asarray(scale, np.float32), np.asarray(zero_point, np.int32))


def _random_input(shape, rng: np.random.Generator, magnitude: float) -> np.ndarray:
    x = rng.standard_normal(shape) * magnitude
    x.flat[:: max(1, x.size // 7)] *= 4  # a few far outliers that saturate
    return x.astype(np.float32)


GRANULARITIES = [
    pytest.param(Granularity("tensor"), id="tensor"),
    pytest.param(per_channel(0), id="channel0"),
    pytest.param(per_channel(1), id="channel1"),
    pytest.param(per_channel(-1), id="channel-1"),
    pytest.param(per_channel(-3), id="channel-3"),
    pytest.param(per_group(4, 2), id="group4-axis2"),
    pytest.param(per_group(3, -1), id="group3-axis-1-partial"),
    pytest.param(per_group(2, 0), id="group2-axis0-partial"),
    pytest.param(per_group(4, 1), id="group4-axis1-partial"),
    pytest.param(per_group(16, -2), id="group16-axis-2-one-partial-block"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_random_tensors_match_ort(dtype, symmetric, granularity):
    spec = QuantSpec(dtype, symmetric=symmetric, granularity=granularity)
    seed = zlib.crc32(f"{dtype}-{symmetric}-{granularity.describe()}".encode())
    rng = np.random.default_rng(seed)
    for magnitude in (1e-3, 1.0, 250.0):
        x = _random_input((3, 5, 8), rng, magnitude)
        check_against_ort(x, _random_qparams(spec, x.shape, rng, magnitude * 6))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_large_tensors_quantized_block_by_block_match_ort(dtype, granularity, monkeypatch):
    """Tensors past `numerics._BLOCK_ELEMENTS` are quantized in blocks of rows; the block size is
    made small here so a 5x5x8 tensor takes that path (blocks of 2, 2 and 1 rows)."""
    import lowbit.numerics as numerics

    monkeypatch.setattr(numerics, "_BLOCK_ELEMENTS", 90)
    rng = np.random.default_rng(zlib.crc32(f"blocks-{dtype}-{granularity.describe()}".encode()))
    for symmetric in (True, False):
        spec = QuantSpec(dtype, symmetric=symmetric, granularity=granularity)
        x = _random_input((5, 5, 8), rng, 1.0)
        check_against_ort(x, _random_qparams(spec, x.shape, rng, 6.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_lowbit_chosen_qparams_are_valid_onnx_layouts(dtype, granularity):
    """Scales from lowbit's own range analysis feed ONNX unchanged, in every layout."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 5, 8)) * rng.uniform(0.1, 10, size=(3, 5, 8))).astype(np.float32)
    for symmetric in (True, False):
        qp = qparams_for(x, QuantSpec(dtype, symmetric=symmetric, granularity=granularity))
        q = check_against_ort(x, qp)
        # lowbit's ranges cover the data, so every value is within half a step (plus float32
        # rounding of the product) of its dequantized value.
        error = np.abs(dequantize(q, qp) - x)
        half_step = expand_to(np.asarray(qp.scale), x.shape, qp.spec) * 0.5
        assert (error <= half_step + 4 * np.finfo(np.float32).eps * np.abs(x)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.25, 0.1, 3.0e-5], ids=lambda s: f"scale{s}")
def test_exact_half_ties_round_to_even(dtype, scale):
    spec = QuantSpec(dtype, symmetric=True)
    k = np.arange(-8, 8)
    x = ((k + 0.5) * np.float32(scale)).astype(np.float32)
    qp = QParams(spec, np.float32(scale), np.int32(0 if spec.qmin < 0 else spec.qmin))
    q = check_against_ort(x, qp).astype(np.int64)
    if scale in (1.0, 0.25):
        # (k + 0.5) * 2^-n is exact in float32, so x / scale is an exact tie: the even neighbour.
        even = np.where(k % 2 == 0, k, k + 1) + int(qp.zero_point)
        np.testing.assert_array_equal(q, np.clip(even, spec.qmin, spec.qmax))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_with_zero_point_round_before_the_shift(dtype):
    """ONNX rounds x/scale first and adds the zero point after, so a tie next to an odd zero
    point still lands on the even *unshifted* value."""
    spec = QuantSpec(dtype, symmetric=False)
    zero_point = spec.qmin + 3  # odd offset from the bottom
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    qp = QParams(spec, np.float32(1.0), np.int32(zero_point))
    q = check_against_ort(x, qp).astype(np.int64)
    np.testing.assert_array_equal(q, np.clip(np.array([0, 2, 2, 0, -2, -2]) + zero_point, spec.qmin, spec.qmax))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_saturation_far_outside_the_range(dtype, symmetric):
    spec = QuantSpec(dtype, symmetric=symmetric)
    x = np.array([1e6, -1e6, 3.0e38, -3.0e38, 1e30, -1e30, 65504.0, -70000.0], np.float32)
    qp = QParams(spec, np.float32(0.1), np.int32(spec.qmin + 1 if not symmetric else (0 if spec.qmin < 0 else 8)))
    q = check_against_ort(x, qp).astype(np.int64)
    assert (q[0::2] == spec.qmax).all() and (q[1::2] == spec.qmin).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities_saturate(dtype):
    spec = QuantSpec(dtype, symmetric=False)
    qp = QParams(spec, np.float32(0.5), np.int32(spec.qmin + 2))
    x = np.array([np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(quantize(x, qp).astype(np.int64), [spec.qmax, spec.qmin])
    if dtype != "int4":
        # ONNX Runtime 1.31 maps -inf to +7 in int4 QuantizeLinear (a runtime quirk; ONNX
        # says saturate), so int4 is checked against the spec above only.
        np.testing.assert_array_equal(ort_quantize(x, qp).astype(np.int64), [spec.qmax, spec.qmin])


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_range_gives_scale_one_and_exact_zero_point(dtype):
    spec = QuantSpec(dtype, symmetric=False)
    x = np.zeros((4, 3), np.float32)
    qp = qparams_for(x, spec)
    assert float(qp.scale) == 1.0
    q = check_against_ort(x, qp)
    assert (q.astype(np.int64) == int(qp.zero_point)).all()
    assert (dequantize(q, qp) == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_denormal_inputs_tiny_scales_and_negative_zero(dtype):
    spec = QuantSpec(dtype, symmetric=True)
    tiny = np.finfo(np.float32).tiny
    x = np.array([1e-40, -1e-40, 1e-45, -1e-45, -0.0, 0.0, tiny, -tiny, 1e-38, 3e-38], np.float32)
    for scale in (np.float32(1e-3), np.float32(tiny), np.float32(1e-39), np.float32(1.4e-45), np.float32(1e-38)):
        zero_point = 0 if spec.qmin < 0 else (spec.qmax + 1) // 2
        check_against_ort(x, QParams(spec, scale, np.int32(zero_point)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_zero_quantizes_to_the_zero_point(dtype):
    spec = QuantSpec(dtype, symmetric=False)
    zero_point = (spec.qmin + spec.qmax) // 2
    qp = QParams(spec, np.float32(0.5), np.int32(zero_point))
    q = check_against_ort(np.array([-0.0, 0.0], np.float32), qp)
    assert (q.astype(np.int64) == zero_point).all()
    # DequantizeLinear gives +0.0 for q == zero point; lowbit must not produce -0.0.
    assert not np.signbit(dequantize(q, qp)).any()


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_large_magnitudes_inside_the_grid(dtype):
    """Huge values with huge scales quantize as well as small ones (no intermediate overflow)."""
    spec = QuantSpec(dtype, symmetric=True)
    rng = np.random.default_rng(3)
    x = (rng.uniform(-1, 1, size=64) * 1e37).astype(np.float32)
    qp = qparams_for(x, spec)
    check_against_ort(x, qp)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_every_grid_value(dtype):
    """Every integer of the grid, against every zero point class, dequantizes like ONNX."""
    spec = QuantSpec(dtype, symmetric=False, granularity=per_channel(0))
    grid = np.arange(spec.qmin, spec.qmax + 1, max(1, (spec.qmax - spec.qmin) // 300))
    q = np.tile(grid, (3, 1)).astype(storage_dtype(spec))
    zero_point = np.array([spec.qmin, (spec.qmin + spec.qmax) // 2, spec.qmax], np.int32)
    qp = QParams(spec, np.array([0.1, 3.7e-3, 1234.5], np.float32), zero_point)
    assert_bits_equal(dequantize(q, qp), ort_dequantize(q, qp))


@pytest.mark.parametrize("dtype", ["int4", "uint4"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_lowbit_packed_int4_is_the_onnx_int4_layout(dtype, shape):
    """Bytes from `lowbit.pack` used as ONNX int4 raw data dequantize to the right values."""
    spec = QuantSpec(dtype, symmetric=False)
    rng = np.random.default_rng(11)
    q = rng.integers(spec.qmin, spec.qmax + 1, size=shape).astype(storage_dtype(spec))
    qp = QParams(spec, np.float32(0.37), np.int32(spec.qmin + 5))
    raw = pack(q, 4, signed=spec.qmin < 0).tobytes()
    # onnx's own int4 packing must agree with lowbit's.
    reference = helper.make_tensor("ref", ONNX_TYPES[dtype], shape, q.reshape(-1).tolist())
    assert raw == _onnx_packed_bytes(reference)
    packed = helper.make_tensor("q", ONNX_TYPES[dtype], shape, raw, raw=True)
    zp = helper.make_tensor("zp", ONNX_TYPES[dtype], (), [int(qp.zero_point)])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, (), [float(qp.scale)])
    sess = _session(
        [helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["out"])],
        [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], [packed, zp, scale],
    )
    assert_bits_equal(dequantize(q, qp), sess.run(None, {})[0])


def _onnx_packed_bytes(tensor: onnx.TensorProto) -> bytes:
    """onnx.helper stores int4 values packed two per int32_data entry (one byte each)."""
    return bytes(int(v) & 0xFF for v in tensor.int32_data)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_choose_qparams_is_sane_next_to_ort_quantizer(dtype, symmetric):
    """Not bit-exact by design (ORT's symmetric unsigned scale uses 255 steps, lowbit 2*127 so
    zero sits exactly on the grid), but both must describe the same range."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    spec = QuantSpec(dtype, symmetric=symmetric)
    lo, hi = np.float32(-0.62), np.float32(1.62)
    qp = choose_qparams(lo, hi, spec)
    qmin, qmax = spec.qmin, spec.qmax
    if symmetric and qmin < 0:
        qmin = -qmax  # ORT's symmetric signed grid is narrow
    ort_zp, ort_scale = compute_scale_zp(np.array(lo), np.array(hi), np.array(qmin), np.array(qmax), symmetric)
    assert float(qp.scale) == pytest.approx(float(ort_scale), rel=0.01)
    assert abs(int(qp.zero_point) - int(ort_zp)) <= 1
    if not symmetric:
        # Same formula: (max - min) / (qmax - qmin) with 0 in range, zero point rounded.
        assert float(qp.scale) == pytest.approx(float(ort_scale), rel=1e-6)
        assert int(qp.zero_point) == int(ort_zp)
