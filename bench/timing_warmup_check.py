"""Does taking the verification's runs as the timing's warm-up move the quantize table's speedup?
In ONE process, rounds alternating: `compare_models` as the quantize table runs it (the
verification's runs of the timed shape are the warm-up, `time_models(warm_ms=)`) and
`time_models` with its own warm-up runs on fresh sessions, same float and written model, same
first calibration call, same options (1 intra-op thread, spin-waiting off, adaptive, up to 3 s per model).

    PYTHONPATH=. python bench/timing_warmup_check.py FLOAT.onnx WRITTEN.onnx CALIB_DIR --rounds 4
"""

from __future__ import annotations

import argparse
import os
import sys

import onnx


def main() -> int:
    from lowbit.onnx.calib_data import CalibrationData, model_inputs
    from lowbit.onnx.session import make_session
    from lowbit.onnx.timing import TABLE_MAX_SECONDS, TABLE_MIN_SECONDS, TABLE_PRECISION, time_models
    from lowbit.onnx.verify import compare_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("float_model")
    parser.add_argument("written_model")
    parser.add_argument("calib")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    data = CalibrationData(args.calib, model_inputs(onnx.load(args.float_model)))
    feed = next(data.batches(16))
    for round_ in range(args.rounds):
        report = compare_models(args.float_model, args.written_model, data, threads=1)
        sessions = [make_session(path, threads=1) for path in (args.float_model, args.written_model)]
        own = time_models(sessions, feed, warmup=2, repeats=10, min_seconds=TABLE_MIN_SECONDS,
                          precision=TABLE_PRECISION, max_seconds=TABLE_MAX_SECONDS)
        print(f"round {round_} (load {os.getloadavg()[0]:.1f}): verification-warmed {report.speedup:.3f}x "
              f"({report.latency_float_ms:.0f} / {report.latency_quant_ms:.0f} ms), own warm-up "
              f"{own.speedup:.3f}x ({own.medians_ms[0]:.0f} / {own.medians_ms[1]:.0f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
