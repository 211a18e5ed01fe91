"""lowbit's quantized models on mobile runtimes: ORT Mobile (.ort), ExecuTorch (.pte), LiteRT (.tflite).

    pip install -e '.[executorch,litert]'
    python bench/mobile.py [--qat-epochs 2] [--batch 1] [--repeats 50] [--json out.json]

Models: the zoo's MobileNetV2-style net on 32x32 digits, static int8 by `quantize_onnx` (256
calibration images; per-channel, and per-tensor after cross-layer equalization) and W8A8 QAT (`lowbit.torch`: prepare, calibrate, distillation fine-tune,
export_onnx) and W4A8 QAT, each with per-channel and with per-tensor weights (`prepare(...,
per_channel=False)`); the digits CNN with W4A8 QAT (int4 weights in int8 containers, int8
activations); a digits MLP (64-512-256-10) with weight-only int4 and int8 per-channel weights
(MatMulNBits, and int8 also as DequantizeLinear).
Each QDQ model goes through `lowbit.deploy.export_model` to every target whose packages are
installed; the written file is loaded in that target's runtime and compared with ONNX Runtime on
the QDQ model over the 450 test images (top-1 agreement, max error in output quantization
steps), its size with the target's float export of the same network, and its latency with that
float file (same runtime, same threads, interleaved, median of --repeats). Top-1 accuracy on the
labels (ONNX Runtime, float and QDQ models) is printed first and kept in WORK/accuracy.json. x86 CPU: ExecuTorch
and LiteRT run their XNNPACK kernels here, as on ARM phones, but the ratios are a proxy (see
docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.deploy.export import TARGETS, export_model, missing_extra, target_for  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.onnx.config import StaticConfig, WeightOnlyConfig  # noqa: E402
from lowbit.onnx.quantize import quantize_onnx  # noqa: E402
from lowbit.torch import calibrate, distill_finetune, export_onnx, prepare  # noqa: E402
from lowbit.zoo.onnx_export import export_to_onnx  # noqa: E402
from lowbit.zoo.digits import load_digits_split, torch_threads, train_classifier, train_digits_cnn  # noqa: E402
from lowbit.zoo.mobilenet import IMAGE_SIZE, train_mobilenet_digits  # noqa: E402
from lowbit.zoo.mobilenet import export_onnx as export_mobilenet  # noqa: E402
from lowbit.zoo.upscaled_digits import digits_as_rgb  # noqa: E402


def qat_model(teacher: torch.nn.Module, recipe: str, x_train: torch.Tensor, y_train: torch.Tensor,
              x_test: torch.Tensor, path: Path, epochs: int, seed: int, per_channel: bool = True) -> Path:
    torch.manual_seed(seed)
    prepared = prepare(teacher, recipe, x_train[:2], per_channel=per_channel)
    calibrate(prepared, [x_train[i:i + 128] for i in range(0, 512, 128)])
    distill_finetune(prepared, teacher, x_train, y_train, epochs=epochs, seed=seed, lr=2e-3, batch_size=64)
    prepared.eval()
    export_onnx(prepared, x_train[:2], path, check_data=x_test, check_fusion=False)
    return path


def build_models(work: Path, epochs: int, seed: int) -> list[tuple[str, Path, Path]]:
    """(label, QDQ model, test-data .npz) for each benchmarked model; reused when `work` has them."""
    models = [("MobileNetV2-style, static int8 (quantize_onnx)", work / "mobilenet_int8.onnx", work / "mobilenet_test.npz"),
              ("MobileNetV2-style, static int8 per-tensor+CLE", work / "mobilenet_int8_pt.onnx", work / "mobilenet_test.npz"),
              ("MobileNetV2-style, QAT W8A8", work / "mobilenet_w8a8.onnx", work / "mobilenet_test.npz"),
              ("MobileNetV2-style, QAT W4A8", work / "mobilenet_w4a8.onnx", work / "mobilenet_test.npz"),
              ("MobileNetV2-style, QAT W8A8 per-tensor", work / "mobilenet_w8a8_pt.onnx", work / "mobilenet_test.npz"),
              ("MobileNetV2-style, QAT W4A8 per-tensor", work / "mobilenet_w4a8_pt.onnx", work / "mobilenet_test.npz"),
              ("digits CNN, QAT W4A8", work / "digits_w4a8.onnx", work / "digits_test.npz"),
              ("digits MLP, weight-only W4 per-channel", work / "mlp_wo4.onnx", work / "digits_test.npz"),
              ("digits MLP, weight-only W8 per-channel", work / "mlp_wo8.onnx", work / "digits_test.npz"),
              ("digits MLP, weight-only W8 per-channel (dq)", work / "mlp_wo8_dq.onnx", work / "digits_test.npz")]
    if all(path.is_file() for _, path, _ in models) and (work / "accuracy.json").is_file():
        return models
    raw = load_digits_split()
    x_train, x_test = digits_as_rgb(raw.x_train, IMAGE_SIZE), digits_as_rgb(raw.x_test, IMAGE_SIZE)
    np.savez(work / "mobilenet_test.npz", input=x_test.numpy())
    np.savez(work / "mobilenet_calib.npz", input=x_train[:256].numpy())
    np.savez(work / "digits_test.npz", input=raw.x_test.numpy())
    with torch_threads(1):
        mobilenet, _ = train_mobilenet_digits(seed=seed)
        export_mobilenet(mobilenet, work / "mobilenet_fp32.onnx")
        quantize_onnx(work / "mobilenet_fp32.onnx", work / "mobilenet_int8.onnx", mode="static",
                      calib=work / "mobilenet_calib.npz", measure_speed=False)
        # one scale per tensor (channels equalized first): no per-channel vectors to store, the smallest file
        quantize_onnx(work / "mobilenet_fp32.onnx", work / "mobilenet_int8_pt.onnx",
                      StaticConfig(per_channel=False, equalize=True, calib_method="auto"),
                      calib=work / "mobilenet_calib.npz", measure_speed=False)
        qat_model(mobilenet, "w8a8", x_train, raw.y_train, x_test, work / "mobilenet_w8a8.onnx", epochs, seed)
        qat_model(mobilenet, "w4a8", x_train, raw.y_train, x_test, work / "mobilenet_w4a8.onnx", epochs, seed)
        # one weight scale per tensor, trained (no equalization: QAT fits the weights to the one grid)
        for recipe in ("w8a8", "w4a8"):
            qat_model(mobilenet, recipe, x_train, raw.y_train, x_test, work / f"mobilenet_{recipe}_pt.onnx", epochs,
                      seed, per_channel=False)
        cnn, _ = train_digits_cnn(epochs=15, seed=seed)
        export_to_onnx(cnn, (raw.x_train[:1],), work / "digits_fp32.onnx", input_names=["input"],
                       output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        qat_model(cnn, "w4a8", raw.x_train, raw.y_train, raw.x_test, work / "digits_w4a8.onnx", epochs, seed)
        torch.manual_seed(seed)
        mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(),
                                  torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        train_classifier(mlp, raw.x_train, raw.y_train, epochs=15, seed=seed)
        export_to_onnx(mlp, (raw.x_train[:1],), work / "mlp_fp32.onnx", input_names=["input"], output_names=["logits"],
                       dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        for bits in (4, 8):  # one scale per output channel, symmetric: what XNNPACK's kernels take
            quantize_onnx(work / "mlp_fp32.onnx", work / f"mlp_wo{bits}.onnx",
                          WeightOnlyConfig(bits=bits, group_size=0, algo="rtn"), measure_speed=False)
        # the same in standard DequantizeLinear form (what LiteRT's dynamic-range kernels take)
        quantize_onnx(work / "mlp_fp32.onnx", work / "mlp_wo8_dq.onnx",
                      WeightOnlyConfig(bits=8, group_size=0, algo="rtn", weight_format="dq"), measure_speed=False)
    float_models = [("MobileNetV2-style, float", work / "mobilenet_fp32.onnx", work / "mobilenet_test.npz"),
                    ("digits CNN, float", work / "digits_fp32.onnx", work / "digits_test.npz"),
                    ("digits MLP, float", work / "mlp_fp32.onnx", work / "digits_test.npz")]
    accuracy = {label: onnx_accuracy(path, np.load(data)["input"], raw.y_test.numpy())
                for label, path, data in float_models + models}
    (work / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
    return models


def onnx_accuracy(path: Path, x: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model on the labels (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == labels).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qat-epochs", type=int, default=2, help="QAT fine-tuning epochs (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the exported files (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per file (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_artifacts" / "mobile",
                        help="where the trained and quantized models are kept (reused by the next run)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    rows = []
    args.work.mkdir(parents=True, exist_ok=True)
    models = build_models(args.work, args.qat_epochs, args.seed)
    for label, value in json.loads((args.work / "accuracy.json").read_text()).items():
        print(f"top-1 accuracy on the digits labels: {label:<48} {100 * value:6.2f}%")
    with tempfile.TemporaryDirectory(prefix="lowbit-mobile-") as tmp:
        work = Path(tmp)
        for suffix in TARGETS:
            sentence = missing_extra(target_for(f"x{suffix}"))
            if sentence:
                print(f"skipping {suffix}: {sentence}")
                continue
            for label, model, data in models:
                try:
                    report = export_model(model, work / f"{model.stem}{suffix}", data=data, samples=450,
                                          batch=args.batch, threads=args.threads, repeats=args.repeats)
                except LowbitError as refusal:  # a precision the target does not run: its one sentence
                    print(f"{label} -> {suffix}: refused: {refusal}\n", flush=True)
                    continue
                rows.append({"model": label, **report.to_dict()})
                print(f"{label} -> {suffix}\n{report.describe()}\n", flush=True)
    print(f"{'model':<48} {'target':<22} {'top-1 agr.':>10} {'max err':>9} {'quant KB':>8} {'float KB':>9} "
          f"{'smaller':>8} {'quant ms':>8} {'float ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['model']:<48} {r['target']:<22} {100 * r['top1_agreement']:>9.2f}% {r['max_error_steps']:>6.2f} st "
              f"{r['file_bytes'] / 1024:>8.1f} {r['float_file_bytes'] / 1024:>9.1f} {r['size_ratio']:>7.2f}x "
              f"{r['latency_ms']:>8.3f} {r['float_latency_ms']:>9.3f} {r['speedup']:>7.2f}x")
    print(f"\nbatch {args.batch}, {args.threads} thread(s), median of {args.repeats} interleaved runs; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
