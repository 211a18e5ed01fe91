"""The demo's QAT section: post-training rounding vs quantization-aware training at 2 and 1 bits.

For each recipe, `lowbit.torch.prepare` + `calibrate` give the post-training (PTQ) model; the same
model is then fine-tuned with fake quantization in the loop and distillation from the fp32 model
(QAT). Both are exported to QDQ ONNX (parity with PyTorch checked on the test set) and their
accuracy is measured by running the exported files on ONNX Runtime, so the numbers are those of
models a user could ship.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

HEADING = "Quantization-aware training recovers what rounding loses"
# (recipe, label, the weight-table row with the same weight format: their packed sizes must agree)
RECIPES = [("w2a8", "W2A8: int2 asym per-channel weights, int8 activations", "int2-channel-asym"),
           ("w1a8", "W1A8: binary per-channel weights, int8 activations", "binary-channel")]
CALIBRATION_IMAGES = 1024
LEARNING_RATE = 5e-3  # fixed scales; learned (LSQ) scales were unstable at this rate on digits
TEMPERATURE, ALPHA = 4.0, 0.5  # distillation: soft teacher targets and labels weighted equally
BATCH_SIZE = 64


def run_qat_section(teacher: torch.nn.Module, data: Any, workdir: Path, *, epochs: int,
                    seed: int) -> dict[str, Any]:
    """PTQ and QAT rows for each recipe, every accuracy measured on ONNX Runtime."""
    import onnx

    from lowbit.commands._demo_runtime import ort_accuracy
    from lowbit.onnx.session import make_session
    from lowbit.torch import calibrate, export_onnx, prepare
    from lowbit.zoo.digits import evaluate

    def shipped(model: torch.nn.Module, name: str) -> tuple[float, Any]:
        result = export_onnx(model, data.x_train[:2], workdir / f"{name}.onnx", check_data=data.x_test)
        session = make_session(onnx.load(result.path), threads=1)
        return ort_accuracy(session, data.x_test, data.y_test), result

    rows = []
    for recipe, label, weight_row in RECIPES:
        torch.manual_seed(seed)
        # Every layer at the recipe's width, so sizes match the weight table's rows of that format.
        model = prepare(teacher, recipe, data.x_train[:2], keep_int8="none")
        calibrate(model, [data.x_train[i:i + 256] for i in range(0, CALIBRATION_IMAGES, 256)])
        ptq_accuracy, ptq = shipped(model, f"{recipe}_ptq")
        seconds = finetune(model, teacher, data, epochs=epochs, seed=seed, desc=f"QAT {recipe}")
        qat_accuracy, qat = shipped(model, f"{recipe}_qat")
        rows.append({
            "recipe": recipe, "label": label, "weight_row": weight_row,
            "ptq_accuracy": ptq_accuracy, "qat_accuracy": qat_accuracy,
            "qat_torch_accuracy": evaluate(model, data.x_test, data.y_test),
            "ptq_parity_top1": ptq.parity.top1_agreement, "qat_parity_top1": qat.parity.top1_agreement,
            "parity_passed": ptq.parity.passed and qat.parity.passed,
            "packed_bytes": qat.packed_weight_bytes, "float_bytes": qat.float_weight_bytes,
            "compression": round(qat.float_weight_bytes / qat.packed_weight_bytes, 3),
            "train_seconds": round(seconds, 2),
        })
    return {"epochs": epochs, "learning_rate": LEARNING_RATE, "temperature": TEMPERATURE, "alpha": ALPHA,
            "measured_on": "exported QDQ ONNX models run on ONNX Runtime", "rows": rows}


def finetune(student: torch.nn.Module, teacher: torch.nn.Module, data: Any, *, epochs: int, seed: int,
             desc: str) -> float:
    """AdamW with a cosine schedule on distillation + label loss; returns the seconds it took."""
    import time

    from lowbit.torch import distill_finetune

    started = time.perf_counter()
    distill_finetune(student, teacher, data.x_train, data.y_train, epochs=epochs, seed=seed, lr=LEARNING_RATE,
                     batch_size=BATCH_SIZE, temperature=TEMPERATURE, alpha=ALPHA, desc=desc)
    return time.perf_counter() - started


def format_qat_section(section: dict[str, Any], fp32_accuracy: float) -> str:
    header = ["recipe", "packed (B)", "smaller", "PTQ accuracy", "QAT accuracy", "recovered"]
    body = []
    for row in section["rows"]:
        body.append([row["label"], f"{row['packed_bytes']:,}", f"{row['compression']:.2f}x",
                     f"{100 * row['ptq_accuracy']:.2f}%", f"{100 * row['qat_accuracy']:.2f}%",
                     f"{100 * (row['qat_accuracy'] - row['ptq_accuracy']):+.2f} pt"])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([
        HEADING,
        "-" * len(HEADING),
        f"PTQ: prepare + calibrate on {CALIBRATION_IMAGES} training images. QAT: the same model fine-tuned "
        f"{section['epochs']} epochs with fake quantization and distillation from the fp32 model "
        f"(fp32 accuracy {100 * fp32_accuracy:.2f}%).",
        f"Accuracies: the {section['measured_on']} (PyTorch parity checked at export). Packed sizes count "
        "weights packed to their bit width plus float32 scales, zero points and biases.",
        "",
        line(header), line(["-" * w for w in widths]), *(line(r) for r in body),
    ])


def interpret_qat(section: dict[str, Any], fp32_accuracy: float) -> str:
    """Sentences read off the PTQ and QAT numbers, one clause per recipe."""
    helped, not_helped = [], []
    for row in section["rows"]:
        name = row["recipe"].upper()
        ptq, qat = 100 * row["ptq_accuracy"], 100 * row["qat_accuracy"]
        if qat > ptq:
            helped.append(f"{name} ({row['compression']:.1f}x smaller) from {ptq:.1f}% to {qat:.1f}% "
                          f"({_gap(100 * fp32_accuracy - qat)})")
        else:
            not_helped.append(f"{name} ({ptq:.1f}% -> {qat:.1f}%)")
    sentences = []
    if helped:
        sentences.append(f"Quantization-aware training ({section['epochs']} epochs, distilled from fp32) lifts "
                         f"{' and '.join(helped)}.")
    if not_helped:
        sentences.append(f"In {section['epochs']} epochs it did not help {' or '.join(not_helped)}; "
                         "try more --qat-epochs.")
    return " ".join(sentences)


def _gap(points: float) -> str:
    if points > 0:
        return f"{points:.1f} points below fp32"
    return "matching fp32" if abs(points) < 1e-9 else f"{-points:.1f} points above fp32 (noise)"
