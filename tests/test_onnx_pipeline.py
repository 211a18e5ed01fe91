"""One static pipeline: one calibration serves every candidate, the passes' typed records replay,
and no copy of the sequence (or a private helper imported across modules) remains in lowbit/."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _onnx_quant_models import image_calib, small_cnn, tiny_encoder, token_calib
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.collect import collect_activation_stats
from lowbit.onnx.config import StaticConfig
from lowbit.onnx.passes import records_from_settings
from lowbit.onnx.passes.equalize import EqualizeRecord
from lowbit.onnx.pipeline import StaticPipeline, prepare_model
from lowbit.onnx.planner import ACTIVATION_SPEC
from lowbit.onnx.quantize import quantize_onnx, read_plan

ROOT = Path(__file__).resolve().parents[1] / "lowbit"


def _weights(path_or_model) -> dict[str, np.ndarray]:
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _pipeline(model_path: Path, calib: Path, **options) -> StaticPipeline:
    original = onnx.load(str(model_path))
    data = CalibrationData(str(calib), model_inputs(original))
    return StaticPipeline(prepare_model(original), StaticConfig(**options), data, batch_size=8).calibrate()


def test_candidates_from_one_calibration_equal_separate_runs(tmp_path):
    """build(per_channel=False / exclude=...) from one calibration == a full quantize_onnx run each."""
    model, calib = small_cnn(tmp_path / "m.onnx"), image_calib(tmp_path / "c.npz", n=16)
    pipeline = _pipeline(model, calib)
    for options in ({"per_channel": False}, {"exclude": ["/head/Gemm"]}, {"calib_method": "minmax"}):
        separate = quantize_onnx(model, tmp_path / "q.onnx", StaticConfig(**options), calib=calib, batch_size=8,
                                 verify=False)
        built = pipeline.build(per_channel=options.get("per_channel"), exclude=options.get("exclude", ()),
                               calib_method=options.get("calib_method"))
        assert built.plan.summary() == separate.plan.summary()
        expected, got = _weights(separate.output_path), _weights(built.model)
        assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)


def test_other_range_methods_come_from_the_same_observers(tmp_path):
    model, calib = small_cnn(tmp_path / "m.onnx"), image_calib(tmp_path / "c.npz", n=16)
    pipeline = _pipeline(model, calib)
    fresh = collect_activation_stats(pipeline.model, pipeline.planner.candidates(), pipeline.data, method="minmax",
                                     spec=ACTIVATION_SPEC, batch_size=8)
    reused = pipeline.stats_for("minmax")
    assert reused.ranges.keys() == fresh.ranges.keys()
    for name, (lo, hi) in fresh.ranges.items():  # running min/max: independent of how it was reached
        assert np.array_equal(reused.ranges[name][0], lo) and np.array_equal(reused.ranges[name][1], hi)


def test_stored_records_replay_the_rewrites(tmp_path):
    """Equalization and SmoothQuant read back as typed records and replayed on the float model give
    the stored model's rewritten weights."""
    cnn, images = small_cnn(tmp_path / "m.onnx"), image_calib(tmp_path / "c.npz", n=16)
    stored = quantize_onnx(cnn, tmp_path / "eq.onnx", StaticConfig(equalize=True, per_channel=False), calib=images,
                           batch_size=8, verify=False)
    records = records_from_settings(stored.plan.settings["algorithms"])
    assert [type(r) for r in records] == [EqualizeRecord] and records[0].chains
    enc, tokens = tiny_encoder(tmp_path / "e.onnx"), token_calib(tmp_path / "t.npz")
    smoothed = quantize_onnx(enc, tmp_path / "sm.onnx", StaticConfig(), calib=tokens, batch_size=8, verify=False)
    for path, source, data in ((tmp_path / "eq.onnx", cnn, images), (tmp_path / "sm.onnx", enc, tokens)):
        plan = read_plan(path)
        original = onnx.load(str(source))
        config = StaticConfig(per_channel=plan.settings["per_channel"])
        replayed = StaticPipeline.replay(prepare_model(original), config,
                                         records_from_settings(plan.settings["algorithms"]),
                                         CalibrationData(str(data), model_inputs(original)), batch_size=8)
        assert not replayed.mismatched
        rebuilt = _weights(replayed.build().model)
        written = _weights(path)
        assert rebuilt.keys() == written.keys()
        assert all(np.array_equal(rebuilt[k], written[k]) for k in written)
    assert smoothed.plan.settings["algorithms"]["smoothquant"]


def _sources() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for p in ROOT.rglob("*.py")}


def test_the_preparation_sequence_lives_in_one_place():
    offenders = [str(p.relative_to(ROOT)) for p, tree in _sources().items() if p.name != "pipeline.py"
                 and any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) == "preprocess"
                         for n in ast.walk(tree))]
    assert offenders == []


@pytest.mark.parametrize("package", sorted(p.name for p in ROOT.iterdir()
                                            if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py")))
def test_no_private_name_crosses_modules(package):
    """Shared helpers are public in the module that owns them: no package of lowbit imports a private name."""
    target = ROOT / package
    files = [target] if target.is_file() else list(target.rglob("*.py"))
    crossing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowbit"):
                crossing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []


def test_weight_spread_skips_constant_operands_of_elementwise_ops(tmp_path):
    """A BatchNorm exported as Mul/Add with (1, C, 1, 1) constants (captcha CRNN, PaddleOCR det) has
    int8 constants without a per-channel weight axis: the spread is about Conv/Gemm/MatMul weights."""
    from onnx import TensorProto, helper

    from lowbit.onnx.pipeline import weight_channel_spread

    conv_w = np.ones((4, 3, 3, 3), np.float32)
    conv_w[1] *= 50.0  # channel peaks 1 and 50: spread 50
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "gamma"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "beta"], ["a"], name="bn_add"),
             helper.make_node("Conv", ["a", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(conv_w, "w"),
             numpy_helper.from_array(np.linspace(0.5, 2, 3, dtype=np.float32).reshape(1, 3, 1, 1), "gamma"),
             numpy_helper.from_array(np.linspace(-1, 1, 3, dtype=np.float32).reshape(1, 3, 1, 1), "beta")]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], inits)
    path = tmp_path / "bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    pipeline = _pipeline(path, tmp_path / "calib.npz")
    plan = pipeline.build().plan
    assert {e.nodes[0] for e in plan.quantized("weight")} > {"conv"}  # the Mul/Add constants are int8 too
    assert weight_channel_spread(pipeline.model, plan) == {"conv": pytest.approx(50.0)}


def test_equalized_calibration_measures_only_what_equalization_rescales(tmp_path, monkeypatch):
    """--mode auto's second calibration (equalized graph) reuses the plain one for every tensor
    equalization leaves unchanged: ranges and bias correction's channel means equal those of a
    full calibration of the equalized graph, yet only the rescaled tensors are measured."""
    import lowbit.onnx.pipeline as pipeline_module

    path, calib = small_cnn(tmp_path / "m.onnx"), image_calib(tmp_path / "c.npz", n=16)
    original = onnx.load(str(path))
    model, data = prepare_model(original), CalibrationData(str(calib), model_inputs(original))
    config = StaticConfig(calib_method="minmax", equalize=True)
    plain = StaticPipeline(model, StaticConfig(calib_method="minmax"), data, batch_size=8).calibrate(
        built=("bias_correction",))
    full = StaticPipeline(model, config, data, batch_size=8).calibrate(built=("bias_correction",))
    measured = []
    real = pipeline_module.collect_activation_stats
    monkeypatch.setattr(pipeline_module, "collect_activation_stats",
                        lambda m, tensors, *a, **k: measured.extend(tensors) or real(m, tensors, *a, **k))
    reused = StaticPipeline(model, config, data, batch_size=8).calibrate(built=("bias_correction",), reuse=plain)
    rescaled = reused.records[0].rescaled(reused.model)
    assert measured and set(measured) <= set(rescaled) and len(measured) < len(full.stats.ranges)
    assert reused.stats.ranges.keys() == full.stats.ranges.keys()
    for name, (lo, hi) in full.stats.ranges.items():
        np.testing.assert_allclose(reused.stats.ranges[name][0], lo, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(reused.stats.ranges[name][1], hi, rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(not np.allclose(plain.stats.ranges[t][1], full.stats.ranges[t][1]) for t in measured)
    full_means = full._built_stats["bias_correction"]
    means = reused._built_stats["bias_correction"]
    assert means.keys() == full_means.keys()
    for name, value in full_means.items():
        np.testing.assert_allclose(means[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # A pipeline that calibrated differently (another range method) is not reused.
    other = StaticPipeline(model, StaticConfig(), data, batch_size=8).calibrate()
    assert StaticPipeline(model, config, data, batch_size=8).changed_tensors(other) is None


def test_conv_input_channel_peaks_measured_along_the_calibration_equal_a_pass_of_their_own(tmp_path):
    """--mode auto reads the Conv inputs' channel spreads (whether equalization is worth a trial)
    from the calibration pass: the first 4 samples of its first batch, as the separate pass over
    one batch of 4 measured them."""
    from lowbit.onnx.pipeline import FirstRows, activation_channel_spread, channel_spreads, input_channel_peaks

    model = prepare_model(onnx.load(str(small_cnn(tmp_path / "cnn.onnx"))))
    data = CalibrationData(str(image_calib(tmp_path / "calib.npz", n=32)), model_inputs(model))
    peaks = FirstRows(input_channel_peaks(model), 4)
    StaticPipeline(model, StaticConfig(), data, batch_size=16).calibrate(also=(peaks,))
    along, alone = channel_spreads(peaks.reducer), activation_channel_spread(model, data, batch_size=4)
    assert len(along) >= 2 and along.keys() == alone.keys() and max(alone.values()) > 1.0
    for name, spread in alone.items():
        assert along[name] == pytest.approx(spread, rel=1e-5)
    everything = FirstRows(input_channel_peaks(model), None)  # rows None: the whole first batch (16)
    StaticPipeline(model, StaticConfig(), data, batch_size=16).calibrate(also=(everything,))
    assert channel_spreads(everything.reducer) == pytest.approx(activation_channel_spread(model, data, batch_size=16),
                                                                rel=1e-5)
