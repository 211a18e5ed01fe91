"""Fold a per-input-channel scale into the op that produces a group of linears' input.

After `divide_output(producer, s)`, the producer emits x / s; the caller multiplies the
consumers' weight columns by s, so the float model computes exactly what it did before.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.torch.llm.architectures import ScaleGroup
from lowbit.torch.llm.linears import is_conv1d, is_linear, out_features


class ScaledActivation(nn.Module):
    """act(x) / scales: lets a scale pass an activation that is not positively homogeneous (GELU, SiLU)."""

    def __init__(self, activation, scales: torch.Tensor) -> None:
        super().__init__()
        self.activation = activation
        self.register_buffer("scales", scales.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x) / self.scales.to(x.dtype)


def producer_width(block: nn.Module, group: ScaleGroup) -> int | None:
    """How many channels the producer emits toward the group (None when unknown, e.g. activations)."""
    producer = _get(block, group.producer)
    if group.kind == "linear":
        width = out_features(producer)
        return width // group.part[1] if group.part else width
    if group.kind == "norm":
        weight = getattr(producer, "weight", None)
        return None if weight is None else weight.numel()
    return None


def divide_output(block: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Make the group's producer output x / scales."""
    producer = _get(block, group.producer)
    with torch.no_grad():
        if group.kind == "norm":
            if getattr(producer, "weight", None) is None:
                raise LowbitError(f"norm {group.producer!r} has no weight to absorb a scale; drop it from the ArchitectureMap")
            producer.weight.div_(scales.to(producer.weight))
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(scales.to(producer.bias))
        elif group.kind == "linear":
            if not is_linear(producer):
                raise LowbitError(f"{group.producer!r} is not a linear layer; fix its ScaleGroup kind")
            rows = _part(out_features(producer), group.part)
            weight = producer.weight.T if is_conv1d(producer) else producer.weight  # [out, in] view
            weight[rows].div_(scales.to(weight)[:, None])
            if producer.bias is not None:
                producer.bias[rows].div_(scales.to(producer.bias))
        else:
            parent_name, _, attribute = group.producer.rpartition(".")
            parent = _get(block, parent_name) if parent_name else block
            current = getattr(parent, attribute)
            if isinstance(current, ScaledActivation):
                current.scales.mul_(scales.to(current.scales))
            else:
                setattr(parent, attribute, ScaledActivation(current, scales.to(torch.float32)))


def _part(width: int, part: tuple[int, int] | None) -> slice:
    if part is None:
        return slice(None)
    index, count = part
    size = width // count
    return slice(index * size, (index + 1) * size)


def _get(block: nn.Module, name: str):
    module = block
    for piece in name.split(".") if name else []:
        if not hasattr(module, piece):
            raise LowbitError(f"block has no submodule {name!r}; update the ArchitectureMap for this model")
        module = getattr(module, piece)
    return module
