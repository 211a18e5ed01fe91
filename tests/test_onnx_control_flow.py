"""Quantization inside If / Loop / Scan bodies, LSTM int8 weights, and no size blow-up."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _control_flow_models import loop_mlp, vad_calls, vad_like
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.quantize import quantize_onnx
from lowbit.onnx.subgraphs import bodies, hoist_shared_initializers


@pytest.fixture(scope="module")
def vad_if(tmp_path_factory):
    return vad_like(tmp_path_factory.mktemp("cf") / "vad_if.onnx", branches=True)


def branch_ops(path) -> dict[str, Counter]:
    model = onnx.load(str(path))
    return {b.graph.name: Counter(n.op_type for n in b.graph.node) for b in bodies(model.graph)}


def outputs(path, calls):
    session = ort.InferenceSession(str(path))
    batches = CalibrationData(calls, model_inputs(onnx.load(str(path)))).batches(1)
    return [session.run(None, batch) for batch in batches]


def test_static_quantizes_the_branch_that_runs(vad_if, tmp_path):
    out = tmp_path / "q.onnx"
    result = quantize_onnx(vad_if, out, calib=vad_calls(32, sr=16000), measure_speed=False)
    ops = branch_ops(out)
    # The taken branch runs its Conv on int8 (Q/DQ around it), the untaken one was never observed.
    assert ops["then"]["QuantizeLinear"] >= 2 and ops["else"]["QuantizeLinear"] == 0
    assert "t_conv" not in result.plan.float_nodes and "e_conv" in result.plan.float_nodes
    # Both LSTMs get int8 weights (no calibration needed), through ORT's DynamicQuantizeLSTM.
    assert ops["then"]["DynamicQuantizeLSTM"] == 1 and ops["else"]["DynamicQuantizeLSTM"] == 1
    assert ops["then"]["LSTM"] == 0
    evaluation = vad_calls(16, sr=16000, seed=5)
    for ref, got in zip(outputs(vad_if, evaluation), outputs(out, evaluation)):
        np.testing.assert_allclose(got[0], ref[0], atol=0.03)
        np.testing.assert_allclose(got[1], ref[1], atol=0.15)


def test_calls_taking_both_branches_calibrate_both(vad_if, tmp_path):
    mixed = {k: np.concatenate([a, b]) for (k, a), b in zip(vad_calls(16, sr=16000).items(),
                                                             vad_calls(16, sr=8000, seed=3).values())}
    out = tmp_path / "q.onnx"
    quantize_onnx(vad_if, out, calib=mixed, measure_speed=False)
    ops = branch_ops(out)
    assert ops["then"]["QuantizeLinear"] >= 2 and ops["else"]["QuantizeLinear"] >= 2
    evaluation = vad_calls(8, sr=8000, seed=9)
    for ref, got in zip(outputs(vad_if, evaluation), outputs(out, evaluation)):
        np.testing.assert_allclose(got[0], ref[0], atol=0.03)


def test_dynamic_mode_quantizes_lstms_in_branches_and_writes_a_smaller_model(vad_if, tmp_path):
    out = tmp_path / "d.onnx"
    quantize_onnx(vad_if, out, mode="dynamic", verify=False)
    ops = branch_ops(out)
    assert ops["then"]["DynamicQuantizeLSTM"] == 1 and ops["else"]["DynamicQuantizeLSTM"] == 1
    assert out.stat().st_size < vad_if.stat().st_size
    evaluation = vad_calls(8, seed=4)
    for ref, got in zip(outputs(vad_if, evaluation), outputs(out, evaluation)):
        np.testing.assert_allclose(got[0], ref[0], atol=0.03)


@pytest.mark.parametrize("kind", ["Loop", "Scan"])
def test_loop_and_scan_bodies_are_calibrated_per_iteration(kind, tmp_path):
    model = loop_mlp(tmp_path / f"{kind}.onnx", kind=kind)
    rng = np.random.default_rng(0)
    if kind == "Loop":
        calib = {"h0": rng.standard_normal((32, 16)).astype(np.float32)}
        evaluation = {"h0": rng.standard_normal((8, 16)).astype(np.float32)}
    else:
        calib = {"h0": rng.standard_normal((24, 1, 16)).astype(np.float32),
                 "xs": rng.standard_normal((24, 3, 1, 16)).astype(np.float32)}
        evaluation = {"h0": rng.standard_normal((6, 1, 16)).astype(np.float32),
                      "xs": rng.standard_normal((6, 3, 1, 16)).astype(np.float32)}
    out = tmp_path / "q.onnx"
    result = quantize_onnx(model, out, calib=calib, measure_speed=False)
    body = next(iter(branch_ops(out).values()))
    assert body["QuantizeLinear"] >= 2 and body["MatMul"] + body["Gemm"] == 1, body
    assert any(e.tensor == "W" for e in result.plan.quantized("weight"))
    # The body's ranges cover every iteration: the last step's activations are not clipped.
    ref = np.concatenate([r[0] for r in outputs(model, evaluation)])
    got = np.concatenate([g[0] for g in outputs(out, evaluation)])
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_hoisting_keeps_one_copy_of_a_weight_two_branches_hold():
    weight = np.arange(2048, dtype=np.float32).reshape(32, 64)

    def branch(name, tensor_name):
        return helper.make_graph([helper.make_node("Identity", [tensor_name], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
                                 [numpy_helper.from_array(weight, tensor_name)])

    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch("a", "wa"),
                                                else_branch=branch("b", "wb"))], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.ByteSize()
    saved = hoist_shared_initializers(model.graph)
    assert saved >= weight.nbytes and model.ByteSize() < before - weight.nbytes + 200
    session = ort.InferenceSession(model.SerializeToString())
    for flag in (True, False):
        np.testing.assert_array_equal(session.run(None, {"c": np.array(flag)})[0], weight)


def test_preprocess_does_not_grow_a_model_with_branches(vad_if):
    model = onnx.load(str(vad_if))
    assert preprocess(model).ByteSize() <= model.ByteSize() * 1.1


def test_a_bigger_output_always_comes_with_its_reason(tmp_path):
    model = loop_mlp(tmp_path / "tiny.onnx")  # one 16x16 weight: scales and the plan outweigh int8
    out = tmp_path / "q.onnx"
    result = quantize_onnx(model, out, calib={"h0": np.ones((4, 16), np.float32)}, measure_speed=False)
    bigger = out.stat().st_size > model.stat().st_size
    assert bigger and any("bigger than its input" in w for w in result.warnings)


def test_lstms_in_branches_make_a_dynamic_candidate_and_yes_no_outputs_are_gated(vad_if, tmp_path):
    """--mode auto on the VAD-like model (network inside an If): its dynamic candidate quantizes the
    LSTMs in both branches (smaller than float, as `--mode dynamic`), and every candidate is judged
    on the speech decisions of its (batch, 1) probability output too."""
    from lowbit.onnx.recurrent import has_int8_lstms

    assert has_int8_lstms(onnx.load(str(vad_if)))
    assert not has_int8_lstms(onnx.load(str(loop_mlp(tmp_path / "loop.onnx"))))
    from lowbit.onnx.config import AutoConfig

    auto = quantize_onnx(vad_if, tmp_path / "auto.onnx", AutoConfig(measure_speed=False),
                         calib=vad_calls(32, sr=16000), measure_speed=False).auto
    assert auto.max_position_drop is not None  # the decision gate applies
    assert all(t.position_drop is not None for t in auto.trials)
    dynamic = next(t for t in auto.trials if t.name == "dynamic int8")
    dynamic_mode = tmp_path / "d.onnx"
    quantize_onnx(vad_if, dynamic_mode, mode="dynamic", verify=False)
    assert dynamic.size_bytes < 0.6 * vad_if.stat().st_size  # both branches' LSTM weights int8
    assert abs(dynamic.size_bytes - dynamic_mode.stat().st_size) < 0.1 * dynamic.size_bytes  # (its plan aside)
