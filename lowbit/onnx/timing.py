"""Latency of ONNX models on this CPU: the one timing method behind every speed figure lowbit prints
(the quantize table, `lowbit bench`, the budget search) and the one benches reuse.

Method: every model runs in a session with the same options (`lowbit.onnx.session`: spin-waiting
off, the stated number of intra-op threads, one inter-op thread), in this one process, on the same
feed. Each is run once untimed (first-run allocations) and `warmup` more times; then the models
take turns, the order alternating turn by turn (A B, B A, ...) so clock boost, thermal drift and
background load hit all alike. A turn is one untimed run, then RUNS_PER_TURN timed runs of the same
model back to back: the untimed run brings the model's weights, kernels and buffers back into the
caches the other model just used, so the timed runs measure the warm, back-to-back latency of a
model serving requests, the latency a process timing that model alone measures. (Timed right after
the other model, the fp32 session of a GRU of many tiny ops measured 0.59-0.89 ms, 0.16-0.21 ms
alone, 0.19-0.38 ms in these turns, 1 thread; see BENCHMARKS.md "Timing agreement".) Models whose
runs take COLD_CACHE_MS or more go without the untimed run (the caches refill within the first
fraction of such a run; the untimed run would only double the cost). A model's latency is the
median of its `repeats` timed runs; a speedup is the ratio of medians. Spin-waiting stays off: with
ONNX Runtime's default the threads of the session that just ran keep spinning and slow the next
session's run.

What is timed is the user's data, not one arbitrary call: a run is one pass over `feeds`
(`representative_feeds`): the first batch when every batch has the same shapes, else up to
MAX_TIMED_FEEDS batches evenly spaced through the data, so each input shape (text lines of
different widths, say) counts in proportion to how often it occurs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from lowbit.onnx.session import SPIN_WAIT_OFF, default_threads, make_session

RUNS_PER_TURN = 3  # timed runs per turn, after one untimed run
COLD_CACHE_MS = 10.0  # runs at least this long (every model of the timing): no untimed run per turn
MAX_REPEATS = 300  # the most timed runs `min_seconds` may ask for per model
# Timed seconds per model behind the speedup the quantize table prints: at 3-10 ms a call, ten runs
# moved a captcha CRNN's speedup from 2.6x to 2.2x between two measurements of the same pair; at
# 130-150 ms (PP-OCRv4 det, quiet machine, one process) medians of 10 runs spread 1.13-1.37x and
# medians of 30 runs 1.26-1.32x, so the table times about 3 s per model.
MIN_TIMED_SECONDS = 3.0
MAX_TIMED_FEEDS = 8  # batches per timed run when the data's shapes vary
ModelLike = str | os.PathLike | bytes | onnx.ModelProto | ort.InferenceSession


@dataclass
class Timing:
    """Timed runs of one or more models on one feed (milliseconds), with the settings they ran under."""

    latencies_ms: list[list[float]]  # per model, in the order given
    threads: int | None  # intra-op threads of every session (None: ONNX Runtime's default)
    warmup: int
    repeats: int
    untimed_per_turn: int = 1

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
        return (f"{threads}, 1 inter-op, spin-waiting off; median of {self.repeats} timed runs per model after "
                f"{self.warmup} warm-up, interleaved in one process in turns of {self.untimed_per_turn} untimed + {RUNS_PER_TURN} timed "
                "runs (order alternating)")

    def to_dict(self) -> dict:
        return {"medians_ms": self.medians_ms, "speedup": self.speedup, "threads": self.threads,
                "inter_op_threads": 1, "spin_waiting": False, "warmup": self.warmup, "repeats": self.repeats,
                "method": self.method()}


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
                warm_ms: Sequence[Sequence[float]] | None = None) -> Timing:
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
    are the warm-up, and no other warm-up runs are made."""
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
    untimed = 1
    if warmup:
        typical_ms = float(np.mean([np.median(runs) for runs in warm_ms]))
        untimed = 0 if min(min(runs) for runs in warm_ms) >= COLD_CACHE_MS else 1
        if min_seconds > 0:
            repeats = max(repeats, min(MAX_REPEATS, int(np.ceil(1000 * min_seconds / max(typical_ms, 1e-3)))))
    latencies: list[list[float]] = [[] for _ in sessions]
    for turn in range(-(-repeats // RUNS_PER_TURN)):
        order = range(len(sessions)) if turn % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            for _ in range(untimed):
                one_run(sessions[i])  # warms the caches the other model used
            for _ in range(min(RUNS_PER_TURN, repeats - turn * RUNS_PER_TURN)):
                start = time.perf_counter()
                one_run(sessions[i])
                latencies[i].append(1000 * (time.perf_counter() - start))
    return Timing(latencies, stated.pop(), warmup, repeats, untimed)


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
