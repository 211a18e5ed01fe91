"""A depthwise CNN whose activation channels are rescaled per channel by exp(U(-3, 3)), function-
preservingly: each Conv's output channel c that feeds another Conv is multiplied by s_c (weights
and bias), and that Conv divides its input channel c by s_c (a depthwise Conv: its own channel c; a
dense one: column c).
ReLU commutes with a positive scale, so the float function is unchanged while the activation
channels span up to e^6 ~ 400x: the spread BatchNorm folding produces in the wild (issue 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class DepthwiseNet(nn.Module):
    """Conv -> depthwise -> pointwise -> depthwise (stride 2) -> pointwise, each + BatchNorm + ReLU,
    global pooling, a linear head. `batchnorm=False` (or `fold_batchnorm`) leaves plain Convs."""

    def __init__(self, classes: int = 10, width: int = 16, batchnorm: bool = False) -> None:
        super().__init__()
        w = width
        self.convs = nn.ModuleList([
            nn.Conv2d(3, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1, groups=w), nn.Conv2d(w, 2 * w, 1),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, stride=2), nn.Conv2d(2 * w, 2 * w, 1)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(c.out_channels) if batchnorm else nn.Identity()
                                    for c in self.convs])
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def fold_batchnorm(net: DepthwiseNet) -> DepthwiseNet:
    """Fold every BatchNorm into its Conv (eval statistics), as deployment exports do."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net.eval()
    for i, (conv, norm) in enumerate(zip(net.convs, net.norms)):
        if isinstance(norm, nn.BatchNorm2d):
            net.convs[i] = fuse_conv_bn_eval(conv, norm)
            net.norms[i] = nn.Identity()
    return net


@torch.no_grad()
def rescale_channels(net: DepthwiseNet, *, seed: int = 0, spread: float = 3.0, head: bool = False) -> DepthwiseNet:
    """Multiply each Conv's output channels by exp(U(-spread, spread)) and undo it in the next Conv
    (as BatchNorm folding does between Convs); `head` also rescales the last Conv -> Linear link."""
    generator = np.random.default_rng(seed)
    layers = list(net.convs) + ([net.head] if head else [])
    for conv, reader in zip(layers[:-1], layers[1:]):
        scale = torch.tensor(np.exp(generator.uniform(-spread, spread, conv.out_channels)), dtype=torch.float32)
        conv.weight.mul_(scale[:, None, None, None])
        conv.bias.mul_(scale)
        if isinstance(reader, nn.Conv2d) and reader.groups > 1:
            reader.weight.div_(scale[:, None, None, None])  # depthwise: its channel c reads only channel c
        elif isinstance(reader, nn.Conv2d):
            reader.weight.div_(scale[None, :, None, None])
        else:
            reader.weight.div_(scale[None, :])  # the head after global pooling
    return net


def export_depthwise(net: nn.Module, path: Path, size: int = 16) -> Path:
    from lowbit.zoo.onnx_export import export_to_onnx

    return export_to_onnx(net.eval(), (torch.zeros(1, 3, size, size),), path, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def rescaled_depthwise_digits_onnx(cache_dir: str | Path, *, seed: int = 0, size: int = 16,
                                   epochs: int = 15) -> tuple[Path, Path, dict]:
    """(float ONNX, rescaled ONNX, metrics) of a DepthwiseNet trained on size x size digits, the
    rescaled one with every activation channel multiplied by exp(U(-3, 3)) (same function)."""
    import json

    from lowbit.zoo.digits import evaluate, load_digits_split, train_classifier
    from lowbit.zoo.upscaled_digits import digits_as_rgb

    cache_dir = Path(cache_dir)
    stem = f"depthwise_bn_digits{size}_s{seed}"
    plain, rescaled = cache_dir / f"{stem}.onnx", cache_dir / f"{stem}_rescaled.onnx"
    info = cache_dir / f"{stem}.json"
    if plain.is_file() and rescaled.is_file() and info.is_file():
        return plain, rescaled, json.loads(info.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_split()
    torch.manual_seed(seed)
    net = DepthwiseNet(batchnorm=True)
    train_classifier(net, digits_as_rgb(data.x_train, size), data.y_train, epochs=epochs, seed=seed,
                     desc="depthwise digits")
    fold_batchnorm(net)
    x_test = digits_as_rgb(data.x_test, size)
    metrics = {"test_accuracy": evaluate(net, x_test, data.y_test)}
    export_depthwise(net, plain, size)
    rescale_channels(net, seed=seed)
    metrics["rescaled_test_accuracy"] = evaluate(net, x_test, data.y_test)
    export_depthwise(net, rescaled, size)
    info.write_text(json.dumps(metrics, indent=2))
    return plain, rescaled, metrics
