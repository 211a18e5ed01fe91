"""Magnitude pruning that composes with quantization.

`prune` gives each quantized layer of a prepared model a 0/1 mask (a buffer): the layer multiplies
its weight by the mask before quantizing, so pruned weights stay exactly zero through QAT (their
gradient through the mask is zero too), quantize to the zero point (0 is always on the grid), and
are exported, checkpointed and loaded as zeros.

Patterns, on the weight matrix [out_channels, in_features * kernel]:
- "unstructured": the smallest |w| of each layer, `sparsity` of them;
- "2:4": in every run of 4 consecutive input weights of a row, the 2 smallest (50%), the pattern
  sparse tensor cores accelerate. Layers whose row length is not a multiple of 4 are skipped and
  listed.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.torch.qat import quantized_layers, state_of
from lowbit.torch.quantizers import WeightQuantizer

PATTERNS = ("unstructured", "2:4")


@torch.no_grad()
def prune(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured") -> dict[str, float | str]:
    """Prune every quantized layer of a prepared model in place; returns layer -> sparsity reached
    (or the reason it was skipped). Masks combine with earlier ones (pruned stays pruned)."""
    state_of(model)
    if pattern not in PATTERNS:
        raise LowbitError(f"unknown pruning pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    if pattern == "unstructured" and not 0.0 <= sparsity < 1.0:
        raise LowbitError(f"sparsity must be in [0, 1), got {sparsity}; pass e.g. 0.5 for half the weights")
    result: dict[str, float | str] = {}
    for name, layer in quantized_layers(model).items():
        matrix = WeightQuantizer.matrix(layer.effective_weight()).abs()
        if pattern == "2:4":
            if matrix.shape[1] % 4:
                result[name] = f"skipped: {matrix.shape[1]} input weights per row is not a multiple of 4"
                continue
            mask = _two_of_four(matrix)
        else:
            mask = _unstructured(matrix, sparsity)
        mask = mask.reshape(layer.weight.shape).to(layer.weight.dtype)
        if layer.weight_mask is not None:
            mask = mask * layer.weight_mask
        layer.weight_mask = mask
        result[name] = 1.0 - float(mask.mean())
    return result


def _unstructured(magnitude: torch.Tensor, sparsity: float) -> torch.Tensor:
    count = int(round(sparsity * magnitude.numel()))
    if count == 0:
        return torch.ones_like(magnitude)
    # Rank instead of thresholding, so ties never prune more than asked.
    order = torch.argsort(magnitude.reshape(-1), stable=True)
    mask = torch.ones(magnitude.numel(), dtype=magnitude.dtype)
    mask[order[:count]] = 0
    return mask.reshape(magnitude.shape)


def _two_of_four(magnitude: torch.Tensor) -> torch.Tensor:
    blocks = magnitude.reshape(magnitude.shape[0], -1, 4)
    keep = torch.topk(blocks, 2, dim=-1).indices
    mask = torch.zeros_like(blocks).scatter_(-1, keep, 1.0)
    return mask.reshape(magnitude.shape)


def sparsity_of(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero effective weights per quantized layer."""
    return {name: float((layer.effective_weight() == 0).float().mean())
            for name, layer in quantized_layers(model).items()}
