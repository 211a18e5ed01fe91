"""Accuracy budget: keep as many layers int8 as possible while the model stays within `max_drop`.

    calibrate once (the chosen range method and min/max) -> all-int8 candidate
    -> per fallback unit, keep whichever range method scores better for its inputs
    -> elementwise ops (not MAC-weighted) float if that helps
    -> rank the units by measured fallback gain -> fall the best k (gain per MAC) back (ladder end),
    k found by bisection -> give each fallen-back unit the cheapest step that meets, biggest first
    -> save the best candidate atomically -> verify it (fidelity, size, speed)

Calibration runs once: every candidate excludes some layers, so its activations are a subset of
the full plan's, whose statistics are reused. A candidate is then one plan build, one QDQ write
and one evaluation on ONNX Runtime (with its int8 kernels, as deployed).

A fallback unit is a set of weighted layers (Conv, ConvTranspose, MatMul, Gemm) that read the
same quantized activation: the Q/DQ pair on that input stays while any reader is int8, so falling
back only one of a transformer's Q/K/V projections removes almost none of their shared input's
error. Sensitivity = "leave this unit out": how much the score of the current int8 candidate
improves when the unit alone falls back to float, measured on the real runtime from the model the
search starts from. (The earlier "quantize only this unit" ranking was dominated by error common to
every candidate, e.g. int8 embedding Adds, and missed interactions with the rest of the int8 graph;
the per-activation SQNR of `layer_sensitivity` accumulates error down the graph and ranks the last
layers worst whatever caused it.)

Range choice: the calibration method that minimizes the expected error of each tensor on its own
(auto/mse clips outliers) is not the one that keeps the model output closest: clipping a transformer's
outlier channels hurts more downstream than coarse steps. Measured on all-MiniLM-L6-v2: min/max on
every tensor drops cosine by 0.0087 vs 0.0128 with auto, but min/max on the GELU outputs alone makes
it worse, so the choice is made per unit by measurement.

Fallback ladder (`fallback`): by default int8 -> float. With ("int16", "float") a unit can stop at
16 bits (symmetric int16 activations and per-channel int16 weights, standard Q/DQ at opset 21): the
bisection finds the fewest units that must leave int8 (at the ladder's last step), then the
refinement gives each the cheapest step that still meets the budget (int8, else int16, else float).
int16 is a fidelity and size step, not a speed one: ONNX Runtime's CPU kernels have no int16 path
(a 16-bit Q/DQ pair around a Conv runs as float Conv plus the Q/DQ work), so on CPU an int16 layer
is a little slower than the same layer float; it is the fallback of int16-capable accelerators.

Scores: metric "cosine" = worst output's mean per-sample cosine vs the float model; "top1" = share
of samples whose arg-max agrees with the float model; `evaluate(path) -> score` (higher is better)
replaces both for the search, and the drop is then evaluate(float) - evaluate(candidate).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lowbit.analysis.macs import layer_macs
from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.collect import ActivationStats
from lowbit.onnx.config import StaticConfig
from lowbit.onnx.io import load_model, save_model
from lowbit.onnx.pipeline import Candidate, StaticPipeline, prepare_model, write_candidate
from lowbit.onnx.planner import INT16_OPSET
from lowbit.onnx.registry import rule_for
from lowbit.onnx.session import make_session
from lowbit.onnx.verify import (OutputErrors, VerifyReport, batches_with_calls, compare_models, label_accuracy,
                                looks_like_class_scores, time_pair)
from lowbit.plan import QuantPlan
from lowbit.progress import progress

METRICS = ("cosine", "top1")
FALLBACK_LEVELS = ("int16", "float")  # cheapest first
DEFAULT_FALLBACK = ("float",)


@dataclass
class Layer:
    node: str
    op_type: str
    macs: int
    unit: str = ""  # the fallback unit (layers sharing a quantized input fall back together)
    gain: float | None = None  # score gained when its unit alone falls back; None: not measured in time
    solo_drop: float | None = None  # kept for old reports; the search ranks by `gain`


@dataclass
class Trial:
    """One evaluated candidate: which layers fell back (to which precision), what it scored, how fast it ran."""

    stage: str
    excluded: list[str]  # weighted layers not at the starting precision, whatever their fallback
    score: float
    drop: float
    met: bool
    int8_mac_fraction: float  # share of MACs at the starting precision (int8; int4 for weight-only)
    speedup: float | None
    seconds: float
    base: list[str] = field(default_factory=list)  # non-weighted nodes (elementwise ops) also kept float
    precision: dict[str, str] = field(default_factory=dict)  # excluded layer -> fallback ("int16", "float", ...)
    float_mac_fraction: float = 0.0


@dataclass
class BudgetResult:
    output_path: Path
    met: bool
    metric: str
    max_drop: float
    float_score: float
    score: float
    drop: float
    excluded: list[str]
    int8_mac_fraction: float
    layers: list[Layer]
    trials: list[Trial]
    seconds: float
    ranking_seconds: float
    time_limit: float
    time_limit_hit: bool
    plan: QuantPlan
    report: VerifyReport | None
    warnings: list[str] = field(default_factory=list)
    precision: dict[str, str] = field(default_factory=dict)  # excluded layer -> the fallback it got
    fallback: list[str] = field(default_factory=lambda: list(DEFAULT_FALLBACK))
    start: str = "int8"  # the precision every layer starts at (and keeps unless listed in `precision`)

    def layer_precision(self, node: str) -> str:
        """The precision `node` ended at: the starting one, or its fallback."""
        return self.precision.get(node, self.start)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("plan", "report", "output_path")}
        data["output"] = str(self.output_path)
        data["report"] = None if self.report is None else self.report.to_dict()
        return data

    def summary(self) -> str:
        verdict = "met" if self.met else "NOT MET"
        what = "static int8" if self.start == "int8" else f"weight-only {self.start}"
        fell = ", ".join(f"{n} ({self.precision.get(n, 'float')})" for n in self.excluded)
        lines = [f"wrote {self.output_path} ({what} under an accuracy budget)",
                 f"budget {verdict}: {self.metric} drop {self.drop:.5f} (max {self.max_drop:g}; float "
                 f"{self.float_score:.5f}, quantized {self.score:.5f})",
                 f"kept {self.start}: {len(self.layers) - len(self.excluded)}/{len(self.layers)} weighted layers, "
                 f"{100 * self.int8_mac_fraction:.1f}% of MACs",
                 f"fell back (ladder {self.start} -> {' -> '.join(self.fallback)}): {fell or 'none'}",
                 f"search: {len(self.trials)} candidates in {self.seconds:.1f} s "
                 f"(ranking {self.ranking_seconds:.1f} s)"]
        if self.report is not None:
            lines.append(self.report.table())
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


class CandidateScorer:
    """Scores a candidate model against float outputs computed once (or with the user's function)."""

    def __init__(self, float_path: Path, reference: onnx.ModelProto, data: CalibrationData, metric: str,
                 evaluate: Callable[[str], float] | None, batch_size: int, threads: int | None,
                 measure_speed: bool) -> None:
        self.metric, self.evaluate, self.threads = metric, evaluate, threads
        self.float_session = make_session(reference, threads=threads)
        runs = list(batches_with_calls(data, batch_size))
        self.batches, self.calls = [b for b, _ in runs], [c for _, c in runs]
        self.names = [o.name for o in self.float_session.get_outputs()]
        self.expected = [self.float_session.run(self.names, b) for b in self.batches]
        self.measure_speed = measure_speed
        # --metric top1 with labels in the data: accuracy against them, not agreement with float.
        self.labels = data.labels if metric == "top1" and evaluate is None else None
        self.metric_name = "user evaluate" if evaluate else metric + (" (label accuracy)" if self.labels is not None
                                                                    else "")
        if metric == "top1" and evaluate is None and not any(looks_like_class_scores(o) for o in self.expected[0]):
            raise LowbitError("--metric top1 needs an output of shape (batch, classes); this model has none, "
                              "use --metric cosine")
        self.float_score = float(evaluate(str(float_path))) if evaluate is not None else 1.0
        if self.labels is not None:
            self.float_score = label_accuracy(self.expected, self.calls, self.labels)

    def builtin(self, session, metric: str) -> float:
        if self.labels is not None:
            return label_accuracy([session.run(self.names, b) for b in self.batches], self.calls, self.labels)
        errors: dict[int, OutputErrors] = {}  # the quantize table's metrics: they see every output shape
        for batch, calls, expected in zip(self.batches, self.calls, self.expected):
            for i, (ref, got) in enumerate(zip(expected, session.run(self.names, batch))):
                if np.asarray(ref).dtype.kind == "f" and np.asarray(ref).size:
                    errors.setdefault(i, OutputErrors(self.names[i])).add(ref, got, calls)
        results = [e.result() for e in errors.values()]
        if metric == "top1":
            return min((r.top1_agreement for r in results if r.top1_agreement is not None), default=1.0)
        return min((r.cosine_mean for r in results), default=1.0)

    def score(self, model: onnx.ModelProto, timed: bool = False) -> tuple[float, float | None]:
        """(score, speedup vs float or None). Timing triples a candidate's cost, so the search
        times only on request; the saved model's speed is measured by the final verification."""
        session = make_session(model, threads=self.threads)
        if self.evaluate is not None:
            with tempfile.TemporaryDirectory(prefix="lowbit-budget-") as tmp:
                path = Path(tmp) / "candidate.onnx"
                save_model(model, path)
                value = float(self.evaluate(str(path)))
        else:
            value = self.builtin(session, self.metric)
        speedup = None
        if timed and self.measure_speed:
            t_float, t_quant = time_pair(self.float_session, session, self.batches[0], warmup=1, repeats=5)
            speedup = t_float / t_quant if t_quant > 0 else None
        return value, speedup


def parse_fallback(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The fallback ladder, cheapest first, from "int16,float" or ("int16", "float")."""
    if value is None:
        return DEFAULT_FALLBACK
    steps = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    unknown = [v for v in steps if v not in FALLBACK_LEVELS]
    if unknown or not steps:
        raise LowbitError(f"unknown fallback step(s) {unknown or steps}; give one or more of "
                          f"{', '.join(FALLBACK_LEVELS)} (e.g. --fallback int16,float)")
    return tuple(level for level in FALLBACK_LEVELS if level in steps)


def search_precision(float_path: str | os.PathLike, out_path: str | os.PathLike, *,
                     calib: str | os.PathLike | dict, eval_data: str | os.PathLike | dict | None = None,
                     max_drop: float, metric: str = "cosine", evaluate: Callable[[str], float] | None = None,
                     time_limit: float = 600.0, calib_method: str = "auto", per_channel: bool = True,
                     exclude: tuple[str, ...] | list[str] = (), samples: int | None = None, batch_size: int = 16,
                     threads: int | None = None, smooth: bool | None = None, smooth_alpha: float | dict = 0.5,
                     equalize: bool = False, measure_speed: bool = True,
                     fallback: str | tuple[str, ...] | list[str] = DEFAULT_FALLBACK,
                     outlier_split: bool | None = None, config: StaticConfig | None = None) -> BudgetResult:
    """Static int8 quantization of `float_path` with per-layer fallback chosen so the model stays
    within `max_drop` of the float model (see the module docstring). `fallback`: the precisions a
    layer may fall back to, e.g. ("int16", "float"); each fallen-back layer gets the cheapest one
    that meets the budget. `evaluate(path) -> score` (higher is better) replaces `metric`. Always
    writes the best candidate to `out_path`; `result.met` says whether the budget was met. `config`:
    the static recipe as a `StaticConfig` (the CLI passes one, so every rewrite pass reaches the
    search); it replaces calib_method, per_channel, exclude, smooth, smooth_alpha, equalize and
    outlier_split."""
    started = time.perf_counter()
    float_path, out_path = Path(float_path), Path(out_path)
    check_budget(metric, max_drop, time_limit)
    ladder = parse_fallback(fallback)
    if calib is None:
        raise LowbitError("the accuracy-budget search calibrates static int8; pass --calib CALIB.npz")
    if config is None:
        config = StaticConfig(calib_method=calib_method, per_channel=per_channel, exclude=tuple(exclude),
                              smooth=smooth, smooth_alpha=smooth_alpha, equalize=equalize, outlier_split=outlier_split)
    if config.bias_correction:
        raise LowbitError("--max-drop cannot be combined with --bias-correction yet; drop one of the two")
    config.validate(has_calibration=True)
    calib_method, per_channel, exclude = config.calib_method, config.per_channel, config.exclude
    original = load_model(float_path)
    inputs = model_inputs(original)
    model = _at_int16_opset(original) if "int16" in ladder else prepare_model(original, copy=False)
    del original
    calib_data = CalibrationData(calib, inputs, samples=samples)
    eval_set = CalibrationData(eval_data, inputs, what="evaluation data") if eval_data is not None else calib_data
    pipeline = StaticPipeline(model, config, calib_data, batch_size=batch_size, threads=threads,
                              source=float_path.name).calibrate()
    model = pipeline.model
    stats = pipeline.stats
    alternative = None if calib_method == "minmax" else pipeline.stats_for("minmax")
    active = pipeline.planner.active
    op_types = {n.name: n.op_type for n in model.graph.node}
    names = [n for n, rule in active.items() if rule.kind == "compute"]
    macs = layer_macs(model, names, eval_set.first_batch(1), threads=threads)
    units = _fallback_units(model, names)
    layers = [Layer(n, op_types[n], macs[n], unit=u) for u, members in units.items() for n in members]
    elementwise = [n for n, rule in active.items() if rule.kind == "elementwise"]
    state = {"ranges": dict(stats.ranges), "base": []}  # current ranges, extra float nodes

    def build(assignment: dict[str, str], ranges: dict | None = None) -> tuple[onnx.ModelProto, QuantPlan]:
        candidate = pipeline.build(exclude=state["base"], precision=assignment, ranges=ranges or state["ranges"])
        return candidate.model, candidate.plan

    scorer = CandidateScorer(float_path, model, eval_set, metric, evaluate, batch_size, threads, measure_speed)
    deadline = started + time_limit
    ranges_of: list[dict] = []  # the activation ranges each trial used (kept out of the JSON result)
    record = TrialRecorder(scorer, macs, max_drop)

    def trial(stage: str, assignment: dict[str, str], ranges: dict | None = None) -> Trial:
        ranges_of.append(ranges or state["ranges"])
        return record(stage, assignment, lambda: build(assignment, ranges)[0], base=state["base"])

    trials = record.trials
    first = trial("all int8", {})
    ranking_seconds = 0.0
    if not first.met and layers:
        current = first
        if alternative is not None:
            # At most a third of the time: ranking and bisection need the rest.
            current = _choose_ranges(units, model, stats, alternative, state, trial, current,
                                     min(deadline, started + time_limit / 3))
        if not current.met and elementwise and time.perf_counter() < deadline:
            state["base"] = elementwise
            candidate = trial("elementwise ops float", {})
            if candidate.drop < current.drop:
                current = candidate
            else:
                state["base"] = []
        if not current.met:
            ranking_seconds = rank_units(layers, units, trial, current, deadline, started + time_limit / 2, ladder[-1])
            bisect_and_refine(layers, trial, deadline, ladder)
    best = best_trial(trials)
    state["ranges"], state["base"] = ranges_of[trials.index(best)], best.base
    quantized, plan = build(best.precision)
    minmax_tensors = sorted(t for t, r in state["ranges"].items() if r is not stats.ranges.get(t))
    algorithms = plan.settings["algorithms"]
    if minmax_tensors:
        algorithms["minmax_ranges"] = minmax_tensors
    if best.base:
        algorithms["elementwise_float"] = best.base
    to_float = [n for n in best.excluded if best.precision[n] == "float"]
    plan.settings["exclude"] = [*exclude, *best.base, *to_float]
    del plan.settings["calibration_runs_per_batch"]
    plan.settings["budget"] = {"metric": metric, "max_drop": max_drop, "met": best.met, "drop": best.drop,
                               "fallback": list(ladder), "fell_back": best.excluded, "precision": best.precision,
                               "int8_mac_fraction": best.int8_mac_fraction}
    write_candidate(Candidate(quantized, plan), out_path, inputs=[float_path])
    report = compare_models(float_path, out_path, eval_set, batch_size=batch_size, threads=threads,
                            speed=measure_speed)
    result = BudgetResult(out_path, best.met, scorer.metric_name, max_drop, scorer.float_score,
                          best.score, best.drop, best.excluded, best.int8_mac_fraction, layers, trials,
                          time.perf_counter() - started, ranking_seconds, time_limit,
                          time.perf_counter() > deadline, plan, report, precision=dict(best.precision),
                          fallback=list(ladder))
    result.warnings += outcome_warnings(result)
    return result


def check_budget(metric: str, max_drop: float, time_limit: float) -> None:
    if metric not in METRICS:
        raise LowbitError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not max_drop >= 0:
        raise LowbitError(f"--max-drop must be a non-negative number (0.005 = 0.5%), got {max_drop}")
    if time_limit <= 0:
        raise LowbitError(f"--time-limit must be positive seconds, got {time_limit}")


def _at_int16_opset(original: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return prepare_model(original, copy=False, opset=INT16_OPSET)
    except LowbitError:
        raise LowbitError(f"the int16 fallback needs opset {INT16_OPSET} (int16 QuantizeLinear) and this model "
                          f"does not convert to it; re-export at opset {INT16_OPSET} or use --fallback float") from None


def outcome_warnings(result: BudgetResult) -> list[str]:
    """Budget not met, time limit hit, slower than float: said plainly."""
    warnings = []
    if not result.met:
        warnings.append(f"the accuracy budget was NOT met: best drop {result.drop:.5f} > {result.max_drop:g}; saved "
                        "the most accurate model found (loosen --max-drop, give more calibration data or time)")
    if result.time_limit_hit:
        warnings.append(f"the time limit of {result.time_limit:g} s ran out; the search kept the best model so far")
    if result.report is not None and result.report.speedup is not None and result.report.speedup < 1.0:
        warnings.append(f"the quantized model is SLOWER than float ({result.report.speedup:.2f}x) on this machine")
    return warnings


class TrialRecorder:
    """Evaluates candidates ("this layer -> that precision") and keeps every trial."""

    def __init__(self, scorer: CandidateScorer, macs: dict[str, int], max_drop: float) -> None:
        self.scorer, self.macs, self.max_drop = scorer, macs, max_drop
        self.total = max(1, sum(macs.values()))
        self.trials: list[Trial] = []

    def __call__(self, stage: str, assignment: dict[str, str], make_model: Callable[[], onnx.ModelProto],
                 base: list[str] = ()) -> Trial:
        t0 = time.perf_counter()
        score, speedup = self.scorer.score(make_model())
        drop = self.scorer.float_score - score
        moved = sum(self.macs[n] for n in assignment) / self.total
        floated = sum(self.macs[n] for n, level in assignment.items() if level == "float") / self.total
        self.trials.append(Trial(stage, list(assignment), score, drop, drop <= self.max_drop, 1 - moved, speedup,
                                 time.perf_counter() - t0, list(base), dict(assignment), floated))
        return self.trials[-1]


def _fallback_units(model: onnx.ModelProto, names: list[str]) -> dict[str, list[str]]:
    """Weighted layers grouped by shared activation inputs (union-find), in graph order; each
    unit is named after its first layer."""
    constants = {t.name for t in model.graph.initializer}
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    reader: dict[str, str] = {}
    wanted = set(names)
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for tensor in unit_inputs(node):
            if not tensor or tensor in constants:
                continue
            if tensor in reader:
                parent[root(node.name)] = root(reader[tensor])
            else:
                reader[tensor] = node.name
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(root(n), []).append(n)
    return {members[0]: members for members in units.values()}


def _unit_inputs(model: onnx.ModelProto, members: list[str]) -> set[str]:
    constants = {t.name for t in model.graph.initializer}
    chosen = set(members)
    return {t for node in model.graph.node if node.name in chosen for t in unit_inputs(node) if t and t not in constants}


def unit_inputs(node: onnx.NodeProto) -> list[str]:
    """The activation tensors a weighted layer reads (those whose Q/DQ pair its readers share)."""
    rule = rule_for(node)
    return [node.input[i] for i in rule.unit_inputs() if i < len(node.input)] if rule is not None else []


def _choose_ranges(units: dict[str, list[str]], model: onnx.ModelProto, stats: ActivationStats,
                   alternative: ActivationStats, state: dict, trial, current: Trial, deadline: float) -> Trial:
    """Start from whichever of the two calibrations scores better on the whole model, then switch
    each unit's input ranges to the other one when that measurably lowers the drop."""
    other = {**stats.ranges, **alternative.ranges}
    whole = trial("all int8, min/max ranges", {}, other)
    if whole.drop < current.drop:
        state["ranges"], current, flip_to = other, whole, stats.ranges
    else:
        flip_to = alternative.ranges
    for members in units.values():
        if current.met or time.perf_counter() > deadline:
            break
        tensors = [t for t in _unit_inputs(model, members) if t in flip_to]
        if not tensors:
            continue
        ranges = {**state["ranges"], **{t: flip_to[t] for t in tensors}}
        candidate = trial("range choice", {}, ranges)
        if candidate.drop < current.drop:
            state["ranges"], current = ranges, candidate
    return current


def rank_units(layers: list[Layer], units: dict[str, list[str]], trial, current: Trial, deadline: float,
               ranking_deadline: float, level: str = "float") -> float:
    """Each unit's gain: the drop of `current` minus the drop with that unit alone at `level` (until
    half the time is spent). Orders `layers` by unit, best gain per fallen-back MAC first."""
    started = time.perf_counter()
    gains: dict[str, float] = {}
    with progress(total=len(units), desc="ranking fallback units", unit="unit") as bar:
        for name, members in units.items():
            if time.perf_counter() > min(deadline, ranking_deadline):
                break
            gains[name] = current.drop - trial("ranking", dict.fromkeys(members, level)).drop
            bar.update(1)
    unit_macs = {name: max(1, sum(l.macs for l in layers if l.unit == name)) for name in units}
    for layer in layers:
        layer.gain = gains.get(layer.unit)

    def order(unit: str) -> tuple:
        gain = gains.get(unit)
        return (gain is None, -(gain or 0.0) / unit_macs[unit], unit_macs[unit])

    rank = {name: i for i, name in enumerate(sorted(units, key=order))}
    layers.sort(key=lambda l: rank[l.unit])
    return time.perf_counter() - started


def bisect_and_refine(layers: list[Layer], trial, deadline: float, ladder: tuple[str, ...] = ("float",)) -> None:
    """Smallest k such that the k best-ranked units at the ladder's last step meet the budget; then,
    biggest unit (most MACs) first, give each the cheapest precision the budget still allows: back
    to the starting one, else the ladder's earlier steps in order."""
    units: dict[str, list[str]] = {}
    for layer in layers:
        units.setdefault(layer.unit, []).append(layer.node)
    order = list(units)

    def assign(levels: dict[str, str]) -> dict[str, str]:
        return {n: level for u, level in levels.items() for n in units[u]}

    top = ladder[-1]
    if time.perf_counter() > deadline or not trial(f"all ranked layers {top}", assign(dict.fromkeys(order, top))).met:
        return
    lo, hi = 0, len(order)  # lo fails (the all-int8 trial), hi meets
    while hi - lo > 1 and time.perf_counter() < deadline:
        mid = (lo + hi) // 2
        if trial("bisection", assign(dict.fromkeys(order[:mid], top))).met:
            hi = mid
        else:
            lo = mid
    chosen = dict.fromkeys(order[:hi], top)
    macs = {u: sum(l.macs for l in layers if l.unit == u) for u in units}
    for unit in sorted(chosen, key=lambda u: -macs[u]):
        # None = the starting precision; with one unit left that is the all-int8 model, known to fail.
        cheaper = ([None] if len(chosen) > 1 else []) + list(ladder[:-1])
        for level in cheaper:
            if time.perf_counter() > deadline:
                return
            candidate = {u: l for u, l in chosen.items() if u != unit}
            if level is not None:
                candidate[unit] = level
            if trial("refine", assign(candidate)).met:
                chosen = candidate
                break


def best_trial(trials: list[Trial]) -> Trial:
    """Meeting candidates: most MACs at the starting precision, then least float, then best score;
    otherwise the best score."""
    met = [t for t in trials if t.met]
    if met:
        return max(met, key=lambda t: (t.int8_mac_fraction, -t.float_mac_fraction, t.score))
    return max(trials, key=lambda t: (t.score, t.int8_mac_fraction))
