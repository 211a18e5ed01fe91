"""Per-layer sweeps ("quantize only this layer", "all but this layer") against independent
quantize_onnx + compare_models runs on ONNX Runtime."""

from __future__ import annotations

import json

import onnx
import pytest

import lowbit.onnx.pipeline as pipeline_module
from _onnx_quant_models import image_calib, outlier_cnn, tiny_encoder, token_calib
from lowbit.search.sweep import all_but_sweep, layer_sweeps, quantize_only_sweep
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.planner import node_names
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import ensure_opset
from lowbit.onnx.quantize import quantize_onnx
from lowbit.onnx.verify import compare_models

FRAGILE = "/conv/conv.0/Conv"


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """SmallCNN whose conv.0 weight has one huge outlier, quantized per-tensor: int8 zeroes that
    layer's other weights, so keeping it float must recover most of the lost cosine."""
    root = tmp_path_factory.mktemp("sweep")
    float_path = outlier_cnn(root / "outlier.onnx")
    calib = image_calib(root / "calib.npz", n=24)
    quant = root / "outlier_int8.onnx"
    quantize_onnx(float_path, quant, calib=calib, per_channel=False, batch_size=8, verify=False)
    return {"root": root, "float": float_path, "calib": calib, "quant": quant}


def _cosine_via_quantize_onnx(fragile, out_name: str, **options) -> tuple[float, float | None]:
    """Worst output's mean cosine (and top-1 agreement) of a model written by the public API."""
    out = fragile["root"] / out_name
    quantize_onnx(fragile["float"], out, calib=fragile["calib"], per_channel=False, batch_size=8, verify=False,
                  smooth=False, **options)
    report = compare_models(fragile["float"], out, CalibrationData(fragile["calib"], onnx.load(str(fragile["float"]))),
                            batch_size=8, speed=False)
    worst = min(report.outputs, key=lambda o: o.cosine_mean)
    return worst.cosine_mean, worst.top1_agreement


def test_all_but_ranks_the_fragile_layer_first_and_matches_quantize_onnx(fragile):
    sweep = all_but_sweep(fragile["float"], fragile["quant"], calib=fragile["calib"], batch_size=8, time_limit=120)
    assert sweep.kind == "all-but" and len(sweep.results) == 5 and not sweep.not_reached and not sweep.notes
    assert all(r.quantized_weights == 4 for r in sweep.results)  # every weight but the layer's own
    ranked = sweep.ranked()
    assert ranked[0].node == FRAGILE
    assert ranked[0].recovery > 0.02 and ranked[0].recovery > 20 * max(abs(r.recovery) for r in ranked[1:])
    assert [r.recovery for r in ranked] == sorted((r.recovery for r in ranked), reverse=True)

    everything, everything_top1 = _cosine_via_quantize_onnx(fragile, "all.onnx")
    assert sweep.baseline.cosine == pytest.approx(everything, abs=1e-6)
    assert sweep.full_model_cosine == pytest.approx(everything, abs=1e-6)  # the stored model is that model
    for result in (ranked[0], ranked[-1]):
        without, without_top1 = _cosine_via_quantize_onnx(fragile, "but.onnx", exclude=[result.node])
        assert result.cosine == pytest.approx(without, abs=1e-6)
        assert result.recovery == pytest.approx(without - everything, abs=1e-6)
        assert result.top1_recovery == pytest.approx(without_top1 - everything_top1, abs=1e-9)
    text = sweep.text()
    assert text.splitlines()[0].startswith("all-but-this-layer sweep")
    assert text.index(FRAGILE) < text.index("/head/Gemm") and f"{ranked[0].recovery:+.5f}" in text


def test_solo_variant_matches_quantize_onnx_with_every_other_node_excluded(fragile):
    sweep = quantize_only_sweep(fragile["float"], fragile["quant"], calib=fragile["calib"], batch_size=8)
    worst = sweep.ranked()[0]
    assert worst.node == FRAGILE and worst.recovery is None and sweep.baseline is None
    reference = preprocess(ensure_opset(onnx.load(str(fragile["float"]))))  # the graph quantize_onnx plans on
    node_names(reference)
    others = [n.name for n in reference.graph.node if n.name != FRAGILE]
    alone, _ = _cosine_via_quantize_onnx(fragile, "solo.onnx", exclude=others)
    assert worst.cosine == pytest.approx(alone, abs=1e-6)


def test_both_sweeps_share_one_calibration(fragile, monkeypatch):
    calls = []
    real = pipeline_module.collect_activation_stats
    monkeypatch.setattr(pipeline_module, "collect_activation_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    reports = layer_sweeps(fragile["float"], fragile["quant"], ("solo", "all-but"), calib=fragile["calib"],
                           batch_size=8)
    assert len(calls) == 1
    assert reports["solo"].ranked()[0].node == reports["all-but"].ranked()[0].node == FRAGILE
    with pytest.raises(LowbitError, match="unknown sweep"):
        layer_sweeps(fragile["float"], fragile["quant"], ("every",), calib=fragile["calib"])


def test_stored_exclusions_and_ranges_are_replayed(fragile):
    """A layer the user kept float stays float in every variant, and the sweep's baseline is the
    stored model even when the sweep calibrates with another batch size."""
    quant = fragile["root"] / "no_head.onnx"
    result = quantize_onnx(fragile["float"], quant, calib=fragile["calib"], per_channel=False, batch_size=8,
                           exclude=["/head/Gemm"], measure_speed=False)
    sweep = all_but_sweep(fragile["float"], quant, calib=fragile["calib"], batch_size=5)
    assert "/head/Gemm" not in {r.node for r in sweep.results} and len(sweep.results) == 4
    stored = min(o.cosine_mean for o in result.report.outputs)
    assert sweep.baseline.cosine == pytest.approx(stored, abs=1e-6)
    assert sweep.full_model_cosine == pytest.approx(stored, abs=1e-6)


def test_equalization_and_smoothquant_are_replayed(fragile, tmp_path):
    """Both rewrites are exact in float: the sweep rebuilds them, so its fully quantized variant
    is the stored model and every recovery is measured against the model as deployed."""
    equalized = tmp_path / "eq.onnx"
    stored = quantize_onnx(fragile["float"], equalized, calib=fragile["calib"], batch_size=8, equalize=True,
                           measure_speed=False)
    assert stored.plan.settings["algorithms"]["equalized_chains"]
    sweep = all_but_sweep(fragile["float"], equalized, calib=fragile["calib"], batch_size=8, time_limit=1e-3)
    assert not sweep.notes
    assert sweep.baseline.cosine == pytest.approx(min(o.cosine_mean for o in stored.report.outputs), abs=1e-6)

    float_path = tiny_encoder(tmp_path / "enc.onnx")
    data = token_calib(tmp_path / "tok.npz", n=8)
    smoothed = tmp_path / "enc_smooth.onnx"
    with pytest.warns(Warning):  # -inf attention-mask values are reported by calibration
        stored = quantize_onnx(float_path, smoothed, calib=data, batch_size=4, smooth=True, measure_speed=False)
    assert stored.plan.settings["algorithms"]["smoothquant"]
    with pytest.warns(Warning):
        sweep = all_but_sweep(float_path, smoothed, calib=data, batch_size=4)
    assert not sweep.notes and len(sweep.results) == 7
    assert sweep.baseline.cosine == pytest.approx(min(o.cosine_mean for o in stored.report.outputs), abs=1e-6)
    # Outside the smoothed groups, "stored model with this layer float" is what quantize_onnx writes
    # when told to exclude it (inside them, excluding would also change the group's smoothing scales).
    grouped = {n for g in stored.plan.settings["algorithms"]["smoothquant"] for n in g["nodes"]}
    best = next(r for r in sweep.ranked() if r.node not in grouped)
    without = tmp_path / "without.onnx"
    with pytest.warns(Warning):
        result = quantize_onnx(float_path, without, calib=data, batch_size=4, smooth=True, exclude=[best.node],
                               measure_speed=False)
    assert best.cosine == pytest.approx(result.report.outputs[0].cosine_mean, abs=1e-6)


def test_dynamic_all_but_sweep_on_a_transformer(tmp_path):
    float_path = tiny_encoder(tmp_path / "enc.onnx")
    data = token_calib(tmp_path / "tok.npz", n=8)
    quant = tmp_path / "enc_dyn.onnx"
    quantize_onnx(float_path, quant, mode="dynamic", verify=False)
    sweep = all_but_sweep(float_path, quant, calib=None, eval_data=data, batch_size=4)
    assert len(sweep.results) == 7  # the embedding table, q, k, v, out and the two MLP MatMuls
    assert sweep.baseline.top1_agreement is None and all(r.top1_recovery is None for r in sweep.results)
    assert sweep.baseline.cosine == pytest.approx(sweep.full_model_cosine, abs=1e-9)
    best = sweep.ranked()[0]
    without = tmp_path / "without.onnx"
    result = quantize_onnx(float_path, without, mode="dynamic", exclude=[best.node], eval_data=data, batch_size=4,
                           measure_speed=False)
    assert best.cosine == pytest.approx(result.report.outputs[0].cosine_mean, abs=1e-6)


def test_time_limit_and_user_errors(fragile, tmp_path):
    limited = all_but_sweep(fragile["float"], fragile["quant"], calib=fragile["calib"], batch_size=8, time_limit=1e-3)
    assert limited.results == [] and len(limited.not_reached) == 5 and "time limit" in limited.text()
    with pytest.raises(LowbitError, match="time-limit"):
        all_but_sweep(fragile["float"], fragile["quant"], calib=fragile["calib"], time_limit=0)
    fp16 = tmp_path / "fp16.onnx"
    quantize_onnx(fragile["float"], fp16, mode="fp16", verify=False)
    with pytest.raises(LowbitError, match="fp16 mode"):
        all_but_sweep(fragile["float"], fp16, calib=fragile["calib"])


def test_cli_sweep_choices(fragile, capsys):
    args = ["analyze", str(fragile["float"]), str(fragile["quant"]), "--data", str(fragile["calib"]),
            "--batch-size", "8"]
    assert main([*args, "--sweep", "all-but"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("all-but-this-layer sweep"):].splitlines()
    assert "quantize-only-this-layer" not in out
    assert "recovery" in table[3] and table[4].split()[0] == FRAGILE  # title, two baselines, header, best

    assert main([*args, "--sweep", "--json"]) == 0  # a bare --sweep is the solo sweep, as before
    data = json.loads(capsys.readouterr().out)
    assert data["sweep"]["kind"] == "solo" and data["all_but_sweep"] is None

    assert main([*args, "--sweep", "both", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sweep"]["ranked"][0]["node"] == data["all_but_sweep"]["ranked"][0]["node"] == FRAGILE
    assert data["all_but_sweep"]["ranked"][0]["recovery"] > 0.02

    assert main([*args, "--sweep", "some"]) == 2
    assert "invalid choice" in capsys.readouterr().err
