"""A MobileNetV2-style classifier (inverted residuals, ReLU6, depthwise 3x3) on 32x32 digits.

Why it is in the zoo: once BatchNorm is folded into the depthwise convolutions, the per-channel
weight ranges differ by orders of magnitude, so a single per-tensor int8 scale wipes out the
small channels. It is the standard case for per-channel quantization and cross-layer equalization.

Two training recipes (`RECIPES`). "default" (AdamW, peak learning rate 1e-2, weight decay 1e-4)
gives a well-conditioned net: folded depthwise ranges within ~10x, per-tensor int8 loses nothing.
"high-lr" changes only the peak learning rate, to 5e-2, which lets some ReLU6 units of the 1x1
expansions die (dropping weight decay at 1e-2 does not: the spread stays under 20x). The
depthwise channel fed by a dead unit sees only zeros, its BatchNorm running variance goes to ~0,
and folding multiplies its weights by gamma / sqrt(var + eps), several hundred. The per-tensor
scale is then set by channels that carry no signal, and per-tensor int8 collapses to chance
until cross-layer equalization evens the ranges out. This is the mechanism Nagel et al. 2019
(data-free quantization, section 3) describe for ImageNet MobileNetV2, here from training alone.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.zoo.digits import evaluate, load_digits_split, torch_threads, train_classifier
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


# Optimizer settings per recipe; "threads" None keeps the process's torch threads (how the
# default models were first trained), 1 makes training reproducible bit for bit on any machine.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"lr": 1e-2, "weight_decay": 1e-4, "threads": None},
    "high-lr": {"lr": 5e-2, "weight_decay": 1e-4, "threads": 1},
}


def train_mobilenet_digits(*, seed: int = 0, epochs: int = 12,
                           recipe: str = "default") -> tuple[MobileNetV2, dict[str, Any]]:
    """Train MobileNetV2 on 32x32 digits with one of `RECIPES`; returns the model (eval mode) and metrics."""
    if recipe not in RECIPES:
        raise LowbitError(f"unknown MobileNetV2 training recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    settings = RECIPES[recipe]
    data = load_digits_split()
    torch.manual_seed(seed)
    model = MobileNetV2()
    started = time.perf_counter()
    threads = contextlib.nullcontext() if settings["threads"] is None else torch_threads(settings["threads"])
    with threads:
        train_classifier(model, digits_as_rgb(data.x_train, IMAGE_SIZE), data.y_train, epochs=epochs, seed=seed,
                         lr=settings["lr"], weight_decay=settings["weight_decay"], batch_size=64,
                         desc=f"MobileNetV2 digits ({recipe})")
    seconds = time.perf_counter() - started
    return model, {"test_accuracy": evaluate(model, digits_as_rgb(data.x_test, IMAGE_SIZE), data.y_test),
                   "train_seconds": seconds, "epochs": epochs,
                   "parameters": sum(p.numel() for p in model.parameters()), "recipe": recipe,
                   "depthwise_range_spread": depthwise_range_spread(model)}


@torch.no_grad()
def depthwise_range_spread(model: nn.Module) -> list[float]:
    """For each depthwise Conv+BN, max/min over output channels of max|w| after folding the BN.

    1 means every channel fills a shared int8 scale; at 100 the smallest channel spans about one
    of the 127 steps per side that a per-tensor scale offers."""
    spreads = []
    for module in model.modules():
        if isinstance(module, nn.Sequential) and len(module) > 1 and isinstance(module[0], nn.Conv2d) \
                and module[0].groups > 1 and isinstance(module[1], nn.BatchNorm2d):
            conv, norm = module[0], module[1]
            fold = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            ranges = (conv.weight * fold[:, None, None, None]).abs().flatten(1).amax(dim=1)
            spreads.append(float(ranges.max() / ranges.min().clamp_min(torch.finfo(ranges.dtype).tiny)))
    return spreads


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17) -> Path:
    """Export with a dynamic batch axis; input "input" [N,3,32,32], output "logits" [N,10]."""
    from lowbit.zoo.onnx_export import export_to_onnx

    return export_to_onnx(model, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), path, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset=opset)


def mobilenet_digits_onnx(cache_dir: str | Path, *, seed: int = 0,
                          recipe: str = "default") -> tuple[Path, dict[str, Any]]:
    """Path of the trained MobileNetV2 digits ONNX model in `cache_dir`, training it on first use."""
    cache_dir = Path(cache_dir)
    stem = f"mobilenetv2_digits_s{seed}" if recipe == "default" else f"mobilenetv2_{recipe}_digits_s{seed}"
    path, info = cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"
    if path.is_file() and info.is_file():
        return path, json.loads(info.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    model, metrics = train_mobilenet_digits(seed=seed, recipe=recipe)
    export_onnx(model, path)
    info.write_text(json.dumps(metrics, indent=2))
    return path, metrics
