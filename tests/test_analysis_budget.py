"""Accuracy-budget search: falls back exactly the damaging layer, says so when a budget is impossible."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _onnx_quant_models import image_calib, small_cnn
from lowbit.analysis.budget import search_precision
from lowbit.analysis.macs import layer_macs
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.onnx.io import load_model
from lowbit.onnx.planner import node_names
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import ensure_opset
from lowbit.onnx.quantize import read_plan

OUTLIER_LAYER = "/conv/conv.0/Conv"


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """SmallCNN whose 3x3 Conv has one weight 200x its largest: per-tensor int8 zeroes the rest."""
    root = tmp_path_factory.mktemp("budget")
    model = onnx.load(str(small_cnn(root / "cnn.onnx")))
    weight = next(t for t in model.graph.initializer if t.name == "conv.0.weight")
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = 200 * np.abs(values).max()
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    path = root / "outlier.onnx"
    onnx.save(model, str(path))
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
    assert main(["quantize", str(outlier["float"]), "-o", str(cli_out), "--calib", str(outlier["calib"]),
                 "--per-tensor", "--batch-size", "8", "--max-drop", "0.002", "--no-speed", "--json"]) == 0
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
