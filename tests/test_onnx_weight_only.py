"""ONNX weight-only quantization: block-wise int4 (MatMulNBits / blocked DequantizeLinear), RTN/GPTQ/AWQ.

References are independent of the code under test: stored codes are unpacked here with NumPy bit
operations (MatMulNBits) or by onnx's own int4 reader (DequantizeLinear), outputs are compared
with NumPy matrix products, statistics with a float64 NumPy Gram matrix.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _onnx_quant_models import tiny_encoder, token_calib
from onnx import TensorProto, helper, numpy_helper

from lowbit.algorithms import gptq_quantize, rtn_quantize
from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import with_outputs
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.onnx.weight_only import (apply_input_scales, collect_input_statistics, find_sites, quantize_sites,
                                     quantize_weight_only, weight_only_spec)
from lowbit.spec import QuantSpec, per_group

K1, N1, N2 = 72, 40, 24  # K1 is not a multiple of 32: the last block is partial


def mlp_model(seed: int = 0, pre_norm: bool = True) -> onnx.ModelProto:
    """x -> LayerNorm -> {MatMul W1 [K1, N1], Gemm(transB=1) W2 [N2, K1] + bias}; then MatMul W3
    [N1, N2] on the first branch. With `pre_norm=False` the LayerNorm output also feeds a graph output."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((K1, N1)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((N2, K1)).astype(np.float32) * 0.2
    w3 = rng.standard_normal((N1, N2)).astype(np.float32) * 0.2
    gamma = rng.uniform(0.5, 1.5, K1).astype(np.float32)
    gamma[:4] *= 8.0  # a few loud channels, the case AWQ exists for
    beta = rng.standard_normal(K1).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (w2, "W2"), (w3, "W3"), (gamma, "gamma"),
                                                         (beta, "beta"),
                                                         (rng.standard_normal(N2).astype(np.float32), "b2"))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="norm", axis=-1),
             helper.make_node("MatMul", ["h", "W1"], ["a"], name="mm1"),
             helper.make_node("Gemm", ["h", "W2", "b2"], ["b"], name="gemm2", transB=1),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W3"], ["c"], name="mm3"),
             helper.make_node("Add", ["b", "c"], ["y"], name="add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N2])]
    if not pre_norm:
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", K1]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K1])],
                              outputs, inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


def inputs(n: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    """Correlated features (a few latent factors plus noise), as real activations are: the case
    where GPTQ's error compensation has something to work with."""
    mixing = np.random.default_rng(0).standard_normal((8, K1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)) @ mixing + 0.1 * rng.standard_normal((n, K1))
    return {"x": x.astype(np.float32)}


def run(model: onnx.ModelProto, feed: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feed)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes from bytes, low bits first (MatMulNBits' layout), along the last axis."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).astype(np.int64)


def dequantized_matmulnbits(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    """The [N, K] float weight a MatMulNBits node multiplies by, read back from its initializers."""
    node = next(n for n in model.graph.node if n.name == node_name)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    codes = unpack_codes(initializer(model, node.input[1]), bits).reshape(n, -1)     # [N, k_blocks * block]
    scales = initializer(model, node.input[2]).reshape(n, -1)
    if len(node.input) > 3 and node.input[3]:
        zero = unpack_codes(initializer(model, node.input[3]).reshape(n, -1), bits)[:, :scales.shape[1]]
    else:
        zero = np.full(scales.shape, 2 ** (bits - 1))
    weight = (codes - np.repeat(zero, block, axis=1)).astype(np.float32) * np.repeat(scales, block, axis=1)
    return weight[:, :k]


def node_named(model: onnx.ModelProto, suffix: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name.endswith(suffix))


# ----------------------------------------------------------------------------- stored weights, exactly

@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_stores_exactly_the_rtn_weights_and_runs(symmetric):
    model = mlp_model()
    done = quantize_weight_only(model, None, bits=4, group_size=32, algo="rtn", symmetric=symmetric)
    out = done.model
    assert [n.op_type for n in out.graph.node].count("MatMulNBits") == 3
    spec = QuantSpec("int4", symmetric=symmetric, granularity=per_group(32))
    expected = {"mm1": initializer(model, "W1").T, "gemm2": initializer(model, "W2"), "mm3": initializer(model, "W3").T}
    deq = {}
    for name, w in expected.items():
        deq[name] = dequantized_matmulnbits(out, f"{name}_MatMulNBits")
        reference = rtn_quantize(w, spec).weight.numpy()
        np.testing.assert_array_equal(deq[name], reference)
    # ORT computes with exactly those weights (float activations, accuracy level 0).
    feed = inputs()
    h = run(with_outputs(model, ["h"]), feed, ["h"])[0]
    b = h @ deq["gemm2"].T + initializer(model, "b2")
    c = np.maximum(h @ deq["mm1"].T, 0) @ deq["mm3"].T
    np.testing.assert_allclose(run(out, feed)[0], b + c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 8])
def test_matmulnbits_other_widths_run_with_the_stored_weights(bits):
    model = mlp_model()
    out = quantize_weight_only(model, None, bits=bits, group_size=16, algo="rtn", symmetric=False).model
    spec = QuantSpec(f"int{bits}", symmetric=False, granularity=per_group(16))
    deq = dequantized_matmulnbits(out, "mm1_MatMulNBits")
    np.testing.assert_array_equal(deq, rtn_quantize(initializer(model, "W1").T, spec).weight.numpy())
    # Reference: the float graph with every weight replaced by its read-back dequantized value.
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for t in reference.graph.initializer:
        node = {"W1": "mm1", "W2": "gemm2", "W3": "mm3"}.get(t.name)
        if node:
            w = dequantized_matmulnbits(out, f"{node}_MatMulNBits")
            t.CopyFrom(numpy_helper.from_array(w if node == "gemm2" else np.ascontiguousarray(w.T), t.name))
    np.testing.assert_allclose(run(out, inputs())[0], run(reference, inputs())[0], rtol=1e-4, atol=1e-4)


def test_blocked_dequantizelinear_form_is_standard_onnx_with_the_same_weights():
    model = mlp_model()
    out = quantize_weight_only(model, None, bits=4, group_size=32, algo="rtn", weight_format="dq").model
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)
    spec = weight_only_spec(4, 32)
    for name, w, transposed in (("mm1", "W1", False), ("gemm2", "W2", True)):
        dq = node_named(out, f"{name}_W_DequantizeLinear")
        tensor = next(t for t in out.graph.initializer if t.name == dq.input[0])
        n_out = tensor.dims[0] if transposed else tensor.dims[1]
        assert tensor.data_type == TensorProto.INT4 and len(tensor.raw_data) == (K1 * n_out + 1) // 2  # packed
        values = numpy_helper.to_array(tensor).astype(np.float32)  # onnx's own int4 unpacking
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs["block_size"] == 32 and attrs["axis"] == (1 if transposed else 0)
        scale = initializer(out, dq.input[1])
        expanded = np.repeat(scale, 32, axis=attrs["axis"])[:values.shape[0], :values.shape[1]]
        deq = values * expanded
        matrix = initializer(model, w)
        reference = rtn_quantize(matrix if transposed else matrix.T, spec).weight.numpy()
        np.testing.assert_array_equal(deq if transposed else deq.T, reference)
    mnb = quantize_weight_only(model, None, bits=4, group_size=32, algo="rtn").model
    np.testing.assert_allclose(run(out, inputs())[0], run(mnb, inputs())[0], rtol=1e-3, atol=1e-3)


def test_per_channel_weights_use_one_block_per_row():
    model = mlp_model()
    out = quantize_weight_only(model, None, bits=4, group_size=0, algo="rtn").model
    deq = dequantized_matmulnbits(out, "mm1_MatMulNBits")
    spec = weight_only_spec(4, 0)
    np.testing.assert_array_equal(deq, rtn_quantize(initializer(model, "W1").T, spec).weight.numpy())
    run(out, inputs())


# ----------------------------------------------------------------------------- statistics and algorithms

def test_input_statistics_match_a_numpy_gram_matrix_and_gptq_weights_are_stored(tmp_path):
    model = mlp_model()
    data = CalibrationData(inputs(96, seed=3), model)
    sites, _ = find_sites(model, set())
    stats = collect_input_statistics(model, sites, data, batch_size=32)
    h, r = run(with_outputs(model, ["h", "r"]), inputs(96, seed=3), ["h", "r"])
    for name, x in (("h", h), ("r", r)):
        x = x.astype(np.float64)
        np.testing.assert_allclose(stats[name].gram.numpy(), x.T @ x / len(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[name].abs_mean.numpy(), np.abs(x).mean(0), rtol=1e-5)
    spec = weight_only_spec(4, 32)
    done = quantize_weight_only(model, data, bits=4, group_size=32, algo="gptq", batch_size=32)
    expected = gptq_quantize(initializer(model, "W2"), stats["h"].hessian, spec).weight.numpy()
    np.testing.assert_array_equal(dequantized_matmulnbits(done.model, "gemm2_MatMulNBits"), expected)


def shared_weight_model() -> onnx.ModelProto:
    """An unrolled RNN's shape: one weight W [K1, N1] read by two MatMuls on different inputs
    (x, and relu(x) + 1), their outputs added."""
    w = np.random.default_rng(5).standard_normal((K1, N1)).astype(np.float32) * 0.2
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "one"], ["s"], name="shift"),
             helper.make_node("MatMul", ["x", "W"], ["a"], name="step1"),
             helper.make_node("MatMul", ["s", "W"], ["b"], name="step2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N1])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.float32(1.0), "one")])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("algo", ["rtn", "gptq"])
def test_a_shared_weight_is_rounded_once_with_the_pooled_statistics_and_stored_once(algo):
    model = shared_weight_model()
    feed = inputs(40, seed=4)
    data = CalibrationData(feed, model)
    sites, _ = find_sites(model, set())
    # Batches of one row: the Gram updates wait for enough rows, and every row still counts once.
    stats = collect_input_statistics(model, sites, data, batch_size=1)
    x, s = feed["x"].astype(np.float64), run(with_outputs(model, ["s"]), feed, ["s"])[0].astype(np.float64)
    assert list(stats) == ["x"] and stats["x"].count == 80
    np.testing.assert_allclose(stats["x"].hessian.numpy(), 2 * (x.T @ x + s.T @ s) / 80, rtol=1e-5, atol=1e-6)
    done = quantize_weight_only(model, data if algo == "gptq" else None, bits=4, group_size=32, algo=algo,
                                batch_size=1)
    out = done.model
    first, second = (next(n for n in out.graph.node if n.name == f"{step}_MatMulNBits") for step in ("step1", "step2"))
    assert list(first.input[1:]) == list(second.input[1:])  # one stored copy of W's codes and scales
    assert sum(t.name.endswith("_4bit") for t in out.graph.initializer) == 1
    w = initializer(model, "W").T
    spec = weight_only_spec(4, 32)
    expected = (gptq_quantize(w, stats["x"].hessian, spec) if algo == "gptq" else rtn_quantize(w, spec)).weight.numpy()
    deq = dequantized_matmulnbits(out, "step1_MatMulNBits")
    np.testing.assert_array_equal(deq, expected)
    np.testing.assert_allclose(run(out, feed)[0], (x + s) @ deq.T.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_padding_rows_are_left_out_of_the_statistics(tmp_path):
    path = tiny_encoder(tmp_path / "enc.onnx")
    model = onnx.load(str(path))
    calib = np.load(token_calib(tmp_path / "calib.npz", n=8))
    data = CalibrationData(dict(calib), model)
    sites, _ = find_sites(model, set())
    stats = collect_input_statistics(model, sites, data, batch_size=4)
    first = sites[0].activation
    assert stats[first].count == int(calib["attention_mask"].sum())  # only real tokens


def _error(model, quantized, feed) -> float:
    return float(np.mean((run(model, feed)[0] - run(quantized, feed)[0]) ** 2))


@pytest.mark.parametrize("algo", ["gptq", "awq"])
def test_gptq_and_awq_beat_rtn_on_held_out_inputs(algo):
    model = mlp_model(seed=4)
    data = CalibrationData(inputs(256, seed=5), model)
    held_out = inputs(256, seed=6)
    rtn = quantize_weight_only(model, None, bits=3, group_size=32, algo="rtn").model
    other = quantize_weight_only(model, data, bits=3, group_size=32, algo=algo, batch_size=64).model
    assert _error(model, other, held_out) < 0.7 * _error(model, rtn, held_out)


def test_awq_scales_keep_the_float_model_exact():
    """Dividing an input by s (folded into LayerNorm, or an inserted Mul) and multiplying the
    weights by s computes the same function in float."""
    for pre_norm, expected_fold in ((True, "norm"), (False, "inserted Mul")):
        model = mlp_model(pre_norm=pre_norm)
        s = np.random.default_rng(7).uniform(0.5, 4.0, K1).astype(np.float32)
        scaled = onnx.ModelProto()
        scaled.CopyFrom(model)
        awq = {"h": {"scales": s, "alpha": 0.5, "nodes": ["mm1", "gemm2"]}}
        apply_input_scales(scaled, awq)
        assert awq["h"]["folded_into"] == expected_fold
        for t in scaled.graph.initializer:
            if t.name == "W1":
                t.CopyFrom(numpy_helper.from_array(initializer(model, "W1") * s[:, None], "W1"))
            if t.name == "W2":
                t.CopyFrom(numpy_helper.from_array(initializer(model, "W2") * s[None, :], "W2"))
        feed = inputs()
        for got, want in zip(run(scaled, feed), run(model, feed)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_awq_stores_the_scaled_weights_and_the_end_to_end_model_matches(tmp_path):
    model = mlp_model(seed=4)
    data = CalibrationData(inputs(128, seed=5), model)
    done = quantize_weight_only(model, data, bits=3, group_size=32, algo="awq")
    scales = done.plan.settings["weight_only"]["awq_scales"]
    assert scales and scales[0]["folded_into"] == "norm"
    sites, _ = find_sites(model, set())
    stats = collect_input_statistics(model, sites, data)
    quantized, awq = quantize_sites(model, sites, weight_only_spec(3, 32), "awq", stats)
    for site in sites:
        np.testing.assert_array_equal(dequantized_matmulnbits(done.model, f"{site.node}_MatMulNBits"),
                                      quantized[site.node].weight.numpy())


# ----------------------------------------------------------------------------- the command, plan, bad input

def test_quantize_onnx_weight_only_end_to_end_with_plan(tmp_path):
    path = tiny_encoder(tmp_path / "enc.onnx")
    calib = token_calib(tmp_path / "calib.npz", n=16)
    before = path.read_bytes()
    result = quantize_onnx(path, tmp_path / "q.onnx", mode="weight-only", calib=calib, algo="gptq", group_size=32,
                           measure_speed=False)
    assert path.read_bytes() == before
    assert result.report.outputs[0].cosine_mean > 0.999
    plan = read_plan(tmp_path / "q.onnx")
    assert plan.mode == "weight-only"
    assert plan.settings["weight_only"]["algorithm"] == "gptq"
    assert plan.settings["weight_only"]["format"] == "matmulnbits"
    weights = [e for e in plan.quantized("weight") if e.nodes[0] != plan.settings["weight_only"]["embedding_tables"][0]]
    assert len(weights) == 6 and all(e.spec.granularity.group_size == 32 and e.spec.dtype == "int4" for e in weights)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 6 and ops.count("MatMul") == 2  # the attention products stay float


def test_calibrated_algorithms_without_calibration_fail_clearly(tmp_path):
    path = tiny_encoder(tmp_path / "enc.onnx")
    for algo in ("gptq", "awq"):
        with pytest.raises(LowbitError, match="--calib"):
            quantize_onnx(path, tmp_path / "q.onnx", mode="weight-only", algo=algo)
    assert not (tmp_path / "q.onnx").exists()


def test_bits_and_group_sizes_the_formats_cannot_store():
    model = mlp_model()
    with pytest.raises(LowbitError, match="power-of-two group size"):
        quantize_weight_only(model, None, group_size=48)
    with pytest.raises(LowbitError, match="2 to 8 weight bits"):
        quantize_weight_only(model, None, bits=9)
    with pytest.raises(LowbitError, match="matmulnbits for 2-bit"):
        quantize_weight_only(model, None, bits=2, weight_format="dq")
    with pytest.raises(LowbitError, match="accuracy level"):
        quantize_weight_only(model, None, accuracy_level=4, weight_format="dq")
    # Any block size is fine for the standard form.
    run(quantize_weight_only(model, None, group_size=48, weight_format="dq").model, inputs())


def test_three_bit_weights_fall_back_to_four_bit_codes_and_say_so():
    model = mlp_model()
    done = quantize_weight_only(model, None, bits=3, group_size=32)
    assert any("3-bit weights are stored in 4-bit codes" in w for w in done.warnings)
    assert done.plan.settings["weight_only"]["stored_bits"] == 4
    deq = dequantized_matmulnbits(done.model, "mm1_MatMulNBits")
    np.testing.assert_array_equal(deq, rtn_quantize(initializer(model, "W1").T, weight_only_spec(3, 32)).weight.numpy())
    node = node_named(done.model, "mm1_MatMulNBits")
    codes = unpack_codes(initializer(done.model, node.input[1]), 4).reshape(N1, -1)[:, :K1] - 8
    assert codes.min() >= -4 and codes.max() <= 3  # on the 3-bit grid


def test_cli_weight_only_on_onnx(tmp_path, capsys):
    from lowbit.cli import main

    path = tiny_encoder(tmp_path / "enc.onnx")
    calib = token_calib(tmp_path / "calib.npz", n=8)
    code = main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--mode", "weight-only", "--weight-bits", "4",
                 "--group-size", "32", "--algo", "awq", "--calib", str(calib), "--no-speed"])
    assert code == 0 and (tmp_path / "q.onnx").exists()
    assert read_plan(tmp_path / "q.onnx").settings["weight_only"]["algorithm"] == "awq"
    code = main(["quantize", str(path), "-o", str(tmp_path / "r.onnx"), "--mode", "weight-only", "--algo", "gptq"])
    assert code != 0 and not (tmp_path / "r.onnx").exists()
    assert "--calib" in capsys.readouterr().err
