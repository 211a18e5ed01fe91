"""`--mode auto`'s two calibrations (every range method's observers + bias correction's means + the
Conv inputs' channel peaks, then the equalized tensors) with the statistics pass on one thread
and spread over the cores (`lowbit.onnx.statistics`: next chunk's forward pass read ahead, large
tensors folded in on worker threads, range estimates on worker threads), alternating in one
process; checks that both give the same ranges (every method) and channel peaks, bit for bit.

    cd /tmp/scratch && PYTHONPATH=/path/to/lowbit python /path/to/lowbit/bench/calibration_threads.py \\
        MODEL.onnx CALIB_DIR --rounds 3

ONNX Runtime runs with its default threads in both modes; only the statistics differ.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np

import lowbit.onnx.collect as collect_module
import lowbit.onnx.statistics as statistics_module
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.config import StaticConfig
from lowbit.onnx.io import load_model
from lowbit.onnx.pipeline import FirstRows, StaticPipeline, input_channel_peaks, prepare_model

SPREAD = {"READ_AHEAD": statistics_module.READ_AHEAD, "PARALLEL_MIN_BYTES": statistics_module.PARALLEL_MIN_BYTES}


def one_thread(on: bool) -> None:
    statistics_module.READ_AHEAD = SPREAD["READ_AHEAD"] and not on
    statistics_module.PARALLEL_MIN_BYTES = math.inf if on else SPREAD["PARALLEL_MIN_BYTES"]
    collect_module.default_threads = (lambda: 1) if on else statistics_module.default_threads


def calibrate(model, data) -> tuple[float, float, dict]:
    wall, cpu = time.perf_counter(), time.process_time()
    peaks = FirstRows(input_channel_peaks(model), 4)
    first = StaticPipeline(model, StaticConfig(calib_method="auto", per_channel=True), data).calibrate(
        built=("bias_correction",), also=(peaks,))
    equalized = StaticPipeline(model, StaticConfig(calib_method="auto", per_channel=True, equalize=True), data
                               ).calibrate(built=("bias_correction",), reuse=first)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    found = {"peaks": peaks.reducer.result()}
    for name, pipeline in (("first", first), ("equalized", equalized)):
        for method in ("auto", "minmax", "percentile", "entropy", "mse"):
            found[f"{name} {method}"] = pipeline.stats_for(method).ranges
    return wall, cpu, found


def same(a: dict, b: dict) -> bool:
    def flat(found: dict) -> dict:
        return {(k, n): np.asarray(v) for k, group in found.items() for n, value in group.items()
                for v in (value if isinstance(value, tuple) else (value,))}

    fa, fb = flat(a), flat(b)
    return list(fa) == list(fb) and all(np.array_equal(fa[k], fb[k]) and fa[k].dtype == fb[k].dtype for k in fa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    original = load_model(args.model)
    inputs = model_inputs(original)
    model = prepare_model(original, copy=False)
    data = CalibrationData(args.calib, inputs)
    times: dict[str, list[tuple[float, float]]] = {"one thread": [], "spread": []}
    reference = None
    for round_ in range(args.rounds):
        for mode in times:
            one_thread(mode == "one thread")
            wall, cpu, found = calibrate(model, data)
            times[mode].append((wall, cpu))
            reference = reference or found
            print(f"round {round_ + 1} {mode:<10} wall {wall:6.2f} s  CPU {cpu:6.2f} s  "
                  f"identical to the first run: {same(reference, found)}", flush=True)
    for mode, runs in times.items():
        print(f"{mode:<10} median wall {statistics.median(w for w, _ in runs):.2f} s, "
              f"CPU {statistics.median(c for _, c in runs):.2f} s")


if __name__ == "__main__":
    main()
