"""The peer tool, measured: ONNX Runtime's own quantizer on lowbit's benchmark models.

Same models, inputs, machine and run for every row, so the numbers compare:
  - quant_pre_process, then quantize_static (QDQ, MinMax per-tensor / per-channel, Percentile,
    Entropy), quantize_static on the unprocessed model, and quantize_dynamic;
  - fidelity vs fp32: mean cosine of sentence embeddings (MiniLM), top-1 agreement and accuracy
    (CNNs on the digits test split);
  - speed: `lowbit.onnx.timing.time_models` over all variants in one call (the method of every
    lowbit speed figure: 2 intra-op threads, spin-waiting off, interleaved turns of 1 untimed + 3
    timed runs, order alternating, median), so load from other processes hits every row alike;
    reported as speedup vs fp32;
  - calibration time (the quantize_static call: calibration plus writing the model).
Crashes are caught and reported as results.

    python bench/ort_baseline.py                      # all three models
    python bench/ort_baseline.py --models mobilenetv2 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

THREADS = 2
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_int8_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {flag: flag in flags for flag in CPU_FLAGS}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def session(path: Path) -> ort.InferenceSession:
    """A session with lowbit's timing options (THREADS intra-op, 1 inter-op, spin-waiting off)."""
    from lowbit.onnx.session import make_session

    return make_session(path, threads=THREADS)


class Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = batches
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


@dataclass
class Task:
    """One benchmark model with its data and its fidelity measure."""

    name: str
    fp32: Path
    calibration: list[dict[str, np.ndarray]]          # batches fed to ORT's calibrator
    evaluation: list[dict[str, np.ndarray]]           # batches for fidelity
    timing: dict[str, np.ndarray]                     # one batch for latency
    fidelity: Callable[[list[np.ndarray], list[np.ndarray]], dict[str, float]]  # (fp32, quantized) outputs
    extra_fp32: dict[str, Path] = field(default_factory=dict)  # other float exports of the same net


def run_all(sess: ort.InferenceSession, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    return [sess.run(None, batch)[0] for batch in batches]


# ----------------------------------------------------------------------------- tasks

def minilm_task(artifacts: Path, count: int, calibration_count: int) -> Task:
    from lowbit.zoo import minilm

    tokenizer = minilm.load_tokenizer()
    evaluation = minilm.text_batch(count, tokenizer=tokenizer)
    # Calibration sentences are disjoint from the evaluation ones.
    calibration = minilm.text_batch(calibration_count, skip=count, tokenizer=tokenizer)
    calib_batches = [{k: v[i:i + 8] for k, v in calibration.items()} for i in range(0, calibration_count, 8)]
    masks = [evaluation["attention_mask"]]

    def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
        ref = minilm.sentence_embedding(reference[0], masks[0])
        out = minilm.sentence_embedding(candidate[0], masks[0])
        cos = np.sum(ref * out, axis=-1)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}

    return Task("MiniLM-L6-v2", minilm.minilm_onnx(artifacts), calib_batches, [evaluation], evaluation, fidelity)


def digits_task(name: str, fp32: Path, image_size: int, timing_batch: int,
                extra_fp32: dict[str, Path] | None = None) -> Task:
    from lowbit.zoo.digits import load_digits_split
    from lowbit.zoo.upscaled_digits import digits_as_rgb

    data = load_digits_split()
    generator = np.random.default_rng(0)
    calib_index = generator.choice(len(data.x_train), 128, replace=False)
    x_calib = digits_as_rgb(data.x_train[calib_index], image_size).numpy()
    x_test = digits_as_rgb(data.x_test, image_size).numpy()
    labels = data.y_test.numpy()
    step = 16 if image_size > 64 else 128
    calibration = [{"input": x_calib[i:i + step]} for i in range(0, len(x_calib), step)]
    evaluation = [{"input": x_test[i:i + step]} for i in range(0, len(x_test), step)]

    def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
        ref = np.concatenate(reference).argmax(-1)
        out = np.concatenate(candidate).argmax(-1)
        return {"top1_agreement": float((ref == out).mean()), "accuracy": float((out == labels).mean()),
                "fp32_accuracy": float((ref == labels).mean())}

    return Task(name, fp32, calibration, evaluation, {"input": x_test[:timing_batch]}, fidelity, extra_fp32 or {})


# ----------------------------------------------------------------------------- variants

def build_variants(task: Task, workdir: Path) -> list[dict]:
    """Create every quantized model; each row records its build time or the crash."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = [{"variant": "fp32", "path": task.fp32}]
    for label, path in task.extra_fp32.items():
        rows.append({"variant": f"fp32 ({label})", "path": path})

    pre = workdir / "fp32_preprocessed.onnx"
    # ORT's defaults first; if its symbolic shape inference gives up, record that and retry with
    # its documented remedies (auto_merge, then ONNX shape inference only).
    for label, options in (("", {}), (" (auto_merge)", {"auto_merge": True}),
                           (" (no symbolic shapes)", {"skip_symbolic_shape": True})):
        started = time.perf_counter()
        try:
            with contextlib.chdir(workdir):  # on failure it dumps sym_shape_infer_temp.onnx into the cwd
                quant_pre_process(str(Path(task.fp32).resolve()), str(pre.resolve()), **options)
            rows.append({"variant": "fp32 pre-processed" + label, "path": pre, "build_s": time.perf_counter() - started})
            break
        except Exception as exc:
            rows.append({"variant": "quant_pre_process" + label,
                         "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"})

    def static(label: str, source: Path, method: CalibrationMethod, per_channel: bool, **options) -> None:
        target = workdir / (label.replace(" ", "_").replace("/", "") + ".onnx")
        row = {"variant": label}
        started = time.perf_counter()
        try:
            quantize_static(str(source), str(target), Reader(task.calibration), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, calibrate_method=method, **options)
            row.update(path=target, build_s=time.perf_counter() - started)
        except Exception as exc:  # a crash is a result
            row.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}",
                       build_s=time.perf_counter() - started)
            traceback.print_exc(limit=3, file=sys.stderr)
        rows.append(row)

    def dynamic(label: str, per_channel: bool) -> None:
        target = workdir / (label.replace(" ", "_") + ".onnx")
        row = {"variant": label}
        started = time.perf_counter()
        try:
            quantize_dynamic(str(pre), str(target), per_channel=per_channel)
            row.update(path=target, build_s=time.perf_counter() - started)
        except Exception as exc:
            row.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}")
        rows.append(row)

    static("static minmax per-tensor, NOT pre-processed", task.fp32, CalibrationMethod.MinMax, False)
    for label, path in task.extra_fp32.items():
        static(f"static minmax per-tensor, {label}, NOT pre-processed", path, CalibrationMethod.MinMax, False)
    static("static minmax per-tensor", pre, CalibrationMethod.MinMax, False)
    static("static minmax per-channel", pre, CalibrationMethod.MinMax, True)
    # ORT's default is int8 activations (S8S8); x86 int8 kernels are built around uint8 activations.
    static("static minmax per-channel U8S8", pre, CalibrationMethod.MinMax, True, activation_type=QuantType.QUInt8)
    static("static percentile per-tensor", pre, CalibrationMethod.Percentile, False)
    static("static entropy per-tensor", pre, CalibrationMethod.Entropy, False)
    dynamic("dynamic per-tensor", False)
    dynamic("dynamic per-channel", True)
    return rows


def measure(task: Task, rows: list[dict], repeats: int, warmup: int = 2) -> None:
    """Fidelity for every working row, then latency round-robin over all of them."""
    reference = run_all(session(task.fp32), task.evaluation)
    sessions = {}
    for row in rows:
        if "path" not in row:
            continue
        try:
            sess = session(row["path"])
            row.update(task.fidelity(reference, run_all(sess, task.evaluation)))
            row["size_mb"] = row["path"].stat().st_size / 1e6
            sessions[row["variant"]] = sess
        except Exception as exc:
            row["error"] = f"{type(exc).__name__} at run time: {str(exc).strip().splitlines()[0][:160]}"
    from lowbit.onnx.timing import time_models

    timing = time_models(list(sessions.values()), task.timing, threads=THREADS, warmup=warmup, repeats=repeats)
    latency = dict(zip(sessions, timing.medians_ms))
    for row in rows:
        if row["variant"] in latency:
            row["latency_ms"] = latency[row["variant"]]
            row["speedup"] = latency["fp32"] / row["latency_ms"]


def table(task: Task, rows: list[dict]) -> str:
    metric_keys = [k for k in ("cosine_mean", "cosine_min", "top1_agreement", "accuracy") if any(k in r for r in rows)]
    header = ["variant", *metric_keys, "latency ms", "speedup", "calib/build s", "MB"]
    lines = [f"### {task.name} (timing batch: " + ", ".join(f"{k}{list(v.shape)}" for k, v in task.timing.items())
             + f"; {THREADS} threads)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | CRASH: {row['error']} |" + " |" * (len(header) - 2))
            continue
        cells = [row["variant"], *(f"{row[k]:.4f}" if k in row else "" for k in metric_keys),
                 f"{row.get('latency_ms', float('nan')):.1f}", f"{row.get('speedup', float('nan')):.2f}x",
                 f"{row['build_s']:.1f}" if "build_s" in row else "", f"{row.get('size_mb', 0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="minilm,resnet18,mobilenetv2")
    parser.add_argument("--artifacts", type=Path, default=Path(__file__).parent / "_artifacts")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sentences", type=int, default=64, help="MiniLM evaluation/timing batch (x128 tokens)")
    parser.add_argument("--calibration-sentences", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write all rows as JSON here")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(THREADS)

    print(f"CPU: {cpu_model()}")
    print("int8-relevant CPU flags: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu_int8_flags().items()))
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}\n")

    results = {}
    for name in args.models.split(","):
        if name == "minilm":
            task = minilm_task(args.artifacts, args.sentences, args.calibration_sentences)
        elif name == "resnet18":
            from lowbit.zoo.resnet import resnet18_digits_onnx
            folded, _ = resnet18_digits_onnx(args.artifacts)
            unfolded, _ = resnet18_digits_onnx(args.artifacts, fold_constants=False)
            task = digits_task("ResNet-18-style (digits 224x224)", folded, 224, 8, {"BN-unfolded export": unfolded})
        elif name == "mobilenetv2":
            from lowbit.zoo.mobilenet import mobilenet_digits_onnx
            task = digits_task("MobileNetV2-style (digits 32x32)", mobilenet_digits_onnx(args.artifacts)[0], 32, 64)
        else:
            parser.error(f"unknown model {name!r}")
        rows = build_variants(task, args.artifacts / "ort_baseline" / name)
        measure(task, rows, args.repeats)
        print(table(task, rows) + "\n", flush=True)
        results[task.name] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows]
    if args.json:
        args.json.write_text(json.dumps({"cpu_flags": cpu_int8_flags(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
