"""A small residual depthwise CNN (MobileNetV2-style blocks) on 16x16 digits, for low-bit QAT.

Why it is in the zoo: it has every layer kind that binary and 2-bit weights are known to break
(Rastegari et al. 2016, Zhou et al. 2016, Liu et al. 2018 keep them at higher precision): a first
convolution that sees raw pixels through only 27 weights per channel, depthwise 3x3 convolutions
with 9 weights per channel (one binary scale cannot fit nine values), and a last Linear whose
errors land directly on the logits. Trained in seconds on one CPU thread.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lowbit.zoo.digits import evaluate, load_digits_split, torch_threads, train_classifier
from lowbit.zoo.upscaled_digits import digits_as_rgb

IMAGE_SIZE = 16


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class DepthwiseBlock(nn.Module):
    """1x1 expand (ReLU) -> 3x3 depthwise (ReLU) -> 1x1 projection (+ input when shapes match)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.block = nn.Sequential(conv_bn_relu(in_channels, hidden, 1),
                                   conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class ResidualDepthwiseCNN(nn.Module):
    """[N, 3, 16, 16] -> stem 3x3 conv -> four depthwise blocks (two residual) -> 1x1 conv ->
    global average pool -> Linear: 10 logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 16, 3),
            DepthwiseBlock(16, 16, 1), DepthwiseBlock(16, 32, 2), DepthwiseBlock(32, 32, 1),
            DepthwiseBlock(32, 48, 2),
            conv_bn_relu(48, 96, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_16(images: torch.Tensor) -> torch.Tensor:
    """The 8x8 digits as this net's input: [N, 3, 16, 16] in [-1, 1]."""
    return digits_as_rgb(images, IMAGE_SIZE)


def train_depthwise_digits(*, seed: int = 0, epochs: int = 15) -> tuple[ResidualDepthwiseCNN, dict[str, Any]]:
    """Train on the fixed digits split (one thread, reproducible); returns the model (eval mode) and metrics."""
    data = load_digits_split()
    torch.manual_seed(seed)
    model = ResidualDepthwiseCNN()
    started = time.perf_counter()
    with torch_threads(1):
        train_classifier(model, digits_16(data.x_train), data.y_train, epochs=epochs, seed=seed,
                         desc="residual depthwise CNN digits")
        accuracy = evaluate(model, digits_16(data.x_test), data.y_test)
    return model, {"test_accuracy": accuracy, "train_seconds": time.perf_counter() - started, "epochs": epochs,
                   "parameters": sum(p.numel() for p in model.parameters())}
