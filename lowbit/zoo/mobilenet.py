"""A MobileNetV2-style classifier (inverted residuals, ReLU6, depthwise 3x3) on 32x32 digits.

Why it is in the zoo: once BatchNorm is folded into the depthwise convolutions, the per-channel
weight ranges differ by orders of magnitude, so a single per-tensor int8 scale wipes out the
small channels. It is the standard case for per-channel quantization and cross-layer equalization.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.zoo.digits import evaluate, load_digits_split, train_classifier
from lowbit.zoo.upscaled_digits import digits_as_rgb

IMAGE_SIZE = 32
# (expansion t, output channels c, repeats n, first stride s), as in Sandler et al. 2018, Table 2,
# shortened for 32x32 inputs (32 -> 16 -> 8 -> 4).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU6())


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection, residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers = [conv_bn_relu6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, stem: int = 32, last: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, stem, 3)]
        channels = stem
        for expansion, width, repeats, stride in STAGES:
            for index in range(repeats):
                layers.append(InvertedResidual(channels, width, stride if index == 0 else 1, expansion))
                channels = width
        layers += [conv_bn_relu6(channels, last, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_mobilenet_digits(*, seed: int = 0, epochs: int = 12) -> tuple[MobileNetV2, dict[str, Any]]:
    """Train MobileNetV2 on 32x32 digits; returns the model (eval mode) and metrics."""
    data = load_digits_split()
    torch.manual_seed(seed)
    model = MobileNetV2()
    started = time.perf_counter()
    train_classifier(model, digits_as_rgb(data.x_train, IMAGE_SIZE), data.y_train, epochs=epochs, seed=seed,
                     lr=1e-2, batch_size=64, desc="MobileNetV2 digits")
    seconds = time.perf_counter() - started
    return model, {"test_accuracy": evaluate(model, digits_as_rgb(data.x_test, IMAGE_SIZE), data.y_test),
                   "train_seconds": seconds, "epochs": epochs,
                   "parameters": sum(p.numel() for p in model.parameters())}


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17) -> Path:
    """Export with a dynamic batch axis; input "input" [N,3,32,32], output "logits" [N,10]."""
    from lowbit.zoo._export import export_to_onnx

    return export_to_onnx(model, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), path, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset=opset)


def mobilenet_digits_onnx(cache_dir: str | Path, *, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Path of the trained MobileNetV2 digits ONNX model in `cache_dir`, training it on first use."""
    cache_dir = Path(cache_dir)
    path, info = cache_dir / f"mobilenetv2_digits_s{seed}.onnx", cache_dir / f"mobilenetv2_digits_s{seed}.json"
    if path.is_file() and info.is_file():
        return path, json.loads(info.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    model, metrics = train_mobilenet_digits(seed=seed)
    export_onnx(model, path)
    info.write_text(json.dumps(metrics, indent=2))
    return path, metrics
