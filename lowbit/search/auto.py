"""`--mode auto`: pick the quantization strategy that works on this model and this CPU.

    one StaticPipeline calibration (outlier split, SmoothQuant, observers for every range method)
    -> statistics decide which candidates are worth a trial:
         weight channel-range spread, activation channel spread   -> equalization (+ bias correction)
         Convs with biases and per-tensor or depthwise weights     -> bias correction
         MatMul inputs whose min/max range is far past their 99.99th percentile -> hybrid (those
           MatMuls dynamic int8, the rest static)
         MatMul/Gemm with constant weights                         -> dynamic int8, and dynamic int8
                                                                      with the output layer float
         ... holding most parameters, activations of a few rows   -> weight-only int8/int4 (MatMulNBits)
         a CPU with fp16 arithmetic (avx512_fp16, amx_fp16)         -> fp16
         a static candidate within budget                          -> the same with one layer kind
           (each compute op type, depthwise Convs apart; int8 elementwise ops) float at a time,
           then the kinds that measured faster in float all together (int8 where it pays)
    -> each candidate: built from the one calibration (no model run), scored on a bounded, evenly
       spaced subset of the evaluation batches (SCORE_SECONDS of float compute, at least
       MIN_SCORED_BATCHES, and MIN_SCORED_POSITIONS positions of per-position class scores; all
       of them with labels) against float outputs computed once by the model as the user gave it;
       the written model is verified on all of them (a candidate whose mean cosine, each call's
       being at most 1, can no longer reach the budget nor the closest candidate's is scored no
       further: it can neither win nor be the closest); the candidates within the budget are timed
       against that float model, the candidate as it will be written (no shape annotations),
       interleaved, same session options, median (`lowbit.onnx.timing.time_models`),
       with enough repeats to cover MIN_TIMED_SECONDS per model (sub-millisecond models too)
    -> close calls are timed again, together in one interleaved run with the float model: the
       candidates within RETIME_BAND of the fastest, and a fastest one within RETIME_BAND of float
       A model with per-position class scores (`verify.looks_like_position_scores`, e.g. a CTC
       recognizer's softmax frames) is also gated on its decisions: a candidate whose expected
       share of flipped arg-max positions (`verify.expected_disagreement`) is over
       `AutoConfig.max_position_drop` is over budget whatever its cosine (a cosine budget cannot
       see flips between near-tied classes: the float model's near-ties are where strings change)
    -> the fastest within budget wins (a candidate within the timing noise of the fastest but more
       accurate beats it: the noise is SPEED_NOISE, or the float model's measured spread in that
       run when larger); none within budget: the most accurate, said plainly.

Memory: the float outputs are computed after calibration, by the model as the user gave it, in
the session the timings and the final verification use too (which reuses those outputs instead of
running the float model on those batches again). One candidate is in memory at a time: built,
serialized, its model freed, scored and timed in one session that is closed before the next is
built. The candidates that can still win (within the budget, or while none is, the closest) are
kept as files in a temporary folder, read back only for the re-timing and the winner. Freed memory
is handed back to the OS after each (glibc keeps a closed session's buffers resident otherwise).
Bound: the static run's footprint after calibration + the float session + one candidate session
(+ at most MAX_RETIMED - 1 more candidate sessions during the re-timing, of candidates within
RETIME_BAND of the fastest). ResNet-18-style at 16x3x224x224: 860 MB against the static run's
677 MB; the difference is the float session and a candidate with float Convs (~250-300 MB each
at that batch).

Only equalization needs a second calibration (it rescales activations per channel, so ranges of
the unequalized graph do not carry over); it runs only when the statistics say it can matter, and
measures only the tensors equalization rescales (Relu links: every other tensor keeps its float
values, so its statistics come from the first calibration; `StaticPipeline.calibrate(reuse=)`).
Bias correction's channel means are measured in the calibration pass itself.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lowbit.memory import trim_heap
from lowbit.onnx.config import DEFAULT_MAX_DROP, AutoConfig, DynamicConfig, Fp16Config, StaticConfig, WeightOnlyConfig
from lowbit.onnx.control_flow import BodyPlanners
from lowbit.onnx.cpu import cpu_flags
from lowbit.onnx.dynamic import plan_dynamic, write_dynamic
from lowbit.onnx.equalize import find_chains
from lowbit.onnx.io import drop_shape_annotations
from lowbit.onnx.pipeline import (FirstRows, StaticPipeline, activation_channel_spread, channel_spreads,
                                  input_channel_peaks, weight_channel_spread)
from lowbit.onnx.quantize import Handled, RunInputs, run_fp16, run_weight_only
from lowbit.onnx.recurrent import has_int8_lstms
from lowbit.onnx.registry import rule_for
from lowbit.onnx.session import default_threads, make_session
from lowbit.onnx.timing import evenly_spaced, representative_feeds, time_models
from lowbit.onnx.verify import (MIN_VALUES_PER_CALL, FloatReference, OutputErrors, OutputFidelity, batches_with_calls,
                               label_accuracy, looks_like_binary_probabilities, looks_like_class_scores,
                               looks_like_position_scores)
from lowbit.plan import QuantPlan

# A MatMul input whose min/max range is this many times its 99.99th-percentile range is
# outlier-heavy: one static scale wastes most int8 levels on a few values; dynamic int8 re-scales
# each batch and static int8 of the other layers is unaffected.
OUTLIER_RANGE_RATIO = 4.0
WEIGHT_SPREAD = 100.0  # per-tensor weights: as in `onnx.quantize.PER_TENSOR_SPREAD_WARNING`
ACTIVATION_SPREAD = 8.0  # activation channel peak / median channel peak: as in `onnx.quantize`
SPEED_NOISE = 0.03  # timings this close are a tie; the more accurate candidate wins it
MAX_NOISE = 0.15  # a noisier machine still does not make candidates further apart than this a tie
TIMING_REPEATS = 6  # per candidate at least; the kept model is timed again (10 repeats) by the final verification
MAX_TIMING_REPEATS = 600
MIN_TIMED_SECONDS = 0.3  # per model and timing: a 0.1 ms model gets hundreds of runs, not 6
# Candidates are scored on evenly spaced batches worth about SCORE_SECONDS of float compute, at
# least MIN_SCORED_BATCHES: on a 736x1088 text detector (0.13 s a call) 4 of 8 calls per candidate.
SCORE_SECONDS = 0.5
MIN_SCORED_BATCHES = 4
# Per-position class scores: batches holding this many positions are scored. The expected
# disagreement rests on the float model's near-ties, which few calls hardly hold: on PP-OCRv4 rec
# (~70 frames a line), random 8-line subsets of 240 lines put dynamic int8 at 0.09-0.79% (5-95%),
# 24-line subsets at 0.17-0.54% (0.30% measured on all 240).
MIN_SCORED_POSITIONS = 4000
RETIME_BAND = 0.15  # candidates this close to the fastest (or the fastest this close to float) are timed again
MAX_RETIMED = 3  # candidates timed together in that second run (each holds a session)
# Weight-only kernels (MatMulNBits) dequantize weights and compute in float: they win when the
# activations are a few rows (token-by-token decoding), not on a batch of full sequences.
WEIGHT_ONLY_MAX_ROWS = 64
# CPU features with fp16 arithmetic; without them ONNX Runtime runs fp16 models through casts.
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})


@dataclass
class Trial:
    """One candidate: what it is, how close it stays to float, how fast and big it is."""

    name: str
    cosine: float
    top1: float | None
    drop: float
    met: bool
    speedup: float | None = None
    size_bytes: int = 0
    seconds: float = 0.0
    note: str = ""
    accuracy: float | None = None  # against the evaluation labels, when the data holds them
    position_top1: float | None = None  # per-position class scores: measured arg-max agreement
    position_drop: float | None = None  # ... and the expected share of flipped positions (gated)


@dataclass
class AutoReport:
    metric: str
    max_drop: float
    trials: list[Trial]
    winner: str
    reason: str
    seconds: float
    calibrations: int
    skipped: list[str] = field(default_factory=list)  # candidates the statistics ruled out, and why
    scored_calls: int = 0  # evaluation calls each candidate was scored on
    total_calls: int = 0  # of the evaluation calls the written model is verified on
    max_position_drop: float | None = None  # the decision gate, when an output has per-position class scores

    def to_dict(self) -> dict:
        return {"metric": self.metric, "max_drop": self.max_drop, "winner": self.winner, "reason": self.reason,
                "seconds": self.seconds, "calibrations": self.calibrations, "skipped": self.skipped,
                "scored_calls": self.scored_calls, "total_calls": self.total_calls,
                "max_position_drop": self.max_position_drop,
                "candidates": [asdict(t) for t in self.trials]}

    def table(self) -> str:
        labeled = any(t.accuracy is not None for t in self.trials)
        budget = (f"{'label accuracy' if labeled else 'top-1 agreement'} drop <= {100 * self.max_drop:g} pt"
                  if self.metric == "top1" else f"cosine drop <= {self.max_drop:g}")
        if self.max_position_drop is not None:
            budget += f" and expected per-position top-1 disagreement <= {100 * self.max_position_drop:g}%"
        scored = (f"; scored on {self.scored_calls} of the {self.total_calls} evaluation calls"
                  if self.scored_calls < self.total_calls else "")
        positions = self.max_position_drop is not None
        lines = [f"auto: {len(self.trials)} candidates from {self.calibrations} calibration(s) in "
                 f"{self.seconds:.1f} s; budget {budget}{scored}",
                 f"  {'candidate':<52} {'top-1':>7} {'cosine':>8} {'speed':>7} {'size':>9}"
                 + (f" {'accuracy':>9}" if labeled else "")
                 + (f" {'pos. top-1 (expected flips)':>27}" if positions else "")]
        for t in self.trials:
            mark = "*" if t.name == self.winner else (" " if t.met else "x")
            top1 = "-" if t.top1 is None else f"{100 * t.top1:.1f}%"
            speed = "-" if t.speedup is None else f"{t.speedup:.2f}x"
            accuracy = "" if not labeled else f" {'-' if t.accuracy is None else f'{100 * t.accuracy:.2f}%':>9}"
            decisions = "" if not positions else " " + (
                "-" if t.position_top1 is None else f"{100 * t.position_top1:.2f}% ({100 * t.position_drop:.3f}%)"
            ).rjust(27)
            lines.append(f"{mark} {t.name:<52} {top1:>7} {t.cosine:>8.5f} {speed:>7} {_mb(t.size_bytes):>9}"
                         + accuracy + decisions + (f"  {t.note}" if t.note else ""))
        lines.append("  (* kept, x over budget: not timed; speed = float latency / candidate latency, same run)")
        lines.extend(f"  skipped {s}" for s in self.skipped)
        lines.append(f"why: {self.reason}")
        return "\n".join(lines)


class _Scorer:
    """Float outputs computed once, by the model as the user gave it; each candidate scored on them
    with the quantize table's metrics (`verify.OutputErrors`: every output shape, counted in calls)
    and timed against float. With a `labels` array in the evaluation data, "top1" is accuracy
    against the labels. The final verification reuses the float session and its outputs
    (`reference`): the float model runs on each evaluation batch once in the whole quantize
    (and once more on the first, to time it)."""

    def __init__(self, run: RunInputs, metric: str) -> None:
        # The thread count the final verification times with, so that both timings and the float
        # outputs it reuses come from sessions with the same, stated options.
        self.threads = run.threads or default_threads()
        self.float_path = run.model_path
        self._float_session = None
        session = self.float_session()
        self.names = [o.name for o in session.get_outputs()]
        batches = list(batches_with_calls(run.eval_set, run.batch_size))
        feeds = [b for b, _ in batches]
        self.timing_feeds = representative_feeds(feeds)  # what the final verification times too
        first = session.run(self.names, feeds[0])
        started = time.perf_counter()
        session.run(self.names, feeds[0])
        per_batch = time.perf_counter() - started
        # Candidates are compared on a bounded, evenly spaced subset of the batches (all of them
        # when the data holds labels or is small); the written model is verified on all of them.
        # Per-position class scores: enough batches for MIN_SCORED_POSITIONS positions.
        positions = max((np.asarray(o).size // np.asarray(o).shape[-1] for o in first
                         if looks_like_position_scores(np.asarray(o))), default=0)
        # Yes/no probabilities (one per call or frame) are decisions too, gated alike (`verify.expected_binary_flips`).
        self.position_scores = positions > 0 or any(looks_like_binary_probabilities(np.asarray(o)) for o in first)
        wanted = max(MIN_SCORED_BATCHES, int(SCORE_SECONDS / max(per_batch, 1e-6)),
                     math.ceil(MIN_SCORED_POSITIONS / positions) if positions else 0)
        scored = list(range(len(feeds)))
        if run.eval_set.labels is None and len(feeds) > wanted:
            scored = evenly_spaced(len(feeds), wanted)
        self.scored = scored
        self.batches, self.calls = [feeds[i] for i in scored], [batches[i][1] for i in scored]
        self.expected = [first if i == 0 else session.run(self.names, feeds[i]) for i in scored]
        self.scored_calls = sum(c or 1 for c in self.calls)
        self.total_calls = sum(c or 1 for _, c in batches)
        del batches, feeds
        if len(self.timing_feeds) == 1:
            latency = per_batch
        else:
            started = time.perf_counter()
            for feed in self.timing_feeds:
                session.run(self.names, feed)
            latency = time.perf_counter() - started
        runs = math.ceil(MIN_TIMED_SECONDS / max(latency, 1e-6))
        self.repeats = int(min(MAX_TIMING_REPEATS, max(TIMING_REPEATS, runs)))
        self.classifier = any(looks_like_class_scores(np.asarray(o)) for o in self.expected[0])
        self.metric = ("top1" if self.classifier else "cosine") if metric == "auto" else metric
        labels = run.eval_set.labels if self.metric == "top1" else None
        self.labels = labels
        self.float_accuracy = label_accuracy(self.expected, self.calls, labels) if labels is not None else None

    def reference(self, kept: _Built) -> FloatReference:
        """The float session, its outputs on the scored batches and the kept candidate's errors on
        them, for the final verification (the written model is that candidate, its plan added)."""
        return FloatReference(self.float_session(), dict(zip(self.scored, self.expected)), kept.errors)

    def fidelity(self, session, floor: float | None = None) -> tuple[float, float | None, float | None,
                                                                     OutputFidelity | None,
                                                                     dict[str, OutputErrors], int]:
        """(worst output's mean cosine, top-1 agreement with float, accuracy against the labels, the
        per-position class-score output with the most expected flips if any, the errors of each
        output on the scored batches, how many batches were scored). `floor`: stop scoring once
        the worst output's mean cosine can no longer reach it (`cosine_ceiling`), so the figures
        are those of the batches scored."""
        runs = []
        errors: dict[str, OutputErrors] = {}
        for batch, expected, calls in zip(self.batches, self.expected, self.calls):
            outputs = session.run(self.names, batch)
            runs.append(outputs)
            for name, ref, got in zip(self.names, expected, outputs):
                if np.asarray(ref).dtype.kind == "f" and np.asarray(ref).size:
                    errors.setdefault(name, OutputErrors(name)).add(ref, got, calls)
            if floor is not None and len(runs) < len(self.batches) and self.cosine_ceiling(errors) < floor:
                break
        results = [e.result() for e in errors.values()]
        cosine = min((r.cosine_mean for r in results), default=1.0)
        top1 = next((r.top1_agreement for r in results if r.top1_agreement is not None), None)
        accuracy = label_accuracy(runs, self.calls, self.labels) if self.labels is not None else None
        positions = max((r for r in results if r.position_disagreement is not None),
                        key=lambda r: r.position_disagreement, default=None)
        return cosine, top1, accuracy, positions, errors, len(runs)

    def cosine_ceiling(self, errors: dict[str, OutputErrors]) -> float:
        """The highest worst-output mean cosine the scored batches can still end with, from the
        outputs scored per call so far: their cosine sums plus 1 for each call not scored yet."""
        ceiling = 1.0
        for e in errors.values():
            if e.call_cosines and e.values_per_call >= MIN_VALUES_PER_CALL:
                ceiling = min(ceiling, (sum(float(c.sum()) for c in e.call_cosines) + self.scored_calls - e.calls)
                              / self.scored_calls)
        return ceiling

    def drop(self, cosine: float, top1: float | None, accuracy: float | None) -> float:
        if accuracy is not None:
            return self.float_accuracy - accuracy
        return 1.0 - (top1 if self.metric == "top1" and top1 is not None else cosine)

    def float_session(self):
        """The model as the user gave it: what the candidates are scored against and the final
        verification compares with and times."""
        if self._float_session is None:
            self._float_session = make_session(self.float_path, threads=self.threads)
        return self._float_session

    def speedup(self, session) -> float:
        timing = time_models([self.float_session(), session], self.timing_feeds, warmup=2, repeats=self.repeats)
        return timing.speedup or float("inf")

    def retime(self, sessions: list) -> tuple[list[float], float]:
        """Speedups of `sessions`, timed together with float in one interleaved run (twice the
        repeats), and the float model's relative spread in that run (interquartile range / median)."""
        timing = time_models([self.float_session(), *sessions], self.timing_feeds, warmup=2,
                             repeats=2 * self.repeats)
        medians = timing.medians_ms
        q1, q3 = np.percentile(timing.latencies_ms[0], [25, 75])
        return [medians[0] / m if m > 0 else float("inf") for m in medians[1:]], float((q3 - q1) / medians[0])


def search_strategy(model: onnx.ModelProto, config: AutoConfig, run: RunInputs) -> Handled:
    """The `AutoConfig` handler of `quantize_onnx` (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="lowbit-auto-") as folder:  # the kept candidates, removed after
        return _search(model, config, run, Path(folder))


def _search(model: onnx.ModelProto, config: AutoConfig, run: RunInputs, folder: Path) -> Handled:
    started = time.perf_counter()
    deadline = started + config.time_limit
    per_channel_options = [False] if config.per_channel is False else [True, False]
    static_config = StaticConfig(calib_method=config.calib_method, per_channel=per_channel_options[0],
                                 exclude=config.exclude, calib_memory_mb=config.calib_memory_mb)
    # Bias correction's channel means come from the calibration pass itself when it may be tried.
    built = ("bias_correction",) if _has_biased_conv(model) else ()
    # The Conv inputs' channel peaks equalization's trial depends on, measured along the calibration.
    stacked = run.calib.feed_batch_size(run.batch_size) > 1  # else each run is one call, whole
    peaks = FirstRows(input_channel_peaks(model), min(4, run.batch_size) if stacked else None)
    pipeline = StaticPipeline(model, static_config, run.calib, batch_size=run.batch_size, threads=run.threads,
                              source=run.model_path.name).calibrate(built=built, also=(peaks,))
    # After calibration: the float outputs are not held through it.
    scorer = _Scorer(run, config.metric)
    max_drop = config.max_drop if config.max_drop is not None else DEFAULT_MAX_DROP[scorer.metric]
    search = _Search(scorer, max_drop, run, config, deadline, folder)
    skipped: list[str] = []
    profile = _profile(pipeline)

    static_built = []
    for per_channel in per_channel_options:
        static_built.append(search.add(_granularity_name(per_channel),
                                       lambda pc=per_channel: pipeline.build(per_channel=pc)))
    best_static = max(zip(per_channel_options, static_built), key=lambda pair: _fidelity_key(pair[1]))[0]
    if config.calib_method != "minmax":
        search.add(f"{_granularity_name(best_static)}, min/max ranges",
                   lambda: pipeline.build(per_channel=best_static, calib_method="minmax"))

    if profile["bias_correctable"]:
        search.add(f"{_granularity_name(best_static)} + bias correction",
                   lambda: pipeline.build(per_channel=best_static, bias_correction=True))
    else:
        skipped.append("bias correction: no Conv with its own bias here")

    base = search.trial(_granularity_name(best_static))
    if base is not None and base.met and base.speedup is not None:
        _add_float_regions(search, pipeline, best_static, base)
    else:
        skipped.append("int8/float per layer kind by speed: " + (
            "the static candidate is over budget" if base is not None and not base.met else "speed not measured"))

    worth, why = _equalization_worth(pipeline, profile, run, peaks.reducer)
    if worth:
        eq_config = StaticConfig(calib_method=config.calib_method, per_channel=True, exclude=config.exclude,
                                 equalize=True, calib_memory_mb=config.calib_memory_mb)
        # Only the tensors equalization rescales are measured again (exact: see `StaticPipeline`).
        equalized = StaticPipeline(model, eq_config, run.calib, batch_size=run.batch_size, threads=run.threads,
                                   source=run.model_path.name).calibrate(built=built, reuse=pipeline)
        search.calibrations += 1
        for per_channel in per_channel_options:
            search.add(f"{_granularity_name(per_channel)} + equalization",
                       lambda pc=per_channel: equalized.build(per_channel=pc), note=why)
        if profile["bias_correctable"]:
            search.add(f"{_granularity_name(per_channel_options[-1])} + equalization + bias correction",
                       lambda: equalized.build(per_channel=per_channel_options[-1], bias_correction=True))
    else:
        skipped.append(f"equalization: {why}")

    if profile["matmuls"]:
        heavy = _outlier_heavy_matmuls(pipeline)
        if heavy and len(heavy) < len(profile["matmuls"]) or heavy and profile["convs"]:
            search.add(f"hybrid: {len(heavy)} outlier-heavy MatMul(s) dynamic, rest static",
                       lambda: _hybrid(pipeline, heavy, best_static))
        else:
            skipped.append("hybrid (outlier-heavy MatMuls dynamic): "
                           + ("no MatMul input is outlier-heavy" if not heavy else "that is every MatMul: "
                              "the dynamic candidate covers it"))
        if profile["convs"]:
            search.add("hybrid: static Convs, every MatMul/Gemm dynamic",
                       lambda: _hybrid(pipeline, profile["matmuls"], best_static))
        search.add("dynamic int8", lambda: _dynamic(pipeline))
        heads = [n for n in output_layers(pipeline.model) if n in profile["matmuls"]]
        if heads and len(heads) < len(profile["matmuls"]):
            search.add(f"dynamic int8, output layer{'s' if len(heads) > 1 else ''} float",
                       lambda: _dynamic(pipeline, keep_float=heads), note=", ".join(heads))
    elif has_int8_lstms(pipeline.model):  # no MatMul in the main graph, LSTMs (If/Loop/Scan bodies too): int8 weights
        search.add("dynamic int8", lambda: _dynamic(pipeline), note="LSTM weights int8 (DynamicQuantizeLSTM)")
    else:
        skipped.append("dynamic and hybrid: no MatMul/Gemm with a constant weight")
    rows = _rows_per_call(scorer.batches[0])
    if profile["matmul_heavy"] and rows > WEIGHT_ONLY_MAX_ROWS:
        skipped.append(f"weight-only: {rows} activation rows per MatMul call; at that size int8 compute beats "
                       "float compute on dequantized weights (weight-only pays off at small batch)")
    elif profile["matmul_heavy"]:
        for bits in (8, 4):
            wo = WeightOnlyConfig(bits=bits, group_size=32 if bits == 4 else -1, algo="rtn", exclude=config.exclude)
            wo.validate(has_calibration=False)
            search.add(f"weight-only int{bits} (MatMulNBits, RTN)",
                       lambda wo=wo: _handled(run_weight_only(model, wo, run)))
    else:
        skipped.append("weight-only: MatMul/Gemm weights hold under half of the parameters")
    if FP16_FLAGS & cpu_flags():
        search.add("fp16", lambda: _handled(run_fp16(model, Fp16Config(exclude=config.exclude), run)))
    else:
        skipped.append("fp16: this CPU has no native fp16 arithmetic (ONNX Runtime would cast around float kernels)")

    search.retime_close_calls()
    winner, reason = search.choose()
    trial = next(t for t in search.trials if t.name == winner)
    candidate = search.load(winner)
    report = AutoReport(scorer.metric, max_drop, search.trials, winner, reason, time.perf_counter() - started,
                        search.calibrations, skipped, scorer.scored_calls, scorer.total_calls,
                        config.max_position_drop if scorer.position_scores else None)
    plan = candidate.plan
    plan.settings = {**plan.settings, "auto": {"winner": winner, "reason": reason, "metric": scorer.metric,
                                               "max_drop": max_drop, "met": trial.met,
                                               "max_position_drop": report.max_position_drop,
                                               "candidates": [asdict(t) for t in search.trials]}}
    warnings = [] if trial.met else [
        f"no candidate met the budget ({scorer.metric} drop <= {max_drop:g}"
        + (f", expected per-position top-1 disagreement <= {config.max_position_drop:g}" if scorer.position_scores
           else "")
        + f"); saved the most accurate one ({winner}); loosen --max-drop"
        + (" or --max-position-drop" if scorer.position_scores else "")
        + f", or let `--mode static --max-drop {max_drop:g}` fall the most sensitive layers back to float"]
    if search.timed_out:
        warnings.append(f"the time limit of {config.time_limit:g} s ran out; the best candidate so far is saved")
    if all(t.speedup is not None and t.speedup < 1.0 for t in search.trials if t.met) and trial.met:
        slower = "SLOWER than" if trial.speedup < 1.0 - search.noise else \
            f"no faster than (within the {100 * search.noise:.0f}% timing noise of)"
        warnings.append(f"every candidate within the budget is {slower} float on this CPU (best {winner} at "
                        f"{trial.speedup:.2f}x); keep the float model where speed matters")
    return Handled(candidate.model, plan, pipeline.seconds, warnings, auto=report, float_model=pipeline.model,
                   reference=scorer.reference(candidate))


@dataclass
class _Built:
    model: onnx.ModelProto
    plan: QuantPlan
    errors: dict[str, OutputErrors] | None = None  # per output, on the scored batches (`_Scorer.fidelity`)


@dataclass
class _Kept:
    """A candidate that may still win, kept serialized in the search's folder, not in memory."""

    path: Path
    plan: QuantPlan
    errors: dict[str, OutputErrors] | None = None


class _Search:
    def __init__(self, scorer: _Scorer, max_drop: float, run: RunInputs, config: AutoConfig, deadline: float,
                 folder: Path):
        self.scorer, self.max_drop, self.run, self.config, self.deadline = scorer, max_drop, run, config, deadline
        self.folder = folder  # the kept candidates' files (a temporary folder of `search_strategy`)
        self.trials: list[Trial] = []
        self.kept: dict[str, _Kept] = {}
        self.calibrations = 1
        self.timed_out = False
        self.noise = SPEED_NOISE  # ties within this relative speed; raised by a noisy re-timing

    def add(self, name: str, build, note: str = "") -> Trial | None:
        if time.perf_counter() > self.deadline and self.trials:
            self.timed_out = True
            return None
        t0 = time.perf_counter()
        candidate = build()
        # Timed as it will be written: with lowbit's shape annotations left in, ONNX Runtime fuses
        # differently (`io.drop_shape_annotations`) and the search would time another model.
        drop_shape_annotations(candidate.model)
        payload, plan = candidate.model.SerializeToString(), candidate.plan  # the session's and the file's
        del candidate
        trim_heap()  # what building it left (copies of the float model) before a session opens
        session = make_session(payload, threads=self.scorer.threads)
        floor = self._floor()
        cosine, top1, accuracy, positions, errors, scored = self.scorer.fidelity(session, floor)
        drop = self.scorer.drop(cosine, top1, accuracy)
        if scored < len(self.scorer.batches):
            note = "; ".join(filter(None, [note, f"scored on {scored} of {len(self.scorer.batches)} batches: its "
                                                 f"cosine cannot reach {floor:.5f} (the budget or a better candidate)"]))
        met = drop <= self.max_drop + 1e-12 and scored == len(self.scorer.batches)
        trial = Trial(name, cosine, top1, drop, met, size_bytes=len(payload), note=note, accuracy=accuracy)
        if positions is not None:
            trial.position_top1, trial.position_drop = positions.position_agreement, positions.position_disagreement
            trial.met = trial.met and trial.position_drop <= self.config.max_position_drop + 1e-12
        if trial.met and self.config.measure_speed and self.run.measure_speed:
            trial.speedup = self.scorer.speedup(session)
        del session
        trial.seconds = time.perf_counter() - t0
        self.trials.append(trial)
        if name in self._needed():
            path = self.folder / f"candidate{len(self.trials)}.onnx"
            path.write_bytes(payload)
            self.kept[name] = _Kept(path, plan, errors)
        del payload
        self._keep_needed()
        trim_heap()  # the session's buffers and the model's bytes
        return trial

    def trial(self, name: str) -> Trial | None:
        return next((t for t in self.trials if t.name == name), None)

    def _floor(self) -> float | None:
        """The mean cosine a candidate must be able to reach to matter: the budget's, or while no
        candidate is within it, the closest one's (below both it can neither be within the budget
        nor the closest). None where the choice rests on more than the cosine (labels, top-1
        agreement, per-position decisions), or before any candidate is scored."""
        scorer = self.scorer
        if scorer.metric != "cosine" or scorer.labels is not None or scorer.position_scores or not self.trials:
            return None
        best = max(t.cosine for t in self.trials)
        return min(1.0 - self.max_drop, best) - 1e-9

    def _needed(self) -> set[str]:
        """The candidates that can still win: those within budget, or while none is, the closest (`closest`)."""
        return {t.name for t in self.trials if t.met} or {self.closest().name}

    def _keep_needed(self) -> None:
        """Delete the kept files of candidates that can no longer win."""
        needed = self._needed()
        for name in [n for n in self.kept if n not in needed]:
            self.kept.pop(name).path.unlink(missing_ok=True)

    def load(self, name: str) -> _Built:
        """A kept candidate, read back as it was scored and timed."""
        kept = self.kept[name]
        return _Built(onnx.load_model(kept.path), kept.plan, kept.errors)

    def retime_close_calls(self) -> None:
        """Time the close calls again, together in one interleaved run with float, and take the
        noise of that run as the tie margin. Close: the candidates within RETIME_BAND of the
        fastest (at most MAX_RETIMED), or a fastest one within RETIME_BAND of float."""
        timed = sorted((t for t in self.trials if t.met and t.speedup is not None), key=lambda t: -t.speedup)
        if not timed:
            return
        close = [t for t in timed if t.speedup >= timed[0].speedup * (1 - RETIME_BAND)][:MAX_RETIMED]
        if len(close) < 2 and abs(timed[0].speedup - 1.0) > RETIME_BAND:
            return
        sessions = [make_session(self.kept[t.name].path, threads=self.scorer.threads) for t in close]
        speedups, spread = self.scorer.retime(sessions)
        del sessions
        trim_heap()
        for trial, speedup in zip(close, speedups):
            retimed = f"re-timed together: {trial.speedup:.2f}x -> {speedup:.2f}x"
            trial.note = "; ".join(filter(None, [trial.note, retimed]))
            trial.speedup = speedup
        self.noise = min(MAX_NOISE, max(SPEED_NOISE, spread))

    def choose(self) -> tuple[str, str]:
        met = [t for t in self.trials if t.met]
        if not met:
            best = self.closest()
            return best.name, (f"no candidate stayed within the budget; {best.name} came closest "
                               f"({self._score_text(best)})")
        timed = [t for t in met if t.speedup is not None]
        if not timed:
            best = max(met, key=lambda t: (-t.size_bytes, _fidelity_key(t)))
            return best.name, f"speed not measured (--no-speed): the smallest of the {len(met)} within the budget"
        fastest = max(t.speedup for t in timed)
        ties = [t for t in timed if t.speedup >= fastest * (1 - self.noise)]
        best = max(ties, key=_fidelity_key)
        others = f" of the {len(met)} candidates within the budget" if len(met) > 1 else ", the only candidate " \
            "within the budget"
        tie = (f" (tied within {100 * self.noise:.0f}% with {', '.join(t.name for t in ties if t is not best)}; "
               "more accurate)") if len(ties) > 1 else ""
        over = len(self.trials) - len(met)
        return best.name, (f"fastest ({best.speedup:.2f}x float){others}{tie}, {self._score_text(best)}"
                           + (f"; {over} candidate(s) were over budget" if over else ""))

    def closest(self) -> Trial:
        """The candidate closest to the budget: the smallest of its drops as a share of their budgets
        (the decision gate's too, where there is one), then `_fidelity_key`."""
        if all(t.position_drop is None for t in self.trials):
            return max(self.trials, key=_fidelity_key)

        def overshoot(t: Trial) -> float:
            decisions = 0.0 if t.position_drop is None else t.position_drop / max(self.config.max_position_drop, 1e-12)
            return max(t.drop / max(self.max_drop, 1e-12), decisions)
        return max(self.trials, key=lambda t: (-overshoot(t), _fidelity_key(t)))

    def _score_text(self, trial: Trial) -> str:
        decisions = "" if trial.position_drop is None else (
            f", per-position top-1 agreement {100 * trial.position_top1:.2f}% (expected disagreement "
            f"{100 * trial.position_drop:.3f}% <= {100 * self.config.max_position_drop:g}%)")
        return self._main_score_text(trial) + decisions

    def _main_score_text(self, trial: Trial) -> str:
        if trial.accuracy is not None:
            return (f"label accuracy {100 * trial.accuracy:.1f}% (drop {100 * trial.drop:.1f} pt <= "
                    f"{100 * self.max_drop:g})")
        if self.scorer.metric == "top1" and trial.top1 is not None:
            return f"top-1 agreement {100 * trial.top1:.1f}% (drop {100 * trial.drop:.1f} pt <= {100 * self.max_drop:g})"
        return f"cosine {trial.cosine:.5f} (drop {trial.drop:.4f}, budget {self.max_drop:g})"


def _fidelity_key(trial: Trial | None) -> tuple:
    if trial is None:
        return (-1.0, -1.0, -1.0)
    return (-trial.drop, trial.top1 if trial.top1 is not None else 0.0, trial.cosine)


def _granularity_name(per_channel: bool) -> str:
    return "static int8, per-channel weights" if per_channel else "static int8, per-tensor weights"


def _handled(done: Handled) -> _Built:
    return _Built(done.model, done.plan)


def _has_biased_conv(model: onnx.ModelProto) -> bool:
    """A convolution with a constant bias: bias correction may be tried (its means are then
    measured in the calibration pass)."""
    initializers = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        rule = rule_for(node)
        if (rule is not None and rule.kind == "compute" and rule.weight_only != "matmul" and rule.bias_input is not None
                and len(node.input) > rule.bias_input and node.input[rule.bias_input] in initializers):
            return True
    return False


def _profile(pipeline: StaticPipeline) -> dict:
    """What the candidates depend on: the compute mix and where the parameters are."""
    model = pipeline.model
    initializers = {t.name: t for t in model.graph.initializer}
    active = pipeline.planner.active
    convs, matmuls = [], []
    params = {"conv": 0, "matmul": 0}
    for node in model.graph.node:
        rule = rule_for(node)
        if rule is None or rule.kind != "compute":
            continue
        weight = initializers.get(node.input[rule.weight_input]) if len(node.input) > rule.weight_input else None
        if weight is None:
            continue
        size = int(np.prod(weight.dims))
        if rule.weight_only != "matmul":  # convolutions
            params["conv"] += size
            if node.name in active:
                convs.append(node)
        elif len(weight.dims) == 2:  # matrix products: dynamic and weight-only candidates too
            params["matmul"] += size
            if not {node.name, node.op_type, *node.output} & set(pipeline.exclude):
                matmuls.append(node.name)
    depthwise = any(next((a.i for a in n.attribute if a.name == "group"), 1) > 1 for n in convs)
    biased = any(len(n.input) > 2 and n.input[2] in initializers for n in convs)
    return {"convs": [n.name for n in convs], "matmuls": matmuls, "depthwise": depthwise,
            "bias_correctable": biased and (depthwise or not pipeline.config.per_channel),
            "matmul_heavy": params["matmul"] > params["conv"]}


def layer_kinds(pipeline: StaticPipeline) -> dict[str, list[str]]:
    """The static plan's int8 nodes grouped by kernel kind: each compute op type (depthwise
    convolutions apart) and the int8 elementwise ops. ONNX Runtime's int8 kernels are faster than its
    float ones for some kinds and slower for others, depending on the CPU (depthwise and transposed
    convolutions often lose without VNNI; int8 elementwise ops only pay off between int8 kernels).
    Kinds with one node or none are left out."""
    initializers = {t.name: t for t in pipeline.model.graph.initializer}
    kinds: dict[str, list[str]] = {}
    for node in pipeline.model.graph.node:
        rule = pipeline.planner.active.get(node.name)
        if rule is None:
            continue
        if rule.kind == "compute":
            weight = initializers.get(node.input[rule.weight_input]) if rule.weight_input is not None \
                and len(node.input) > rule.weight_input else None
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            depthwise = weight is not None and group > 1 and group == weight.dims[0]
            kind = f"depthwise {node.op_type}s" if depthwise else f"{node.op_type}s"
        elif rule.kind == "elementwise":
            kind = "int8 elementwise ops (Add, Mul, Concat, pooling, Sigmoid)"
        else:
            continue
        kinds.setdefault(kind, []).append(node.name)
    return {kind: nodes for kind, nodes in kinds.items() if len(nodes) > 1}


def _add_float_regions(search: _Search, pipeline: StaticPipeline, per_channel: bool, base: Trial) -> None:
    """Per layer kind, by measured speed: the static candidate with one kind of layer kept float at a
    time; then the kinds whose float version measured faster than `base` (beyond timing noise), all
    float together. The search keeps whichever is fastest within the budget, so int8 stays where it
    pays and no kind is kept float unless that measured faster."""
    kinds = layer_kinds(pipeline)
    if len(kinds) < 2:
        return  # one kind: keeping it float is the float model
    faster: list[str] = []
    for kind, nodes in kinds.items():
        trial = search.add(f"{_granularity_name(per_channel)}, {kind} float",
                           lambda nodes=nodes: _with_float(pipeline, per_channel, nodes),
                           note=f"{len(nodes)} node(s)")
        if trial is not None and trial.speedup is not None and trial.speedup > base.speedup * (1 + SPEED_NOISE):
            faster.append(kind)
    if len(faster) > 1:
        nodes = [n for kind in faster for n in kinds[kind]]
        search.add(f"{_granularity_name(per_channel)}, {' + '.join(faster)} float",
                   lambda: _with_float(pipeline, per_channel, nodes),
                   note=f"{len(nodes)} node(s)")


def _with_float(pipeline: StaticPipeline, per_channel: bool, nodes: list[str]) -> _Built:
    candidate = pipeline.build(per_channel=per_channel, precision={n: "float" for n in nodes},
                               float_reason="kept float by --mode auto: this layer kind measured faster in float")
    return _Built(candidate.model, candidate.plan)


def _equalization_worth(pipeline: StaticPipeline, profile: dict, run: RunInputs, peaks) -> tuple[bool, str]:
    """Equalization is tried when some Conv chain can be equalized and either a weight's channel
    ranges or a Conv input's channel peaks are far apart (measured; `peaks`: the Conv inputs'
    channel peaks on the first calibration batch, measured by the calibration pass)."""
    if not profile["convs"]:
        return False, "no Conv"
    if not find_chains(pipeline.model, set(pipeline.exclude)):
        return False, "no Conv -> Conv chain it could rebalance"
    plan = pipeline.build(per_channel=False).plan
    spread = max(weight_channel_spread(pipeline.model, plan).values(), default=1.0)
    if set(input_channel_peaks(pipeline.model).tensors) <= set(peaks.shapes):
        spreads = channel_spreads(peaks)
    else:  # a graph pass renamed some Conv input: one batch of its own
        spreads = activation_channel_spread(pipeline.model, run.calib, batch_size=min(4, run.batch_size),
                                            threads=run.threads)
    act = max(spreads.values(), default=1.0)
    if spread > WEIGHT_SPREAD or act > ACTIVATION_SPREAD:
        return True, f"measured: weight channel spread {spread:,.0f}x, activation channel spread {act:,.0f}x"
    return False, (f"channels already balanced (weight spread {spread:,.0f}x <= {WEIGHT_SPREAD:g}, activation "
                   f"spread {act:.1f}x <= {ACTIVATION_SPREAD:g})")


def _outlier_heavy_matmuls(pipeline: StaticPipeline) -> list[str]:
    """MatMuls (in the static plan) whose activation input's min/max range is far past its
    99.99th-percentile range."""
    minmax, percentile = pipeline.stats_for("minmax").ranges, pipeline.stats_for("percentile").ranges
    heavy = []
    for node in pipeline.model.graph.node:
        rule = rule_for(node)
        if rule is None or rule.kind != "compute" or rule.dynamic is None or node.name not in pipeline.planner.active:
            continue
        tensor = node.input[0]
        if tensor not in minmax or tensor not in percentile:
            continue
        full = float(np.max(minmax[tensor][1]) - np.min(minmax[tensor][0]))
        core = float(np.max(percentile[tensor][1]) - np.min(percentile[tensor][0]))
        if core > 0 and full / core > OUTLIER_RANGE_RATIO:
            heavy.append(node.name)
    return heavy


def _dynamic_part(pipeline: StaticPipeline, matmuls: list[str]) -> QuantPlan:
    keep = set(matmuls)
    others = [n.name for n in pipeline.model.graph.node if n.name not in keep]
    return plan_dynamic(pipeline.model, per_channel_weights=True, exclude=others)


def _hybrid(pipeline: StaticPipeline, matmuls: list[str], per_channel: bool) -> _Built:
    """Static int8 everywhere but `matmuls`, which become dynamic int8."""
    static = pipeline.build(per_channel=per_channel, exclude=matmuls,
                            float_reason="dynamic int8 (hybrid: its input is outlier-heavy)")
    dynamic = _dynamic_part(pipeline, matmuls)
    # Both writers name their tensors after the activation they quantize ("x_quantized"): rename
    # the static side's clashing names first.
    float_names = _names(pipeline.model)
    _rename(static.model, (_names(write_dynamic(pipeline.model, dynamic)) - float_names) & _names(static.model))
    model = write_dynamic(static.model, dynamic)
    plan = static.plan
    for entry in dynamic.quantized():
        plan.add(entry)
    for name in matmuls:
        plan.float_nodes.pop(name, None)
    plan.settings["dynamic_nodes"] = list(matmuls)
    return _Built(model, plan)


def _names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | {n.name for n in graph.node}


def _rename(model: onnx.ModelProto, names: set[str]) -> None:
    """Give the tensors and nodes called `names` a "_static" suffix (graph outputs keep theirs)."""
    outputs = {o.name for o in model.graph.output}
    mapping = {n: f"{n}_static" for n in names if n not in outputs}
    for node in model.graph.node:
        node.name = mapping.get(node.name, node.name)
        for i, name in enumerate(node.input):
            node.input[i] = mapping.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = mapping.get(name, name)
    for tensor in model.graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)


def output_layers(model: onnx.ModelProto) -> list[str]:
    """The compute nodes (Conv, MatMul, Gemm ...) whose result reaches a graph output through a
    chain of ops of one activation input each (bias Add, Softmax, Sigmoid, reshapes): the layers
    that make the logits. Their int8 error moves the outputs directly, and a decision taken on them
    (the argmax of a CTC frame between blank and a space, a class) flips where float itself is
    nearly tied. A residual Add or a Concat ends the chain (what feeds it is not one layer's)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    # Integer tensors (a Reshape's target shape from Shape) are not activations.
    constants |= {v.name for v in [*graph.value_info, *graph.input] if v.type.tensor_type.elem_type
                  in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)}
    producer = {o: n for n in graph.node for o in n.output}
    found: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        rule = rule_for(node)
        activations = [i for i in node.input if i and i not in constants]
        if rule is not None and rule.kind == "compute":
            found.append(node.name)
        elif len(activations) == 1:
            stack.extend(activations)
    return found


def _dynamic(pipeline: StaticPipeline, keep_float: list[str] = ()) -> _Built:
    config = DynamicConfig(exclude=pipeline.config.exclude)
    plan = plan_dynamic(pipeline.model, per_channel_weights=True, exclude=[*pipeline.exclude, *keep_float])
    for name in keep_float:
        plan.float_nodes[name] = "kept float by --mode auto: an output layer"
    model = write_dynamic(pipeline.model, plan)
    model = BodyPlanners(pipeline.model, exclude=[*pipeline.exclude, *keep_float], mode="dynamic").write(model, plan)
    algorithms: dict = {}
    for record in pipeline.records:
        algorithms.update(record.to_settings())
    plan.settings = {"calib_method": None, "per_channel": True, "exclude": list(config.exclude),
                     "samples": pipeline.data.num_samples, "source": pipeline.source, "algorithms": algorithms}
    return _Built(model, plan)


def _rows_per_call(batch: dict[str, np.ndarray]) -> int:
    """Activation rows a MatMul sees per call: batch x sequence for token inputs, batch otherwise."""
    first = next(iter(batch.values()))
    if first.dtype.kind in "iu":
        return int(np.prod(first.shape))
    return int(first.shape[0]) if first.ndim else 1


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
