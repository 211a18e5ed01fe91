"""`lowbit demo`: train a small digits CNN, quantize it many ways, show the trade-offs.

Three sections, run offline in well under a minute on two CPU cores:
1. weight-only quantization in PyTorch, fp16 down to binary (this module);
2. static int8 on ONNX Runtime: fidelity, file size and measured latency vs fp32 (`_demo_runtime`),
   then that model exported to ORT Mobile, ExecuTorch and LiteRT, one row each (`_demo_mobile`);
3. PTQ vs quantization-aware training at 2 and 1 bits, measured on ONNX Runtime (`_demo_qat`).
Every size is measured on really packed weights (plus scales, zero points and float32 biases),
every accuracy on the 450 held-out test images, so the report is a small, honest picture of what
each scheme costs and buys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec, per_channel, per_group

DEFAULT_EPOCHS = 15
FAST_EPOCHS = 6
DEFAULT_QAT_EPOCHS = 10
FAST_QAT_EPOCHS = 4
WEIGHTS_HEADING = "Weight-only quantization in PyTorch"

# (id, weight spec); None is the float32 baseline. Groups of 16 run along input features.
SCHEMES: list[tuple[str, QuantSpec | None]] = [
    ("fp32", None),
    ("fp16", QuantSpec("fp16")),
    ("int8-tensor", QuantSpec("int8")),
    ("int8-channel", QuantSpec("int8", granularity=per_channel())),
    ("int4-tensor", QuantSpec("int4")),
    ("int4-channel", QuantSpec("int4", granularity=per_channel())),
    ("int4-g16", QuantSpec("int4", granularity=per_group(16))),
    ("int2-channel-asym", QuantSpec("int2", symmetric=False, granularity=per_channel())),
    ("ternary-channel", QuantSpec("ternary", granularity=per_channel())),
    ("binary-channel", QuantSpec("binary", granularity=per_channel())),
]


@dataclass
class SchemeResult:
    scheme: str
    spec: str  # QuantSpec.describe(), or "float32"
    weight_bits: int
    granularity: str
    size_bytes: int
    compression: float  # fp32 size / this size
    accuracy: float
    drop_points: float  # fp32 accuracy minus this accuracy, in percentage points
    weight_sqnr_db: float | None  # None for fp32 (no error)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="train a small digits CNN; compare weight schemes, int8 on ONNX Runtime and QAT",
        description="Train a small CNN on scikit-learn's digits (offline); quantize its Conv and "
                    "Linear weights with ten schemes from fp16 to binary; quantize it static int8 on "
                    "ONNX Runtime and time it against fp32; compare post-training quantization with "
                    "quantization-aware training at 2 and 1 bits. Prints size and accuracy for each.")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {DEFAULT_EPOCHS}, or {FAST_EPOCHS} with --fast)")
    parser.add_argument("--qat-epochs", type=int, default=None,
                        help=f"quantization-aware training epochs (default {DEFAULT_QAT_EPOCHS}, "
                             f"or {FAST_QAT_EPOCHS} with --fast)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for training (default 0)")
    parser.add_argument("--fast", action="store_true", help="train fewer epochs (for tests and quick looks)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all results as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    epochs = args.epochs if args.epochs is not None else (FAST_EPOCHS if args.fast else DEFAULT_EPOCHS)
    qat_epochs = args.qat_epochs if args.qat_epochs is not None else (
        FAST_QAT_EPOCHS if args.fast else DEFAULT_QAT_EPOCHS)
    for flag, value in (("--epochs", epochs), ("--qat-epochs", qat_epochs)):
        if value < 1:
            raise LowbitError(f"{flag} must be at least 1, got {value}; pass a positive number")
    if args.json is not None:
        _check_writable(args.json)
    started = time.perf_counter()
    result = run_demo(epochs=epochs, qat_epochs=qat_epochs, seed=args.seed)
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    print(format_report(result))
    if args.json is not None:
        _write_json_atomic(args.json, result)
        print(f"\nWrote {args.json}")
    return 0


def run_demo(epochs: int = DEFAULT_EPOCHS, qat_epochs: int = DEFAULT_QAT_EPOCHS, seed: int = 0) -> dict[str, Any]:
    """Train, fold BatchNorm, run the three sections; returns plain data (JSON-ready)."""
    # Imported here so that `lowbit --help` does not pay for loading torch.
    from lowbit.commands._demo_mobile import run_mobile_section
    from lowbit.commands._demo_qat import run_qat_section
    from lowbit.commands._demo_runtime import run_onnx_section
    from lowbit.progress import progress
    from lowbit.torch.fold import fold_batchnorm
    from lowbit.torch.weights import float_nbytes, quantize_module_weights
    from lowbit.zoo.digits import evaluate, load_digits_split, torch_threads, train_digits_cnn

    data = load_digits_split()
    trained, train_metrics = train_digits_cnn(epochs=epochs, seed=seed)
    # Deployment runtimes fold BatchNorm into the convolutions; quantize what would ship.
    model = fold_batchnorm(trained)
    fp32_bytes = float_nbytes(model)
    rows: list[SchemeResult] = []
    with torch_threads(1):
        fp32_accuracy = evaluate(model, data.x_test, data.y_test)
        for scheme, spec in progress(SCHEMES, desc="quantizing", unit="scheme"):
            if spec is None:
                quantized, size = model, fp32_bytes
            else:
                quantized, size = quantize_module_weights(model, spec)
            accuracy = evaluate(quantized, data.x_test, data.y_test)
            rows.append(SchemeResult(
                scheme=scheme,
                spec="float32" if spec is None else spec.describe(),
                weight_bits=32 if spec is None else spec.bits,
                granularity="-" if spec is None or spec.dtype_info.is_float else spec.granularity.describe(),
                size_bytes=size,
                compression=round(fp32_bytes / size, 3),
                accuracy=accuracy,
                drop_points=round(100 * (fp32_accuracy - accuracy), 2),
                weight_sqnr_db=None if spec is None else round(_weight_sqnr_db(model, quantized), 2),
            ))
        # Everything the runtime sections write (ONNX files, calibration .npz) lives and dies here.
        with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
            onnx_runtime = run_onnx_section(model, data, Path(tmp))
            # The files the ONNX Runtime section wrote: its int8 QDQ model and the test images.
            mobile = run_mobile_section(Path(tmp) / "digits_int8.onnx", Path(tmp) / "test.npz",
                                        onnx_runtime["batch"], Path(tmp))
            qat = run_qat_section(trained, data, Path(tmp), epochs=qat_epochs, seed=seed)
    return {
        "data": {"name": "sklearn digits 8x8", "train": len(data.x_train), "test": len(data.x_test)},
        "model": {"name": "DigitsCNN", "parameters": train_metrics["parameters"],
                  "parameters_after_bn_fold": sum(p.numel() for p in model.parameters())},
        "training": train_metrics,
        "rows": [asdict(row) for row in rows],
        "onnx_runtime": onnx_runtime,
        "mobile": mobile,
        "qat": qat,
    }


def _weight_sqnr_db(original: Any, quantized: Any) -> float:
    """Signal-to-quantization-noise ratio over all Conv/Linear weights together, in dB."""
    from lowbit.torch.weights import QUANTIZABLE_LAYERS

    signal = noise = 0.0
    for before, after in zip(original.modules(), quantized.modules()):
        if isinstance(before, QUANTIZABLE_LAYERS):
            w = before.weight.detach().double()
            signal += float(w.pow(2).sum())
            noise += float((w - after.weight.detach().double()).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def format_report(result: dict[str, Any]) -> str:
    """The three sections and a short interpretation, as printed by `lowbit demo`."""
    from lowbit.commands._demo_mobile import format_mobile_section, interpret_mobile
    from lowbit.commands._demo_qat import format_qat_section, interpret_qat
    from lowbit.commands._demo_runtime import format_onnx_section, interpret_onnx

    training, model = result["training"], result["model"]
    fp32_accuracy = result["rows"][0]["accuracy"]
    lines = [
        f"Trained DigitsCNN ({model['parameters']:,} parameters; {model['parameters_after_bn_fold']:,} "
        f"after folding BatchNorm) for {training['epochs']} epochs in {training['train_seconds']:.1f} s "
        f"on {result['data']['train']} images; tested on {result['data']['test']}.",
        "",
        WEIGHTS_HEADING,
        "-" * len(WEIGHTS_HEADING),
        "Conv and Linear weights are quantized; biases stay float32. Sizes count packed weights, "
        "float32 scales, zero points and biases.",
        "",
        format_table(result["rows"]),
        "",
        format_onnx_section(result["onnx_runtime"]),
        "",
        format_mobile_section(result["mobile"]),
        "",
        format_qat_section(result["qat"], fp32_accuracy),
        "",
        "What the numbers say",
        "--------------------",
        # One paragraph per section, each generated from that section's numbers.
        interpret(result["rows"], result["data"]["test"]),
        interpret_onnx(result["onnx_runtime"]),
        interpret_mobile(result["mobile"]),
        interpret_qat(result["qat"], fp32_accuracy),
    ]
    if "wall_seconds" in result:
        lines.append(f"\nDemo finished in {result['wall_seconds']:.1f} s.")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["scheme", "bits", "granularity", "size (B)", "smaller", "accuracy", "drop (pt)", "SQNR (dB)"]
    body = [[
        row["scheme"], str(row["weight_bits"]), row["granularity"], f"{row['size_bytes']:,}",
        f"{row['compression']:.2f}x", f"{100 * row['accuracy']:.2f}%", f"{row['drop_points']:+.2f}",
        "-" if row["weight_sqnr_db"] is None else f"{row['weight_sqnr_db']:.1f}",
    ] for row in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    left = {0, 2}  # text columns; numbers are right-aligned

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def interpret(rows: list[dict[str, Any]], n_test: int) -> str:
    """Two or three sentences read off the numbers (never written in advance)."""
    by = {row["scheme"]: row for row in rows}
    int8, tensor4, channel4, binary = by["int8-channel"], by["int4-tensor"], by["int4-channel"], by["binary-channel"]
    sentences = [
        f"int8 per-channel weights are {int8['compression']:.1f}x smaller than fp32 and "
        f"{_change(int8['drop_points'])}.",
        f"At 4 bits, per-channel scales raise weight SQNR from {tensor4['weight_sqnr_db']:.1f} to "
        f"{channel4['weight_sqnr_db']:.1f} dB for {channel4['size_bytes'] - tensor4['size_bytes']:,} extra "
        f"bytes of scales (accuracy {100 * tensor4['accuracy']:.1f}% -> {100 * channel4['accuracy']:.1f}%; "
        f"on {n_test} test images one image is {100 / n_test:.2f} points).",
    ]
    if binary["drop_points"] > 5:
        sentences.append(
            f"Binary weights are {binary['compression']:.1f}x smaller but cost {binary['drop_points']:.1f} "
            f"points (accuracy {100 * binary['accuracy']:.1f}%): at one bit, rounding after the fact is "
            "not enough.")
    else:
        sentences.append(f"Binary weights are {binary['compression']:.1f}x smaller and "
                         f"{_change(binary['drop_points'])}.")
    return " ".join(sentences)


def _change(drop_points: float) -> str:
    if drop_points > 0:
        return f"lose {drop_points:.2f} accuracy points"
    if drop_points < 0:
        return f"gain {-drop_points:.2f} accuracy points (noise)"
    return "lose no accuracy"


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise LowbitError(f"--json {path} is a directory; give a file path such as {path / 'demo.json'}")
    if not path.parent.is_dir():
        raise LowbitError(f"the folder for --json {path} does not exist; create {path.parent} first or pick another path")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file next to `path`, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
