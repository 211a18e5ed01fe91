"""Sub-4-bit QAT on a residual depthwise CNN (16x16 digits): every layer low-bit vs prepare's default.

    python bench/qat_depthwise.py [--epochs 8] [--lr 5e-3] [--seed 0] [--json out.json]

The net is `lowbit.zoo.depthwise_digits` (stem 3x3 conv, four inverted-residual blocks with 3x3
depthwise convs, two of them residual, 1x1 conv, global pool, Linear). For each row: `prepare`,
`calibrate` (1024 images), `distill_finetune` from the fp32 model (`--epochs`, `--lr`), then
`export_onnx` with parity checked on the 450 test images, and accuracy measured on ONNX Runtime.
"all layers" is `keep_int8="none"` (every layer at the recipe's width, lowbit's behaviour before);
"default" is `prepare`'s default, which for weights under 4 bits keeps the first and last layers
and the depthwise convs at int8; "sensitivity" keeps the layers `lowbit.torch.sensitive_layers`
measures as costing more than 2 points of top-1 agreement alone (solo sweep, PTQ).
"packed KB" is the true packed size of all parameters (sub-byte weights packed, int8 layers at 8
bits, biases float32); "ORT time" is ONNX Runtime latency relative to fp32 (1 thread, test set
as one batch, median of interleaved rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qat_digits import ort_metrics  # noqa: E402  same folder

from lowbit.torch import calibrate, distill_finetune, export_onnx, prepare, sensitive_layers  # noqa: E402
from lowbit.torch.fold import fold_batchnorm  # noqa: E402
from lowbit.zoo.onnx_export import export_to_onnx  # noqa: E402
from lowbit.zoo.depthwise_digits import digits_16, train_depthwise_digits  # noqa: E402
from lowbit.zoo.digits import evaluate, load_digits_split, torch_threads  # noqa: E402

ROWS = [("w4a8", "default"), ("w2a8", "all layers"), ("w2a8", "default"), ("w1a8", "all layers"),
        ("w1a8", "default"), ("w1a8", "sensitivity"), ("ternary", "all layers"), ("ternary", "default")]
KEEP = {"all layers": "none", "default": "auto"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="QAT fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=5e-3, help="QAT peak learning rate (AdamW, cosine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=50, help="timed ONNX Runtime runs per model")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    raw = load_digits_split()
    data = raw._replace(x_train=digits_16(raw.x_train), x_test=digits_16(raw.x_test))
    calibration = [data.x_train[i:i + 256] for i in range(0, 1024, 256)]
    rows, paths = [], {}
    with torch_threads(1), tempfile.TemporaryDirectory() as tmp:
        teacher, metrics = train_depthwise_digits(seed=args.seed)
        folded = fold_batchnorm(teacher)
        paths["fp32"] = export_to_onnx(folded, (data.x_train[:2],), Path(tmp) / "fp32.onnx",
                                       input_names=["input"], output_names=["output"],
                                       dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        fp32_accuracy, _ = ort_metrics(paths["fp32"], data, 1)
        fp32_bytes = sum(p.numel() * 4 for p in folded.parameters())
        rows.append({"name": "fp32", "recipe": "fp32", "layers": "-", "torch_accuracy": metrics["test_accuracy"],
                     "ort_accuracy": fp32_accuracy, "packed_bytes": fp32_bytes, "int8_layers": [],
                     "parity": "-", "seconds": 0.0})
        for recipe, layers in ROWS:
            started = time.perf_counter()
            if layers == "sensitivity":
                keep = list(sensitive_layers(teacher, recipe, calibration))
            else:
                keep = KEEP[layers]
            torch.manual_seed(args.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the Int8LayersWarning: the row lists the layers
                prepared = prepare(teacher, recipe, data.x_train[:2], keep_int8=keep)
            calibrate(prepared, calibration)
            distill_finetune(prepared, teacher, data.x_train, data.y_train, epochs=args.epochs, seed=args.seed,
                             lr=args.lr, desc=f"QAT {recipe} {layers}")
            seconds = time.perf_counter() - started
            name = f"{recipe.upper()} {layers}"
            result = export_onnx(prepared, data.x_train[:2], Path(tmp) / f"{recipe}_{layers[:3]}.onnx",
                                 check_data=data.x_test)
            paths[name] = result.path
            accuracy, _ = ort_metrics(result.path, data, 1)
            rows.append({"name": name, "recipe": recipe, "layers": layers,
                         "torch_accuracy": evaluate(prepared, data.x_test, data.y_test),
                         "ort_accuracy": accuracy, "packed_bytes": result.packed_weight_bytes,
                         "int8_layers": list(result.int8_layers), "parity_passed": result.parity.passed,
                         "parity": f"{100 * result.parity.top1_agreement:.1f}% / {result.parity.max_diff_steps:.2f} steps",
                         "seconds": seconds})
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(5):  # interleaved rounds: load from other processes hits every model alike
            for name, path in paths.items():
                times[name].append(ort_metrics(path, data, max(args.repeats // 5, 3))[1])
        fp32_seconds = statistics.median(times["fp32"])
        for row in rows:
            row["latency_ratio"] = statistics.median(times[row["name"]]) / fp32_seconds

    print(f"\nresidual depthwise CNN, 16x16 digits, {len(data.x_test)} test images, {metrics['parameters']} "
          f"parameters; QAT {args.epochs} epochs, lr {args.lr}, distillation, seed {args.seed}")
    print(f"fp32 ONNX Runtime time for the test batch: {1000 * fp32_seconds:.2f} ms (1 thread)\n")
    header = (f"{'model':<22}{'acc torch':>10}{'acc ORT':>9}{'drop':>7}{'packed KB':>11}{'int8 layers':>12}"
              f"{'ORT time':>10}  {'parity (top-1 / max diff)':<28}{'prep s':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        drop = 100 * (fp32_accuracy - row["ort_accuracy"])
        print(f"{row['name']:<22}{100 * row['torch_accuracy']:>9.2f}%{100 * row['ort_accuracy']:>8.2f}%"
              f"{drop:>7.2f}{row['packed_bytes'] / 1024:>11.1f}{len(row['int8_layers']):>12}"
              f"{row['latency_ratio']:>9.2f}x  {row['parity']:<28}{row['seconds']:>7.1f}")
    for row in rows:
        if row["int8_layers"]:
            print(f"  {row['name']}: int8 weights in {', '.join(row['int8_layers'])}")
    by_name = {row["name"]: row["ort_accuracy"] for row in rows}
    checks = [("QAT W1A8 (default) within 5 points of fp32", by_name["W1A8 default"] >= fp32_accuracy - 0.05),
              ("QAT W2A8 (default) within 2 points of fp32", by_name["W2A8 default"] >= fp32_accuracy - 0.02),
              ("every export passes parity", all(r.get("parity_passed", True) for r in rows))]
    print("\ntargets:")
    for text, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    if args.json:
        args.json.write_text(json.dumps({"fp32_ort_seconds": fp32_seconds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
