"""Find the linear layers of a transformers block and read/write their weights in one layout.

`nn.Linear` stores `[out, in]`; GPT-2's `Conv1D` (transformers.pytorch_utils) stores the
transpose `[in, out]`. Everything else in lowbit sees `[out, in]` (see
`lowbit.algorithms.weight_layout`); these helpers hide the difference.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: a linear layer with a transposed `[in, out]` weight (matched by shape
    contract, so transformers need not be imported)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def find_linears(root: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer under `root`, by qualified name, in registration order."""
    return {name: module for name, module in root.named_modules() if name and is_linear(module)}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as `[out_features, in_features]` float32 (a copy)."""
    weight = module.weight.detach()
    return (weight.T if is_conv1d(module) else weight).to(torch.float32).clone()


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Store an `[out, in]` matrix into the layer, in its own layout, dtype and device."""
    target = module.weight
    value = matrix.T if is_conv1d(module) else matrix
    with torch.no_grad():
        target.copy_(value.to(target.device, target.dtype))


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]
