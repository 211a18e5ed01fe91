"""Per-tensor vs per-channel QAT accuracy on the MobileNetV2-style net (same teacher and data as bench/mobile.py).

    python bench/qat_per_tensor.py

Trains the zoo's MobileNetV2-style net on 32x32 digits (seed 0, 1 thread), then for each variant:
`prepare(..., "w8a8")`, calibrate on 512 training images, top-1 accuracy on the 450 test images
(the fake-quantized model, which ONNX Runtime matches after export), `distill_finetune` (lr 2e-3,
batch 64), accuracy again. Variants: per-tensor 2 epochs with learnable scales (LSQ), per-tensor
4 epochs, per-channel 4 epochs (the 2-epoch runs without LSQ are bench/mobile.py's).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.torch import calibrate, distill_finetune, prepare  # noqa: E402
from lowbit.zoo.digits import load_digits_split, torch_threads  # noqa: E402
from lowbit.zoo.mobilenet import IMAGE_SIZE, train_mobilenet_digits  # noqa: E402
from lowbit.zoo.upscaled_digits import digits_as_rgb  # noqa: E402

VARIANTS = [("per-tensor, LSQ, 2 epochs", dict(per_channel=False, learnable_scales=True), 2),
            ("per-tensor, 4 epochs", dict(per_channel=False), 4),
            ("per-channel, 4 epochs", dict(per_channel=True), 4)]


def main() -> int:
    raw = load_digits_split()
    x_train, x_test = digits_as_rgb(raw.x_train, IMAGE_SIZE), digits_as_rgb(raw.x_test, IMAGE_SIZE)

    def accuracy(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model(x_test).argmax(1) == raw.y_test).float().mean())

    with torch_threads(1):
        teacher, _ = train_mobilenet_digits(seed=0)
        print(f"float teacher: top-1 {100 * accuracy(teacher):.2f}%", flush=True)
        for label, options, epochs in VARIANTS:
            started = time.perf_counter()
            torch.manual_seed(0)
            prepared = prepare(teacher, "w8a8", x_train[:2], **options)
            calibrate(prepared, [x_train[i:i + 128] for i in range(0, 512, 128)])
            calibrated = accuracy(prepared.eval())
            distill_finetune(prepared, teacher, x_train, raw.y_train, epochs=epochs, seed=0, lr=2e-3, batch_size=64)
            prepared.eval()
            print(f"W8A8 {label}: top-1 {100 * calibrated:.2f}% calibrated, {100 * accuracy(prepared):.2f}% after "
                  f"fine-tuning ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
