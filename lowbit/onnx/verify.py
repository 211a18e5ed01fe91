"""Measure a quantized ONNX model against its float original on ONNX Runtime.

Fidelity is counted in calls: a call is one sample's inputs as the user gave them (one row of the
evaluation arrays), whether the model runs it alone or stacked with others in a batch. Per output:

- cosine that sees the error whatever the output's shape: per call (the call's whole output as one
  vector) when a call yields at least MIN_VALUES_PER_CALL numbers, else across calls (all calls'
  outputs as one vector), because the cosine of one number with another is 1 whatever the error;
- relative error (||quantized - float|| / ||float|| over every call) and max abs error, always;
- per-frame cosine for sequence outputs (a call yields frames x features);
- top-1 agreement for class scores (a call yields one vector of >= 2 scores), and, when the
  evaluation data holds `labels`, the accuracy of both models against them and the drop;
- per-position top-1 agreement for per-position class scores (`looks_like_position_scores`: a
  probability or log-probability distribution over the last axis at every position of the float
  output, e.g. a CTC recognizer's (calls, frames, classes) softmax): measured, and the expected
  disagreement (`expected_disagreement`), a lower-variance estimate from every position's margin
  error that `--mode auto` gates on (a cosine budget cannot see argmax flips between near-tied classes);
- the same for yes/no decisions (`looks_like_binary_probabilities`: one probability per call or per
  frame, e.g. a voice-activity detector's speech probability, decided at DECISION_THRESHOLD): the
  implicit two classes (1 - p, p) at each position, the expected disagreement estimated in log-odds
  (`expected_binary_flips`).

Size before/after, and speed: both models timed by `lowbit.onnx.timing.time_models` (the method
every lowbit speed figure uses) on the evaluation data: the first batch when every batch has the
same shapes, else up to `timing.MAX_TIMED_FEEDS` batches evenly spaced through it (the report
states the calls and shapes timed; the data is read once more, for its shapes only, to pick them). Benches reuse `compare_models`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import Batch, CalibrationData
from lowbit.onnx.io import load_model, model_size_bytes
from lowbit.onnx.session import default_threads, make_session
from lowbit.onnx.timing import (TABLE_MAX_SECONDS, TABLE_MIN_SECONDS, TABLE_PRECISION, describe_shapes, shape_key,
                                time_models, timed_indices)

# A call yielding fewer numbers than this gets its cosine across calls: the cosine of a 1-, 2- or
# 3-vector barely moves with the error (1.0 exactly for one number of the same sign).
MIN_VALUES_PER_CALL = 8
# Per-position class scores: a float output whose last axis sums to 1 (probabilities) or whose
# exponentials do (log-probabilities) within this, at every position.
DISTRIBUTION_TOLERANCE = 1e-3
# Positions per run kept for the expected disagreement (evenly spaced beyond that): bounded memory
# for outputs with a class axis at every pixel.
MAX_MARGINS_PER_RUN = 4096
MARGIN_BINS = 10  # the expected disagreement pools margin errors within deciles of the float margin
# Binary decisions: a probability p is "yes" at p >= DECISION_THRESHOLD (a sigmoid's natural cut, the
# default of e.g. silero-vad's get_speech_timestamps). Log-odds are taken of p clipped to
# [LOGIT_CLIP, 1 - LOGIT_CLIP]: beyond that float32 no longer resolves 1 - p (p = 1 - 1e-7 is 1 - 2^-23 or 1).
DECISION_THRESHOLD = 0.5
LOGIT_CLIP = 1e-6
TIMING_WARMUP, TIMING_REPEATS = 2, 10  # the quantize table's timing (`lowbit bench` defaults to more repeats)


@dataclass
class OutputFidelity:
    name: str
    cosine_mean: float  # over calls (basis "per call") or the across-calls cosine (basis "across calls")
    cosine_min: float
    max_abs_error: float
    top1_agreement: float | None = None
    cosine_basis: str = "per call"
    cosine_all: float = 1.0  # every call's output as one vector
    relative_error: float = 0.0  # ||quantized - float|| / ||float|| over every call
    values_per_call: int = 0
    frame_cosine_mean: float | None = None  # sequence outputs: per frame (last axis = features)
    frame_cosine_min: float | None = None
    frames: int = 0
    accuracy_float: float | None = None  # against the evaluation labels
    accuracy_quant: float | None = None
    positions: int = 0  # per-position class scores: positions (calls x positions per call) compared
    position_agreement: float | None = None  # share of positions whose arg-max class is float's
    position_disagreement: float | None = None  # expected share of flipped positions (`expected_disagreement`)
    binary_decisions: bool = False  # the positions are yes/no probabilities (`looks_like_binary_probabilities`)

    @property
    def accuracy_drop(self) -> float | None:
        """Points of label accuracy lost (float - quantized, as a fraction), or None without labels."""
        if self.accuracy_float is None or self.accuracy_quant is None:
            return None
        return self.accuracy_float - self.accuracy_quant


@dataclass
class VerifyReport:
    outputs: list[OutputFidelity]
    calls: int
    size_before: int
    size_after: int
    latency_float_ms: float | None = None
    latency_quant_ms: float | None = None
    threads: int | None = None
    notes: list[str] = field(default_factory=list)
    timing_method: str | None = None
    timed_calls: int | None = None  # calls per timed run
    timed_shapes: str | None = None  # the input shapes of the timed run (`timing.describe_shapes`)
    speedup_interval: float | None = None  # relative half-width of the speedup's 95% interval (`Timing.interval`)
    labeled_calls: int = 0

    @property
    def samples(self) -> int:
        """Calls compared (the name older callers use)."""
        return self.calls

    @property
    def speedup(self) -> float | None:
        if not self.latency_float_ms or not self.latency_quant_ms:
            return None
        return self.latency_float_ms / self.latency_quant_ms

    @property
    def size_ratio(self) -> float:
        return self.size_before / max(1, self.size_after)

    @property
    def labeled(self) -> OutputFidelity | None:
        """The output whose label accuracy was measured, if any."""
        return next((o for o in self.outputs if o.accuracy_quant is not None), None)

    def to_dict(self) -> dict:
        data = asdict(self)
        for out, fidelity in zip(data["outputs"], self.outputs):
            out["accuracy_drop"] = fidelity.accuracy_drop
        data["speedup"] = self.speedup
        data["size_ratio"] = self.size_ratio
        return data

    def table(self) -> str:
        """Plain-text report for the command line."""
        lines = [f"{'output':<24} {'values/call':>11} {'cosine mean':>11} {'cosine min':>10} {'basis':<12} "
                 f"{'rel err':>8} {'max abs err':>11} {'top-1 agree':>11}"]
        for o in self.outputs:
            top1 = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%"
            lines.append(f"{o.name[:24]:<24} {o.values_per_call:>11} {o.cosine_mean:>11.5f} {o.cosine_min:>10.5f} "
                         f"{o.cosine_basis:<12} {o.relative_error:>8.2e} {o.max_abs_error:>11.4g} {top1:>11}")
            if o.position_agreement is not None:
                kind = (f"probability >= {DECISION_THRESHOLD:g}): decision" if o.binary_decisions
                        else "class = last axis): top-1")
                lines.append(f"  {o.name[:22]} per position ({o.positions} positions, {kind} "
                             f"agreement {100 * o.position_agreement:.2f}%, expected disagreement "
                             f"{100 * o.position_disagreement:.3f}%")
            if o.frame_cosine_mean is not None:
                lines.append(f"  {o.name[:22]} per frame ({o.frames} frames): cosine mean {o.frame_cosine_mean:.5f}, "
                             f"min {o.frame_cosine_min:.5f}")
        lines.append(f"calls compared: {self.calls} (a call = one sample's inputs as given; cosine per call, or "
                     "across calls for outputs of < 8 values per call)")
        labeled = self.labeled
        if labeled is not None:
            lines.append(f"accuracy vs labels ({labeled.name}, {self.labeled_calls} calls): float "
                         f"{100 * labeled.accuracy_float:.2f}%, quantized {100 * labeled.accuracy_quant:.2f}% "
                         f"(drop {100 * labeled.accuracy_drop:.2f} pt)")
        lines.append(f"size: {_mb(self.size_before)} -> {_mb(self.size_after)} ({self.size_ratio:.2f}x smaller)")
        if self.speedup is not None:
            shapes = f"; {self.timed_shapes}" if self.timed_shapes else ""
            lines.append(f"latency per run ({self.timed_calls} calls{shapes}): float {self.latency_float_ms:.2f} ms, "
                         f"quantized "
                         f"{self.latency_quant_ms:.2f} ms -> {self.speedup:.2f}x "
                         f"({'faster' if self.speedup >= 1 else 'SLOWER'})")
            lines.append(f"timing: {self.timing_method}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


class OutputErrors:
    """The error of one output accumulated call by call in bounded memory (sums, not arrays)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.values_per_call = 0
        self.call_cosines: list[np.ndarray] = []
        self.frame_cosines: list[np.ndarray] = []
        self.dot = self.ref_sq = self.got_sq = self.diff_sq = 0.0
        self.max_abs = 0.0
        self.agree = 0
        self.class_calls = 0
        self.predictions: list[tuple[np.ndarray, np.ndarray]] = []  # (float, quantized) arg-max per call
        self.positions = self.position_agree = 0
        self.margins: list[np.ndarray] = []  # per-position class scores: float's top-1 - runner-up margin
        self.margin_errors: list[np.ndarray] = []  # |the candidate's margin between those classes - float's|
        self.binary = False  # the positions are yes/no probabilities: margins and errors in log-odds

    def add(self, ref: np.ndarray, got: np.ndarray, calls: int | None) -> None:
        """One run's output. `calls`: how many calls the run stacked on axis 0; None when the run
        was one call fed as given (the model takes no batch axis: the whole output is that call's)."""
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        per_call_view = True
        if calls is None:  # one call: its output, with a leading axis of 1 unless it has one already
            calls = 1
            if ref.ndim == 0 or ref.shape[0] != 1:
                ref, got = ref.reshape(1, *ref.shape), got.reshape(1, *got.shape)
        elif ref.ndim == 0 or ref.shape[0] != calls:
            # An output that does not carry the stacked calls on axis 0: the run counts as one unit.
            ref, got, per_call_view = ref.reshape(1, *ref.shape), got.reshape(1, *got.shape), False
        self.calls += calls
        self.values_per_call = ref.size // calls
        diff = ref - got
        self.dot += float((ref * got).sum())
        self.ref_sq += float((ref * ref).sum())
        self.got_sq += float((got * got).sum())
        self.diff_sq += float((diff * diff).sum())
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        if looks_like_position_scores(ref):  # positions are positions whichever axis holds the calls
            self._add_positions(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]))
        elif looks_like_binary_probabilities(ref):
            self._add_binary_positions(ref.ravel(), got.ravel())
        if not per_call_view:
            return
        self.call_cosines.append(cosine_per_row(ref, got))
        if ref.ndim == 3 and ref.shape[1] >= 2 and ref.shape[2] >= MIN_VALUES_PER_CALL:  # (calls, frames, features)
            self.frame_cosines.append(cosine_per_row(ref.reshape(-1, ref.shape[2]), got.reshape(-1, got.shape[2])))
        if looks_like_class_scores(ref):
            ref_class, got_class = ref.argmax(-1), got.argmax(-1)
            self.agree += int((ref_class == got_class).sum())
            self.class_calls += ref.shape[0]
            self.predictions.append((ref_class, got_class))

    def _add_positions(self, ref: np.ndarray, got: np.ndarray) -> None:
        """(positions, classes) scores: arg-max agreement, and each position's float margin between
        its top-1 and runner-up class with the candidate's error on that margin."""
        self.positions += ref.shape[0]
        self.position_agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        if ref.shape[0] > MAX_MARGINS_PER_RUN:
            keep = np.linspace(0, ref.shape[0] - 1, MAX_MARGINS_PER_RUN).round().astype(int)
            ref, got = ref[keep], got[keep]
        rows = np.arange(ref.shape[0])
        pair = np.argpartition(ref, -2, axis=-1)[:, -2:]  # the two highest float scores, unordered
        first_higher = ref[rows, pair[:, 0]] >= ref[rows, pair[:, 1]]
        top = np.where(first_higher, pair[:, 0], pair[:, 1])
        runner_up = np.where(first_higher, pair[:, 1], pair[:, 0])
        margin = ref[rows, top] - ref[rows, runner_up]
        self.margins.append(margin.astype(np.float32))
        self.margin_errors.append(np.abs(got[rows, top] - got[rows, runner_up] - margin).astype(np.float32))

    def _add_binary_positions(self, ref: np.ndarray, got: np.ndarray) -> None:
        """One probability per position: decision agreement at DECISION_THRESHOLD, and each
        position's float log-odds margin (|logit p|, the distance to the threshold) with the
        candidate's log-odds error."""
        self.binary = True
        self.positions += ref.size
        self.position_agree += int(((ref >= DECISION_THRESHOLD) == (got >= DECISION_THRESHOLD)).sum())
        if ref.size > MAX_MARGINS_PER_RUN:
            keep = np.linspace(0, ref.size - 1, MAX_MARGINS_PER_RUN).round().astype(int)
            ref, got = ref[keep], got[keep]
        ref_logit, got_logit = log_odds(ref), log_odds(got)
        self.margins.append(np.abs(ref_logit).astype(np.float32))
        self.margin_errors.append(np.abs(got_logit - ref_logit).astype(np.float32))

    def result(self) -> OutputFidelity:
        across = _cosine(self.dot, self.ref_sq, self.got_sq)
        relative = (self.diff_sq ** 0.5 / self.ref_sq ** 0.5) if self.ref_sq > 0 else (0.0 if self.diff_sq == 0
                                                                                         else float("inf"))
        if self.call_cosines and self.values_per_call >= MIN_VALUES_PER_CALL:
            values = np.concatenate(self.call_cosines)
            mean, low, basis = float(values.mean()), float(values.min()), "per call"
        else:
            mean, low, basis = across, across, "across calls"
        fidelity = OutputFidelity(self.name, mean, low, self.max_abs,
                                  self.agree / self.class_calls if self.class_calls else None, basis, across,
                                  relative, self.values_per_call)
        if self.positions:
            fidelity.positions = self.positions
            fidelity.position_agreement = self.position_agree / self.positions
            estimate = expected_binary_flips if self.binary else expected_disagreement
            fidelity.position_disagreement = estimate(np.concatenate(self.margins), np.concatenate(self.margin_errors))
            fidelity.binary_decisions = self.binary
        if self.frame_cosines:
            frames = np.concatenate(self.frame_cosines)
            fidelity.frame_cosine_mean, fidelity.frame_cosine_min = float(frames.mean()), float(frames.min())
            fidelity.frames = int(frames.size)
        return fidelity

    def label_accuracy(self, labels: np.ndarray) -> tuple[float, float] | None:
        """(float accuracy, quantized accuracy) against `labels`, or None when this output is not
        one score per class for every call or has fewer classes than the labels name."""
        if not self.predictions or self.class_calls != self.calls:
            return None
        ref = np.concatenate([r for r, _ in self.predictions])
        got = np.concatenate([g for _, g in self.predictions])
        if self.values_per_call <= int(labels.max(initial=0)):
            return None
        n = min(len(labels), len(ref))
        return float((ref[:n] == labels[:n]).mean()), float((got[:n] == labels[:n]).mean())


def batches_with_calls(data: CalibrationData, batch_size: int) -> Iterator[tuple[Batch, int | None]]:
    """`data.batches(batch_size)`, each with the number of calls it stacks on axis 0, or None when
    every run is one call fed as given (a model without a batch axis, or a batch of 1)."""
    stacked = data.feed_batch_size(batch_size) != 1
    for batch in data.batches(batch_size):
        yield batch, (_rows(batch) if stacked else None)


def label_accuracy(runs: list[list[np.ndarray]], calls: list[int | None], labels: np.ndarray) -> float:
    """Accuracy against `labels` of the first output giving one score per class for every call.
    `runs`: per run, the model's outputs; `calls`: per run, as `batches_with_calls` yields them."""
    for i in range(len(runs[0]) if runs else 0):
        errors = OutputErrors(str(i))
        for outputs, count in zip(runs, calls):
            if np.asarray(outputs[i]).dtype.kind == "f" and np.asarray(outputs[i]).size:
                errors.add(outputs[i], outputs[i], count)
        accuracy = errors.label_accuracy(labels) if errors.calls else None
        if accuracy is not None:
            return accuracy[0]
    raise LowbitError("the evaluation data holds labels but no model output gives one score per class for every "
                      "call (with more classes than the largest label); use --metric cosine, or drop the labels")


@dataclass
class FloatReference:
    """An open session of the float model (made with the thread count the comparison uses) and
    its outputs, already computed, on some of the evaluation batches (batch index -> outputs in
    the session's output order): `compare_models` runs the float model only on the others.
    `quant_errors`: the errors (per output name) the quantized model already measured on exactly
    those batches, computed from the same graph as the written model (--mode auto scores the
    candidate it then writes, with its plan added as metadata): without labels, and when there are
    other batches, the written model then runs only on those, and the report covers every call."""

    session: object
    outputs: dict[int, list[np.ndarray]] = field(default_factory=dict)
    quant_errors: dict[str, OutputErrors] | None = None


def compare_models(float_path: str | os.PathLike, quant_path: str | os.PathLike, data: CalibrationData, *,
                   batch_size: int = 16, threads: int | None = None, speed: bool = True,
                   warmup: int = TIMING_WARMUP, repeats: int = TIMING_REPEATS,
                   min_seconds: float = TABLE_MIN_SECONDS, precision: float | None = TABLE_PRECISION,
                   reference: FloatReference | None = None) -> VerifyReport:
    """Run `data` through both models and measure fidelity, size and (optionally) speed.
    `reference`: the float model's session and outputs a caller has already (see `FloatReference`)."""
    threads = threads or default_threads()
    float_session = reference.session if reference is not None else make_session(load_model(float_path),
                                                                                   threads=threads)
    known = reference.outputs if reference is not None else {}
    quant_session = make_session(load_model(quant_path), threads=threads)
    names = [o.name for o in float_session.get_outputs()]
    errors = {n: OutputErrors(n) for n in names}
    shapes = [shape_key(b) for b in data.batches(batch_size)]
    # Errors measured on the known batches already (their per-call order only matters with labels);
    # the written model still runs on at least one batch.
    measured = (reference is not None and reference.quant_errors is not None and data.labels is None
                and any(index not in known for index in range(len(shapes))))
    if measured:
        errors.update(reference.quant_errors)
    calls = 0
    # The batches the timed run passes over (`timing.timed_indices`), kept as the data streams by.
    wanted = set(timed_indices(shapes)) if speed else set()
    timed: list[tuple[Batch, int]] = []
    # Latency of the runs below on batches shaped like the timed one (a single timed batch): they
    # warm both sessions up as the timing's own warm-up runs would (`time_models(warm_ms=)`).
    timed_shape = shapes[min(wanted)] if len(wanted) == 1 else None
    warm_ms: list[list[float]] = [[], []]
    for index, (batch, run_calls) in enumerate(batches_with_calls(data, batch_size)):
        if index in wanted:
            timed.append((batch, run_calls or 1))
        same_shape = timed_shape is not None and shape_key(batch) == timed_shape
        if measured and index in known:
            calls += run_calls or 1
            continue
        if index in known:
            reference_outputs = known[index]
        else:
            reference_outputs = _timed_run(float_session, names, batch, warm_ms[0] if same_shape else None)
        candidate = _timed_run(quant_session, names, batch, warm_ms[1] if same_shape else None)
        for name, ref, got in zip(names, reference_outputs, candidate):
            ref, got = np.asarray(ref), np.asarray(got)
            if ref.dtype.kind != "f" or ref.size == 0:
                continue
            errors[name].add(ref, got, run_calls)
        calls += run_calls or 1
    report = VerifyReport([e.result() for e in errors.values() if e.calls], calls,
                          model_size_bytes(Path(float_path)), model_size_bytes(Path(quant_path)), threads=threads)
    labels = data.labels
    if labels is not None:
        _add_label_accuracy(report, errors, labels[:calls])
    if speed:
        feeds = [batch for batch, _ in timed]
        # A session's first run allocates: it is no warm-up sample. Too few samples: the timing warms up itself.
        if known:
            warm = [warm_ms[0], warm_ms[1][1:]]
        else:
            warm = [warm_ms[0][1:], warm_ms[1][1:]]
        timing = time_models([float_session, quant_session], feeds, warmup=warmup, repeats=repeats,
                             min_seconds=min_seconds, precision=precision, max_seconds=TABLE_MAX_SECONDS,
                             warm_ms=warm if min(map(len, warm)) >= warmup else None)
        report.latency_float_ms, report.latency_quant_ms = timing.medians_ms
        report.timing_method = timing.method()
        report.speedup_interval = timing.interval
        report.timed_calls = sum(count for _, count in timed)
        report.timed_shapes = describe_shapes(feeds)
    return report


def _timed_run(session, names: list[str], batch: Batch, latencies_ms: list[float] | None) -> list:
    """`session.run(names, batch)`, its latency appended to `latencies_ms` when given."""
    started = time.perf_counter()
    outputs = session.run(names, batch)
    if latencies_ms is not None:
        latencies_ms.append(1000 * (time.perf_counter() - started))
    return outputs


def _add_label_accuracy(report: VerifyReport, errors: dict[str, OutputErrors], labels: np.ndarray) -> None:
    for fidelity in report.outputs:
        accuracy = errors[fidelity.name].label_accuracy(labels)
        if accuracy is not None:
            fidelity.accuracy_float, fidelity.accuracy_quant = accuracy
            report.labeled_calls = min(len(labels), errors[fidelity.name].calls)
            return
    report.notes.append("the evaluation data holds labels but no output gives one score per class for every call "
                        "(with more classes than the largest label); accuracy not measured")


def time_pair(first, second, feed: dict, *, warmup: int = 2, repeats: int = 10,
              min_seconds: float = TABLE_MIN_SECONDS, precision: float | None = TABLE_PRECISION) -> tuple[float, float]:
    """Median latency in ms of two sessions on one feed: `time_models` for a pair (same method as the table)."""
    return tuple(time_models([first, second], feed, warmup=warmup, repeats=repeats, min_seconds=min_seconds,
                             precision=precision, max_seconds=TABLE_MAX_SECONDS).medians_ms)


def cosine_per_row(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine of each row (axis 0) of `ref` and `got`, each row flattened; both zero counts 1, one zero 0."""
    if ref.ndim == 0:
        ref, got = ref.reshape(1, 1), got.reshape(1, 1)
    ref = np.asarray(ref, np.float64).reshape(ref.shape[0], -1)
    got = np.asarray(got, np.float64).reshape(got.shape[0], -1)
    dot = (ref * got).sum(1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    both_zero = norms == 0
    cos = np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norms))
    # One side zero and the other not: cosine 0, not 1.
    return np.where(both_zero & (np.abs(ref).sum(1) + np.abs(got).sum(1) > 0), 0.0, cos)


def looks_like_class_scores(ref: np.ndarray) -> bool:
    """2-D (calls, classes) with at least two classes."""
    return ref.ndim == 2 and ref.shape[1] >= 2


def looks_like_position_scores(ref: np.ndarray) -> bool:
    """(calls, positions..., classes) with >= 2 classes, holding a probability distribution over the
    last axis at every position: non-negative and summing to 1 (a softmax), or non-positive with
    exponentials summing to 1 (a log-softmax), within DISTRIBUTION_TOLERANCE. By values, so no false
    positives from detector heads (boxes in pixels), embeddings or feature maps; raw logits are not
    recognized (nothing in their values tells a class axis from features)."""
    if ref.ndim < 3 or ref.shape[-1] < 2 or ref.dtype.kind != "f" or not ref.size:
        return False
    ref = np.asarray(ref, np.float64)
    if ref.min() >= -DISTRIBUTION_TOLERANCE:
        return bool(np.abs(ref.sum(-1) - 1).max() <= DISTRIBUTION_TOLERANCE)
    if ref.max() <= DISTRIBUTION_TOLERANCE:
        return bool(np.abs(np.exp(ref).sum(-1) - 1).max() <= DISTRIBUTION_TOLERANCE)
    return False


def looks_like_binary_probabilities(ref: np.ndarray) -> bool:
    """(calls, ..., 1) or (calls,) holding values in [0, 1] only: one probability per call or per
    frame, each a yes/no decision at DECISION_THRESHOLD (a sigmoid head: speech per frame, a binary
    classifier), i.e. the implicit class distribution (1 - p, p) at every position. By shape and
    values: class-score vectors (>= 2 classes on the last axis), probability maps (a last axis of
    pixels), logits, embeddings and states are not recognized. An output that is no probability but
    happens to lie in [0, 1] with one value per position is gated as one, which only makes auto stricter."""
    if ref.dtype.kind != "f" or not ref.size or (ref.ndim >= 2 and ref.shape[-1] != 1):
        return False
    return bool(ref.min() >= 0.0 and ref.max() <= 1.0)


def log_odds(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of probabilities clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP], in float64."""
    p = np.clip(np.asarray(p, np.float64), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(p / (1 - p))


def expected_binary_flips(margins: np.ndarray, errors: np.ndarray) -> float:
    """Expected share of flipped yes/no decisions from every position's float log-odds margin
    (|logit p|) and the candidate's log-odds error there: for each position, the share of the errors
    measured at the less confident half of the positions (margin <= the median) that exceed its
    margin. Log-odds, because an error made before the sigmoid is about the same size in log-odds
    at every margin while the sigmoid squeezes it at confident positions (0.005 in probability at
    p = 0.99 is 0.5 in log-odds, 0.125 at p = 0.5). Pooled over the less confident half instead of
    margin deciles: one decision per call gives few positions near the threshold (1 of 59 calls
    within 0.1 of it on silero-vad's calibration calls), too few to pool within a decile. The
    positions past the median margin do not add their errors: saturated ones (p ~ 1) carry errors
    that say little about the threshold."""
    margins, errors = np.asarray(margins, np.float64).ravel(), np.asarray(errors, np.float64).ravel()
    if not margins.size:
        return 0.0
    pooled = np.sort(errors[margins <= np.median(margins)])
    return float((pooled.size - np.searchsorted(pooled, margins, side="right")).sum()) / pooled.size / margins.size


def expected_disagreement(margins: np.ndarray, errors: np.ndarray, bins: int = MARGIN_BINS) -> float:
    """Expected share of positions whose arg-max flips, from every position's float margin (top-1
    minus runner-up score) and the candidate's error on it (a flip: error > margin). Counting the
    flips themselves rests on the few near-tied positions a small evaluation set holds (2 or 3 of
    ~900 on a CTC recognizer's scored frames); here each position's flip probability is the share
    of the errors measured at positions of similar float margin (the same decile) that exceed its
    margin, so every position's error counts. Errors grow where float is near a tie (transitions),
    hence the deciles rather than one pool."""
    margins, errors = np.asarray(margins, np.float64).ravel(), np.asarray(errors, np.float64).ravel()
    if not margins.size:
        return 0.0
    flipped = 0.0
    for chunk in np.array_split(np.argsort(margins, kind="stable"), min(bins, margins.size)):
        pooled = np.sort(errors[chunk])
        flipped += float((pooled.size - np.searchsorted(pooled, margins[chunk], side="right")).sum()) / pooled.size
    return flipped / margins.size


def _cosine(dot: float, a_sq: float, b_sq: float) -> float:
    if a_sq == 0 and b_sq == 0:
        return 1.0
    if a_sq == 0 or b_sq == 0:
        return 0.0
    return dot / (a_sq ** 0.5 * b_sq ** 0.5)


def _rows(batch: dict[str, np.ndarray]) -> int:
    first = next(iter(batch.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
