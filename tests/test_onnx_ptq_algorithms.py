"""The ONNX side of SmoothQuant, equalization, bias correction and bounded calibration memory."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import tiny_encoder, token_calib
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import collect_activation_stats
from lowbit.onnx.equalize import equalize_model, find_chains
from lowbit.onnx.planner import ACTIVATION_SPEC, StaticPlanner, node_names
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.onnx.smooth import apply_smoothing, channel_absmax, smoothing_groups


def run(model, feed):
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(payload, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def conv_chain(path, *, relu6: bool = False, seed: int = 0):
    """Conv 1x1 (3->8) -> act -> depthwise 3x3 -> act -> Conv 1x1 (8->4) -> GAP -> Flatten, with
    channel ranges spread over three orders of magnitude (like folded BatchNorm in MobileNet)."""
    rng = np.random.default_rng(seed)
    def spread(shape, low=-2, high=1):
        return rng.standard_normal(shape) * np.logspace(low, high, shape[0]).reshape(-1, *[1] * (len(shape) - 1))

    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", spread((8, 3, 1, 1), 0, -1)), ("b1", rng.standard_normal(8) * 0.5), ("w2", spread((8, 1, 3, 3))),
        ("b2", rng.standard_normal(8) * 0.5), ("w3", rng.standard_normal((4, 8, 1, 1))), ("b3", rng.standard_normal(4)),
        *([("lo", np.array(0.0)), ("hi", np.array(6.0))] if relu6 else [])]]

    def act(i, o):
        return helper.make_node("Clip", [i, "lo", "hi"], [o]) if relu6 else helper.make_node("Relu", [i], [o])

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]), act("c1", "a1"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], group=8, pads=[1, 1, 1, 1]), act("c2", "a2"),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"]), helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
             helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what the installed ONNX Runtime reads
    onnx.save(model, str(path))
    return path


def images(n=32, seed=1):
    return {"x": (np.random.default_rng(seed).standard_normal((n, 3, 8, 8)) + 0.5).astype(np.float32)}


def test_equalization_keeps_a_relu_chain_identical(tmp_path):
    model = onnx.load(str(conv_chain(tmp_path / "c.onnx")))
    equalized, report = equalize_model(model)
    assert report.chains == [[n.name for n in model.graph.node if n.op_type == "Conv"]]
    x = images()
    np.testing.assert_allclose(run(equalized, x), run(model, x), rtol=1e-4, atol=1e-4)
    w2_before = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))
    w2_after = numpy_helper.to_array(next(t for t in equalized.graph.initializer if t.name.startswith("w2")))
    spread = lambda w: np.abs(w).reshape(8, -1).max(1).max() / np.abs(w).reshape(8, -1).max(1).min()  # noqa: E731
    assert spread(w2_after) < spread(w2_before) / 10


def test_equalization_turns_relu6_into_relu_on_equalized_links(tmp_path):
    model = onnx.load(str(conv_chain(tmp_path / "c6.onnx", relu6=True)))
    for node in model.graph.node:
        node.name = node.name or f"{node.op_type}_{list(node.output)[0]}"
    equalized, report = equalize_model(model)
    assert len(report.relu6_replaced) == 2
    assert "Clip" not in [n.op_type for n in equalized.graph.node]
    # Exactly the float net with ReLU instead of ReLU6.
    relu_version = onnx.load(str(conv_chain(tmp_path / "c.onnx")))
    x = images()
    np.testing.assert_allclose(run(equalized, x), run(relu_version, x), rtol=1e-4, atol=1e-4)
    assert find_chains(equalized, skip={report.chains[0][1]}) != find_chains(equalized)  # skip is honoured


def test_per_tensor_int8_with_equalization_and_bias_correction_is_closer_to_float(tmp_path):
    src = conv_chain(tmp_path / "c.onnx", seed=3)
    calib, evaluation = images(64, seed=1), images(64, seed=2)
    reference = run(src, evaluation)
    errors = {}
    for label, options in {"plain": {}, "equalize": {"equalize": True},
                           "both": {"equalize": True, "bias_correction": True}}.items():
        out = tmp_path / f"{label}.onnx"
        quantize_onnx(src, out, calib=calib, per_channel=False, verify=False, **options)
        errors[label] = float(np.abs(run(out, evaluation) - reference).mean())
        plan = read_plan(out)
        assert ("equalized_chains" in plan.settings["algorithms"]) == ("equalize" in options)
        assert ("bias_corrected" in plan.settings["algorithms"]) == ("bias_correction" in options)
    # Activation rounding dominates this toy, so equalization alone helps a little; the mean
    # shift that bias correction removes is most of what is left.
    assert errors["equalize"] < errors["plain"]
    assert errors["both"] < errors["equalize"] / 2


def test_options_that_need_calibration_are_refused_in_dynamic_mode(tmp_path):
    from lowbit.errors import LowbitError

    src = conv_chain(tmp_path / "c.onnx")
    with pytest.raises(LowbitError, match="--mode static"):
        quantize_onnx(src, tmp_path / "o.onnx", mode="dynamic", equalize=True)
    with pytest.raises(LowbitError, match="memory budget"):
        quantize_onnx(src, tmp_path / "o.onnx", calib=images(), calib_memory_mb=0)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    model = preprocess(onnx.load(str(tiny_encoder(root / "enc.onnx"))))
    node_names(model)
    calib = token_calib(root / "calib.npz", n=16)
    return model, CalibrationData(calib, model), dict(np.load(calib))


def test_smoothing_keeps_the_encoder_output_identical(encoder):
    model, data, feed = encoder
    planner = StaticPlanner(model)
    for producers in (("LayerNormalization",), None):  # LayerNorm-fed only, then every MatMul input
        groups = smoothing_groups(model, set(planner.active), alpha=0.8, producers=producers)
        assert groups and all(g.alpha == 0.8 for g in groups)
        absmax = channel_absmax(model, [g.activation for g in groups], data)
        smoothed = apply_smoothing(model, groups, absmax)
        assert all(g.scales is not None and not np.allclose(g.scales, 1.0) for g in groups)
        np.testing.assert_allclose(run(smoothed, feed), run(model, feed), rtol=1e-3, atol=1e-4)
        if producers is None:
            assert any(n.name.endswith("_SmoothMul") for n in smoothed.graph.node)


def test_smoothing_per_layer_alpha(encoder):
    model, _, _ = encoder
    planner = StaticPlanner(model)
    first = smoothing_groups(model, set(planner.active))[0]
    groups = smoothing_groups(model, set(planner.active), alpha={first.nodes[0]: 0.9, "default": 0.3})
    assert groups[0].alpha == 0.9 and all(g.alpha == 0.3 for g in groups[1:])


def test_transformer_elementwise_ops_stay_float_and_matmul_outputs_are_not_requantized(encoder):
    model, _, _ = encoder
    planner = StaticPlanner(model)
    pruned = {n: r for n, r in planner.float_nodes.items() if "int8 here would only add error" in r}
    assert pruned  # residual / bias Adds next to MatMul and LayerNorm
    assert all(planner.index.model.graph.node[[n.name for n in model.graph.node].index(name)].op_type
               in ("Add", "Mul") for name in pruned)


def test_memory_budget_splits_runs_and_gives_the_same_ranges(encoder):
    model, data, _ = encoder
    planner = StaticPlanner(model)
    names = planner.candidates()
    whole = collect_activation_stats(model, names, data, method="minmax", spec=ACTIVATION_SPEC, batch_size=8)
    split = collect_activation_stats(model, names, data, method="minmax", spec=ACTIVATION_SPEC, batch_size=8,
                                     memory_budget_mb=whole.peak_output_bytes / 4 / 2**20)
    assert whole.runs_per_batch == 1 and split.runs_per_batch >= 4
    assert split.peak_output_bytes <= whole.peak_output_bytes / 2
    assert set(split.ranges) == set(whole.ranges) and split.mask_like == whole.mask_like
    for name, (lo, hi) in whole.ranges.items():
        np.testing.assert_array_equal(split.ranges[name][0], lo)
        np.testing.assert_array_equal(split.ranges[name][1], hi)


def test_cli_flags_reach_the_quantizer(tmp_path, capsys):
    from lowbit.cli import main

    src = conv_chain(tmp_path / "c.onnx")
    np.savez(tmp_path / "calib.npz", **images(16))
    out = tmp_path / "out.onnx"
    code = main(["quantize", str(src), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--per-tensor",
                 "--equalize", "--bias-correction", "--calib-memory-mb", "0.001", "--no-speed"])
    assert code == 0 and "cosine" in capsys.readouterr().out
    settings = read_plan(out).settings
    assert settings["algorithms"]["equalized_chains"] and settings["algorithms"]["bias_corrected"]
    assert settings["calibration_runs_per_batch"] > 1


def test_per_tensor_warns_when_channel_ranges_are_far_apart(tmp_path):
    """The high-lr MobileNetV2 failure in miniature: one conv channel 1000x narrower than the rest."""
    from _onnx_quant_models import image_calib, small_cnn
    from lowbit.onnx.quantize import quantize_onnx

    model = onnx.load(str(small_cnn(tmp_path / "cnn.onnx")))
    weight = next(t for t in model.graph.initializer if t.name == "conv.0.weight")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0] *= 1e-3
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    source = tmp_path / "narrow.onnx"
    onnx.save(model, str(source))
    calib = image_calib(tmp_path / "c.npz", n=16)
    warned = quantize_onnx(source, tmp_path / "t.onnx", calib=calib, per_channel=False, verify=False).warnings
    assert any("per-channel ranges more than 100x apart" in w and "/conv/conv.0/Conv" in w for w in warned)
    for options in ({"per_channel": True}, {"per_channel": False, "equalize": True}):
        quiet = quantize_onnx(source, tmp_path / "q.onnx", calib=calib, verify=False, **options).warnings
        assert not any("ranges more than" in w for w in quiet)
