"""A ResNet-18-style classifier (BasicBlocks [2, 2, 2, 2], 224x224 RGB input) for ONNX benchmarks.

Untrained weights give near-uniform class scores, which makes "top-1 agreement" meaningless, so
the model is trained briefly on a real offline task: scikit-learn's digits, upscaled to 3-channel
224x224 images. (Training at a lower resolution and fine-tuning at 224 was tried: the filters do
not transfer across a 3.5x scale change, 59% test accuracy.) The trained ONNX file is cached in
a caller-chosen folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.zoo.digits import evaluate, load_digits_split, train_classifier
from lowbit.zoo.upscaled_digits import digits_as_rgb

IMAGE_SIZE = 224


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (He et al. 2016): 7x7 stem, max-pool, four stages of 2 BasicBlocks."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, channels = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width, 1)))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_resnet18_digits(*, seed: int = 0, epochs: int = 2, batch_size: int = 32) -> tuple[ResNet18, dict[str, Any]]:
    """Train ResNet18 on digits at 224x224; returns the model (eval mode) and test metrics.

    Two epochs (~2-3 minutes on two cores) reach >90% test accuracy: enough for class scores with
    clear winners, which is what top-1 agreement needs."""
    data = load_digits_split()
    torch.manual_seed(seed)
    model = ResNet18()
    started = time.perf_counter()
    train_classifier(model, digits_as_rgb(data.x_train, IMAGE_SIZE), data.y_train, epochs=epochs, seed=seed,
                     lr=2e-3, batch_size=batch_size, desc="ResNet-18 digits")
    seconds = time.perf_counter() - started
    x_test = digits_as_rgb(data.x_test, IMAGE_SIZE)
    return model, {"test_accuracy": evaluate(model, x_test, data.y_test, batch_size=64),
                   "train_seconds": seconds, "epochs": epochs,
                   "parameters": sum(p.numel() for p in model.parameters())}


def export_onnx(model: nn.Module, path: str | Path, *, image_size: int = IMAGE_SIZE, opset: int = 17,
                fold_constants: bool = True) -> Path:
    """Export with a dynamic batch axis; input "input" [N,3,H,W], output "logits" [N,10].

    `fold_constants=False` keeps BatchNormalization nodes, like exports from other tools do."""
    from lowbit.zoo.onnx_export import export_to_onnx

    example = torch.zeros(1, 3, image_size, image_size)
    return export_to_onnx(model, (example,), path, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset=opset,
                          fold_constants=fold_constants)


def resnet18_digits_onnx(cache_dir: str | Path, *, seed: int = 0,
                         fold_constants: bool = True) -> tuple[Path, dict[str, Any]]:
    """Path of the trained ResNet-18 digits ONNX model in `cache_dir`, training it on first use.

    The trained weights are cached too (`.pt`), so the unfolded export (BatchNormalization nodes
    kept, `fold_constants=False`) is the same network without retraining."""
    cache_dir = Path(cache_dir)
    stem = f"resnet18_digits_s{seed}"
    path = cache_dir / (stem + ("" if fold_constants else "_unfolded") + ".onnx")
    weights, info = cache_dir / f"{stem}.pt", cache_dir / f"{stem}.json"
    if path.is_file() and info.is_file():
        return path, json.loads(info.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = ResNet18()
    if weights.is_file() and info.is_file():
        model.load_state_dict(torch.load(weights, weights_only=True))
        metrics = json.loads(info.read_text())
    else:
        model, metrics = train_resnet18_digits(seed=seed)
        torch.save(model.state_dict(), weights)
        info.write_text(json.dumps(metrics, indent=2))
    export_onnx(model.eval(), path, fold_constants=fold_constants)
    return path, metrics
