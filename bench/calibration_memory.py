"""Calibration memory: streaming observers vs keeping every activation.

Feeds 10, 100 and 1000 calibration batches of synthetic activations (several tensors, made one
batch at a time so nothing but the current batch exists) through an `ObserverSet`, and reports
the peak Python-tracked memory (tracemalloc: NumPy allocations included; while feeding, and separately while computing ranges), the wall time, the
bytes the observers hold, and what the naive "store all activations, then compute ranges"
approach would hold (computed, not allocated).

    python bench/calibration_memory.py                       # default size, ~1 minute on 2 cores
    python bench/calibration_memory.py --shape 64 128 384    # the full activation size
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

import numpy as np

from lowbit.calibration import ObserverSet
from lowbit.spec import QuantSpec

MIB = 1024 * 1024
TENSORS = ("attention_scores", "gelu_out", "relu_out", "residual")


def make_batch(rng: np.random.Generator, index: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One batch of activations with the shapes of a transformer block's tensors."""
    scores = rng.standard_normal(shape, dtype=np.float32)
    scores *= 3.0
    scores[..., -shape[-1] // 8:] = -np.inf  # padded keys masked before Softmax
    gelu = rng.standard_normal(shape, dtype=np.float32)
    relu = np.maximum(gelu, 0.0)
    residual = rng.standard_normal(shape, dtype=np.float32)
    residual *= 1.0 + 0.001 * index  # a slowly growing range forces histogram re-binning
    residual.reshape(-1)[::100_003] *= 20.0  # sparse outlier features
    return {"attention_scores": scores, "gelu_out": gelu, "relu_out": relu, "residual": residual}


def run(n_batches: int, shape: tuple[int, ...], bins: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    observers = ObserverSet(bins=bins)
    for index in range(n_batches):
        observers.update(make_batch(rng, index, shape))
    feed_seconds = time.perf_counter() - start
    _, feed_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    range_start = time.perf_counter()
    ranges = observers.ranges("auto", QuantSpec("uint8", symmetric=False))
    range_seconds = time.perf_counter() - range_start
    _, range_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert all(np.isfinite(lo) and np.isfinite(hi) for lo, hi in ranges.values())
    batch_bytes = len(TENSORS) * int(np.prod(shape)) * 4
    return {
        "batches": n_batches,
        "feed_peak_mib": feed_peak / MIB,
        "range_peak_mib": range_peak / MIB,
        "feed_s": feed_seconds,
        "ranges_s": range_seconds,
        "held_mib": observers.nbytes() / MIB,
        "naive_mib": n_batches * batch_bytes / MIB,
        "batch_mib": batch_bytes / MIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 128, 384],
                        help="shape of each activation tensor (default 8 128 384)")
    parser.add_argument("--bins", type=int, default=2048)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = [run(n, shape, args.bins) for n in args.batches]
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    print(f"Calibration memory: {len(TENSORS)} tensors of shape {shape} float32 per batch "
          f"({rows[0]['batch_mib']:.1f} MiB per batch), {args.bins}-bin histograms, "
          "ranges by method 'auto' for uint8 asymmetric.\n")
    print("| batches | peak MiB while feeding | peak MiB computing ranges | feed s | ranges s "
          "| MiB held by observers | naive: MiB to keep all activations | naive / feeding peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batches']} | {r['feed_peak_mib']:.1f} | {r['range_peak_mib']:.1f} "
              f"| {r['feed_s']:.1f} | {r['ranges_s']:.2f} | {r['held_mib']:.3f} "
              f"| {r['naive_mib']:,.0f} | {r['naive_mib'] / r['feed_peak_mib']:.0f}x |")
    growth = rows[-1]["feed_peak_mib"] / rows[0]["feed_peak_mib"]
    print(f"\nPeak memory {rows[-1]['batches']} vs {rows[0]['batches']} batches: {growth:.2f}x "
          f"(the naive approach: {rows[-1]['batches'] / rows[0]['batches']:.0f}x). "
          f"Process max RSS grew by {(rss_after - rss_before) / 1024:.0f} MiB over all runs "
          "(includes NumPy's allocator reuse; tracemalloc is the precise number).")
    held = {r["held_mib"] for r in rows}
    if len(held) != 1:
        print("WARNING: observer memory changed with the number of batches", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
