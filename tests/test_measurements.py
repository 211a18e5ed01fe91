"""Measurements that cannot lie: fidelity that sees the error for every output shape (hand-computed
examples), counts in calls, evaluation labels, and the one timing method with stated options."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import image_calib, outlier_cnn
from lowbit.analysis.bench import bench_models
from lowbit.search.budget import search_precision
from lowbit.cli import main
from lowbit.errors import CalibrationError, LowbitError
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.session import make_session
from lowbit.onnx.timing import UNTIMED_PER_TURN, time_models
from lowbit.onnx.verify import (FloatReference, OutputErrors, compare_models, cosine_per_row, expected_binary_flips,
                                expected_disagreement, looks_like_binary_probabilities, looks_like_position_scores)

# ----------------------------------------------------------------------------- metrics, by hand


def test_one_number_per_call_sees_the_error_the_per_call_cosine_missed():
    ref = np.array([[1.0], [1.0]])  # two calls, one number each
    got = np.array([[1.0], [3.0]])
    assert cosine_per_row(ref, got).tolist() == [1.0, 1.0]  # the old metric: "cosine 1.0", error 2
    errors = OutputErrors("score")
    errors.add(ref, got, calls=2)
    result = errors.result()
    assert result.cosine_basis == "across calls"
    # [1, 1] . [1, 3] = 4; |[1, 1]| |[1, 3]| = sqrt(2) sqrt(10)
    assert result.cosine_mean == result.cosine_min == result.cosine_all == pytest.approx(4 / np.sqrt(20))
    assert result.relative_error == pytest.approx(2 / np.sqrt(2))  # |[0, 2]| / |[1, 1]|
    assert result.max_abs_error == 2.0 and result.values_per_call == 1 and errors.calls == 2


def test_per_call_cosine_for_wide_outputs_and_across_calls_accumulated_over_runs():
    base = np.arange(1.0, 9.0)  # 8 values per call
    errors = OutputErrors("embedding")
    errors.add(base[None], base[None], calls=1)  # call 1: exact
    errors.add(base[None], -base[None], calls=1)  # call 2: sign flipped, cosine -1
    result = errors.result()
    assert result.cosine_basis == "per call" and errors.calls == 2
    assert result.cosine_mean == pytest.approx(0.0) and result.cosine_min == pytest.approx(-1.0)
    assert result.cosine_all == pytest.approx(0.0)  # (|b|^2 - |b|^2) / (2 |b|^2)
    assert result.relative_error == pytest.approx(np.sqrt(4 * base @ base) / np.sqrt(2 * base @ base))


def test_sequence_output_gets_per_frame_cosine_and_one_call_per_unbatched_run():
    frame = np.ones(8)
    ref = np.stack([frame, frame, frame])  # one call fed as given: 3 frames x 8 features, no batch axis
    got = np.stack([frame, -frame, frame])
    errors = OutputErrors("logits")
    for _ in range(4):
        errors.add(ref, got, calls=None)
    result = errors.result()
    assert errors.calls == 4 and result.frames == 12
    assert result.frame_cosine_mean == pytest.approx(1 / 3) and result.frame_cosine_min == pytest.approx(-1.0)
    assert result.cosine_mean == pytest.approx(1 / 3)  # per call: 16 of 24 agree, 8 opposite -> 8/24


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_expected_disagreement_pools_margin_errors_within_margin_deciles_by_hand():
    margins, errors = [0.1, 0.2, 0.3, 0.4], [0.15, 0.0, 0.05, 0.0]
    # Two bins: {0.1, 0.2} with errors {0.15, 0}: 0.1 is exceeded by 1 of 2, 0.2 by none;
    # {0.3, 0.4} with errors {0.05, 0}: none. (0.5 + 0 + 0 + 0) / 4.
    assert expected_disagreement(margins, errors, bins=2) == pytest.approx(0.125)
    # One pool {0, 0, 0.05, 0.15}: 0.1 is exceeded by 1 of 4, the others by none.
    assert expected_disagreement(margins, errors, bins=1) == pytest.approx(0.0625)
    # Against a brute-force double loop on random data (deciles of the margin, ties included).
    rng = np.random.default_rng(0)
    m, e = rng.exponential(0.2, 503).round(2), rng.exponential(0.05, 503)
    order = np.argsort(m, kind="stable")
    reference = sum(sum(np.mean(e[chunk] > m[i]) for i in chunk) for chunk in np.array_split(order, 10)) / len(m)
    assert expected_disagreement(m, e) == pytest.approx(reference)
    assert expected_disagreement([], []) == 0.0


def test_per_position_class_scores_are_told_by_their_values():
    rng = np.random.default_rng(1)
    probs = _softmax(rng.standard_normal((2, 30, 11)))
    assert looks_like_position_scores(probs)  # (calls, frames, classes) softmax: a CTC recognizer
    assert looks_like_position_scores(np.log(probs))  # log-softmax
    assert looks_like_position_scores(_softmax(rng.standard_normal((1, 4, 6, 3))))  # per pixel
    assert not looks_like_position_scores(probs[:, 0])  # (calls, classes): one decision a call (top-1)
    assert not looks_like_position_scores(rng.standard_normal((2, 30, 11)))  # logits, embeddings
    head = np.concatenate([rng.uniform(0, 320, (1, 4, 2100)), rng.uniform(0, 1, (1, 18, 2100))], 1)
    assert not looks_like_position_scores(head)  # a detector head: boxes in pixels and class scores
    assert not looks_like_position_scores(rng.uniform(0, 1, (1, 1, 64, 64)))  # a probability map
    assert not looks_like_position_scores(probs * 0.9)  # does not sum to 1


def test_per_position_agreement_against_numpy_and_calls_on_another_axis():
    rng = np.random.default_rng(2)
    ref = _softmax(rng.standard_normal((3, 40, 7)) * 3)
    got = _softmax(np.log(ref) + rng.standard_normal(ref.shape) * 0.3)
    errors = OutputErrors("probs")
    errors.add(ref[:2], got[:2], calls=2)
    errors.add(ref[2:].transpose(1, 0, 2), got[2:].transpose(1, 0, 2), calls=1)  # calls on axis 1
    result = errors.result()
    flat_ref, flat_got = ref.reshape(-1, 7), got.reshape(-1, 7)
    assert result.positions == 120
    assert result.position_agreement == pytest.approx(np.mean(flat_ref.argmax(1) == flat_got.argmax(1)))
    top2 = np.argsort(flat_ref, axis=1)[:, -2:]  # runner-up, top-1
    rows = np.arange(120)
    margins = flat_ref[rows, top2[:, 1]] - flat_ref[rows, top2[:, 0]]
    margin_errors = np.abs(flat_got[rows, top2[:, 1]] - flat_got[rows, top2[:, 0]] - margins)
    assert result.position_disagreement == pytest.approx(expected_disagreement(margins, margin_errors), rel=1e-5)
    assert 0 < result.position_disagreement < 1 and result.top1_agreement is None
    assert "per position (120 positions" in _report_table(result)


def test_binary_probabilities_are_told_by_their_shape_and_values():
    rng = np.random.default_rng(3)
    assert looks_like_binary_probabilities(rng.uniform(0, 1, (1, 1)).astype(np.float32))  # one per call (a VAD)
    assert looks_like_binary_probabilities(rng.uniform(0, 1, (4, 30, 1)))  # one per frame
    assert looks_like_binary_probabilities(rng.uniform(0, 1, 16))  # (calls,)
    assert not looks_like_binary_probabilities(_softmax(rng.standard_normal((4, 2))))  # two classes: top-1
    assert not looks_like_binary_probabilities(rng.uniform(0, 1, (1, 1, 64, 64)))  # a probability map
    assert not looks_like_binary_probabilities(rng.standard_normal((8, 1)))  # logits, a regression
    assert not looks_like_binary_probabilities(rng.uniform(-1, 1, (2, 1, 128)))  # an LSTM state
    assert not looks_like_binary_probabilities((rng.uniform(0, 1, (8, 1)) > 0.5))  # not float


def test_expected_binary_flips_pools_the_less_confident_half_by_hand():
    margins, errors = [0.1, 0.2, 2.0, 3.0], [0.15, 0.05, 5.0, 0.0]
    # Pool: the errors at margins <= the median 1.1, {0.15, 0.05}. Margin 0.1 is exceeded by 1 of 2,
    # the others by none: 0.5 / 4. The 5.0 error of a confident position is left out.
    assert expected_binary_flips(margins, errors) == pytest.approx(0.125)
    rng = np.random.default_rng(4)
    m, e = rng.exponential(2.0, 301), rng.exponential(0.2, 301)
    pool = e[m <= np.median(m)]
    assert expected_binary_flips(m, e) == pytest.approx(np.mean([np.mean(pool > x) for x in m]))
    assert expected_binary_flips([], []) == 0.0


def test_binary_decision_agreement_against_numpy_one_probability_per_call():
    """A VAD-like output, (1, 1) per call: decisions at 0.5 counted per call, the estimate taken in
    log-odds; the cosine across calls barely sees the error that flips the near-threshold calls."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, 400)
    ref = 1 / (1 + np.exp(-logits))
    got = 1 / (1 + np.exp(-(logits + 0.2)))  # a small shift before the sigmoid
    errors = OutputErrors("output")
    for r, g in zip(ref, got):
        errors.add(np.array([[r]], np.float32), np.array([[g]], np.float32), calls=None)
    result = errors.result()
    assert result.positions == 400 and result.binary_decisions
    assert result.position_agreement == pytest.approx(np.mean((ref >= 0.5) == (got >= 0.5)))
    # Every log-odds error is 0.2 (up to float32 rounding): a call flips when its margin |logit| is below it.
    assert result.position_disagreement == pytest.approx(np.mean(np.abs(logits) < 0.2), abs=2 / 400)
    assert result.position_disagreement > 0.01 and result.cosine_mean > 0.997
    assert "per position (400 positions, probability >= 0.5): decision agreement" in _report_table(result)


def _report_table(fidelity) -> str:
    from lowbit.onnx.verify import VerifyReport

    return VerifyReport([fidelity], 3, 100, 50).table()


# ----------------------------------------------------------------------------- compare_models on ORT


def _linear_model(path, weights, bias, *, batched=True, frames=None, input_name="x"):
    """y = x @ W + b; `batched`: x is (N, 16), else one call (frames, 16) without batch axis."""
    shape = ["N", 16] if batched else [frames, 16]
    out_shape = ["N", weights.shape[1]] if batched else [frames, weights.shape[1]]
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])],
        "linear", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(weights.astype(np.float32), "W"), numpy_helper.from_array(bias.astype(np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_compare_models_reports_the_offset_of_a_one_number_output(tmp_path):
    rng = np.random.default_rng(0)
    weights = np.abs(rng.standard_normal((16, 1)))
    x = rng.standard_normal((12, 16)).astype(np.float32)  # outputs of both signs
    float_path = _linear_model(tmp_path / "f.onnx", weights, np.zeros(1))
    quant_path = _linear_model(tmp_path / "q.onnx", weights, np.full(1, 0.5))
    report = compare_models(float_path, quant_path, CalibrationData({"x": x}, onnx.load(float_path)), batch_size=5,
                            speed=False)
    out = report.outputs[0]
    ref = (x.astype(np.float64) @ weights).ravel()
    got = ref + 0.5
    assert report.calls == 12 and out.values_per_call == 1 and out.cosine_basis == "across calls"
    assert out.cosine_mean == pytest.approx(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got), rel=1e-6)
    assert out.cosine_mean < 0.999  # the per-sample cosine said 1.0 (or -1.0) here
    assert out.relative_error == pytest.approx(0.5 * np.sqrt(12) / np.linalg.norm(ref), rel=1e-5)
    assert out.max_abs_error == pytest.approx(0.5, rel=1e-5)
    assert "calls compared: 12" in report.table() and "across calls" in report.table()


def test_unbatched_sequence_model_counts_calls_not_frames(tmp_path):
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((16, 10))
    float_path = _linear_model(tmp_path / "f.onnx", weights, np.zeros(10), batched=False, frames=64)
    quant_path = _linear_model(tmp_path / "q.onnx", weights * 1.1, np.zeros(10), batched=False, frames=64)
    x = rng.standard_normal((5, 64, 16)).astype(np.float32)  # 5 calls of 64 frames
    report = compare_models(float_path, quant_path, CalibrationData({"x": x}, onnx.load(float_path)), speed=False)
    out = report.outputs[0]
    assert report.calls == 5 and out.frames == 5 * 64 and out.values_per_call == 640
    assert out.frame_cosine_min == pytest.approx(1.0)  # a scale keeps every frame's direction
    assert out.relative_error == pytest.approx(0.1, rel=1e-5)


# ----------------------------------------------------------------------------- labels


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    path = outlier_cnn(root / "cnn.onnx")
    calib = image_calib(root / "calib.npz", n=24)
    images = np.load(calib)["image"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"image": images})[0]
    labels = scores.argmax(1).copy()
    labels[::3] = (labels[::3] + 1) % 10  # the float model is right on 2 of 3 samples
    np.savez(root / "eval.npz", image=images, labels=labels.astype(np.int64))
    return {"root": root, "float": path, "calib": calib, "eval": root / "eval.npz", "labels": labels}


def test_labels_give_accuracy_of_both_models_in_table_and_json(classifier, capsys):
    out = classifier["root"] / "q.onnx"
    args = ["quantize", str(classifier["float"]), "-o", str(out), "--mode", "static", "--calib",
            str(classifier["calib"]), "--eval", str(classifier["eval"]), "--per-tensor", "--no-speed"]
    assert main(args) == 0
    assert "accuracy vs labels (out, 24 calls): float 66.67%, quantized" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    fidelity = report["outputs"][0]
    assert fidelity["accuracy_float"] == pytest.approx(2 / 3)  # 16 of 24, by construction
    quant = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    predicted = quant.run(None, {"image": np.load(classifier["eval"])["image"]})[0].argmax(1)
    assert fidelity["accuracy_quant"] == pytest.approx(float((predicted == classifier["labels"]).mean()))
    assert fidelity["accuracy_drop"] == pytest.approx(fidelity["accuracy_float"] - fidelity["accuracy_quant"])
    assert report["calls"] == 24 and report["labeled_calls"] == 24


def test_budget_metric_top1_uses_label_accuracy(classifier):
    result = search_precision(classifier["float"], classifier["root"] / "b.onnx", calib=classifier["calib"],
                              eval_data=classifier["eval"], max_drop=0.05, metric="top1", per_channel=False,
                              batch_size=8, measure_speed=False, time_limit=60)
    assert result.float_score == pytest.approx(2 / 3) and "label" in result.metric
    assert result.report.labeled.accuracy_float == pytest.approx(2 / 3)


def test_a_model_input_named_labels_stays_an_input(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["labels"], ["lf"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "lf"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = CalibrationData({"x": np.zeros((3, 4), np.float32), "labels": np.ones((3, 4), np.int64)}, model)
    assert data.labels is None and sorted(data.first_batch(3)) == ["labels", "x"]


def test_malformed_labels_are_one_sentence(classifier):
    images = np.load(classifier["calib"])["image"]
    model = onnx.load(classifier["float"])
    with pytest.raises(CalibrationError, match=r"one integer class id per sample, shape \(24,\)"):
        CalibrationData({"image": images, "labels": np.zeros((24, 1), np.int64)}, model)
    with pytest.raises(CalibrationError, match="one integer class id"):
        CalibrationData({"image": images, "labels": np.zeros(24, np.float32)}, model)


# ----------------------------------------------------------------------------- timing


def test_every_session_has_spin_waiting_off_and_timing_states_its_settings(tmp_path):
    path = _linear_model(tmp_path / "m.onnx", np.ones((16, 4)), np.zeros(4))
    options = make_session(onnx.load(path), threads=1).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    feed = {"x": np.ones((2, 16), np.float32)}
    timing = time_models([path, path.read_bytes()], feed, threads=1, warmup=1, repeats=3)
    assert [len(t) for t in timing.latencies_ms] == [3, 3] and timing.threads == 1
    assert "1 intra-op thread, 1 inter-op, spin-waiting off" in timing.method()
    spinning = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="allow_spinning"):
        time_models([spinning], feed)


def test_runners_of_other_runtimes_are_timed_with_the_same_turns():
    import time

    class SleepingRunner:  # stands in for an ExecuTorch / LiteRT runner: run() only, no session options
        def __init__(self, seconds):
            self.seconds, self.calls = seconds, 0

        def run(self, names, feed):
            self.calls += 1
            time.sleep(self.seconds)

    slow, fast = SleepingRunner(0.004), SleepingRunner(0.001)
    timing = time_models([slow, fast], {}, threads=2, warmup=1, repeats=6)
    assert timing.threads == 2 and [len(t) for t in timing.latencies_ms] == [6, 6]
    assert timing.medians_ms[0] >= 4.0 and 1.0 <= timing.medians_ms[1] < 4.0 and timing.speedup > 1.5
    assert slow.calls == fast.calls  # same warm-up and untimed turn runs for both


def test_fast_models_are_timed_for_a_minimum_time_not_a_fixed_count():
    import time

    from lowbit.onnx.timing import MAX_REPEATS

    class SleepingRunner:
        def __init__(self, seconds):
            self.seconds = seconds

        def run(self, names, feed):
            time.sleep(self.seconds)

    # ~2 ms runs, 0.1 s asked per model: about 50 timed runs each instead of the 3 requested.
    timing = time_models([SleepingRunner(0.002), SleepingRunner(0.002)], {}, threads=1, warmup=2, repeats=3,
                         min_seconds=0.1)
    runs = [len(t) for t in timing.latencies_ms]
    assert runs[0] == runs[1] and 10 <= runs[0] <= 50 and f"median of {runs[0]} timed runs" in timing.method()
    slow = time_models([SleepingRunner(0.03)], {}, threads=1, warmup=1, repeats=3, min_seconds=0.05)
    assert len(slow.latencies_ms[0]) == 3  # already long enough: the requested count stands
    tiny = time_models([SleepingRunner(0.0)], {}, threads=1, warmup=1, repeats=3, min_seconds=10.0)
    assert len(tiny.latencies_ms[0]) == MAX_REPEATS


def test_bench_and_quantize_table_state_the_same_method(tmp_path):
    path = _linear_model(tmp_path / "m.onnx", np.ones((16, 4)), np.zeros(4))
    bench = bench_models([path, path], threads=1, warmup=1, repeats=3)
    report = compare_models(path, path, CalibrationData({"x": np.ones((4, 16), np.float32)}, onnx.load(path)),
                            threads=1, warmup=1, repeats=3, min_seconds=0)
    def method(text):  # the method, without this run's counts and seconds
        return re.sub(r"[\d.]+", "N", text)

    assert method(bench.method) == method(report.timing_method) and "spin-waiting off" in bench.text()
    assert "95% interval" in bench.method
    assert f"timing: {report.timing_method}" in report.table() and bench.to_dict()["threads"] == 1
    with pytest.raises(LowbitError):
        bench_models([path, path, path])


# ----------------------------------------------------------------------------- found by bench/timing_check.py


def test_a_bias_shared_by_two_gemms_gets_one_int32_copy_each(tmp_path):
    """An unrolled RNN reuses one bias in every step's Gemm; each step has its own input scale, so its
    int32 bias differs (it was written twice under one name: an invalid model)."""
    from lowbit.onnx.quantize import quantize_onnx

    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((8, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Mul", ["r", "ten"], ["big"]), helper.make_node("Gemm", ["big", "W", "b"], ["y"])],
        "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b"),
         numpy_helper.from_array(np.float32(10.0), "ten")])
    path = tmp_path / "f.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    result = quantize_onnx(path, tmp_path / "q.onnx", calib={"x": x}, eval_data={"x": x}, measure_speed=False)
    quant = onnx.load(tmp_path / "q.onnx")
    names = [n.name for n in quant.graph.node]
    assert len(names) == len(set(names))
    bias_inputs = [n.input[2] for n in quant.graph.node if n.op_type == "Gemm"]
    assert len(set(bias_inputs)) == 2 and all(b.endswith("_dequantized") for b in bias_inputs)
    assert result.report.outputs[0].cosine_min > 0.999


def test_bench_counts_an_unbatched_run_as_one_call(tmp_path):
    path = _linear_model(tmp_path / "seq.onnx", np.ones((16, 4)), np.zeros(4), batched=False, frames=64)
    report = bench_models([path], threads=1, warmup=1, repeats=3)
    assert report.models[0].batch == 1  # 64 frames, one call
    assert report.models[0].throughput == pytest.approx(1000 / report.models[0].median_ms)
    batched = _linear_model(tmp_path / "b.onnx", np.ones((16, 4)), np.zeros(4))
    assert bench_models([batched], shapes={"x": (5, 16)}, threads=1, warmup=1, repeats=3).models[0].batch == 5


def test_a_timed_run_passes_over_the_data_shapes_in_proportion(tmp_path):
    """Batches of one shape: the first is timed. Shapes that vary (text lines of different widths):
    up to MAX_TIMED_FEEDS batches evenly spaced through the data, and a run is one pass over them;
    the quantize report times those and states the shapes."""
    from lowbit.onnx.timing import MAX_TIMED_FEEDS, describe_shapes, representative_feeds

    same = [{"x": np.full((1, 3, 8, 8), i, np.float32)} for i in range(20)]
    assert len(representative_feeds(same)) == 1 and representative_feeds(same)[0]["x"][0, 0, 0, 0] == 0
    widths = [16 if i % 4 else 64 for i in range(40)]  # a quarter of the calls are 4x wider
    varied = [{"x": np.full((1, 3, 8, w), i, np.float32)} for i, w in enumerate(widths)] + [{"x": np.zeros((1, 3, 8, 9))}]
    picked = representative_feeds(varied)
    assert len(picked) == MAX_TIMED_FEEDS
    order = [int(f["x"][0, 0, 0, 0]) for f in picked]
    assert order == sorted(order) and order[0] == 0 and order[-1] >= 30  # spread over the whole data
    assert sum(f["x"].shape[3] == 64 for f in picked) == MAX_TIMED_FEEDS // 4
    assert describe_shapes(picked) == "2 shapes, 1x3x8x16 to 1x3x8x64"
    from lowbit.onnx.timing import evenly_spaced

    assert {i % 2 for i in evenly_spaced(8, 4)} == {0, 1}  # alternating data (paper, photo): both kinds

    class Counting:  # a runner: counts the calls of each width
        def __init__(self):
            self.widths = []

        def run(self, names, feed):
            self.widths.append(feed["x"].shape[3])

    runner = Counting()
    timing = time_models([runner], picked, threads=1, warmup=0, repeats=3)
    # first run, no warm-up, one turn of UNTIMED_PER_TURN untimed + 3 timed runs, each a pass over the 8 feeds
    assert len(timing.latencies_ms[0]) == 3 and len(runner.widths) == (1 + UNTIMED_PER_TURN + 3) * MAX_TIMED_FEEDS
    assert runner.widths.count(64) * 4 == len(runner.widths)

    float_path = _linear_model(tmp_path / "f.onnx", np.ones((16, 4)), np.zeros(4))
    quant_path = _linear_model(tmp_path / "q.onnx", np.ones((16, 4)), np.zeros(4))
    rows = {"x": np.ones((40, 16), np.float32)}
    report = compare_models(float_path, quant_path, CalibrationData(rows, onnx.load(float_path)), batch_size=16)
    assert report.timed_calls == 16 and report.timed_shapes == "16x16"  # batches of 16, 16 and a partial 8


def test_verification_reuses_the_float_outputs_it_is_given_and_its_runs_are_the_timing_warm_up(tmp_path, monkeypatch):
    """--mode auto hands the verification its float session and the outputs it computed on the
    scored batches: the float model runs only on the other batches, the fidelity is the same, and
    the verification's runs of the timed shape stand for the timing's warm-up runs."""
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((16, 4))
    float_path = _linear_model(tmp_path / "f.onnx", weights, np.zeros(4))
    quant_path = _linear_model(tmp_path / "q.onnx", weights * 1.1, np.full(4, 0.1))
    x = rng.standard_normal((40, 16)).astype(np.float32)  # 5 batches of 8, one shape
    data = CalibrationData({"x": x}, onnx.load(float_path))

    class Counting:  # the float session, its runs counted
        def __init__(self, session):
            self.session, self.runs = session, 0

        def run(self, names, feed, *args):
            self.runs += 1
            return self.session.run(names, feed, *args)

        def __getattr__(self, name):
            return getattr(self.session, name)

    session = Counting(make_session(float_path, threads=1))
    known = {i: session.session.run(None, {"x": x[8 * i:8 * i + 8]}) for i in (0, 2)}
    plain = compare_models(float_path, quant_path, data, batch_size=8, threads=1, speed=False)
    reused = compare_models(float_path, quant_path, data, batch_size=8, threads=1, warmup=2, repeats=3,
                            min_seconds=0, precision=None, reference=FloatReference(session, known))
    assert [o.__dict__ for o in reused.outputs] == [o.__dict__ for o in plain.outputs] and reused.calls == 40
    # Batches 1, 3 and 4 in the verification, then one turn of 3 untimed + 3 timed runs: no warm-up runs.
    assert session.runs == 3 + 3 + 3 and "after 3 warm-up" in reused.timing_method
    assert reused.speedup is not None and len(reused.outputs) == 1

    # With the quantized model's errors on those batches too (auto scored the candidate it wrote),
    # the written model runs only on the others, and the report still covers all 40 calls.
    import lowbit.onnx.verify as verify

    quant = make_session(quant_path, threads=1)
    scored = {"y": OutputErrors("y")}
    for i in (0, 2):
        scored["y"].add(known[i][0], quant.run(None, {"x": x[8 * i:8 * i + 8]})[0], 8)
    opened = []
    monkeypatch.setattr(verify, "make_session",
                        lambda model, **kw: opened.append(Counting(make_session(model, **kw))) or opened[-1])
    partial = compare_models(float_path, quant_path, data, batch_size=8, threads=1, speed=False,
                             reference=FloatReference(session, known, scored))
    assert [s.runs for s in opened] == [3] and partial.calls == 40
    for mine, theirs in zip(partial.outputs, plain.outputs):
        assert mine.cosine_mean == pytest.approx(theirs.cosine_mean, rel=1e-12)
        assert mine.cosine_min == theirs.cosine_min and mine.max_abs_error == theirs.max_abs_error
        assert mine.relative_error == pytest.approx(theirs.relative_error, rel=1e-12)


def test_latencies_given_as_warm_up_decide_the_repeats_and_no_warm_up_runs_are_made():
    class Runner:
        def __init__(self):
            self.calls = 0

        def run(self, names, feed):
            self.calls += 1

    runners = [Runner(), Runner()]
    # 2 ms a run (as measured by the caller), 0.1 s asked per model: 50 timed runs each, in 9 turns
    # of UNTIMED_PER_TURN (3) untimed runs (fast models) plus up to 6 timed ones.
    timing = time_models(runners, {}, threads=1, warmup=5, repeats=3, min_seconds=0.1, warm_ms=[[2.0, 2.0], [2.0]])
    assert [len(t) for t in timing.latencies_ms] == [50, 50] and [r.calls for r in runners] == [9 * 3 + 50] * 2
    assert "after 1 warm-up" in timing.method()
    with pytest.raises(ValueError):
        time_models(runners, {}, threads=1, warm_ms=[[2.0], []])


def test_runs_of_many_milliseconds_go_without_the_untimed_run_per_turn():
    import time

    from lowbit.onnx.timing import COLD_CACHE_MS

    class SleepingRunner:
        def __init__(self, seconds):
            self.seconds, self.calls = seconds, 0

        def run(self, names, feed):
            self.calls += 1
            time.sleep(self.seconds)

    slow = [SleepingRunner(COLD_CACHE_MS / 1000 * 1.2), SleepingRunner(COLD_CACHE_MS / 1000 * 1.5)]
    timing = time_models(slow, {}, threads=1, warmup=1, repeats=3)
    assert [r.calls for r in slow] == [1 + 1 + 3] * 2 and timing.untimed_per_turn == 0
    assert "turns of 0 untimed + 1 timed" in timing.method()
    fast = [SleepingRunner(0.001), SleepingRunner(0.001)]
    assert time_models(fast, {}, threads=1, warmup=1, repeats=3).untimed_per_turn == UNTIMED_PER_TURN
    assert [r.calls for r in fast] == [1 + 1 + UNTIMED_PER_TURN + 3] * 2


def test_speedup_interval_is_students_t_over_block_speedups():
    from lowbit.onnx.timing import MIN_CI_BLOCKS, T_95, speedup_interval

    steady = [[[4.0, 4.0, 4.0], [2.0, 2.0, 2.0]]] * 8
    assert speedup_interval(steady) == 0.0
    assert speedup_interval(steady[:MIN_CI_BLOCKS - 1]) is None  # too few rounds to say
    # 8 rounds, 8 blocks of one round: speedups 2 and 2.5 alternating (logs 0.6931 and 0.9163).
    rounds = [[[4.0], [2.0]] if r % 2 == 0 else [[5.0], [2.0]] for r in range(8)]
    logs = np.log([2.0, 2.5] * 4)
    half = T_95[7] * np.std(logs, ddof=1) / np.sqrt(8)
    assert speedup_interval(rounds) == pytest.approx(np.expm1(half))
    # 16 rounds go into 8 blocks of two rounds: each block's speedup is the ratio of its medians.
    paired = [r for r in rounds for _ in range(2)]
    assert speedup_interval(paired) == pytest.approx(np.expm1(half))


class _DriftingRunner:
    """Sleeps `base` seconds a run, 1 to `drift` times longer by `period`-long window of wall time (the
    factor drawn from a generator seeded by the window's index, so no turn length falls in step with it)."""

    def __init__(self, base: float, drift: float = 1.0, period: float = 0.05):
        import time

        self.base, self.drift, self.period, self.start, self.calls = base, drift, period, time.perf_counter(), 0

    def run(self, names, feed):
        import time

        self.calls += 1
        window = int((time.perf_counter() - self.start) / self.period)
        factor = 1.0 + (self.drift - 1.0) * np.random.default_rng(window).random()
        time.sleep(self.base * factor)


def test_adaptive_timing_stops_when_the_speedup_is_known_and_goes_on_while_it_drifts(monkeypatch):
    from lowbit.onnx import timing

    steady = time_models([_DriftingRunner(0.004), _DriftingRunner(0.002)], {}, threads=1, warmup=1, repeats=3,
                         min_seconds=0.02, precision=0.05, max_seconds=2.0)
    assert steady.interval is not None and steady.interval <= 0.05 and steady.seconds < 1.0
    assert steady.speedup == pytest.approx(2.0, rel=0.25) and "interval" in steady.method()
    assert "met" in steady.method() and steady.to_dict()["speedup_interval"] == steady.interval
    # The second model runs 1-3x slower from one 50 ms window to the next: the blocks disagree; the
    # timing goes on to its limit (0.4 s per model) and says the aim was not reached.
    drifting = time_models([_DriftingRunner(0.004), _DriftingRunner(0.002, drift=3.0)], {}, threads=1, warmup=1,
                           repeats=3, min_seconds=0.02, precision=0.05, max_seconds=0.4)
    assert drifting.interval > 0.05 and 0.8 <= drifting.seconds < 1.5 and "not reached" in drifting.method()
    assert len(drifting.latencies_ms[0]) == len(drifting.latencies_ms[1]) > len(steady.latencies_ms[0])
    # Runs of COLD_CACHE_MS or more: the minimum is SLOW_MIN_SECONDS, not the min_seconds asked.
    monkeypatch.setattr(timing, "SLOW_MIN_SECONDS", 0.1)
    slow = time_models([_DriftingRunner(0.012), _DriftingRunner(0.011)], {}, threads=1, warmup=1, repeats=3,
                       min_seconds=10.0, precision=0.5, max_seconds=2.0)
    assert slow.untimed_per_turn == 0 and 9 <= len(slow.latencies_ms[0]) <= 12 and slow.interval <= 0.5
    # A single model has no speedup to pin down: the fixed count stands.
    alone = time_models([_DriftingRunner(0.001)], {}, threads=1, warmup=1, repeats=3, precision=0.05)
    assert len(alone.latencies_ms[0]) == 3 and alone.interval is None
