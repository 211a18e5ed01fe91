"""Which layers a sub-4-bit recipe keeps at int8 weights, and what that costs in packed size.

Binary, ternary and 2-bit weights break a few kinds of layer that fine-tuning does not train
back, which is why binary-network papers keep them at higher precision (XNOR-Net, Rastegari et
al. 2016; DoReFa-Net, Zhou et al. 2016; Bi-Real Net, Liu et al. 2018):

- the first layer: it sees the raw input through few weights per channel (27 for a 3x3 RGB
  conv), and every later layer inherits its error;
- the last layer: its error lands directly on the logits;
- depthwise convolutions: 9 weights per output channel (3x3), so one scale per channel cannot fit
  them with 2-3 levels (a residual depthwise CNN at w1a8 loses over 40 points with them binary).

`prepare` keeps exactly these at int8 (symmetric, per channel; per tensor with per_channel=False)
for recipes whose weights have fewer than 4 bits (`keep_int8="auto"`, the default). They are a few percent of the weights, so
the packed size grows little (`int8_cost_bytes`). `keep_int8="none"` quantizes every layer at the
recipe's width (the behaviour before); a list of module names keeps exactly those, for example
the ones `sensitive_layers` picks from a measured per-layer sensitivity, within a weight budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.spec import PRESETS, QuantSpec, Recipe
from lowbit.torch.weights import quantize_weight

INT8_WEIGHTS: QuantSpec = PRESETS["w8a8"].weights  # int8, symmetric, per output channel
MIN_SAFE_BITS = 4  # weights this wide quantize every layer well (w4a8 loses nothing on the zoo's nets)
KEEP_INT8_MODES = ("auto", "none")


def int8_weights(recipe: Recipe) -> QuantSpec:
    """The spec of layers kept at int8: per channel, or per tensor when the recipe's weights are."""
    if recipe.weights is not None and recipe.weights.granularity.kind == "tensor":
        return replace(INT8_WEIGHTS, granularity=recipe.weights.granularity)
    return INT8_WEIGHTS


def is_depthwise(module: nn.Module) -> bool:
    """A convolution with one input channel per group and more than one group."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and 1 < module.groups == module.in_channels


def call_order(model: nn.Module, inputs: tuple[torch.Tensor, ...], kinds: tuple[type, ...]) -> list[str]:
    """Names of the modules of exactly the types `kinds`, in the order the forward pass first calls them."""
    order: list[str] = []
    hooks = [module.register_forward_hook(lambda *_, name=name: order.append(name) if name not in order else None)
             for name, module in model.named_modules() if type(module) in kinds]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def default_int8_layers(model: nn.Module, inputs: tuple[torch.Tensor, ...], kinds: tuple[type, ...],
                        exclude: set[str]) -> dict[str, str]:
    """{name: reason} for the first layer, the last layer and every depthwise convolution."""
    order = [name for name in call_order(model, inputs, kinds) if name not in exclude]
    if not order:
        return {}
    kept = {order[0]: "first layer"}
    for name in order[1:-1]:
        module = model.get_submodule(name)
        if is_depthwise(module):
            kept[name] = f"depthwise conv, {module.weight[0].numel()} weights per channel"
    kept.setdefault(order[-1], "last layer")
    return dict(sorted(kept.items(), key=lambda item: order.index(item[0])))


def int8_layers(recipe: Recipe, keep_int8: str | Iterable[str], model: nn.Module, inputs: tuple[torch.Tensor, ...],
                kinds: tuple[type, ...], exclude: set[str]) -> dict[str, str]:
    """{name: reason} of the layers `prepare` quantizes with int8 weights instead of the recipe's."""
    if isinstance(keep_int8, str):
        if keep_int8 not in KEEP_INT8_MODES:
            raise LowbitError(f"keep_int8 must be 'auto', 'none' or a list of module names, not {keep_int8!r}")
        if keep_int8 == "none" or recipe.weights.bits >= MIN_SAFE_BITS:
            return {}
        return default_int8_layers(model, inputs, kinds, exclude)
    names = list(keep_int8)
    layers = {name for name, module in model.named_modules() if type(module) in kinds}
    wrong = sorted(set(names) - layers)
    if wrong:
        raise LowbitError(f"keep_int8 names {wrong} are not Linear/Conv/Embedding modules of this model; use names "
                          "from model.named_modules()")
    both = sorted(set(names) & exclude)
    if both:
        raise LowbitError(f"{both} are both excluded (kept float) and kept at int8; name each layer in one of them")
    return {name: "chosen by the caller" for name in names}


@torch.no_grad()
def int8_cost_bytes(model: nn.Module, names: Iterable[str], recipe: Recipe) -> int:
    """Extra packed bytes of the named layers' weights at int8 instead of the recipe's (scales included)."""
    extra = 0
    for name in names:
        weight = model.get_submodule(name).weight
        extra += quantize_weight(weight, int8_weights(recipe))[1] - quantize_weight(weight, recipe.weights)[1]
    return extra


def describe_int8_layers(kept: dict[str, str], recipe: Recipe, extra_bytes: int, packed_bytes: int) -> str:
    """One sentence: what was kept at int8, why, what it costs, and how to turn it off."""
    layers = ", ".join(f"{name} ({reason})" for name, reason in kept.items())
    low = packed_bytes - extra_bytes
    return (f"{len(kept)} layers keep int8 weights because {recipe.weights.dtype} weights break them: {layers}; "
            f"packed weights {packed_bytes / 1024:.1f} KB instead of {low / 1024:.1f} KB "
            f"(+{100 * extra_bytes / max(low, 1):.0f}%); pass keep_int8='none' to quantize every layer at "
            f"{recipe.weights.dtype}")


def sensitive_layers(model: nn.Module, recipe: str | Recipe, batches: list[Any], *, max_drop: float = 0.02,
                     max_weight_share: float = 0.1, metric: Any = None) -> dict[str, float]:
    """{name: score} of the layers to keep at int8, chosen from measured sensitivity: worst first,
    the layers whose quantization alone (every other layer float) costs more than `max_drop` of
    the metric (default: top-1 agreement with the float model), as long as the chosen layers hold
    at most `max_weight_share` of the quantized weights. Pass the names to
    `prepare(..., keep_int8=names)`.

    Measured by `lowbit.analysis.torch_sensitivity.torch_layer_sensitivity` ("solo" sweep) on a
    copy prepared with every layer at the recipe's width and calibrated on `batches`. This is
    post-training sensitivity: at 1-2 bits nearly every layer fails alone before fine-tuning,
    hence the budget."""
    from lowbit.analysis.torch_sensitivity import torch_layer_sensitivity
    from lowbit.torch.qat import prepare, quantized_layers
    from lowbit.torch.ranges import calibrate

    if not batches:
        raise LowbitError("sensitive_layers needs at least one batch of model inputs")
    if not 0.0 <= max_weight_share <= 1.0:
        raise LowbitError(f"max_weight_share must be in [0, 1], got {max_weight_share}")
    first = batches[0] if isinstance(batches[0], torch.Tensor) else batches[0][0]
    prepared = prepare(model, recipe, first[:2], keep_int8="none")
    calibrate(prepared, batches)
    report = torch_layer_sensitivity(model, prepared, batches, sweeps=("solo",), metric=metric)
    reference = report.float_score if report.float_score is not None else 1.0
    sizes = {name: layer.weight.numel() for name, layer in quantized_layers(prepared).items()}
    ranked = sorted((entry.solo_score, entry.tensor) for entry in report.tensors
                    if entry.tensor in sizes and entry.solo_score is not None
                    and entry.solo_score < reference - max_drop)
    chosen, budget = {}, max_weight_share * sum(sizes.values())
    for score, name in ranked:
        if sizes[name] <= budget:
            chosen[name] = score
            budget -= sizes[name]
    return chosen
