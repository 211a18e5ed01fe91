"""Bounded calibration memory: chunked activation streaming gives exactly the unbounded statistics."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import tiny_encoder, token_calib
from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import ActivationStream, budget_bytes, collect_activation_stats
from lowbit.onnx.planner import ACTIVATION_SPEC, StaticPlanner, node_names
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.onnx.session import make_session
from lowbit.onnx.smooth import channel_absmax


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    source = tiny_encoder(root / "enc.onnx")
    model = preprocess(onnx.load(str(source)))
    node_names(model)
    calib = token_calib(root / "calib.npz", n=24)
    return model, CalibrationData(calib, model), source, calib


def _stats(model, data, budget):
    names = StaticPlanner(model).candidates()
    return collect_activation_stats(model, names, data, method="auto", spec=ACTIVATION_SPEC, batch_size=8,
                                    memory_budget_mb=budget)


def _assert_same_stats(a, b):
    assert set(a.ranges) == set(b.ranges) and a.mask_like == b.mask_like and a.non_float == b.non_float
    for name, (lo, hi) in a.ranges.items():
        np.testing.assert_array_equal(b.ranges[name][0], lo, err_msg=name)
        np.testing.assert_array_equal(b.ranges[name][1], hi, err_msg=name)


def test_chunked_statistics_equal_the_unbounded_ones_bit_for_bit(encoder):
    model, data, _, _ = encoder
    whole = _stats(model, data, math.inf)
    assert whole.runs_per_batch == 1 and whole.ranges
    largest = whole.peak_output_bytes / 2**20
    for fraction in (0.5, 0.2, 1e-6):  # down to one tensor per chunk
        chunked = _stats(model, data, largest * fraction)
        assert chunked.runs_per_batch > 1
        _assert_same_stats(whole, chunked)
    # A budget of a fifth holds well under half of what the unbounded run exposes at once.
    assert _stats(model, data, largest * 0.2).peak_output_bytes < whole.peak_output_bytes / 2


def test_chunks_come_from_disjoint_slices_of_the_graph(encoder):
    """One batch costs one forward pass: the segments never recompute a node."""
    model, data, _, _ = encoder
    names = StaticPlanner(model).candidates()
    stream = ActivationStream(model, names, memory_budget_mb=1e-6)
    batch = next(iter(data.batches(8)))
    seen: list[str] = []
    for chunk in stream.chunks(batch):
        seen += list(chunk)
    assert sorted(seen) == sorted(set(names))  # every tensor exactly once
    ran = [(s.start, s.end) for s in stream._segments if s.end > s.start]
    assert len(ran) > 3 and all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ran, ran[1:]))
    # Each chunk's values are what the whole model computes.
    reference = make_session(_exposed(model, seen), optimize=False)
    expected = dict(zip(seen, reference.run(seen, batch)))
    for chunk in ActivationStream(model, names, memory_budget_mb=1e-6).chunks(batch):
        for name, value in chunk.items():
            np.testing.assert_array_equal(value, batch[name] if name in batch else expected[name])


def _exposed(model, names):
    from lowbit.onnx.collect import with_outputs

    graph_inputs = {i.name for i in model.graph.input}
    return with_outputs(model, [n for n in names if n not in graph_inputs])


def test_the_quantized_model_does_not_depend_on_the_budget(encoder, tmp_path):
    _, _, source, calib = encoder
    plans = {}
    for label, budget in (("unbounded", math.inf), ("default", None), ("tiny", 0.001)):
        out = tmp_path / f"{label}.onnx"
        quantize_onnx(source, out, calib=str(calib), calib_memory_mb=budget, verify=False, batch_size=8)
        plan = read_plan(out)
        runs = plan.settings.pop("calibration_runs_per_batch")
        plans[label] = (plan.to_json(), runs)
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
        plans[label] += (weights,)
    assert plans["unbounded"][1] == 1 and plans["tiny"][1] > 1
    for label in ("default", "tiny"):
        assert plans[label][0] == plans["unbounded"][0]
        assert plans[label][2].keys() == plans["unbounded"][2].keys()
        for name, value in plans["unbounded"][2].items():
            np.testing.assert_array_equal(plans[label][2][name], value, err_msg=name)


def test_smoothing_measurement_is_the_same_in_chunks(encoder):
    model, data, _, _ = encoder
    layer_norms = [n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert layer_norms
    whole = channel_absmax(model, layer_norms, data, memory_budget_mb=math.inf)
    chunked = channel_absmax(model, layer_norms, data, memory_budget_mb=1e-6)
    assert whole.keys() == chunked.keys() == set(layer_norms)
    for name in whole:
        np.testing.assert_array_equal(chunked[name], whole[name])


def _model_with_if(path):
    """x -> Relu -> If(sum > 0: *2 else: *3) -> Sigmoid: control flow reads outer names implicitly."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)

    def branch(name, factor):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        const = numpy_helper.from_array(np.array(factor, np.float32), f"{name}_k")
        return helper.make_graph([helper.make_node("Mul", ["r", f"{name}_k"], [f"{name}_out"])], name, [], [out],
                                 [const])

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["r"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["b"], name="if", then_branch=branch("then", 2.0),
                              else_branch=branch("else", 3.0)),
             helper.make_node("Sigmoid", ["b"], ["y"], name="sig")]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return model


def test_graphs_with_control_flow_are_chunked_by_prefixes(tmp_path):
    model = _model_with_if(tmp_path / "if.onnx")
    rng = np.random.default_rng(0)
    data = CalibrationData({"x": rng.standard_normal((12, 4)).astype(np.float32)}, model)
    names = ["x", "r", "b", "y"]
    whole = collect_activation_stats(model, names, data, spec=ACTIVATION_SPEC, batch_size=4,
                                     memory_budget_mb=None)
    chunked = collect_activation_stats(model, names, data, spec=ACTIVATION_SPEC, batch_size=4,
                                       memory_budget_mb=1e-6)
    assert chunked.runs_per_batch == 3  # r, b and y each in their own chunk; x comes with the first
    _assert_same_stats(whole, chunked)
    stream = ActivationStream(model, names, memory_budget_mb=1e-6)
    list(stream.chunks({"x": np.ones((4, 4), np.float32)}))
    assert all(s.start == 0 for s in stream._segments)  # prefixes, never a cut through the If


@pytest.mark.parametrize("bad", [0, -5])
def test_a_non_positive_budget_is_refused_with_the_fix(bad):
    with pytest.raises(LowbitError, match="positive.*inf for no bound"):
        budget_bytes(bad)
    assert budget_bytes(None) == math.inf and budget_bytes(math.inf) == math.inf
    assert budget_bytes(2) == 2 * 2**20


def test_statistics_are_the_same_without_the_shared_arena(encoder, monkeypatch):
    """Segment sessions share one ONNX Runtime arena where it can be registered; without it
    (fallback: no arena per session, nothing to shrink after the last batch) the statistics are
    the same bit for bit."""
    import lowbit.onnx.collect as collect

    model, data, _, _ = encoder
    shared = _stats(model, data, 1e-6)
    assert collect.shared_arena()
    monkeypatch.setattr(collect, "_ARENA", [False])
    _assert_same_stats(shared, _stats(model, data, 1e-6))
