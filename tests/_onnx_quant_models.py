"""Small torch-exported models and calibration sets for the ONNX quantization tests."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn


def export(module: nn.Module, args: tuple, path: Path, input_names: list[str], dynamic_axes: dict,
           opset: int = 17) -> Path:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buffer, dynamo=False, input_names=input_names,
                          output_names=["out"], dynamic_axes=dynamic_axes, opset_version=opset)
    path.write_bytes(buffer.getvalue())
    onnx.checker.check_model(str(path))
    return path


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, depthwise conv, residual add, pooling and a Gemm classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.pointwise = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU6())
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.pointwise(self.depthwise(x)))
        x = self.conv(self.pool(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


class TinyEncoder(nn.Module):
    """One transformer encoder layer with an additive -inf attention mask."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        b, s, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, h, d // h).transpose(1, 2)

        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / (d // h) ** 0.5
        mask = torch.zeros_like(attention_mask, dtype=torch.float32).masked_fill(attention_mask == 0, float("-inf"))
        attn = torch.softmax(scores + mask[:, None, None, :], dim=-1) @ split(self.v(x))
        x = self.norm1(x + self.out(attn.transpose(1, 2).reshape(b, s, d)))
        return self.norm2(x + self.mlp(x))


def small_cnn(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = SmallCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded by preprocessing
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return export(net, (torch.randn(1, 3, 32, 32),), path, ["image"], {"image": {0: "batch"}, "out": {0: "batch"}})


def tiny_encoder(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "out": {0: "batch", 1: "seq"}}
    return export(TinyEncoder(), (ids, mask), path, ["input_ids", "attention_mask"], axes)


def outlier_cnn(path: Path, seed: int = 0) -> Path:
    """SmallCNN whose 3x3 conv.0 weight has one value 200x its largest: per-tensor int8 then zeroes
    that layer's other weights, so it is the one layer that must stay float."""
    model = onnx.load(str(small_cnn(path.with_name(path.stem + "_plain.onnx"), seed)))
    weight = next(t for t in model.graph.initializer if t.name == "conv.0.weight")
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] = 200 * np.abs(values).max()
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(path))
    return path


def image_calib(path: Path, n: int = 32, seed: int = 1, shape=(3, 32, 32)) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, image=rng.standard_normal((n, *shape)).astype(np.float32))
    return path


def token_calib(path: Path, n: int = 16, seq: int = 12, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (n, seq)).astype(np.int64)
    mask = np.ones((n, seq), np.int64)
    mask[:, seq - 3:] = rng.integers(0, 2, (n, 3))  # padded tails: -inf in the mask path
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path
