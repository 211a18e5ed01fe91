"""`lowbit bench`: latency and throughput of one or two ONNX models on this CPU, in one run.

Both models get the same inputs (generated from the declared input shapes, or the first batch of
`--data`) and are timed by `lowbit.onnx.timing.time_models`, the method behind every lowbit speed
figure (the quantize table too): same session options (spin-waiting off, the stated thread count),
warmed up, then interleaved in turns in one process, alternating which goes first, so clock
boost, thermal drift and background load hit both alike; the ratio of medians is the speedup. Two
models are timed as the quantize table times them: at least `repeats` runs and
`timing.TABLE_MIN_SECONDS` each, then until the speedup's 95% interval is within
+-`timing.TABLE_PRECISION` (at most `timing.TABLE_MAX_SECONDS` per model).
The CPU's int8 features are reported next to the numbers, so a slower int8 model is
explained rather than mysterious.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit.analysis.cpu import CpuInfo, cpu_info
from lowbit.analysis.feeds import synthetic_feed
from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.io import load_model, model_size_bytes
from lowbit.onnx.session import default_threads, make_session
from lowbit.onnx.timing import TABLE_MAX_SECONDS, TABLE_MIN_SECONDS, TABLE_PRECISION, time_models
from lowbit.onnx.verify import batches_with_calls


@dataclass
class ModelTiming:
    path: str
    size_bytes: int
    latencies_ms: list[float]
    batch: int  # calls per run: samples stacked on a batch axis, or 1 for a model without one

    @property
    def median_ms(self) -> float:
        return float(np.median(self.latencies_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 90))

    @property
    def throughput(self) -> float:
        """Calls (samples) per second at the median latency."""
        return self.batch * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"path": self.path, "size_bytes": self.size_bytes, "batch": self.batch, "median_ms": self.median_ms,
                "p90_ms": self.p90_ms, "min_ms": min(self.latencies_ms), "throughput_per_s": self.throughput,
                "repeats": len(self.latencies_ms)}


@dataclass
class BenchReport:
    models: list[ModelTiming]
    threads: int | None
    warmup: int
    inputs: dict[str, str]
    cpu: CpuInfo
    notes: list[str] = field(default_factory=list)
    method: str = ""  # how it was timed (threads, spin-waiting, repeats), from `Timing.method`

    @property
    def speedup(self) -> float | None:
        """How many times faster the second model is than the first (ratio of medians)."""
        if len(self.models) < 2 or self.models[1].median_ms <= 0:
            return None
        return self.models[0].median_ms / self.models[1].median_ms

    def to_dict(self) -> dict:
        return {"models": [m.to_dict() for m in self.models], "speedup": self.speedup, "threads": self.threads,
                "inter_op_threads": 1, "spin_waiting": False, "warmup": self.warmup,
                "repeats": len(self.models[0].latencies_ms), "method": self.method, "inputs": self.inputs,
                "cpu": self.cpu.to_dict(), "notes": self.notes}

    def text(self) -> str:
        lines = [self.cpu.line()]
        shown = ", ".join(f"{k} {v}" for k, v in self.inputs.items())
        lines.append(f"timing: {self.method}")
        lines.append(f"inputs: {shown}")
        width = max(12, *(len(Path(m.path).name) for m in self.models))
        lines.append(f"{'model':<{width}} {'size':>10} {'median ms':>10} {'p90 ms':>9} {'calls/s':>11}")
        for m in self.models:
            size = f"{m.size_bytes / 1e6:.2f} MB" if m.size_bytes >= 1e5 else f"{m.size_bytes / 1e3:.1f} kB"
            lines.append(f"{Path(m.path).name:<{width}} {size:>10} {m.median_ms:>10.3f} "
                         f"{m.p90_ms:>9.3f} {m.throughput:>11.1f}")
        if self.speedup is not None:
            first, second = (Path(m.path).name for m in self.models)
            verdict = "faster" if self.speedup >= 1 else "SLOWER"
            lines.append(f"{second} vs {first}: {self.speedup:.2f}x {verdict} (ratio of medians, interleaved "
                         f"in the same run, {self.threads} threads)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def bench_models(paths: list[str | os.PathLike], *, shapes: dict[str, tuple[int, ...]] | None = None,
                 data: str | os.PathLike | None = None, batch_size: int = 1, threads: int | None = None,
                 warmup: int = 5, repeats: int = 30, seed: int = 0) -> BenchReport:
    """Time one or two models on the same inputs (see the module docstring)."""
    if not 1 <= len(paths) <= 2:
        raise LowbitError(f"bench takes one or two models, got {len(paths)}; compare two at a time")
    if repeats < 1 or warmup < 0:
        raise LowbitError(f"--repeats must be at least 1 and --warmup at least 0 (got {repeats}, {warmup})")
    if threads is not None and threads < 1:
        raise LowbitError(f"--threads must be at least 1, got {threads}")
    if data is not None and shapes:
        raise LowbitError("--shape and --data both set the inputs; use --data alone (its arrays have shapes)")
    models = [load_model(p) for p in paths]
    if data is not None:
        feed, calls = next(batches_with_calls(CalibrationData(data, models[0], what="benchmark data"), batch_size))
    else:
        feed = synthetic_feed(models[0], shapes, seed=seed)
        calls = _stacked_calls(models[0], feed)
    for path, model in zip(paths[1:], models[1:]):
        _check_same_inputs(paths[0], models[0], path, model)
    threads = threads or default_threads()
    sessions = [make_session(m, threads=threads) for m in models]
    for path, session in zip(paths, sessions):
        _first_run(path, session, feed)
    timing = time_models(sessions, feed, warmup=warmup, repeats=repeats, min_seconds=TABLE_MIN_SECONDS,
                         precision=TABLE_PRECISION, max_seconds=TABLE_MAX_SECONDS)
    latencies = timing.latencies_ms
    timings = [ModelTiming(str(p), model_size_bytes(p), lat, calls or 1) for p, lat in zip(paths, latencies)]
    inputs = {k: f"{'x'.join(map(str, v.shape)) or 'scalar'} {v.dtype}" for k, v in feed.items()}
    report = BenchReport(timings, threads, warmup, inputs, cpu_info(), method=timing.method())
    if report.speedup is not None and report.speedup < 1:
        report.notes.append("the second model is slower; see the CPU line above for what int8 can gain here "
                            "(on small models the Q/DQ and layout overhead can outweigh faster int8 kernels)")
    return report


def _stacked_calls(model, feed: dict[str, np.ndarray]) -> int | None:
    """Samples per run of a generated feed: the first input's batch axis (a symbolic first dim), else None."""
    signature = next(iter(model_inputs(model)), None)
    if signature is None or not signature.batched:
        return None
    return int(feed[signature.name].shape[0])


def _check_same_inputs(first_path, first, other_path, other) -> None:
    a = {s.name: s.dtype for s in model_inputs(first)}
    b = {s.name: s.dtype for s in model_inputs(other)}
    if a != b:
        raise LowbitError(f"{other_path} takes inputs {b} but {first_path} takes {a}; bench compares two "
                          "versions of the same model, with the same input names and dtypes")


def _first_run(path, session, feed: dict[str, np.ndarray]) -> None:
    try:
        session.run(None, feed)
    except Exception as exc:  # ORT's own exception types: shape/type mismatch on the fed inputs
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"{path} failed on the benchmark inputs ({first}); pass matching --shape values or "
                          "real inputs with --data") from None
