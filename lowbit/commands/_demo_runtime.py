"""The demo's ONNX Runtime section: static int8 of the digits CNN, measured against fp32.

The trained float CNN is exported to ONNX, quantized by `quantize_onnx` (int8 weights and
calibrated int8 activations, QDQ format), and both files are run on ONNX Runtime: accuracy on the
test images, top-1 agreement with fp32, file sizes, and latency of one batch of all test images,
timed interleaved in the same process so the ratio compares like with like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

HEADING = "On ONNX Runtime"
CALIBRATION_IMAGES = 256  # the first training images; calibration never sees the test set
THREADS = 1  # reproducible on a shared machine; a model this small gains little from more
WARMUP, REPEATS = 5, 30
SAME_SPEED = 0.05  # ratios within 5% of 1.0 are reported as "about as fast"


def run_onnx_section(model: torch.nn.Module, data: Any, workdir: Path) -> dict[str, Any]:
    """Export `model` (float, BatchNorm folded), quantize it static int8, measure both on ORT."""
    from lowbit.onnx.quantize import quantize_onnx
    from lowbit.onnx.session import make_session
    from lowbit.onnx.verify import time_pair
    from lowbit.zoo.onnx_export import export_to_onnx

    fp32_path = export_to_onnx(model, (data.x_train[:2],), workdir / "digits_fp32.onnx",
                               input_names=["input"], output_names=["output"],
                               dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    calib_path, eval_path = workdir / "calib.npz", workdir / "test.npz"
    np.savez(calib_path, input=data.x_train[:CALIBRATION_IMAGES].numpy())
    np.savez(eval_path, input=data.x_test.numpy())
    batch = len(data.x_test)
    result = quantize_onnx(fp32_path, workdir / "digits_int8.onnx", mode="static", calib=calib_path,
                           eval_data=eval_path, batch_size=batch, threads=THREADS, measure_speed=False)
    fidelity = result.report.outputs[0]

    fp32_session = make_session(onnx.load(fp32_path), threads=THREADS)
    int8_session = make_session(onnx.load(result.output_path), threads=THREADS)
    feed = {"input": data.x_test.numpy()}
    fp32_ms, int8_ms = time_pair(fp32_session, int8_session, feed, warmup=WARMUP, repeats=REPEATS)
    int8_model = onnx.load(result.output_path)
    return {
        "fp32_accuracy": ort_accuracy(fp32_session, data.x_test, data.y_test),
        "int8_accuracy": ort_accuracy(int8_session, data.x_test, data.y_test),
        "top1_agreement": fidelity.top1_agreement,
        "cosine_min": round(fidelity.cosine_min, 6),
        "fp32_bytes": result.report.size_before,
        "int8_bytes": result.report.size_after,
        "size_ratio": round(result.report.size_ratio, 3),
        "fp32_ms": round(fp32_ms, 3),
        "int8_ms": round(int8_ms, 3),
        "speedup": round(fp32_ms / int8_ms, 3),
        "batch": batch,
        "threads": THREADS,
        "repeats": REPEATS,
        "calibration_images": CALIBRATION_IMAGES,
        "quantized": {"weights": len(result.plan.quantized("weight")),
                      "activations": len(result.plan.quantized("activation")),
                      "biases": len(result.plan.quantized("bias")),
                      "float nodes": len(result.plan.float_nodes)},
        # lowbit stores the plan in the model as JSON (per-channel scales summarized; the graph holds them).
        "metadata_bytes": sum(len(p.key) + len(p.value) for p in int8_model.metadata_props),
        "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in int8_model.graph.node),
        "multiply_adds_per_image": multiply_adds(model, data.x_test[:1]),
    }


def ort_accuracy(session: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of an ONNX Runtime session (one input, class scores out) on (x, y)."""
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((logits.argmax(1) == y.numpy()).mean())


@torch.no_grad()
def multiply_adds(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds per sample in the model's Conv2d and Linear layers (what int8 makes cheaper)."""
    total = 0

    def count(layer: torch.nn.Module, _: Any, output: torch.Tensor) -> None:
        nonlocal total
        per_output = layer.weight[0].numel()  # in_channels / groups x kernel area, or in_features
        total += per_output * output[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def format_onnx_section(section: dict[str, Any]) -> str:
    s = section
    counts = s["quantized"]
    quantized = (f"{counts['weights']} weights, {counts['activations']} activations and {counts['biases']} "
                 f"biases quantized, {counts['float nodes']} nodes left float")
    speed = speed_phrase(s["speedup"])
    rows = [
        ("accuracy on ONNX Runtime", f"fp32 {100 * s['fp32_accuracy']:.2f}%   int8 {100 * s['int8_accuracy']:.2f}%"),
        ("top-1 agreement", f"{100 * s['top1_agreement']:.2f}% of {s['batch']} test images "
                            f"(worst cosine {s['cosine_min']:.4f})"),
        ("model file", f"{s['fp32_bytes']:,} B -> {s['int8_bytes']:,} B ({s['size_ratio']:.2f}x smaller; "
                       f"{s['metadata_bytes']:,} B of it is the quantization plan kept in the metadata)"),
        (f"latency, batch of {s['batch']}",
         f"fp32 {s['fp32_ms']:.2f} ms   int8 {s['int8_ms']:.2f} ms   -> {s['speedup']:.2f}x ({speed}; "
         f"{s['threads']} thread, median of {s['repeats']} interleaved runs in the same process)"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join([
        HEADING,
        "-" * len(HEADING),
        f"Static int8 QDQ (quantize_onnx: int8 per-channel weights, int8 activations calibrated on "
        f"{s['calibration_images']} training images; {quantized}).",
        *(f"  {label.ljust(width)}   {value}" for label, value in rows),
    ])


def speed_phrase(speedup: float) -> str:
    if speedup >= 1 + SAME_SPEED:
        return "faster"
    if speedup <= 1 - SAME_SPEED:
        return "SLOWER"
    return "about as fast"


def interpret_onnx(section: dict[str, Any]) -> str:
    """Sentences read off the ONNX Runtime numbers, including an honest word on speed."""
    s = section
    drop = 100 * (s["fp32_accuracy"] - s["int8_accuracy"])
    sentences = [
        f"On ONNX Runtime, static int8 agrees with fp32 on {100 * s['top1_agreement']:.1f}% of the test images "
        f"({_accuracy_change(drop)}) with a {s['size_ratio']:.1f}x smaller file."]
    speed = speed_phrase(s["speedup"])
    if speed == "faster":
        sentences.append(f"It runs a {s['batch']}-image batch {s['speedup']:.2f}x faster than fp32 on "
                         f"{s['threads']} thread, measured in the same run.")
    else:
        verdict = "is slower than" if speed == "SLOWER" else "is no faster than"
        sentences.append(
            f"It {verdict} fp32 here ({s['speedup']:.2f}x on a {s['batch']}-image batch): the CNN does only "
            f"{s['multiply_adds_per_image'] / 1e6:.2f} M multiply-adds per image, so the fixed cost of each op and "
            f"of the {s['qdq_nodes']} quantize/dequantize steps outweighs the cheaper int8 arithmetic.")
    return " ".join(sentences)


def _accuracy_change(drop_points: float) -> str:
    if abs(drop_points) < 1e-9:
        return "same accuracy"
    if drop_points > 0:
        return f"{drop_points:.2f} accuracy points lower"
    return f"{-drop_points:.2f} accuracy points higher, which is noise"
