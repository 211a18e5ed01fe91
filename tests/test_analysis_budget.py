"""Accuracy-budget search: falls back exactly the damaging layer (to the cheapest precision that meets the
budget), groups shared-input layers, chooses ranges per unit, says so when a budget is impossible."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import image_calib, outlier_cnn, tiny_encoder, token_calib
from lowbit.search.budget import _fallback_units, search_precision
from lowbit.search.budget_weights import search_weight_precision
from lowbit.analysis.macs import layer_macs
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.onnx.io import load_model
from lowbit.onnx.planner import StaticPlanner, node_names
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import ensure_opset
from lowbit.onnx.quantize import read_plan

OUTLIER_LAYER = "/conv/conv.0/Conv"


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """SmallCNN whose 3x3 Conv has one weight 200x its largest: per-tensor int8 zeroes the rest."""
    root = tmp_path_factory.mktemp("budget")
    path = outlier_cnn(root / "outlier.onnx")
    return {"root": root, "float": path, "calib": image_calib(root / "calib.npz", n=24)}


def test_budget_met_by_falling_back_exactly_the_outlier_layer(outlier):
    out = outlier["root"] / "met.onnx"
    before = outlier["float"].read_bytes()
    result = search_precision(outlier["float"], out, calib=outlier["calib"], max_drop=0.002, per_channel=False,
                              batch_size=8, measure_speed=False)
    assert result.met and result.excluded == [OUTLIER_LAYER]
    assert result.trials[0].stage == "all int8" and not result.trials[0].met  # the budget needed a fallback
    assert result.layers[0].node == OUTLIER_LAYER  # ranked most sensitive
    assert result.report.outputs[0].cosine_mean >= 1 - 0.002  # re-measured independently on the saved file
    plan = read_plan(out)
    assert OUTLIER_LAYER in plan.float_nodes and plan.settings["budget"]["met"] is True
    assert {n for e in plan.quantized("weight") for n in e.nodes} == {l.node for l in result.layers} - {OUTLIER_LAYER}
    # MAC-weighted int8 share: every layer but the outlier's, from independently computed MACs.
    macs = {l.node: l.macs for l in result.layers}
    assert result.int8_mac_fraction == pytest.approx(1 - macs[OUTLIER_LAYER] / sum(macs.values()))
    assert outlier["float"].read_bytes() == before


def test_macs_match_hand_counts(outlier):
    model = preprocess(ensure_opset(load_model(outlier["float"])))
    node_names(model)
    feed = {"image": np.zeros((1, 3, 32, 32), np.float32)}
    macs = layer_macs(model, [OUTLIER_LAYER, "/head/Gemm", "/stem/stem.0/Conv", "/depthwise/depthwise.0/Conv"], feed)
    assert macs[OUTLIER_LAYER] == 16 * 16 * 32 * (16 * 9)  # 16x16 output after pooling, 32 channels, 16x3x3 kernel
    assert macs["/head/Gemm"] == 32 * 10
    assert macs["/stem/stem.0/Conv"] == 32 * 32 * 16 * (3 * 9)
    assert macs["/depthwise/depthwise.0/Conv"] == 32 * 32 * 16 * 9  # one input channel per group


def test_impossible_budget_saves_best_model_and_says_so(outlier, capsys):
    """A user evaluate that scores every quantized model 0: the budget cannot be met."""
    calls = []

    def evaluate(path: str) -> float:
        calls.append(path)
        return 1.0 if path == str(outlier["float"]) else 0.0

    out = outlier["root"] / "unmet.onnx"
    result = search_precision(outlier["float"], out, calib=outlier["calib"], max_drop=0.01, evaluate=evaluate,
                              per_channel=False, batch_size=8, measure_speed=False)
    assert calls[0] == str(outlier["float"]) and len(calls) == len(result.trials) + 1
    assert not result.met and result.drop == pytest.approx(1.0) and out.exists()
    assert "NOT met" in result.summary() and any("NOT met" in w for w in result.warnings)
    assert result.metric == "user evaluate" and read_plan(out).settings["budget"]["met"] is False

    cli_out = outlier["root"] / "cli.onnx"
    assert main(["quantize", str(outlier["float"]), "-o", str(cli_out), "--mode", "static", "--calib",
                 str(outlier["calib"]), "--per-tensor", "--batch-size", "8", "--max-drop", "0.002", "--no-speed", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["met"] is True and data["excluded"] == [OUTLIER_LAYER] and cli_out.exists()


def test_user_errors(outlier, tmp_path, capsys):
    with pytest.raises(LowbitError, match="unknown metric"):
        search_precision(outlier["float"], tmp_path / "a.onnx", calib=outlier["calib"], max_drop=0.01, metric="f1")
    with pytest.raises(LowbitError, match="non-negative"):
        search_precision(outlier["float"], tmp_path / "a.onnx", calib=outlier["calib"], max_drop=-1)
    code = main(["quantize", str(outlier["float"]), "-o", str(tmp_path / "b.onnx"), "--mode", "dynamic",
                 "--max-drop", "0.01"])
    err = capsys.readouterr().err
    assert code != 0 and "--mode static" in err and "Traceback" not in err
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


# ----------------------------------------------------------------------------- graphs built for one behaviour each

def _save(nodes, inputs, outputs, weights: dict, path) -> str:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return str(path)


def _cosine(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    return float(np.mean((ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-30)))


def _run(path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_attention_projections_fall_back_as_one_unit(tmp_path):
    """Q, K and V read one quantized activation: they form one unit, and no candidate splits it."""
    path, calib = tiny_encoder(tmp_path / "enc.onnx"), token_calib(tmp_path / "tok.npz")
    model = preprocess(ensure_opset(load_model(path)))
    node_names(model)
    names = [n for n, rule in StaticPlanner(model).active.items() if rule.kind == "compute"]
    weights = {t.name for t in model.graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            readers.setdefault(node.input[0], []).append(node.name)
    qkv = next(group for group in readers.values() if len(group) == 3)
    units = _fallback_units(model, names)
    unit_of = {n: u for u, members in units.items() for n in members}
    assert len({unit_of[n] for n in qkv}) == 1 and len(units[unit_of[qkv[0]]]) == 3
    assert len(units) > 2  # the rest (output projection, MLP, attention products) are units of their own
    result = search_precision(path, tmp_path / "q.onnx", calib=calib, max_drop=0.0, batch_size=16,
                              measure_speed=False, time_limit=20)
    for trial in result.trials:
        assert len(set(qkv) & set(trial.excluded)) in (0, 3), trial


def test_range_method_is_chosen_per_unit(tmp_path):
    """x1 carries rare large values that matter (entropy clips them, min/max keeps them); x2 has one
    irrelevant glitch (min/max would coarsen its grid 300x). Only x1 should switch to min/max."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((2, 64, 8)).astype(np.float32)
    path = _save([helper.make_node("MatMul", ["x1", "w1"], ["out1"], name="spiky"),
                  helper.make_node("MatMul", ["x2", "w2"], ["out2"], name="glitch")],
                 [("x1", ["batch", 64]), ("x2", ["batch", 64])], [("out1", ["batch", 8]), ("out2", ["batch", 8])],
                 {"w1": w1, "w2": w2}, tmp_path / "two.onnx")
    x1, x2 = rng.standard_normal((2, 64, 64)).astype(np.float32)
    x1[np.arange(0, 64, 8), rng.integers(0, 64, 8)] = 40.0
    x2[3, 5] = 300.0
    np.savez(tmp_path / "two.npz", x1=x1, x2=x2)
    result = search_precision(path, tmp_path / "q.onnx", calib=tmp_path / "two.npz", max_drop=0.005,
                              calib_method="entropy", measure_speed=False)
    assert not result.trials[0].met and result.met and result.excluded == []  # met without any fallback
    minmax = read_plan(tmp_path / "q.onnx").settings["algorithms"]["minmax_ranges"]
    assert "x1" in minmax and "x2" not in minmax
    got = _run(tmp_path / "q.onnx", {"x1": x1, "x2": x2})
    assert min(_cosine(x1 @ w1, got[0]), _cosine(x2 @ w2, got[1])) >= 1 - 0.005


def test_elementwise_stage_keeps_a_cancelling_add_float(tmp_path):
    """y = -x + s: an int8 Add rounds x and y on a grid 100x coarser than s, so only a float Add (not
    any Conv fallback) meets the budget."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    path = _save([helper.make_node("Add", ["x", "y"], ["s"], name="cancel"),
                  helper.make_node("Conv", ["s", "w"], ["out"], name="conv", pads=[1, 1, 1, 1])],
                 [("x", ["batch", 4, 8, 8]), ("y", ["batch", 4, 8, 8])], [("out", ["batch", 4, 8, 8])],
                 {"w": weight}, tmp_path / "add.onnx")
    x = (100 * rng.standard_normal((16, 4, 8, 8))).astype(np.float32)
    s = rng.standard_normal((16, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "add.npz", x=x, y=(s - x).astype(np.float32))
    result = search_precision(path, tmp_path / "q.onnx", calib=tmp_path / "add.npz", max_drop=0.01,
                              measure_speed=False)
    assert not result.trials[0].met and result.met and result.excluded == []
    plan = read_plan(tmp_path / "q.onnx")
    assert plan.settings["algorithms"]["elementwise_float"] == ["cancel"]
    assert "conv" in {n for e in plan.quantized("weight") for n in e.nodes}  # the Conv stayed int8


def test_int16_step_when_it_meets_the_budget(outlier, tmp_path):
    """The outlier Conv: int8 per-tensor zeroes its weights, int16 keeps them; the ladder stops at int16."""
    out = tmp_path / "i16.onnx"
    result = search_precision(outlier["float"], out, calib=outlier["calib"], max_drop=0.002, per_channel=False,
                              batch_size=8, measure_speed=False, fallback=("int16", "float"))
    assert result.met and result.precision == {OUTLIER_LAYER: "int16"} and result.excluded == [OUTLIER_LAYER]
    assert result.layer_precision(OUTLIER_LAYER) == "int16" and result.layer_precision("/head/Gemm") == "int8"
    assert "(int16)" in result.summary()
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == OUTLIER_LAYER)
    dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    assert inits[dq.input[0]].data_type == TensorProto.INT16 and model.opset_import[0].version >= 21
    float_weight = numpy_helper.to_array(next(t for t in onnx.load(str(outlier["float"])).graph.initializer
                                              if t.name == "conv.0.weight"))
    scale = float(numpy_helper.to_array(inits[dq.input[1]]))
    assert scale == pytest.approx(np.abs(float_weight).max() / 32767, rel=1e-6)  # symmetric int16, per tensor
    assert any(n.op_type == "QuantizeLinear" and inits[n.input[2]].data_type == TensorProto.INT16
               for n in model.graph.node)  # its activations too
    images = np.load(outlier["calib"])["image"]
    assert _cosine(_run(outlier["float"], {"image": images})[0], _run(out, {"image": images})[0]) >= 1 - 0.002
    assert read_plan(out).settings["budget"]["precision"] == {OUTLIER_LAYER: "int16"}


@pytest.fixture(scope="module")
def three_matmuls(tmp_path_factory):
    """Three MatMuls reading an input whose feature 0 is always 0. Each weight column has an outlier
    in row 0 (so it never reaches the output) of 1x (plain), 8x (int4 zeroes the rest, int8 does not)
    and 2000x (int8 zeroes the rest too) the other weights."""
    root = tmp_path_factory.mktemp("weights")
    rng = np.random.default_rng(0)
    weights = {}
    for name, ratio in (("plain", 1.0), ("needs8", 8.0), ("needsfloat", 2000.0)):
        w = rng.uniform(-1, 1, (32, 32)).astype(np.float32)
        w[0] = ratio
        weights[name] = w
    nodes = [helper.make_node("MatMul", ["x", name], [f"out_{name}"], name=name) for name in weights]
    path = _save(nodes, [("x", ["batch", 32])], [(f"out_{n}", ["batch", 32]) for n in weights], weights,
                 root / "three.onnx")
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, 0] = 0
    np.savez(root / "x.npz", x=x)
    return {"root": root, "float": path, "data": root / "x.npz", "x": x, "weights": weights}


def test_weight_only_falls_back_int4_to_int8_to_float(three_matmuls):
    out = three_matmuls["root"] / "wo.onnx"
    result = search_weight_precision(three_matmuls["float"], out, eval_data=three_matmuls["data"], max_drop=0.01,
                                     bits=4, group_size=-1, algo="rtn", measure_speed=False)
    assert result.met and result.precision == {"needs8": "int8", "needsfloat": "float"}
    assert result.start == "int4" and result.layer_precision("plain") == "int4"
    assert result.int8_mac_fraction == pytest.approx(1 / 3)  # share of MACs still at int4
    model = onnx.load(str(out))
    kinds = {n.name: (n.op_type, {a.name: a.i for a in n.attribute}.get("bits")) for n in model.graph.node}
    assert kinds == {"plain_MatMulNBits": ("MatMulNBits", 4), "needs8_MatMulNBits": ("MatMulNBits", 8),
                     "needsfloat": ("MatMul", None)}
    got = _run(out, {"x": three_matmuls["x"]})
    refs = [three_matmuls["x"] @ w for w in three_matmuls["weights"].values()]
    assert min(_cosine(r, g) for r, g in zip(refs, got)) >= 1 - 0.01
    plan = read_plan(out)
    assert plan.float_nodes["needsfloat"].startswith("fell back") and plan.get("needs8").spec.dtype == "int8"


def test_weight_only_budget_from_the_cli(three_matmuls, capsys):
    out = three_matmuls["root"] / "cli.onnx"
    assert main(["quantize", three_matmuls["float"], "-o", str(out), "--mode", "weight-only", "--algo", "rtn",
                 "--group-size", "0", "--eval", str(three_matmuls["data"]), "--max-drop", "0.01",
                 "--fallback", "float", "--no-speed", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["met"] and data["precision"] == {"needs8": "float", "needsfloat": "float"}


def test_fallback_errors(outlier, three_matmuls, tmp_path, capsys):
    with pytest.raises(LowbitError, match="fallback"):
        search_precision(outlier["float"], tmp_path / "a.onnx", calib=outlier["calib"], max_drop=0.01,
                         fallback="int4")
    with pytest.raises(LowbitError, match="--fallback float"):
        search_weight_precision(three_matmuls["float"], tmp_path / "a.onnx", eval_data=three_matmuls["data"],
                                max_drop=0.01, bits=8, fallback="int8")
    code = main(["quantize", str(outlier["float"]), "-o", str(tmp_path / "b.onnx"), "--calib", str(outlier["calib"]),
                 "--max-drop", "0.01", "--fallback", "int16,fp8"])
    err = capsys.readouterr().err
    assert code != 0 and "fallback" in err and "Traceback" not in err
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_weight_only_budget_rounds_embedding_tables_like_weight_only_mode(tmp_path):
    """--max-drop with --mode weight-only stores the same GatherBlockQuantized tables as the plain mode."""
    from lowbit.onnx.config import WeightOnlyConfig
    from lowbit.onnx.quantize import quantize_onnx

    float_path = tiny_encoder(tmp_path / "enc.onnx")
    data = token_calib(tmp_path / "tokens.npz")
    plain, searched, kept = tmp_path / "plain.onnx", tmp_path / "searched.onnx", tmp_path / "kept.onnx"
    quantize_onnx(float_path, plain, WeightOnlyConfig(bits=4, group_size=32, embedding_bits=8), verify=False)
    result = search_weight_precision(float_path, searched, eval_data=data, max_drop=1.0, bits=4, group_size=32,
                                     measure_speed=False)
    assert result.met

    def tables(path):
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.name: [inits[i] for i in n.input if i in inits] for n in model.graph.node
                if n.op_type == "GatherBlockQuantized"}

    expected, got = tables(plain), tables(searched)
    assert expected and expected.keys() == got.keys()
    for node, arrays in expected.items():
        for a, b in zip(arrays, got[node]):
            np.testing.assert_array_equal(a, b)
    assert read_plan(searched).settings["weight_only"]["embedding_tables"] == read_plan(plain).settings[
        "weight_only"]["embedding_tables"] == ["/embed/Gather"]
    search_weight_precision(float_path, kept, eval_data=data, max_drop=1.0, bits=4, group_size=32,
                            measure_speed=False, embedding_bits=0)
    assert not tables(kept) and "Gather" in {n.op_type for n in onnx.load(str(kept)).graph.node}
