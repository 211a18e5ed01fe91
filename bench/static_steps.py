"""Seconds of each step of `quantize_onnx` in static mode (no verification): load, prepare,
calibrate (passes' statistics + calibration, = `calibration_seconds`), build, load check, save.
Medians of N runs after one warm-up run, in this process (imports are not counted).

    python bench/static_steps.py MODEL.onnx CALIB.npz --runs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import lowbit.onnx.pipeline as pipeline
    import lowbit.onnx.quantize as quantize
    from lowbit.onnx.config import StaticConfig

    seconds: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        function = getattr(owner, name)

        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - started
        setattr(owner, name, wrapper)

    for owner, name, label in ((quantize, "load_model", "load"), (quantize, "prepare_model", "prepare"),
                               (pipeline.StaticPipeline, "calibrate", "calibrate"),
                               (pipeline.StaticPipeline, "build", "build"), (quantize, "_check_runs", "load check"),
                               (quantize, "save_model", "save")):
        timed(owner, name, label)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs + 1):
            seconds.clear()
            started = time.perf_counter()
            quantize.quantize_onnx(args.model, Path(tmp) / "out.onnx", StaticConfig(), calib=args.calib,
                                   verify=False, threads=args.threads)
            row = {"total": time.perf_counter() - started, **seconds}
            if run:  # the first run is a warm-up
                rows.append(row)
    print(json.dumps({k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
