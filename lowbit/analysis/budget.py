"""Accuracy budget: keep as many layers int8 as possible while the model stays within `max_drop`.

    calibrate once -> all-int8 candidate -> rank the weighted layers by measured sensitivity
    -> fall the worst k back to float, k found by bisection -> try re-quantizing each fallen-back
    layer, biggest first -> save the best candidate atomically -> verify it (fidelity, size, speed)

Calibration runs once: every candidate excludes some layers, so its activations are a subset of
the full plan's, whose statistics are reused. A candidate is then one plan build, one QDQ write
and one evaluation on ONNX Runtime (with its int8 kernels, as deployed).

Sensitivity = "quantize only this layer": the drop of the final-output cosine when one weighted
layer (Conv, ConvTranspose, MatMul, Gemm) is int8 and every other weighted layer float. It is
measured on the real runtime, so it sees weight outliers as well as activation clipping; the
per-activation SQNR of `layer_sensitivity` accumulates error down the graph and ranks the last
layers worst whatever caused it. Fallback is int8 -> float: ONNX Runtime's CPU kernels have no
int16 path (a 16-bit Q/DQ pair around a Conv runs as float Conv plus extra Q/DQ work), so an
int16 step would cost speed without being a real deployment precision here.

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
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import collect_activation_stats
from lowbit.onnx.cpu import has_amx_int8
from lowbit.onnx.io import load_model, save_model
from lowbit.onnx.planner import ACTIVATION_SPEC, StaticPlanner, node_names
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import ensure_opset, write_qdq
from lowbit.onnx.quantize import CALIB_METHODS, _smooth, attach_plan
from lowbit.onnx.session import make_session
from lowbit.onnx.verify import VerifyReport, _cosine_per_sample, _looks_like_class_scores, compare_models, time_pair
from lowbit.plan import QuantPlan
from lowbit.progress import progress

METRICS = ("cosine", "top1")


@dataclass
class Layer:
    node: str
    op_type: str
    macs: int
    solo_drop: float | None = None  # cosine drop with only this layer int8; None: not measured in time


@dataclass
class Trial:
    """One evaluated candidate: which layers fell back, what it scored, how fast it ran."""

    stage: str
    excluded: list[str]
    score: float
    drop: float
    met: bool
    int8_mac_fraction: float
    speedup: float | None
    seconds: float


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

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("plan", "report", "output_path")}
        data["output"] = str(self.output_path)
        data["report"] = None if self.report is None else self.report.to_dict()
        return data

    def summary(self) -> str:
        verdict = "met" if self.met else "NOT MET"
        lines = [f"wrote {self.output_path} (static int8 under an accuracy budget)",
                 f"budget {verdict}: {self.metric} drop {self.drop:.5f} (max {self.max_drop:g}; float "
                 f"{self.float_score:.5f}, quantized {self.score:.5f})",
                 f"kept int8: {len(self.layers) - len(self.excluded)}/{len(self.layers)} weighted layers, "
                 f"{100 * self.int8_mac_fraction:.1f}% of MACs",
                 f"fell back to float: {', '.join(self.excluded) or 'none'}",
                 f"search: {len(self.trials)} candidates in {self.seconds:.1f} s (ranking {self.ranking_seconds:.1f} s)"]
        if self.report is not None:
            lines.append(self.report.table())
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


class _Scorer:
    """Scores a candidate model against float outputs computed once (or with the user's function)."""

    def __init__(self, float_path: Path, reference: onnx.ModelProto, data: CalibrationData, metric: str,
                 evaluate: Callable[[str], float] | None, batch_size: int, threads: int | None,
                 measure_speed: bool) -> None:
        self.metric, self.evaluate, self.threads = metric, evaluate, threads
        self.float_session = make_session(reference, threads=threads)
        self.batches = list(data.batches(batch_size))
        self.names = [o.name for o in self.float_session.get_outputs()]
        self.expected = [self.float_session.run(self.names, b) for b in self.batches]
        self.measure_speed = measure_speed
        if metric == "top1" and evaluate is None and not any(_looks_like_class_scores(o) for o in self.expected[0]):
            raise LowbitError("--metric top1 needs an output of shape (batch, classes); this model has none, "
                              "use --metric cosine")
        self.float_score = float(evaluate(str(float_path))) if evaluate is not None else 1.0

    def builtin(self, session, metric: str) -> float:
        per_output: dict[int, list[np.ndarray]] = {}
        for batch, expected in zip(self.batches, self.expected):
            for i, (ref, got) in enumerate(zip(expected, session.run(self.names, batch))):
                ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
                if ref.dtype.kind != "f" or ref.size == 0 or (metric == "top1" and not _looks_like_class_scores(ref)):
                    continue
                value = (ref.argmax(-1) == got.argmax(-1)) if metric == "top1" else _cosine_per_sample(ref, got)
                per_output.setdefault(i, []).append(np.asarray(value, np.float64))
        return min((float(np.concatenate(v).mean()) for v in per_output.values()), default=1.0)

    def score(self, model: onnx.ModelProto) -> tuple[float, float | None]:
        """(score, speedup vs float or None)."""
        session = make_session(model, threads=self.threads)
        if self.evaluate is not None:
            with tempfile.TemporaryDirectory(prefix="lowbit-budget-") as tmp:
                path = Path(tmp) / "candidate.onnx"
                save_model(model, path)
                value = float(self.evaluate(str(path)))
        else:
            value = self.builtin(session, self.metric)
        speedup = None
        if self.measure_speed:
            t_float, t_quant = time_pair(self.float_session, session, self.batches[0], warmup=1, repeats=5)
            speedup = t_float / t_quant if t_quant > 0 else None
        return value, speedup


def search_precision(float_path: str | os.PathLike, out_path: str | os.PathLike, *,
                     calib: str | os.PathLike | dict, eval_data: str | os.PathLike | dict | None = None,
                     max_drop: float, metric: str = "cosine", evaluate: Callable[[str], float] | None = None,
                     time_limit: float = 600.0, calib_method: str = "auto", per_channel: bool = True,
                     exclude: tuple[str, ...] | list[str] = (), samples: int | None = None, batch_size: int = 16,
                     threads: int | None = None, smooth: bool | None = None, smooth_alpha: float | dict = 0.5,
                     equalize: bool = False, measure_speed: bool = True) -> BudgetResult:
    """Static int8 quantization of `float_path` with per-layer float fallback chosen so the model
    stays within `max_drop` of the float model (see the module docstring). Always writes the best
    candidate to `out_path`; `result.met` says whether the budget was met."""
    started = time.perf_counter()
    float_path, out_path = Path(float_path), Path(out_path)
    if metric not in METRICS:
        raise LowbitError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if calib_method not in CALIB_METHODS:
        raise LowbitError(f"unknown calibration method {calib_method!r}; use one of {', '.join(CALIB_METHODS)}")
    if not max_drop >= 0:
        raise LowbitError(f"--max-drop must be a non-negative number (0.005 = 0.5%), got {max_drop}")
    if time_limit <= 0:
        raise LowbitError(f"--time-limit must be positive seconds, got {time_limit}")
    if calib is None:
        raise LowbitError("the accuracy-budget search calibrates static int8; pass --calib CALIB.npz")
    original = load_model(float_path)
    model = preprocess(ensure_opset(original))
    node_names(model)
    calib_data = CalibrationData(calib, original, samples=samples)
    eval_set = CalibrationData(eval_data, original, what="evaluation data") if eval_data is not None else calib_data
    algorithms: dict = {}
    if equalize:
        from lowbit.onnx.equalize import equalize_model

        model, eq = equalize_model(model, skip=set(exclude))
        algorithms.update(equalized_chains=eq.chains, relu6_to_relu=eq.relu6_replaced)
    planner = StaticPlanner(model, per_channel_weights=per_channel, exclude=exclude)
    if smooth is None or smooth:
        model, smoothed, _ = _smooth(model, planner, calib_data, smooth_alpha, batch_size, threads)
        if smoothed:
            algorithms["smoothquant"] = smoothed
            planner = StaticPlanner(model, per_channel_weights=per_channel, exclude=exclude)
    stats = collect_activation_stats(model, planner.candidates(), calib_data, method=calib_method,
                                     spec=ACTIVATION_SPEC, batch_size=batch_size, threads=threads)
    amx = has_amx_int8()
    op_types = {n.name: n.op_type for n in model.graph.node}
    names = [n for n, rule in planner.active.items() if rule.kind == "compute"]
    macs = layer_macs(model, names, eval_set.first_batch(1), threads=threads)
    layers = [Layer(n, op_types[n], macs[n]) for n in names]
    total_macs = max(1, sum(macs.values()))

    def build(excluded: list[str]) -> tuple[onnx.ModelProto, QuantPlan]:
        plan = StaticPlanner(model, per_channel_weights=per_channel, exclude=[*exclude, *excluded]).build(stats)
        for node in excluded:
            plan.float_nodes[node] = "fell back to float by the accuracy-budget search"
        return write_qdq(model, plan, conv_weights_for_qgemm=amx), plan

    scorer = _Scorer(float_path, model, eval_set, metric, evaluate, batch_size, threads, measure_speed)
    deadline = started + time_limit
    trials: list[Trial] = []

    def trial(stage: str, excluded: list[str]) -> Trial:
        t0 = time.perf_counter()
        score, speedup = scorer.score(build(excluded)[0])
        drop = scorer.float_score - score
        kept = 1 - sum(macs[n] for n in excluded) / total_macs
        trials.append(Trial(stage, list(excluded), score, drop, drop <= max_drop, kept, speedup,
                            time.perf_counter() - t0))
        return trials[-1]

    first = trial("all int8", [])
    ranking_seconds = 0.0
    if not first.met and layers:
        ranking_seconds = _rank(layers, build, scorer, deadline, started + time_limit / 2)
        _bisect_and_refine(layers, trial, deadline)
    best = _best(trials)
    quantized, plan = build(best.excluded)
    plan.settings = {"calib_method": calib_method, "per_channel": per_channel, "exclude": [*exclude, *best.excluded],
                     "samples": calib_data.num_samples, "source": float_path.name, "algorithms": algorithms,
                     "budget": {"metric": metric, "max_drop": max_drop, "met": best.met, "drop": best.drop,
                                "fell_back": best.excluded, "int8_mac_fraction": best.int8_mac_fraction}}
    attach_plan(quantized, plan)
    save_model(quantized, out_path, inputs=[float_path])
    report = compare_models(float_path, out_path, eval_set, batch_size=batch_size, threads=threads,
                            speed=measure_speed)
    hit = time.perf_counter() > deadline
    result = BudgetResult(out_path, best.met, "user evaluate" if evaluate else metric, max_drop, scorer.float_score,
                          best.score, best.drop, best.excluded, best.int8_mac_fraction, layers, trials,
                          time.perf_counter() - started, ranking_seconds, time_limit, hit, plan, report)
    if not best.met:
        result.warnings.append(f"the accuracy budget was NOT met: best drop {best.drop:.5f} > {max_drop:g}; saved the "
                               "most accurate model found (loosen --max-drop, give more calibration data or time)")
    if hit:
        result.warnings.append(f"the time limit of {time_limit:g} s ran out; the search kept the best model so far")
    if report.speedup is not None and report.speedup < 1.0:
        result.warnings.append(f"the quantized model is SLOWER than float ({report.speedup:.2f}x) on this machine")
    return result


def _rank(layers: list[Layer], build, scorer: _Scorer, deadline: float, ranking_deadline: float) -> float:
    """Measure each layer's solo cosine drop (until half the time is spent), sort worst first."""
    started = time.perf_counter()
    names = [layer.node for layer in layers]
    with progress(total=len(layers), desc="ranking layers", unit="layer") as bar:
        for layer in layers:
            if time.perf_counter() > min(deadline, ranking_deadline):
                break
            session = make_session(build([n for n in names if n != layer.node])[0], threads=scorer.threads)
            layer.solo_drop = 1.0 - scorer.builtin(session, "cosine")
            bar.update(1)
    # Unmeasured layers go last, smallest first (cheapest to fall back if the search reaches them).
    layers.sort(key=lambda l: (l.solo_drop is None, -(l.solo_drop or 0.0), l.macs))
    return time.perf_counter() - started


def _bisect_and_refine(layers: list[Layer], trial, deadline: float) -> None:
    """Smallest k such that falling back the k worst layers meets the budget, then re-quantize
    whichever of those k layers the budget still allows, biggest (most MACs) first."""
    order = [layer.node for layer in layers]
    if time.perf_counter() > deadline or not trial("all ranked layers float", order).met:
        return
    lo, hi = 0, len(order)  # lo fails (the all-int8 trial), hi meets
    while hi - lo > 1 and time.perf_counter() < deadline:
        mid = (lo + hi) // 2
        if trial("bisection", order[:mid]).met:
            hi = mid
        else:
            lo = mid
    excluded = order[:hi]
    macs = {layer.node: layer.macs for layer in layers}
    for node in sorted(excluded, key=lambda n: -macs[n]):
        if len(excluded) <= 1 or time.perf_counter() > deadline:
            break
        candidate = [n for n in excluded if n != node]
        if trial("refine", candidate).met:
            excluded = candidate


def _best(trials: list[Trial]) -> Trial:
    """Meeting candidates: most int8 MACs, then best score; otherwise the best score."""
    met = [t for t in trials if t.met]
    if met:
        return max(met, key=lambda t: (t.int8_mac_fraction, t.score))
    return max(trials, key=lambda t: (t.score, t.int8_mac_fraction))
