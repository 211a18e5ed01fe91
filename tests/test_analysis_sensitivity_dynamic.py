"""Per-layer sensitivity of dynamic int8 models (layer outputs vs float, through ONNX Runtime)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import token_calib, tiny_encoder
from lowbit.analysis.sensitivity import layer_sensitivity
from lowbit.cli import main
from lowbit.onnx.quantize import quantize_onnx

BATCH = 8


def _mlp(path, fragile: bool):
    """x -> fc1 -> Relu -> fc2 -> Relu -> fc3 (Gemm, transB, alpha 0.5, bias). Fragile: fc2's output
    channel 5 is scaled 1000x and fc3's matching weight row 1/1000x (the same function in float,
    Relu being positively homogeneous), so fc3's input has one channel 1000x the rest and its
    per-tensor run-time activation scale rounds the other channels to zero."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (32, 32)).astype(np.float32)
    w3 = rng.normal(0, 0.2, (8, 32)).astype(np.float32)  # (out, in): transB
    if fragile:
        w2[:, 5] *= 1000
        w3[:, 5] /= 1000
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w3, "w3"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
             helper.make_node("Gemm", ["a2", "w3", "b3"], ["out"], name="fc3", transB=1, alpha=0.5)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.fixture(scope="module")
def mlps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic_sensitivity")
    data = root / "x.npz"
    np.savez(data, x=np.random.default_rng(1).normal(size=(24, 16)).astype(np.float32))
    models = {"data": data}
    for name in ("plain", "fragile"):
        float_path = _mlp(root / f"{name}.onnx", fragile=name == "fragile")
        quant = root / f"{name}_dyn.onnx"
        quantize_onnx(float_path, quant, mode="dynamic", verify=False)
        models[name] = (float_path, quant)
    return models


def test_the_layer_fed_an_activation_outlier_ranks_worst(mlps):
    plain = layer_sensitivity(*mlps["plain"], mlps["data"], batch_size=BATCH)
    assert plain.mode == "dynamic" and plain.samples == 24
    assert [t.nodes for t in plain.tensors] == [["fc1"], ["fc2"], ["fc3"]]
    assert all(t.sqnr_db > 30 and t.local_sqnr_db > 30 and t.cosine > 0.999 for t in plain.tensors)

    fragile = layer_sensitivity(*mlps["fragile"], mlps["data"], batch_size=BATCH)
    ranked = fragile.ranked()
    assert ranked[0].nodes == ["fc3"] and ranked[0].tensor == "out"
    assert ranked[0].sqnr_db < 10 and ranked[0].local_sqnr_db < 10 and ranked[0].sqnr_db < ranked[1].sqnr_db - 20
    assert ranked[0].clipped is None  # run-time ranges never clip
    assert "layer output" in fragile.text() and "fed the float model's input" in fragile.text()


def _dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """ONNX DynamicQuantizeLinear, written out from the operator spec."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255
    zero_point = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.clip(np.rint(x / scale) + zero_point, 0, 255), scale, zero_point


def test_sqnr_and_own_error_match_numpy(mlps):
    """fc3's accumulated SQNR from the two models' outputs, and its own SQNR from a NumPy dynamic
    int8 Gemm fed the float model's input (both streamed in the same batches of 8)."""
    float_path, quant_path = mlps["fragile"]
    x = np.load(mlps["data"])["x"]
    float_model = onnx.load(str(float_path))
    float_model.graph.output.append(onnx.ValueInfoProto(name="a2"))
    float_session = ort.InferenceSession(float_model.SerializeToString(), providers=["CPUExecutionProvider"])
    quant_session = ort.InferenceSession(str(quant_path), providers=["CPUExecutionProvider"])
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(quant_path)).graph.initializer}
    w_q, w_scale = stored["fc3_W_quantized"].astype(np.float64), stored["fc3_W_scale"].astype(np.float64)
    bias = numpy_helper.to_array(next(t for t in float_model.graph.initializer if t.name == "b3")).astype(np.float64)
    sums = dict(signal=0.0, noise=0.0, dot=0.0, power=0.0, own_noise=0.0)
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH]
        ref, a2 = (v.astype(np.float64) for v in float_session.run(["out", "a2"], {"x": batch}))
        got = quant_session.run(["out"], {"x": batch})[0].astype(np.float64)
        sums["signal"] += (ref ** 2).sum()
        sums["noise"] += ((ref - got) ** 2).sum()
        sums["dot"] += (ref * got).sum()
        sums["power"] += (got ** 2).sum()
        q, scale, zero_point = _dynamic_quantize_linear(a2.astype(np.float32))
        own = 0.5 * ((q - zero_point) @ w_q) * (scale * w_scale) + bias
        sums["own_noise"] += ((ref - own) ** 2).sum()
    report = layer_sensitivity(float_path, quant_path, mlps["data"], batch_size=BATCH)
    fc3 = next(t for t in report.tensors if t.nodes == ["fc3"])
    assert fc3.sqnr_db == pytest.approx(10 * math.log10(sums["signal"] / sums["noise"]), abs=0.01)
    assert fc3.cosine == pytest.approx(sums["dot"] / math.sqrt(sums["signal"] * sums["power"]), abs=1e-6)
    assert fc3.local_sqnr_db == pytest.approx(10 * math.log10(sums["signal"] / sums["own_noise"]), abs=0.01)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic_encoder")
    float_path = tiny_encoder(root / "enc.onnx")
    data = token_calib(root / "tok.npz", n=16)
    quant = root / "enc_dyn.onnx"
    quantize_onnx(float_path, quant, mode="dynamic", verify=False)
    return {"root": root, "float": float_path, "data": data, "quant": quant}


def test_memory_budget_does_not_change_the_numbers(encoder):
    """A budget so small that every layer output is its own chunk pairs the two streams the same
    way as one unbounded pass (shared Q/K/V input quantization and the int8 embedding included)."""
    tiny = layer_sensitivity(encoder["float"], encoder["quant"], encoder["data"], batch_size=8, memory_budget_mb=1e-4)
    whole = layer_sensitivity(encoder["float"], encoder["quant"], encoder["data"], batch_size=8,
                              memory_budget_mb=math.inf)
    assert [t.nodes[0] for t in whole.tensors] == ["/embed/Gather", "/v/MatMul", "/k/MatMul", "/q/MatMul",
                                                   "/out/MatMul", "/mlp/mlp.0/MatMul", "/mlp/mlp.2/MatMul"]
    for a, b in zip(tiny.tensors, whole.tensors):
        assert (a.tensor, a.sqnr_db, a.cosine, a.local_sqnr_db) == (b.tensor, b.sqnr_db, b.cosine, b.local_sqnr_db)
    embedding = whole.tensors[0]  # integer ids in: its accumulated error is its own
    assert embedding.sqnr_db == pytest.approx(embedding.local_sqnr_db)
    assert all(25 < t.sqnr_db < 80 and 0.999 < t.cosine <= 1 + 1e-9 for t in whole.tensors)


def test_outlier_split_ffn_is_compared_with_the_same_split_float_layer(tmp_path):
    """quantize --mode dynamic with calibration data splits FFN outlier channels off (their up
    projection columns and down projection rows move to a float branch): both int8 projections must
    be compared with the float main path, not with the unsplit layers (1-3 dB if they were)."""
    from test_onnx_outlier_split import _ffn, _inputs
    from torch import nn

    from lowbit.onnx.quantize import read_plan

    float_path = _ffn(tmp_path, nn.GELU())
    data = tmp_path / "x.npz"
    np.savez(data, x=_inputs(32))
    quant = tmp_path / "ffn_dyn.onnx"
    quantize_onnx(float_path, quant, mode="dynamic", calib=data, verify=False)
    assert read_plan(quant).settings["algorithms"].get("outlier_split")
    report = layer_sensitivity(float_path, quant, data, batch_size=16)
    assert not report.notes and not any(t.skipped for t in report.tensors)
    assert [t.nodes for t in report.tensors] == [["/up/MatMul"], ["/down/MatMul"]]
    assert all(t.sqnr_db > 30 and t.local_sqnr_db > 30 for t in report.tensors)


def test_cli_analyze_dynamic_with_sweep_and_report(encoder, capsys):
    root = encoder["root"]
    args = ["analyze", str(encoder["float"]), str(encoder["quant"]), "--data", str(encoder["data"]), "--batch-size", "8"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["sensitivity"]
    assert data["mode"] == "dynamic" and len(data["ranked"]) == 7 and not data["skipped"]
    assert data["ranked"][0]["sqnr_db"] <= data["ranked"][-1]["sqnr_db"]
    assert main([*args, "--sweep", "--time-limit", "120", "--report", str(root / "report")]) == 0
    out = capsys.readouterr().out
    assert "layer output" in out and "/mlp/mlp.2/MatMul_output_0" in out
    assert "quantize-only-this-layer sweep" in out
    markdown = (root / "report" / "report.md").read_text()
    assert "/mlp/mlp.2/MatMul_output_0" in markdown and "SQNR dB" in markdown
    assert (root / "report" / "report.html").exists()
