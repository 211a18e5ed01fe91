"""lowbit's ONNX post-training quantization vs onnxruntime.quantization, side by side.

Same models, inputs, machine and run for every row (the tasks come from bench/ort_baseline.py):
  - all-MiniLM-L6-v2, 64 sentences x 128 tokens of real English text: mean/min cosine of the
    sentence embeddings vs fp32; static and dynamic int8, lowbit and ONNX Runtime;
  - ResNet-18-style CNN on 224x224 digits: top-1 agreement with fp32, accuracy, speedup;
  - MobileNetV2-style depthwise CNN on 32x32 digits: accuracy drop, per-channel and per-tensor
    (with cross-layer equalization / bias correction for lowbit), for two trainings of the same
    net: "mobilenetv2" (default recipe, well-conditioned) and "mobilenetv2-highlr" (5x the peak
    learning rate, nothing else changed: dead ReLU6 units make the folded depthwise ranges span
    100-100000x, and per-tensor int8 fails unless the weights are equalized; see
    lowbit/zoo/mobilenet.py).
Every quantizer runs in its own subprocess, which reports its build time, calibration time and
peak resident memory (VmHWM of that process: model, calibration and writing together; '+N' is
the part above the process's footprint after imports).
Latency: all variants of a model are timed in one `lowbit.onnx.timing.time_models` call
(bench/ort_baseline.measure: 2 intra-op threads, spin-waiting off, interleaved turns, median of
the repeats); speedup = fp32 median / variant median.
On a machine shared with other work the ratios are noisy; re-run on a quiet machine for
publishable numbers.

    python bench/ptq_onnx.py                       # all models
    python bench/ptq_onnx.py --models mobilenetv2,mobilenetv2-highlr
    python bench/ptq_onnx.py --models minilm --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_baseline as base  # noqa: E402  (the shared tasks, sessions and timing)

ARTIFACTS = Path(__file__).parent / "_artifacts"
THREADS = base.THREADS


# ----------------------------------------------------------------------------- workers (subprocesses)

def _worker(spec: dict) -> dict:
    """Build one quantized model in this process; report time and peak memory."""
    import onnxruntime  # noqa: F401  (imported before the baseline so it is not counted as the build's)

    started = time.perf_counter()
    info: dict = {"rss_before_mb": peak_rss_mb()}
    if spec["tool"] == "lowbit":
        from lowbit.onnx.quantize import quantize_onnx

        options = {k: v for k, v in spec["options"].items() if k != "with_calib"}
        from lowbit.onnx.config import config_for_mode

        config = config_for_mode(options.pop("mode"), **options)
        result = quantize_onnx(spec["source"], spec["target"], config, calib=spec.get("calib"), verify=False,
                               threads=THREADS)
        info["calib_s"] = result.calibration_seconds
        info["warnings"] = result.warnings
        if result.auto is not None:
            info["auto"] = {"winner": result.auto.winner, "seconds": result.auto.seconds}
    else:
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)

        options = spec["options"]
        if options["mode"] == "dynamic":
            quantize_dynamic(spec["source"], spec["target"], per_channel=options["per_channel"])
        else:
            arrays = dict(np.load(spec["calib"]))
            count = len(next(iter(arrays.values())))
            step = options.get("batch", 8)
            batches = [{k: v[i:i + step] for k, v in arrays.items()} for i in range(0, count, step)]
            quantize_static(spec["source"], spec["target"], base.Reader(batches), quant_format=QuantFormat.QDQ,
                            per_channel=options["per_channel"],
                            activation_type=getattr(QuantType, options.get("activation_type", "QInt8")),
                            calibrate_method=getattr(CalibrationMethod, options.get("method", "MinMax")))
            info["calib_s"] = time.perf_counter() - started  # ORT calibrates and writes in one call
    info["build_s"] = time.perf_counter() - started
    info["peak_rss_mb"] = peak_rss_mb()
    return info


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent across fork+exec, so a big parent would hide the build's own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(spec: dict, script: str = __file__, threads: int = THREADS) -> dict:
    """Run `script --worker SPEC` (this file's `_worker(spec)` by default) in a fresh Python so peak
    memory belongs to this build alone; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
        return {"error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- variants per model

def variants(name: str) -> list[tuple[str, str, dict]]:
    """(label, tool, options) for each quantized row of a model."""
    if name == "minilm":
        return [
            ("ORT static minmax per-channel", "ort", {"mode": "static", "per_channel": True}),
            # ORT's defaults are int8 activations; uint8 ones are its fast x86 path, so both are shown.
            ("ORT static minmax per-channel uint8-act", "ort",
             {"mode": "static", "per_channel": True, "activation_type": "QUInt8"}),
            ("ORT dynamic per-channel", "ort", {"mode": "dynamic", "per_channel": True}),
            ("lowbit static", "lowbit", {"mode": "static"}),
            ("lowbit dynamic (no data)", "lowbit", {"mode": "dynamic"}),
            # With calibration data, dynamic mode also splits the FFN outlier channels off.
            ("lowbit dynamic + calib", "lowbit", {"mode": "dynamic", "with_calib": True}),
            # --mode auto (the CLI default with --calib): the fastest candidate within the budget.
            ("lowbit auto", "lowbit", {"mode": "auto", "with_calib": True}),
        ]
    if name == "resnet18":
        return [
            ("ORT static minmax per-channel", "ort", {"mode": "static", "per_channel": True}),
            ("ORT static minmax per-channel uint8-act", "ort",
             {"mode": "static", "per_channel": True, "activation_type": "QUInt8"}),
            ("lowbit static", "lowbit", {"mode": "static"}),
            ("lowbit auto", "lowbit", {"mode": "auto", "with_calib": True}),
        ]
    return [
        ("ORT static minmax per-channel", "ort", {"mode": "static", "per_channel": True}),
        ("ORT static minmax per-tensor", "ort", {"mode": "static", "per_channel": False}),
        ("lowbit static per-channel", "lowbit", {"mode": "static"}),
        ("lowbit static per-tensor", "lowbit", {"mode": "static", "per_channel": False}),
        ("lowbit static per-tensor + equalize", "lowbit", {"mode": "static", "per_channel": False,
                                                           "equalize": True}),
        ("lowbit static per-tensor + equalize + bias-correction", "lowbit",
         {"mode": "static", "per_channel": False, "equalize": True, "bias_correction": True}),
        ("lowbit auto", "lowbit", {"mode": "auto", "with_calib": True}),
        ("lowbit auto per-tensor", "lowbit", {"mode": "auto", "per_channel": False, "with_calib": True}),
    ]


def task_for(name: str, args) -> base.Task:
    if name == "minilm":
        return base.minilm_task(args.artifacts, args.sentences, args.calibration_sentences)
    if name == "resnet18":
        from lowbit.zoo.resnet import resnet18_digits_onnx
        return base.digits_task("ResNet-18-style (digits 224x224)", resnet18_digits_onnx(args.artifacts)[0], 224, 8)
    if name == "mobilenetv2":
        from lowbit.zoo.mobilenet import mobilenet_digits_onnx
        return base.digits_task("MobileNetV2-style (digits 32x32)", mobilenet_digits_onnx(args.artifacts)[0], 32, 64)
    if name == "mobilenetv2-highlr":
        from lowbit.zoo.mobilenet import mobilenet_digits_onnx
        path, _ = mobilenet_digits_onnx(args.artifacts, recipe="high-lr")
        return base.digits_task("MobileNetV2-style, high-lr training (digits 32x32)", path, 32, 64)
    raise SystemExit(f"unknown model {name!r}; use minilm, resnet18, mobilenetv2 or mobilenetv2-highlr")


def run_model(name: str, args) -> tuple[base.Task, list[dict]]:
    task = task_for(name, args)
    workdir = args.artifacts / "ptq_onnx" / name
    workdir.mkdir(parents=True, exist_ok=True)
    calib = workdir / "calibration.npz"
    np.savez(calib, **{k: np.concatenate([b[k] for b in task.calibration]) for k in task.calibration[0]})
    # ORT's quantizers want its own pre-processing (as documented); lowbit pre-processes itself.
    pre = workdir / "fp32_ort_preprocessed.onnx"
    if not pre.exists():
        from onnxruntime.quantization.shape_inference import quant_pre_process
        source, target = str(Path(task.fp32).resolve()), str(pre.resolve())
        # On failure ORT dumps sym_shape_infer_temp.onnx (+ external data) into the cwd: keep it in workdir.
        with contextlib.chdir(workdir):
            try:
                quant_pre_process(source, target)
            except Exception as exc:  # ORT's symbolic shape inference gives up on the MiniLM export
                print(f"  ORT quant_pre_process failed ({str(exc)[:80]}); retrying with skip_symbolic_shape=True",
                      file=sys.stderr)
                quant_pre_process(source, target, skip_symbolic_shape=True)
    rows: list[dict] = [{"variant": "fp32", "path": task.fp32}]
    for label, tool, options in variants(name):
        if args.only and args.only not in label:
            continue
        target = workdir / (label.replace(" ", "_").replace("+", "").replace("__", "_") + ".onnx")
        source = task.fp32 if tool == "lowbit" else pre
        spec = {"tool": tool, "source": str(source), "target": str(target), "options": options,
                "calib": str(calib) if options.get("mode") == "static" or options.get("with_calib") else None}
        print(f"  building {label} ...", file=sys.stderr, flush=True)
        info = build(spec)
        row = {"variant": label, **info}
        if "error" not in info:
            row["path"] = target
        rows.append(row)
    base.measure(task, rows, args.repeats)
    return task, rows


def table(task: base.Task, rows: list[dict]) -> str:
    keys = [k for k in ("cosine_mean", "cosine_min", "top1_agreement", "accuracy") if any(k in r for r in rows)]
    header = ["variant", *keys, "speedup", "latency ms", "calib s", "build s", "peak RSS MB (+build)", "MB"]
    timing = ", ".join(f"{k}{list(v.shape)}" for k, v in task.timing.items())
    lines = [f"### {task.name} (timing batch {timing}; {THREADS} threads)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | FAILED: {row['error']} |" + " |" * (len(header) - 2))
            continue
        cells = [row["variant"], *(f"{row[k]:.4f}" if k in row else "" for k in keys),
                 f"{row.get('speedup', float('nan')):.2f}x", f"{row.get('latency_ms', float('nan')):.1f}",
                 _num(row.get("calib_s")), _num(row.get("build_s")), _rss(row),
                 f"{row.get('size_mb', 0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        if "auto" in row:
            lines.append(f"\n{row['variant']}: picked \"{row['auto']['winner']}\" (search {row['auto']['seconds']:.1f} s)")
    return "\n".join(lines)


def _rss(row: dict) -> str:
    if row.get("peak_rss_mb") is None:
        return ""
    return f"{row['peak_rss_mb']:.0f} (+{row['peak_rss_mb'] - row.get('rss_before_mb', 0):.0f})"


def _num(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="minilm,resnet18,mobilenetv2,mobilenetv2-highlr")
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sentences", type=int, default=64, help="MiniLM evaluation/timing batch (x128 tokens)")
    parser.add_argument("--calibration-sentences", type=int, default=64)
    parser.add_argument("--only", default="", help="build only variants whose label contains this text")
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    import onnxruntime as ort
    import torch
    torch.set_num_threads(THREADS)
    print(f"command: python bench/ptq_onnx.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"CPU: {base.cpu_model()} ({os.cpu_count()} cores visible); int8 flags: "
          + ", ".join(k for k, v in base.cpu_int8_flags().items() if v))
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}; load average at start "
          f"{os.getloadavg()[0]:.1f}\n")
    results = {}
    for name in args.models.split(","):
        task, rows = run_model(name, args)
        print(table(task, rows) + "\n", flush=True)
        results[task.name] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows]
    print(f"load average at end {os.getloadavg()[0]:.1f} (speed ratios are noisy when it exceeds "
          f"the {os.cpu_count()} cores)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
