"""--mode auto (issue 11): candidates from one calibration, pruned by measured statistics, the
fastest within the budget kept; and the explicit modes saying what is off and how to fix it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from _tiny_models import conv_bn_relu_onnx
from lowbit.cli import main
from lowbit.onnx.config import AutoConfig, StaticConfig
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.onnx.session import make_session
from lowbit.search.auto import Trial, _Search
from lowbit.zoo.depthwise import DepthwiseNet, export_depthwise, rescale_channels


def _rescaled_net(root, head: bool):
    """A depthwise net whose activation channels span e^6 (function-preserving rescale), its data."""
    torch.manual_seed(0)
    net = DepthwiseNet()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
        rescale_channels(net, head=head)
        assert torch.allclose(net(x), before, atol=1e-5)  # the float function is unchanged
    path = export_depthwise(net, root / f"dw_head{int(head)}.onnx")
    rng = np.random.default_rng(1)
    np.savez(root / "calib.npz", input=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    np.savez(root / "eval.npz", input=rng.standard_normal((64, 3, 16, 16)).astype(np.float32))
    return {"root": root, "float": path, "calib": root / "calib.npz", "eval": root / "eval.npz"}


@pytest.fixture(scope="module")
def rescaled(tmp_path_factory):
    return _rescaled_net(tmp_path_factory.mktemp("auto"), head=False)


def _cosine_vs_float(float_path, quant_path, data_path) -> float:
    """Mean per-sample cosine of the logits, computed here with ONNX Runtime and NumPy only."""
    x = np.load(data_path)["input"]
    ref = make_session(onnx.load(str(float_path))).run(None, {"input": x})[0].astype(np.float64)
    got = make_session(onnx.load(str(quant_path))).run(None, {"input": x})[0].astype(np.float64)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return float(cos.mean())


@pytest.mark.slow
def test_auto_measures_equalization_and_keeps_a_model_within_budget(rescaled):
    out = rescaled["root"] / "auto.onnx"
    result = quantize_onnx(rescaled["float"], out, AutoConfig(metric="cosine", max_drop=0.003),
                           calib=rescaled["calib"], eval_data=rescaled["eval"], batch_size=16)
    auto = result.auto
    trials = {t.name: t for t in auto.trials}
    equalized = [t for name, t in trials.items() if "equalization" in name]
    assert equalized and auto.calibrations == 2  # the measured channel spreads made it worth a trial
    kept = trials[auto.winner]
    assert kept.met and read_plan(out).settings["auto"]["winner"] == auto.winner
    # The kept model's fidelity, measured here independently, is the one the search recorded.
    measured = _cosine_vs_float(rescaled["float"], out, rescaled["eval"])
    assert measured == pytest.approx(kept.cosine, abs=1e-6) and 1 - measured <= 0.003
    # Independent reference: explicit runs with and without --equalize.
    plain = quantize_onnx(rescaled["float"], rescaled["root"] / "plain.onnx", StaticConfig(),
                          calib=rescaled["calib"], batch_size=16, verify=False)
    fixed = quantize_onnx(rescaled["float"], rescaled["root"] / "eq.onnx", StaticConfig(equalize=True),
                          calib=rescaled["calib"], batch_size=16, verify=False)
    plain_cos, fixed_cos = (_cosine_vs_float(rescaled["float"], r.output_path, rescaled["eval"]) for r in (plain, fixed))
    assert fixed_cos > plain_cos
    assert trials["static int8, per-channel weights + equalization"].cosine == pytest.approx(fixed_cos, abs=1e-6)


def test_verification_reuses_the_float_outputs_of_the_search(rescaled, monkeypatch):
    """The float model runs on each evaluation batch once in the whole quantize: the verification gets
    the search's float session and outputs (here every batch was scored) and opens only the written
    model; its fidelity is still the one measured independently."""
    import lowbit.onnx.verify as verify

    opened = []
    monkeypatch.setattr(verify, "make_session", lambda model, **kw: opened.append(model) or make_session(model, **kw))
    out = rescaled["root"] / "reused.onnx"
    result = quantize_onnx(rescaled["float"], out, AutoConfig(metric="cosine"), calib=rescaled["calib"],
                           eval_data=rescaled["eval"], batch_size=16, measure_speed=False)
    assert len(opened) == 1 and result.report.calls == 64
    measured = _cosine_vs_float(rescaled["float"], out, rescaled["eval"])
    assert result.report.outputs[0].cosine_mean == pytest.approx(measured, abs=1e-6)


def test_explicit_run_far_from_float_names_the_cause(tmp_path):
    net = _rescaled_net(tmp_path, head=True)  # the Conv -> Linear link too: per-tensor int8 collapses
    result = quantize_onnx(net["float"], tmp_path / "pt.onnx", StaticConfig(per_channel=False), calib=net["calib"],
                           eval_data=net["eval"], batch_size=16, measure_speed=False)
    assert _cosine_vs_float(net["float"], result.output_path, net["eval"]) < 0.98
    far = [w for w in result.warnings if w.startswith("far from float")]
    assert len(far) == 1 and "per-tensor" in far[0] and "--equalize" in far[0]


def test_cli_default_with_calib_is_auto_and_per_tensor_restricts_it(rescaled, capsys):
    out = rescaled["root"] / "cli.onnx"
    assert main(["quantize", str(rescaled["float"]), "-o", str(out), "--calib", str(rescaled["calib"]),
                 "--per-tensor", "--no-speed", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    static = [c["name"] for c in data["auto"]["candidates"] if c["name"].startswith("static")]
    assert static and all("per-tensor" in n for n in static)
    assert data["auto"]["winner"] in [c["name"] for c in data["auto"]["candidates"]]
    assert main(["quantize", str(rescaled["float"]), "-o", str(rescaled["root"] / "x.onnx")]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert data["auto"]["max_position_drop"] is None  # no per-position class scores: no decision gate
    assert main(["quantize", str(rescaled["float"]), "-o", str(rescaled["root"] / "y.onnx"), "--calib",
                 str(rescaled["calib"]), "--mode", "static", "--max-position-drop", "0.01"]) == 2
    assert "--max-position-drop gates --mode auto" in capsys.readouterr().err
    assert not (rescaled["root"] / "y.onnx").exists()


def test_dynamic_mode_on_a_conv_only_model_says_so(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_bn_relu_onnx(), str(path))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    result = quantize_onnx(path, tmp_path / "d.onnx", mode="dynamic", eval_data=tmp_path / "x.npz",
                           measure_speed=False)
    assert any("found nothing to quantize" in w and "--mode static" in w for w in result.warnings)


def _trial(name, drop, speedup, top1=None):
    return Trial(name, 1 - drop, top1, drop, drop <= 0.01, speedup)


def test_choice_is_the_fastest_within_budget_and_ties_go_to_accuracy():
    search = _Search.__new__(_Search)
    search.max_drop = 0.01
    search.noise = 0.03
    search.scorer = type("S", (), {"metric": "cosine"})()
    search.trials = [_trial("a", 0.001, 1.50), _trial("b", 0.005, 2.00), _trial("c", 0.002, 1.97),
                     _trial("d", 0.2, None)]
    name, reason = search.choose()
    assert name == "c" and "tied" in reason and "1 candidate(s) were over budget" in reason  # b vs c: 1.5% apart
    search.trials = [_trial("a", 0.001, 1.50), _trial("b", 0.005, 2.00)]
    assert search.choose()[0] == "b"
    search.trials = [_trial("a", 0.3, None), _trial("b", 0.05, None)]
    name, reason = search.choose()
    assert name == "b" and "no candidate stayed within the budget" in reason


def test_layer_kinds_kept_float_only_where_float_measured_faster(rescaled):
    """Per layer kind by measured speed: one candidate per kind, then the kinds that measured faster
    in float (beyond timing noise) together; a kind that was not faster stays int8."""
    from lowbit.onnx.calib_data import CalibrationData as Data
    from lowbit.onnx.pipeline import StaticPipeline, prepare_model
    from lowbit.search.auto import _add_float_regions, layer_kinds

    model = prepare_model(onnx.load(str(rescaled["float"])))
    data = Data(str(rescaled["calib"]), model)
    pipeline = StaticPipeline(model, StaticConfig(), data, batch_size=8, threads=1).calibrate()
    kinds = layer_kinds(pipeline)
    ops = {n.name: n for n in model.graph.node}
    assert {"depthwise Convs", "Convs"} <= set(kinds)
    assert all(next(a.i for a in ops[n].attribute if a.name == "group") > 1 for n in kinds["depthwise Convs"])

    measured = {"depthwise Convs": 1.30, "Convs": 1.02}  # base 1.0: only depthwise is faster in float

    class FakeSearch:
        def __init__(self):
            self.added = []

        def add(self, name, build, note=""):
            candidate = build()
            self.added.append((name, candidate))
            kind = next((k for k in measured if name.endswith(f", {k} float")), None)
            return _trial(name, 0.0, measured.get(kind, 1.0) if kind else 1.0)

    search = FakeSearch()
    _add_float_regions(search, pipeline, True, _trial("base", 0.0, 1.0))
    names = [n for n, _ in search.added]
    assert len(names) == len(kinds)  # one per kind, no combined one: only one kind measured faster
    depthwise_float = dict(search.added)["static int8, per-channel weights, depthwise Convs float"]
    assert set(kinds["depthwise Convs"]) <= set(depthwise_float.plan.float_nodes)
    assert not set(kinds["Convs"]) & set(depthwise_float.plan.float_nodes)
    assert "measured faster in float" in depthwise_float.plan.float_nodes[kinds["depthwise Convs"][0]]
    measured["Convs"] = 1.2  # now two kinds are faster: a combined candidate follows
    search = FakeSearch()
    _add_float_regions(search, pipeline, True, _trial("base", 0.0, 1.0))
    combined = search.added[-1][1]
    assert len(search.added) == len(kinds) + 1
    assert set(kinds["depthwise Convs"] + kinds["Convs"]) <= set(combined.plan.float_nodes)


def test_close_calls_are_timed_again_together_and_their_noise_widens_ties(monkeypatch):
    import lowbit.search.auto as auto

    monkeypatch.setattr(auto, "make_session", lambda model, threads=None: model)  # a "session" is its model here
    retimed = []

    class Scorer:
        metric = "cosine"
        threads = 2

        def retime(self, sessions):
            retimed.append(list(sessions))
            return [1.80, 1.95][:len(sessions)], 0.08

    search = _Search.__new__(_Search)
    search.max_drop, search.scorer, search.noise = 0.01, Scorer(), 0.03
    search.run = type("R", (), {"threads": 2})()
    search.trials = [_trial("b", 0.005, 2.00), _trial("c", 0.002, 1.90), _trial("a", 0.001, 1.20)]
    search.kept = {n: type("K", (), {"path": n})() for n in "bca"}
    search.retime_close_calls()
    assert retimed == [["b", "c"]]  # a is 40% slower than the fastest: not a close call
    speeds = {t.name: t.speedup for t in search.trials}
    assert speeds == {"b": 1.80, "c": 1.95, "a": 1.20} and search.noise == 0.08
    assert search.choose()[0] == "c"
    # One candidate near float: timed again too; one clearly faster than float alone: not.
    search.trials, retimed[:] = [_trial("b", 0.005, 0.95)], []
    search.retime_close_calls()
    assert retimed == [["b"]] and search.trials[0].speedup == 1.80
    search.trials, retimed[:] = [_trial("b", 0.005, 2.5)], []
    search.retime_close_calls()
    assert retimed == []


def test_only_candidates_that_can_win_are_kept_and_on_disk_not_in_memory(tmp_path, monkeypatch):
    """Each candidate that can still win is kept as its serialized file (read back unchanged for
    the winner); the others' files are deleted as soon as they cannot win."""
    import lowbit.search.auto as auto
    from lowbit.plan import QuantPlan

    models = {name: _tiny_model(name) for name in "abcde"}
    drops = {"a": 0.3, "b": 0.05, "c": 0.005, "d": 0.2, "e": 0.001}
    search = _Search.__new__(_Search)
    search.trials, search.kept, search.folder, search.deadline = [], {}, tmp_path, float("inf")
    search.max_drop, search.timed_out = 0.01, False
    search.config = search.run = type("C", (), {"measure_speed": False, "threads": 1})()

    class Scorer:
        metric = "cosine"
        threads = 1
        labels, position_scores, batches = None, False, [{}]

        def fidelity(self, session, floor=None):
            name = session.get_modelmeta().graph_name
            return 1.0 - drops[name], None, None, None, {}, 1

        def drop(self, cosine, top1, accuracy):
            return 1.0 - cosine

    search.scorer = Scorer()
    monkeypatch.setattr(auto, "drop_shape_annotations", lambda model: None)
    for name in "ab":  # neither within 0.01: the most accurate so far stays
        search.add(name, lambda name=name: auto._Built(models[name], QuantPlan(mode=name)))
    assert list(search.kept) == ["b"] and len(list(tmp_path.iterdir())) == 1
    for name in "cde":
        search.add(name, lambda name=name: auto._Built(models[name], QuantPlan(mode=name)))
    assert sorted(search.kept) == ["c", "e"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(k.path.name for k in search.kept.values())
    kept = search.load("e")
    assert kept.model.SerializeToString() == models["e"].SerializeToString() and kept.plan.mode == "e"


def test_scoring_stops_once_a_candidate_cannot_reach_the_floor():
    """Per-call cosines are at most 1, so after k of n calls the mean can reach at most
    (sum so far + n - k) / n; scoring stops when that is below the floor, and the figures are
    those of the calls scored (NumPy reference)."""
    from lowbit.search.auto import _Scorer

    rng = np.random.default_rng(0)
    expected = [[rng.standard_normal((1, 16))] for _ in range(4)]
    noisy = [[e[0] + rng.standard_normal((1, 16)) * 0.5] for e in expected]  # cosine ~0.9 a call

    class Session:
        runs = 0

        def run(self, names, batch):
            Session.runs += 1
            return noisy[batch["i"]]

    scorer = _Scorer.__new__(_Scorer)
    scorer.names, scorer.batches, scorer.expected = ["y"], [{"i": i} for i in range(4)], expected
    scorer.calls, scorer.scored_calls, scorer.labels = [None] * 4, 4, None

    def cosine(a, b):
        a, b = a.ravel(), b.ravel()
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    per_call = [cosine(e[0], q[0]) for e, q in zip(expected, noisy)]
    full = scorer.fidelity(Session())
    assert full[-1] == 4 and full[0] == pytest.approx(np.mean(per_call), abs=1e-12)
    # After 2 calls the mean can reach at most (c1 + c2 + 2) / 4: a floor just above stops there.
    reach = (per_call[0] + per_call[1] + 2) / 4
    assert reach < (per_call[0] + 3) / 4  # ... and not after 1
    Session.runs = 0
    stopped = scorer.fidelity(Session(), floor=reach + 1e-6)
    assert stopped[-1] == 2 and Session.runs == 2
    assert stopped[0] == pytest.approx(np.mean(per_call[:2]), abs=1e-12)
    # A floor the candidate does reach in the end is never given up on early.
    assert scorer.fidelity(Session(), floor=np.mean(per_call) - 1e-9)[-1] == 4


def _tiny_model(name: str):
    """A one-MatMul model whose graph is called `name` (what a session of it reports)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((2, 2), ord(name), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_output_layers_are_the_compute_nodes_that_make_the_logits():
    """MatMul -> Add(bias) -> Softmax -> Reshape(shape from Shape) ends at a graph output: that MatMul
    is the output layer; a residual Add of two activations ends the chain."""
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.onnx.pipeline import prepare_model
    from lowbit.search.auto import output_layers

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("w1", (8, 8)), ("w2", (8, 5)), ("b2", (5,)), ("w3", (8, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="hidden"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["logits0"], name="head"),
             helper.make_node("Add", ["logits0", "b2"], ["logits"], name="bias"),
             helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=-1),
             helper.make_node("Shape", ["logits"], ["shape"], name="shape"),
             helper.make_node("Reshape", ["p", "shape"], ["probs"], name="reshape"),
             helper.make_node("MatMul", ["r", "w3"], ["m"], name="branch"),
             helper.make_node("Relu", ["m"], ["rm"], name="branch_relu"),
             helper.make_node("Add", ["rm", "h"], ["residual"], name="residual_add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 5]),
                               helper.make_tensor_value_info("residual", TensorProto.FLOAT, [2, 8])], weights)
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    heads = output_layers(model)  # ONNX Runtime's optimizer fuses the MatMul and its bias Add into a Gemm
    assert len(heads) == 1 and heads[0].startswith("head")


def _position_softmax_model(weights: np.ndarray) -> onnx.ModelProto:
    """x (calls, positions, 8) @ W (8, classes) -> Softmax over the classes: per-position class scores."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"], name="head"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weights.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_rejects_a_candidate_that_flips_near_tied_positions_within_the_cosine_budget(tmp_path):
    """Classes 0 and 1 nearly tie at every position (a CTC frame between blank and a space): a
    candidate that moves them by a hair keeps the output cosine at 0.9997 yet swaps their arg-maxes.
    The cosine budget passes it; the per-position decision gate does not. The float model itself passes."""
    from lowbit.onnx.config import DEFAULT_MAX_POSITION_DROP
    from lowbit.search.auto import _Built, _Scorer

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 6)) * 0.3
    weights[:, 1] = weights[:, 0] + rng.standard_normal(8) * 0.01  # classes 0 and 1 nearly tied
    weights[:, 0] += 2.0  # both far above the rest (x is positive)
    weights[:, 1] += 2.0
    flipped = weights.copy()
    flipped[:, 1] = 2 * weights[:, 0] - weights[:, 1]  # mirror class 1 around class 0: the near-ties swap
    batches = [{"x": rng.uniform(0.5, 1.5, (2, 50, 8)).astype(np.float32)} for _ in range(3)]

    scorer = _Scorer.__new__(_Scorer)
    reference = make_session(_position_softmax_model(weights), threads=1)
    scorer.names, scorer.batches, scorer.calls = ["probs"], batches, [2, 2, 2]
    scorer.expected = [reference.run(["probs"], b) for b in batches]
    scorer.metric, scorer.labels, scorer.position_scores, scorer.threads = "cosine", None, True, 1
    search = _Search(scorer, 0.003, type("R", (), {"threads": 1, "measure_speed": False})(),
                     AutoConfig(measure_speed=False), deadline=float("inf"), folder=tmp_path)
    float_like = search.add("float", lambda: _Built(_position_softmax_model(weights), None))
    swapped = search.add("swapped", lambda: _Built(_position_softmax_model(flipped), None))
    assert float_like.met and float_like.position_top1 == 1.0 and float_like.position_drop == 0.0
    assert swapped.cosine > 0.999 and swapped.drop <= 0.003  # within the cosine budget ...
    assert swapped.position_top1 < 0.9 and swapped.position_drop > DEFAULT_MAX_POSITION_DROP
    assert not swapped.met  # ... yet over budget: its decisions changed
    assert search.choose()[0] == "float"


def _sigmoid_model(weights: np.ndarray, shift: float = 0.0) -> onnx.ModelProto:
    """x (calls, 8) @ W (8, 1) + shift -> Sigmoid: one yes/no probability per call (a VAD's speech)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="head"),
             helper.make_node("Add", ["mm", "shift"], ["logit"], name="shift"),
             helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid")]
    graph = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weights.astype(np.float32), "w"),
                               numpy_helper.from_array(np.array([shift], np.float32), "shift")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_rejects_a_candidate_that_flips_yes_no_decisions_within_the_cosine_budget(tmp_path):
    """One probability per call, many calls near 0.5: a candidate whose logits move by 0.1 keeps the
    cosine across calls above 0.999 yet flips the calls within 0.1 of the threshold in log-odds.
    The decision gate rejects it; the float model passes."""
    from lowbit.onnx.config import DEFAULT_MAX_POSITION_DROP
    from lowbit.search.auto import _Built, _Scorer

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 1))
    batches = [{"x": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(4)]
    scorer = _Scorer.__new__(_Scorer)
    reference = make_session(_sigmoid_model(weights), threads=1)
    scorer.names, scorer.batches, scorer.calls = ["prob"], batches, [16] * 4
    scorer.expected = [reference.run(["prob"], b) for b in batches]
    scorer.metric, scorer.labels, scorer.position_scores, scorer.threads = "cosine", None, True, 1
    search = _Search(scorer, 0.003, type("R", (), {"threads": 1, "measure_speed": False})(),
                     AutoConfig(measure_speed=False), deadline=float("inf"), folder=tmp_path)
    float_like = search.add("float", lambda: _Built(_sigmoid_model(weights), None))
    shifted = search.add("shifted", lambda: _Built(_sigmoid_model(weights, 0.1), None))
    assert float_like.met and float_like.position_top1 == 1.0 and float_like.position_drop == 0.0
    assert shifted.cosine > 0.999 and shifted.drop <= 0.003  # within the cosine budget ...
    assert shifted.position_drop > DEFAULT_MAX_POSITION_DROP and not shifted.met  # ... not the decision gate
    assert search.choose()[0] == "float"
