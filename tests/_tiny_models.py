"""Tiny torch-exported ONNX models shared by the ONNX I/O and preprocessing tests."""

from __future__ import annotations

import io
import warnings

import onnx
import torch


def export(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
           dynamic_axes: dict, *, fold_constants: bool = True) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter needs no onnxscript and keeps ops 1:1 with the module.
        torch.onnx.export(module.eval(), args, buffer, dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=17,
                          do_constant_folding=fold_constants)
    return onnx.load_from_string(buffer.getvalue())


def conv_bn_relu_onnx() -> onnx.ModelProto:
    """Conv-BN-ReLU x2, exported WITHOUT torch's own constant folding so BatchNormalization survives."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    )
    # Non-trivial running statistics, so a wrong fold would change the outputs.
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return export(net, (torch.randn(1, 3, 16, 16),), ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}},
                  fold_constants=False)


class TinyAttention(torch.nn.Module):
    """One BERT-style encoder layer: embeddings, masked self-attention, LayerNorm, GELU MLP."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.norm1 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.norm2 = torch.nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (dim // self.heads) ** 0.5
        scores = scores + (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, dim)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.mlp(x))


def tiny_attention_onnx() -> onnx.ModelProto:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "hidden": {0: "batch", 1: "sequence"}}
    return export(TinyAttention(), (ids, mask), ["input_ids", "attention_mask"], ["hidden"], axes)
