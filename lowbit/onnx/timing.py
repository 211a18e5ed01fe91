"""Latency of ONNX models on this CPU: the one timing method behind every speed figure lowbit prints
(the quantize table, `lowbit bench`, the budget search) and the one benches reuse.

Method: every model runs in a session with the same options (`lowbit.onnx.session`: spin-waiting
off, the stated number of intra-op threads, one inter-op thread), in this one process, on the same
feed. Each is run once untimed (first-run allocations) and `warmup` more times; then the models
take turns, the order alternating turn by turn (A B, B A, ...) so clock boost, thermal drift and
background load hit all alike. A turn is UNTIMED_PER_TURN untimed runs, then RUNS_PER_TURN timed
runs of the same model back to back: the untimed runs bring the model's weights, kernels and
buffers back into the caches the other model just used, so the timed runs measure the warm,
back-to-back latency of a model serving requests, the latency a process timing that model alone
measures. One untimed run is not enough: after the fp32 model, a captcha CRNN's int8 model (3 ms,
dynamic-int8 LSTM steps) took 3.19, 3.01, 2.95, 2.90 ms in its first four runs, 2.84-2.88 ms from
the fifth on, and its speedup read 3.5-6% low (bench/timing_styles_check.py); the GRU of
BENCHMARKS.md "Timing agreement" likewise measured 0.59-0.89 ms right after the other model,
0.16-0.21 ms alone. Models whose runs take COLD_CACHE_MS or more go without untimed runs (the
caches refill within the first fraction of such a run; untimed runs would only multiply the cost)
and take turns of one timed run. A model's latency is the median of its timed runs; a speedup is
the ratio of medians. Spin-waiting stays off: with ONNX Runtime's default the threads of the
session that just ran keep spinning and slow the next session's run.

How long: a fixed number of timed runs (`repeats`, raised to cover `min_seconds`), or, with
`precision` (the quantize table, `lowbit bench`, `verify.time_pair`), until the speedup is known
that precisely. A round is one turn of each model; the rounds so far are cut into CI_BLOCKS
consecutive blocks, each block's speedup (ratio of its medians) is one sample, and the 95%
interval of the speedup is Student's t over those samples (batch means: slow drifts within a block
show up as spread between blocks, so a model whose latency wanders keeps being timed while a
steady one stops). The timing stops once every
model has had its `min_seconds` of runs (at most MAX_REPEATS; SLOW_MIN_SECONDS at most for runs
of COLD_CACHE_MS or more) and the interval is within +-`precision`, or at `max_seconds` of wall
time per model (at most MAX_ADAPTIVE_REPEATS runs). (PP-OCRv4 det, 80 ms a run, steady: about
SLOW_MIN_SECONDS per model; a 3 ms captcha CRNN: 300 runs per model, more while it drifts.)

What is timed is the user's data, not one arbitrary call: a run is one pass over `feeds`
(`representative_feeds`): the first batch when every batch has the same shapes, else up to
MAX_TIMED_FEEDS batches evenly spaced through the data, so each input shape (text lines of
different widths, say) counts in proportion to how often it occurs.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from lowbit.onnx.session import SPIN_WAIT_OFF, default_threads, make_session

UNTIMED_PER_TURN = 3  # untimed runs opening a turn (runs of COLD_CACHE_MS or more: none)
RUNS_PER_TURN = 6  # timed runs per turn after them (runs of COLD_CACHE_MS or more: 1)
COLD_CACHE_MS = 10.0  # runs at least this long (every model of the timing): no untimed run per turn
MAX_REPEATS = 300  # the most timed runs `min_seconds` may ask for per model
MAX_ADAPTIVE_REPEATS = 2000  # the most timed runs per model of an adaptive timing (sub-millisecond models)
MAX_TIMED_FEEDS = 8  # batches per timed run when the data's shapes vary
# The quantize table's adaptive timing (`precision`): stop once the speedup's 95% interval is within
# +-TABLE_PRECISION, after at least TABLE_MIN_SECONDS of runs per model (at most MAX_REPEATS runs;
# SLOW_MIN_SECONDS for runs of COLD_CACHE_MS or more) and at most TABLE_MAX_SECONDS of wall time per
# model. A fixed count is not enough either way: at 3-10 ms a call, ten runs moved a captcha CRNN's
# speedup from 2.6x to 2.2x between two measurements of the same pair; at 130-150 ms under load
# (PP-OCRv4 det) medians of 10 runs spread 1.13-1.37x. Why two minimums: a model of many tiny ops
# drifts slowly (the captcha CRNN's int8 latency by 10% from one few-second window to the next at
# load 2-3) and a one-second window does not show it: after 1 s per model its interval read
# +-2-4% while the bench's independent timing differed by up to 19%; a model of 80 ms runs on two
# threads shows its drift as spread between rounds within the second (PP-OCRv4 det under the same
# load: +-4-20% after 5 s, so it goes on).
TABLE_PRECISION = 0.04
TABLE_MIN_SECONDS = 3.0
SLOW_MIN_SECONDS = 0.75
TABLE_MAX_SECONDS = 3.0
CI_BLOCKS = 8  # batch-means blocks the rounds are cut into (fewer while there are fewer rounds)
MIN_CI_BLOCKS = 6  # rounds needed before an interval is computed
# Two-sided 95% Student t quantiles by degrees of freedom (blocks - 1).
T_95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
ModelLike = str | os.PathLike | bytes | onnx.ModelProto | ort.InferenceSession


@dataclass
class Timing:
    """Timed runs of one or more models on one feed (milliseconds), with the settings they ran under."""

    latencies_ms: list[list[float]]  # per model, in the order given
    threads: int | None  # intra-op threads of every session (None: ONNX Runtime's default)
    warmup: int
    repeats: int
    untimed_per_turn: int = UNTIMED_PER_TURN
    runs_per_turn: int = RUNS_PER_TURN
    interval: float | None = None  # relative half-width of the speedup's 95% interval (adaptive timing)
    precision: float | None = None  # the half-width the adaptive timing aimed for
    seconds: float = 0.0  # wall time of the timed turns, all models together

    @property
    def medians_ms(self) -> list[float]:
        return [float(np.median(runs)) for runs in self.latencies_ms]

    @property
    def speedup(self) -> float | None:
        """How many times faster the second model is than the first (ratio of medians)."""
        if len(self.latencies_ms) < 2:
            return None
        first, second = self.medians_ms[:2]
        return first / second if second > 0 else None

    def method(self) -> str:
        """One line saying how the numbers were measured."""
        threads = "ONNX Runtime's default intra-op threads" if self.threads is None else \
            f"{self.threads} intra-op thread{'s' if self.threads != 1 else ''}"
        text = (f"{threads}, 1 inter-op, spin-waiting off; median of {self.repeats} timed runs per model after "
                f"{self.warmup} warm-up, interleaved in one process in turns of {self.untimed_per_turn} untimed + "
                f"{self.runs_per_turn} timed runs (order alternating)")
        if self.precision is not None and self.interval is not None:
            met = "met" if self.interval <= self.precision else "not reached by the time limit"
            text += (f"; {self.seconds:.1f} s, speedup's 95% interval +-{100 * self.interval:.1f}% "
                     f"(aim +-{100 * self.precision:.1f}%: {met})")
        return text

    def to_dict(self) -> dict:
        return {"medians_ms": self.medians_ms, "speedup": self.speedup, "threads": self.threads,
                "inter_op_threads": 1, "spin_waiting": False, "warmup": self.warmup, "repeats": self.repeats,
                "speedup_interval": self.interval, "seconds": self.seconds, "method": self.method()}


def speedup_interval(rounds: Sequence[Sequence[Sequence[float]]], blocks: int = CI_BLOCKS) -> float | None:
    """Relative half-width of the 95% interval of every model's speedup over the first (the widest),
    from `rounds` (per round, per model, its timed latencies) cut into up to `blocks` consecutive
    blocks (batch means); None with fewer than MIN_CI_BLOCKS rounds."""
    count = min(blocks, len(rounds))
    if count < MIN_CI_BLOCKS:
        return None
    widest = 0.0
    for other in range(1, len(rounds[0])):
        logs = []
        for block in np.array_split(np.arange(len(rounds)), count):
            first = np.median([ms for r in block for ms in rounds[r][0]])
            second = np.median([ms for r in block for ms in rounds[r][other]])
            logs.append(np.log(max(first, 1e-9) / max(second, 1e-9)))
        half = T_95[count - 1] * float(np.std(logs, ddof=1)) / np.sqrt(count)
        widest = max(widest, float(np.expm1(half)))
    return widest


def shape_key(feed: dict[str, np.ndarray]) -> tuple:
    """The input shapes of one feed (what decides the cost of a run)."""
    return tuple((name, tuple(np.shape(value))) for name, value in feed.items())


def evenly_spaced(count: int, most: int = MAX_TIMED_FEEDS) -> list[int]:
    """Up to `most` indices spread evenly over range(count), the first and the last included (so a
    stride of 2 never picks only the even calls of data that alternates, e.g. pages on paper and
    on photos)."""
    if count <= most:
        return list(range(count))
    return sorted({int(round(i * (count - 1) / (most - 1))) for i in range(most)}) if most > 1 else [0]


def timed_indices(shapes: Sequence[tuple]) -> list[int]:
    """Which of the data's batches (given by their `shape_key`s, in order) a timed run passes over:
    the first when all have the same shapes, else up to MAX_TIMED_FEEDS evenly spaced ones (each
    shape in proportion to how often the data has it). The last batch, often a partial one of a
    batched data set, is left out when there are others."""
    shapes = shapes[:-1] if len(shapes) > 1 else shapes
    return [0] if len(set(shapes)) <= 1 else evenly_spaced(len(shapes))


def representative_feeds(feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The feeds a timed run on `feeds` passes over (`timed_indices`)."""
    return [feeds[i] for i in timed_indices([shape_key(f) for f in feeds])] if feeds else []


def describe_shapes(feeds: Sequence[dict[str, np.ndarray]]) -> str:
    """'1x3x736x1088' or '4 shapes, 1x3x48x160 to 1x3x48x800': what a timed run was made of."""
    keys = sorted({shape_key(f) for f in feeds}, key=lambda k: [int(np.prod(s)) for _, s in k])
    text = [", ".join("x".join(map(str, s)) or "scalar" for _, s in k) for k in keys]
    return text[0] if len(text) == 1 else f"{len(text)} shapes, {text[0]} to {text[-1]}"


def time_models(models: Sequence[ModelLike], feed: dict[str, np.ndarray] | Sequence[dict[str, np.ndarray]], *,
                threads: int | None = None, warmup: int = 5, repeats: int = 30, min_seconds: float = 0.0,
                warm_ms: Sequence[Sequence[float]] | None = None, precision: float | None = None,
                max_seconds: float = TABLE_MAX_SECONDS) -> Timing:
    """Time `models` (paths, serialized bytes, ModelProtos, or sessions made by `make_session`) on
    `feed` (one feed, or a sequence of feeds: then a run is one pass over them, in order) with the
    method of the module docstring. Models given as files or protos get sessions with
    `threads` intra-op threads (default: every core this process may use); sessions given must all
    have the same thread count and spin-waiting off. Runners of other runtimes (any object with
    `run(None, feed)` and no ONNX Runtime session options, e.g. `lowbit.deploy`'s ExecuTorch and
    LiteRT runners) are timed the same way; their threads are the caller's `threads`, which must be
    stated. `Timing.speedup` is models[0] / models[1]. `min_seconds`: time each model about
    this long per model (more repeats for fast models, up to MAX_REPEATS): a median of ten 3 ms runs
    moves by tens of percent with one scheduler hiccup. `warm_ms`: per model, the latencies (ms)
    of runs equivalent to passes over `feed` that the caller has just made with these sessions,
    after each session's first run (the quantize table's verification pass over the data): they
    are the warm-up, and no other warm-up runs are made. `precision` (two or more models): time
    adaptively (module docstring): the runs above are the minimum, then more rounds until the
    speedup's 95% interval is within +-precision or `max_seconds` of wall time per model."""
    if not models:
        raise ValueError("time_models needs at least one model")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    threads = threads or default_threads()
    sessions = [m if hasattr(m, "run") else make_session(m, threads=threads) for m in models]
    stated = {_threads_of(s) if hasattr(s, "get_session_options") else threads for s in sessions}
    if len(stated) != 1:
        raise ValueError(f"sessions timed together must use the same thread count, got {sorted(stated, key=str)}")
    feeds = [feed] if isinstance(feed, dict) else list(feed)
    if not feeds:
        raise ValueError("time_models needs at least one feed")

    def one_run(session) -> None:
        for each in feeds:
            session.run(None, each)

    if warm_ms is not None:
        if len(warm_ms) != len(sessions) or not all(warm_ms):
            raise ValueError("warm_ms needs at least one latency per model")
        warmup = min(len(runs) for runs in warm_ms)
    else:
        for session in sessions:
            one_run(session)
        warm_ms = [[] for _ in sessions]
        for _ in range(warmup):
            for i, session in enumerate(sessions):
                start = time.perf_counter()
                one_run(session)
                warm_ms[i].append(1000 * (time.perf_counter() - start))
    untimed = UNTIMED_PER_TURN
    adaptive = precision is not None and len(sessions) > 1
    if warmup:
        typical_ms = float(np.mean([np.median(runs) for runs in warm_ms]))
        untimed = 0 if min(min(runs) for runs in warm_ms) >= COLD_CACHE_MS else UNTIMED_PER_TURN
        if adaptive and not untimed:
            min_seconds = min(min_seconds, SLOW_MIN_SECONDS)  # slow runs: their drift shows within the window
        if min_seconds > 0:
            repeats = max(repeats, min(MAX_REPEATS, int(np.ceil(1000 * min_seconds / max(typical_ms, 1e-3)))))
    per_turn = RUNS_PER_TURN if untimed else 1
    rounds: list[list[list[float]]] = []  # per round (one turn of each model), per model, its timed runs
    interval = None
    started = time.perf_counter()
    for turn in itertools.count():
        done = turn * per_turn
        if done >= repeats and not adaptive:
            break
        if done >= repeats and adaptive:
            interval = speedup_interval(rounds)
            elapsed = (time.perf_counter() - started) / len(sessions)  # wall seconds per model so far
            if ((interval is not None and interval <= precision) or elapsed >= max_seconds
                    or done >= MAX_ADAPTIVE_REPEATS):
                break
        order = range(len(sessions)) if turn % 2 == 0 else reversed(range(len(sessions)))
        runs: list[list[float]] = [[] for _ in sessions]
        for i in order:
            for _ in range(untimed):
                one_run(sessions[i])  # warms the caches the other model used
            for _ in range(per_turn if adaptive else min(per_turn, repeats - done)):
                start = time.perf_counter()
                one_run(sessions[i])
                runs[i].append(1000 * (time.perf_counter() - start))
        rounds.append(runs)
    seconds = time.perf_counter() - started
    latencies = [[ms for r in rounds for ms in r[i]] for i in range(len(sessions))]
    if adaptive and interval is None:
        interval = speedup_interval(rounds)
    return Timing(latencies, stated.pop(), warmup, len(latencies[0]), untimed, per_turn, interval,
                  precision if adaptive else None, seconds)


def _threads_of(session) -> int | None:
    options = session.get_session_options()
    for key, value in SPIN_WAIT_OFF.items():
        try:
            got = options.get_session_config_entry(key)
        except RuntimeError:  # not set: ONNX Runtime's default, spinning on
            got = None
        if got != value:
            raise ValueError(f"session timed with {key} not {value!r}; make it with lowbit.onnx.session.make_session")
    return options.intra_op_num_threads or None
