"""QAT vs PTQ on the digits CNN: accuracy, packed size and ONNX Runtime latency vs fp32.

    python bench/qat_digits.py [--epochs 12] [--seed 0] [--mobilenet-epochs 2] [--json out.json]

Rows: fp32; PTQ (calibrate only) and QAT (calibrate, then fine-tune with distillation from the
fp32 teacher) at W8A8, W4A8, W2A8 and binary weights with int8 activations (W1A8). Every
quantized row is exported to QDQ ONNX, its parity with the PyTorch model is checked on the test
set, and its accuracy and latency are measured on ONNX Runtime (CPU, one thread, the 450 test
images as one batch; median of interleaved repeated runs, as a ratio to the fp32 model timed in
the same run).
"float ops" counts the Conv/Gemm nodes ONNX Runtime's optimizer left in float (0: all int8 kernels).
Sub-8-bit weights are exported in int8 containers (the fast form); "packed KB" is their true
packed size. A second table does the same for W8A8 QAT on the MobileNetV2-style net (32x32
digits, fine-tuned `--mobilenet-epochs` epochs), where int8 kernels have more work to win on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.onnx.session import make_session  # noqa: E402
from lowbit.torch import calibrate, distill_finetune, export_onnx, prepare  # noqa: E402
from lowbit.torch.fold import fold_batchnorm  # noqa: E402
from lowbit.zoo.onnx_export import export_to_onnx  # noqa: E402
from lowbit.zoo.digits import evaluate, load_digits_split, torch_threads, train_digits_cnn  # noqa: E402

ROWS = [("PTQ", "w8a8"), ("PTQ", "w4a8"), ("PTQ", "w2a8"), ("PTQ", "w1a8"),
        ("QAT", "w8a8"), ("QAT", "w4a8"), ("QAT", "w2a8"), ("QAT", "w1a8")]


def qat_finetune(student: torch.nn.Module, teacher: torch.nn.Module, data, epochs: int, seed: int) -> None:
    """A plain user loop: AdamW, cosine schedule, distillation from the fp32 teacher plus labels."""
    distill_finetune(student, teacher, data.x_train, data.y_train, epochs=epochs, seed=seed, lr=2e-3, batch_size=64)


def ort_metrics(path: Path, data, repeats: int) -> tuple[float, float]:
    """(accuracy, median seconds per run of the whole test set) on ONNX Runtime, one thread."""
    session = make_session(onnx.load(path), threads=1)
    feed = {session.get_inputs()[0].name: data.x_test.numpy()}
    logits = session.run(None, feed)[0]
    accuracy = float((logits.argmax(1) == data.y_test.numpy()).mean())
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return accuracy, statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="QAT fine-tuning epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=50, help="timed ONNX Runtime runs per model")
    parser.add_argument("--mobilenet-epochs", type=int, default=2,
                        help="W8A8 QAT epochs for the MobileNetV2-style table (0: skip it)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    data = load_digits_split()
    rows = []
    with torch_threads(1), tempfile.TemporaryDirectory() as tmp:
        teacher, metrics = train_digits_cnn(epochs=15, seed=args.seed)
        fp32_path = export_to_onnx(fold_batchnorm(teacher), (data.x_train[:2],), Path(tmp) / "fp32.onnx",
                                   input_names=["input"], output_names=["output"],
                                   dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        fp32_accuracy, _ = ort_metrics(fp32_path, data, 1)
        paths = {"fp32": fp32_path}
        fp32_bytes = sum(p.numel() * 4 for p in fold_batchnorm(teacher).parameters())
        rows.append({"method": "fp32", "recipe": "fp32", "torch_accuracy": metrics["test_accuracy"],
                     "ort_accuracy": fp32_accuracy, "packed_bytes": fp32_bytes, "latency_ratio": 1.0,
                     "parity": "-", "seconds": 0.0, "float_ops": "-"})
        for method, recipe in ROWS:
            started = time.perf_counter()
            torch.manual_seed(args.seed)
            prepared = prepare(teacher, recipe, data.x_train[:2])
            calibrate(prepared, [data.x_train[i:i + 256] for i in range(0, 1024, 256)])
            if method == "QAT":
                qat_finetune(prepared, teacher, data, args.epochs, args.seed)
            seconds = time.perf_counter() - started
            result = export_onnx(prepared, data.x_train[:2], Path(tmp) / f"{method}_{recipe}.onnx",
                                 check_data=data.x_test)
            accuracy, _ = ort_metrics(result.path, data, 1)
            paths[f"{method} {recipe}"] = result.path
            rows.append({"method": method, "recipe": recipe,
                         "torch_accuracy": evaluate(prepared, data.x_test, data.y_test),
                         "ort_accuracy": accuracy, "packed_bytes": result.packed_weight_bytes,
                         "float_ops": len(result.float_ops),
                         "parity": f"{100 * result.parity.top1_agreement:.1f}% / {result.parity.max_diff_steps:.2f} steps",
                         "seconds": seconds})
        # Interleaved timing rounds, so load from other processes hits every model alike.
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(5):
            for name, path in paths.items():
                times[name].append(ort_metrics(path, data, max(args.repeats // 5, 3))[1])
        fp32_seconds = statistics.median(times["fp32"])
        for row in rows:
            key = "fp32" if row["method"] == "fp32" else f"{row['method']} {row['recipe']}"
            row["latency_ratio"] = statistics.median(times[key]) / fp32_seconds

    print(f"\ndigits CNN, {len(data.x_test)} test images, QAT {args.epochs} epochs with distillation, seed {args.seed}")
    print(f"fp32 ONNX Runtime time for the test batch: {1000 * fp32_seconds:.2f} ms (1 thread)\n")
    header = (f"{'model':<12}{'acc torch':>10}{'acc ORT':>9}{'packed KB':>11}{'size':>7}{'ORT time':>10}"
              f"{'float ops':>10}  {'parity (top-1 / max diff)':<28}{'prep s':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        name = "fp32" if row["method"] == "fp32" else f"{row['method']} {row['recipe'].upper()}"
        print(f"{name:<12}{100 * row['torch_accuracy']:>9.2f}%{100 * row['ort_accuracy']:>8.2f}%"
              f"{row['packed_bytes'] / 1024:>11.1f}{row['packed_bytes'] / fp32_bytes:>7.3f}"
              f"{row['latency_ratio']:>9.2f}x{row['float_ops']:>10}  {row['parity']:<28}{row['seconds']:>7.1f}")
    by_key = {(r["method"], r["recipe"]): r["ort_accuracy"] for r in rows}
    print("\ntargets:")
    checks = [("QAT W4A8 within 1 point of fp32", by_key[("QAT", "w4a8")] >= fp32_accuracy - 0.01),
              ("QAT binary (W1A8) within 5 points of fp32", by_key[("QAT", "w1a8")] >= fp32_accuracy - 0.05)]
    checks += [(f"QAT beats PTQ at {r.upper()}", by_key[("QAT", r)] > by_key[("PTQ", r)]) for r in ("w4a8", "w2a8", "w1a8")]
    for text, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    mobilenet = mobilenet_rows(args) if args.mobilenet_epochs > 0 else []
    if args.json:
        args.json.write_text(json.dumps({"fp32_ort_seconds": fp32_seconds, "rows": rows,
                                         "mobilenet_rows": mobilenet}, indent=2))
    return 0


def mobilenet_rows(args) -> list[dict]:
    """fp32 vs W8A8 QAT (calibrate, fine-tune, export) on the MobileNetV2-style net, 32x32 digits:
    ONNX Runtime accuracy and latency (1 thread, batch 64), and how many layers stayed float."""
    from lowbit.zoo.mobilenet import IMAGE_SIZE, train_mobilenet_digits
    from lowbit.zoo.upscaled_digits import digits_as_rgb

    raw = load_digits_split()
    data = raw._replace(x_train=digits_as_rgb(raw.x_train, IMAGE_SIZE), x_test=digits_as_rgb(raw.x_test, IMAGE_SIZE))
    timing = data._replace(x_test=data.x_test[:64], y_test=data.y_test[:64])
    rows = []
    with torch_threads(1), tempfile.TemporaryDirectory() as tmp:
        teacher, _ = train_mobilenet_digits(seed=args.seed)
        fp32_path = export_to_onnx(fold_batchnorm(teacher), (data.x_train[:2],), Path(tmp) / "fp32.onnx",
                                   input_names=["input"], output_names=["output"],
                                   dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        fp32_accuracy, _ = ort_metrics(fp32_path, data, 1)
        variants = [("fp32", fp32_path, fp32_accuracy, "-", "-")]
        for label, outputs in (("QAT W8A8", True), ("QAT W8A8, inputs only", False)):
            torch.manual_seed(args.seed)
            prepared = prepare(teacher, "w8a8", data.x_train[:2], quantize_outputs=outputs)
            calibrate(prepared, [data.x_train[i:i + 128] for i in range(0, 512, 128)])
            qat_finetune(prepared, teacher, data, args.mobilenet_epochs, args.seed)
            result = export_onnx(prepared, data.x_train[:2], Path(tmp) / f"{outputs}.onnx", check_data=data.x_test)
            accuracy, _ = ort_metrics(result.path, data, 1)
            parity = f"{100 * result.parity.top1_agreement:.1f}% / {result.parity.max_diff_steps:.2f} steps"
            variants.append((label, result.path, accuracy, len(result.float_ops), parity))
        # Interleaved timing rounds, so load from other processes hits every variant alike.
        times: dict[str, list[float]] = {v[0]: [] for v in variants}
        for _ in range(5):
            for label, path, *_ in variants:
                times[label].append(ort_metrics(path, timing, max(args.repeats // 5, 3))[1])
        fp32_seconds = statistics.median(times["fp32"])
        for label, _, accuracy, float_ops, parity in variants:
            rows.append({"model": label, "ort_accuracy": accuracy, "float_ops": float_ops, "parity": parity,
                         "latency_ratio": statistics.median(times[label]) / fp32_seconds})
    print(f"\nMobileNetV2-style, 32x32 digits, QAT W8A8 {args.mobilenet_epochs} epochs; ONNX Runtime, 1 thread, "
          f"batch 64: fp32 {1000 * fp32_seconds:.2f} ms\n")
    header = f"{'model':<24}{'acc ORT':>9}{'ORT time':>10}{'float ops':>10}  {'parity (top-1 / max diff)':<28}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<24}{100 * row['ort_accuracy']:>8.2f}%{row['latency_ratio']:>9.2f}x"
              f"{row['float_ops']:>10}  {row['parity']:<28}")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
