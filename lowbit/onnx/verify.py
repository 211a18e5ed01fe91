"""Measure a quantized ONNX model against its float original on ONNX Runtime.

Fidelity (per output: mean and worst per-sample cosine, max abs error, top-1 agreement when the
output looks like class scores), size before/after, and speed: both models timed in the same
process on the same batch, interleaved run by run after a warm-up, median of the repeats, so
the speedup is a ratio measured under identical conditions. Benches reuse `compare_models`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.session import make_session
from lowbit.onnx.io import load_model, model_size_bytes


@dataclass
class OutputFidelity:
    name: str
    cosine_mean: float
    cosine_min: float
    max_abs_error: float
    top1_agreement: float | None = None


@dataclass
class VerifyReport:
    outputs: list[OutputFidelity]
    samples: int
    size_before: int
    size_after: int
    latency_float_ms: float | None = None
    latency_quant_ms: float | None = None
    threads: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        if not self.latency_float_ms or not self.latency_quant_ms:
            return None
        return self.latency_float_ms / self.latency_quant_ms

    @property
    def size_ratio(self) -> float:
        return self.size_before / max(1, self.size_after)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["speedup"] = self.speedup
        data["size_ratio"] = self.size_ratio
        return data

    def table(self) -> str:
        """Plain-text report for the command line."""
        lines = [f"{'output':<24} {'cosine mean':>11} {'cosine min':>10} {'max abs err':>11} {'top-1 agree':>11}"]
        for o in self.outputs:
            top1 = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%"
            lines.append(f"{o.name[:24]:<24} {o.cosine_mean:>11.5f} {o.cosine_min:>10.5f} "
                         f"{o.max_abs_error:>11.4g} {top1:>11}")
        lines.append(f"samples compared: {self.samples}")
        lines.append(f"size: {_mb(self.size_before)} -> {_mb(self.size_after)} ({self.size_ratio:.2f}x smaller)")
        if self.speedup is not None:
            lines.append(f"latency per batch: float {self.latency_float_ms:.2f} ms, quantized "
                         f"{self.latency_quant_ms:.2f} ms -> {self.speedup:.2f}x "
                         f"({'faster' if self.speedup >= 1 else 'SLOWER'}, {self.threads} threads, same run)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def compare_models(float_path: str | os.PathLike, quant_path: str | os.PathLike, data: CalibrationData, *,
                   batch_size: int = 16, threads: int | None = None, speed: bool = True,
                   warmup: int = 2, repeats: int = 10) -> VerifyReport:
    """Run `data` through both models and measure fidelity, size and (optionally) speed."""
    threads = threads or os.cpu_count() or 1
    float_session = make_session(load_model(float_path), threads=threads)
    quant_session = make_session(load_model(quant_path), threads=threads)
    names = [o.name for o in float_session.get_outputs()]
    cosines: dict[str, list[np.ndarray]] = {n: [] for n in names}
    max_err = dict.fromkeys(names, 0.0)
    agree = {n: [0, 0] for n in names}
    samples = 0
    for batch in data.batches(batch_size):
        reference = float_session.run(names, batch)
        candidate = quant_session.run(names, batch)
        for name, ref, got in zip(names, reference, candidate):
            ref = np.asarray(ref, np.float64)
            got = np.asarray(got, np.float64)
            if ref.dtype.kind != "f" or ref.size == 0:
                continue
            cosines[name].append(_cosine_per_sample(ref, got))
            max_err[name] = max(max_err[name], float(np.max(np.abs(ref - got))))
            if _looks_like_class_scores(ref):
                agree[name][0] += int((ref.argmax(-1) == got.argmax(-1)).sum())
                agree[name][1] += ref.shape[0]
        samples += next(iter(batch.values())).shape[0] if batch else 0
    outputs = []
    for name in names:
        if not cosines[name]:
            continue
        values = np.concatenate(cosines[name])
        top1 = agree[name][0] / agree[name][1] if agree[name][1] else None
        outputs.append(OutputFidelity(name, float(values.mean()), float(values.min()), max_err[name], top1))
    report = VerifyReport(outputs, samples, model_size_bytes(Path(float_path)), model_size_bytes(Path(quant_path)),
                          threads=threads)
    if speed:
        batch = data.first_batch(batch_size)
        report.latency_float_ms, report.latency_quant_ms = time_pair(float_session, quant_session, batch,
                                                                     warmup=warmup, repeats=repeats)
    return report


def time_pair(first, second, feed: dict, *, warmup: int = 2, repeats: int = 10) -> tuple[float, float]:
    """Median latency in ms of two sessions on one feed, interleaved so drift hits both alike.

    Each timed run follows an untimed one of the same session: after a run, ONNX Runtime's
    worker threads keep spinning for a while, and on a machine with few cores the spinning
    threads of the session that just ran would steal the cores from the other session's timed
    run (measured on 2 cores: ResNet-18 int8 looked 2.2x faster than fp32 instead of 2.8x)."""
    for _ in range(warmup):
        first.run(None, feed)
        second.run(None, feed)
    a, b = [], []
    for _ in range(repeats):
        for session, times in ((first, a), (second, b)):
            session.run(None, feed)  # settles the other session's spinning threads
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(a)), 1000 * float(np.median(b))


def _cosine_per_sample(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    if ref.ndim == 0:
        ref, got = ref.reshape(1, 1), got.reshape(1, 1)
    ref = ref.reshape(ref.shape[0], -1)
    got = got.reshape(got.shape[0], -1)
    dot = (ref * got).sum(1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    both_zero = norms == 0
    cos = np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norms))
    # One side zero and the other not: cosine 0, not 1.
    return np.where(both_zero & (np.abs(ref).sum(1) + np.abs(got).sum(1) > 0), 0.0, cos)


def _looks_like_class_scores(ref: np.ndarray) -> bool:
    """2-D (batch, classes) with at least two classes."""
    return ref.ndim == 2 and ref.shape[1] >= 2


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# Public names for the searches and analyses that score candidates the same way.
cosine_per_sample = _cosine_per_sample
looks_like_class_scores = _looks_like_class_scores
