"""Prepare a PyTorch model for quantization-aware training: fold, swap, record.

`prepare` returns a copy of the model (the input is never modified) in which BatchNorm layers are
folded into the convolution before them (`fold`), and every Linear / Conv1d / Conv2d / Conv3d /
Embedding is replaced by its fake-quantized twin from `modules`, with an activation quantizer on
its input when the recipe quantizes activations. `QuantAdd` modules already in the model get
quantizers for both operands. Recipes with weights under 4 bits keep the first and last layers
and depthwise convolutions at int8 weights by default (see `mixed`). Then `points` moves
activation quantization to layer outputs (after a fused ReLU/ReLU6), the form ONNX Runtime runs
as int8 kernels. Everything lowbit cannot quantize stays float and is listed in
`prepared.lowbit.float_modules` (and in a warning), never skipped silently.

The copy is an ordinary nn.Module: train it with your own optimizer and loop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from lowbit.errors import LowbitError, SpecError
from lowbit.spec import Granularity, Recipe, get_recipe
from lowbit.torch.fold import fold_batchnorm
from lowbit.torch.mixed import describe_int8_layers, int8_cost_bytes, int8_layers, int8_weights
from lowbit.torch.modules import FLOAT_TO_QUANTIZED, QuantAdd, QuantizedLayer
from lowbit.torch.quantizers import ActivationQuantizer
from lowbit.torch.points import place_output_quantizers
from lowbit.torch.residual import insert_quant_adds

_PRESERVED_ATTRIBUTES = "_user_preserved_attributes"  # torch.fx.graph_module's key (torch >= 2.1)


class FloatModuleWarning(UserWarning):
    """Some modules of the model stay float (each is listed with its reason)."""


class Int8LayersWarning(UserWarning):
    """A sub-4-bit recipe keeps some layers at int8 weights (each is listed with its reason)."""


@dataclass
class QATState:
    """What `prepare` did, kept on the prepared model as `model.lowbit`."""

    recipe: Recipe
    learnable_scales: bool
    # Shapes and dtypes of the example inputs; dimension 0 (the batch) may differ later.
    input_signature: list[tuple[tuple[int, ...], str]]
    quantized: list[str] = field(default_factory=list)
    float_modules: dict[str, str] = field(default_factory=dict)
    # Layers with int8 weights instead of the recipe's (see `mixed`): name -> reason
    int8_layers: dict[str, str] = field(default_factory=dict)
    int8_cost_bytes: int = 0  # what they add to the packed weights
    folded_batchnorms: int = 0
    residual_adds: int = 0  # functional adds routed through QuantAdd (see `residual`)
    output_quantizers: int = 0  # layer / add outputs quantized (see `points`)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"recipe {self.recipe.name}: {len(self.quantized)} layers quantized, "
                 f"{self.folded_batchnorms} BatchNorm folded, {self.output_quantizers} outputs quantized, "
                 f"{len(self.float_modules)} modules kept float, {len(self.int8_layers)} kept at int8 weights"]
        lines += [f"  int8: {name} ({reason})" for name, reason in self.int8_layers.items()]
        lines += [f"  float: {name} ({reason})" for name, reason in self.float_modules.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def resolve_recipe(recipe: str | Recipe, per_channel: bool = True) -> Recipe:
    """A Recipe from a preset name, a JSON text or a Recipe; checks QAT can run it.
    `per_channel=False` turns the recipe's per-channel weights into one scale per weight tensor."""
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if not isinstance(recipe, Recipe):
        raise SpecError(f"recipe must be a preset name, a JSON recipe or a Recipe, not {type(recipe).__name__}")
    if not per_channel:
        recipe = per_tensor_weights(recipe)
    weights, acts = recipe.weights, recipe.activations
    if weights is None or weights.dtype_info.is_float or weights.dynamic:
        raise SpecError(f"recipe {recipe.name!r} has no integer, binary or ternary weights; QAT in lowbit "
                        "trains integer grids, use e.g. w8a8, w4a8, w4a16, w2a8 or w1a8")
    if acts is not None and (acts.dtype_info.is_float or acts.dynamic or acts.granularity.kind != "tensor"
                             or acts.bits > 8 or not acts.dtype_info.kind == "int"):
        raise SpecError(f"recipe {recipe.name!r} quantizes activations as {acts.describe()}; QAT supports "
                        "static per-tensor int8/uint8 activations or float ones (e.g. w8a8 or w4a16)")
    if weights.bits > 8:
        raise SpecError(f"{weights.dtype} weights are wider than 8 bits; use int8 or narrower for QAT")
    return recipe


def per_tensor_weights(recipe: Recipe) -> Recipe:
    """`recipe` with one weight scale per tensor instead of per output channel (named NAME-per-tensor).

    Mobile files store no per-channel scale vectors then (nor, on ExecuTorch and LiteRT, a float
    bias scale per channel): on small nets that is what keeps a file >= 3.5x smaller than float."""
    weights = recipe.weights
    if weights is None or weights.granularity.kind == "tensor":
        return recipe
    if weights.granularity.kind != "channel":
        raise SpecError(f"per_channel=False applies to per-channel weights, but recipe {recipe.name!r} has "
                        f"{weights.granularity.describe()} weights; use a per-channel recipe such as w8a8 or w4a8")
    return replace(recipe, name=f"{recipe.name}-per-tensor", weights=replace(weights, granularity=Granularity()),
                   description=f"{recipe.description}; one weight scale per tensor".lstrip("; "))


def as_input_tuple(inputs: Any, what: str = "example inputs") -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise LowbitError(f"{what} must be a tensor or a tuple of tensors, got {type(inputs).__name__}; "
                      "pass e.g. torch.randn(1, 3, 32, 32)")


def signature(inputs: tuple[torch.Tensor, ...]) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in inputs]


def check_inputs(state: QATState, inputs: tuple[torch.Tensor, ...], what: str) -> None:
    """`inputs` must match the example inputs in count, dtype and every non-batch dimension."""
    expected = state.input_signature
    if len(inputs) != len(expected):
        raise LowbitError(f"{what} has {len(inputs)} tensors but the model was prepared with "
                          f"{len(expected)} example inputs; pass inputs shaped like the example inputs")
    for i, (tensor, (shape, dtype)) in enumerate(zip(inputs, expected)):
        got = tuple(tensor.shape)
        if len(got) != len(shape) or got[1:] != shape[1:] or str(tensor.dtype).replace("torch.", "") != dtype:
            raise LowbitError(
                f"{what} input {i} has shape {list(got)} and dtype {str(tensor.dtype).replace('torch.', '')}, "
                f"but the example input was [batch, {', '.join(map(str, shape[1:]))}] {dtype}; "
                "pass inputs shaped like the example inputs (only the batch size may differ)")


def state_of(model: nn.Module) -> QATState:
    state = getattr(model, "lowbit", None)
    if not isinstance(state, QATState):
        raise LowbitError("this model was not prepared by lowbit; call lowbit.torch.qat(model, recipe, "
                          "example_inputs) first")
    return state


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def prepare(model: nn.Module, recipe: str | Recipe, example_inputs: Any, *,
            learnable_scales: bool = False, exclude: tuple[str, ...] | list[str] = (),
            strict: bool = False, quantize_adds: bool = True, quantize_outputs: bool = True,
            keep_int8: str | list[str] | tuple[str, ...] = "auto", per_channel: bool = True) -> nn.Module:
    """A fake-quantized copy of `model`, ready for `calibrate` and training.

    - recipe: a preset name (w8a8, w4a8, w4a16, w2a8, w1a8, ...), a JSON recipe, or a Recipe;
    - example_inputs: a tensor or tuple of tensors the model accepts (checked by running it);
    - learnable_scales: train weight and activation step sizes (LSQ) with the weights;
    - exclude: module names to keep float (listed like any other float module);
    - strict: raise instead of warning when some module with weights stays float;
    - quantize_adds: route `a + b` of two tensors in the forward through QuantAdd (torch.fx; the
      returned model is then a GraphModule). Only with quantized activations.
    - quantize_outputs: quantize Conv outputs (and Linear/add outputs read by quantized layers)
      after their ReLU/ReLU6, with consumers sharing that grid (see `points`); off, only layer
      inputs are quantized, which ONNX Runtime runs partly in float. Needs torch.fx tracing.
    - keep_int8: layers that get int8 weights instead of the recipe's. "auto": for weights under
      4 bits (w2a8, w1a8, ternary...), the first and last layers and depthwise convolutions, which
      such weights break (see `mixed`; listed in `prepared.lowbit.int8_layers`, their packed cost in
      an Int8LayersWarning); "none": every layer at the recipe's width; or a list of module names
      (e.g. from `lowbit.torch.mixed.sensitive_layers`).
    - per_channel: False trains one weight scale per tensor instead of one per output channel
      (as `lowbit quantize --per-tensor`; layers kept at int8 follow). Mobile files then carry no
      per-channel scale vectors: the smallest .ort/.pte/.tflite (see docs/deploy.md).

    The copy is returned in eval mode with BatchNorm folded; call .train() for QAT."""
    recipe = resolve_recipe(recipe, per_channel)
    inputs = as_input_tuple(example_inputs)
    if not isinstance(model, nn.Module):
        raise LowbitError(f"prepare needs a torch.nn.Module, got {type(model).__name__}")
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    prepared = fold_batchnorm(model)  # an eval-mode deep copy
    folded = batchnorms - sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    _run_example(prepared, inputs)
    unknown = sorted(set(exclude) - {name for name, _ in prepared.named_modules()})
    if unknown:
        raise LowbitError(f"exclude names {unknown} are not modules of this model; use names from "
                          "model.named_modules()")
    state = QATState(recipe, learnable_scales, signature(inputs), folded_batchnorms=folded)
    state.int8_layers = int8_layers(recipe, keep_int8, prepared, inputs, tuple(FLOAT_TO_QUANTIZED), set(exclude))
    if quantize_adds and recipe.activations is not None:
        prepared, state.residual_adds, note = insert_quant_adds(prepared, inputs)
        state.notes += [note] if note else []
    _swap(prepared, "", recipe, learnable_scales, set(exclude), state)
    if state.int8_layers:
        from lowbit.torch.export import model_nbytes  # export imports this module

        state.int8_cost_bytes = int8_cost_bytes(prepared, state.int8_layers, recipe)
        warnings.warn(describe_int8_layers(state.int8_layers, recipe, state.int8_cost_bytes,
                                           model_nbytes(prepared)[0]), Int8LayersWarning, stacklevel=2)
    if quantize_outputs and recipe.activations is not None:
        prepared, state.output_quantizers, note = place_output_quantizers(prepared, recipe.activations,
                                                                          learnable_scales)
        state.notes += [note] if note else []
    if state.float_modules:
        message = ("these modules stay float (lowbit cannot quantize them, or they were excluded): "
                   + "; ".join(f"{n} ({r})" for n, r in state.float_modules.items()))
        if strict:
            raise LowbitError(message + "; pass strict=False to keep them float, or exclude them explicitly")
        warnings.warn(message, FloatModuleWarning, stacklevel=2)
    prepared.lowbit = state
    if isinstance(prepared, fx.GraphModule):
        # GraphModule's deepcopy rebuilds the module and keeps only the attributes its meta lists.
        prepared.meta.setdefault(_PRESERVED_ATTRIBUTES, {})["lowbit"] = state
    return prepared


def _run_example(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # any failure here means the inputs do not fit the model
        shapes = ", ".join(str(list(t.shape)) for t in inputs)
        raise LowbitError(f"the model cannot run on the example inputs of shape {shapes} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); pass example inputs "
                          "shaped like real model inputs") from None


def _swap(parent: nn.Module, prefix: str, recipe: Recipe, learnable: bool, exclude: set[str],
          state: QATState) -> None:
    for child_name, child in list(parent.named_children()):
        name = f"{prefix}{child_name}"
        if name in exclude:
            state.float_modules[name] = "excluded by the caller"
            continue
        quantized_type = FLOAT_TO_QUANTIZED.get(type(child))  # exact types: subclasses may differ
        if quantized_type is not None:
            # Embedding inputs are token ids: only its table is quantized.
            quantize_input = recipe.activations is not None and not isinstance(child, nn.Embedding)
            act = ActivationQuantizer(f"{name}.input", recipe.activations, learnable) if quantize_input else None
            weights = int8_weights(recipe) if name in state.int8_layers else recipe.weights
            setattr(parent, child_name, quantized_type.from_float(child, weights, act, learnable))
            state.quantized.append(name)
            continue
        if isinstance(child, QuantAdd):
            if recipe.activations is not None:
                child.lhs_quantizer = ActivationQuantizer(f"{name}.lhs", recipe.activations, learnable)
                child.rhs_quantizer = ActivationQuantizer(f"{name}.rhs", recipe.activations, learnable)
                state.quantized.append(name)
            continue
        own_parameters = list(child.parameters(recurse=False))
        if own_parameters or isinstance(child, nn.modules.batchnorm._BatchNorm):
            # The module uses its weights (and maybe its children's) directly: quantizing the
            # children would change nothing it computes, so all of it stays float.
            state.float_modules[name] = _float_reason(child)
            for sub_name, sub in child.named_modules():
                if sub_name and any(True for _ in sub.parameters(recurse=False)):
                    state.float_modules[f"{name}.{sub_name}"] = f"inside {type(child).__name__} {name}"
            continue
        # Weightless modules (activations, pooling, containers) pass quantized values on.
        _swap(child, f"{name}.", recipe, learnable, exclude, state)


def _float_reason(module: nn.Module) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return ("BatchNorm that does not directly follow a Conv/Linear (in an nn.Sequential or, for "
                "models torch.fx can trace, in the forward), so it cannot be folded; it runs in float")
    return f"{type(module).__name__} has no quantized implementation in lowbit; it runs in float"
