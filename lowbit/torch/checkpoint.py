"""A packed safetensors checkpoint of a prepared model: sub-byte weights really packed.

For every quantized layer (each at its own bit width: a sub-4-bit recipe keeps some layers at
int8, see `mixed`, and the file lists them under "int8_layers") the file holds `<layer>.weight.packed` (the integers packed to the
weight's bit width with `numerics.pack`, as uint8), `<layer>.weight.scale` (float32) and, for
grids whose zero point is not fixed at 0, `<layer>.weight.zero_point` (packed the same way), plus
the pruning mask packed to 1 bit when the layer is pruned. Activation scales and zero points,
biases and the parameters of float modules are stored as they are. The float "latent" weights
are not stored: the file is the deployable model, and its size follows the bit width.

`load_packed(path, model)` takes a fresh instance of the float architecture, prepares it with the
recipe stored in the file and loads the values, with weight scales fixed to the stored ones, so
the loaded model computes exactly what the saved one did.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import QParams, dequantize, pack, quantize, unpack
from lowbit.spec import Recipe
from lowbit.torch.modules import check_switches_on
from lowbit.torch.qat import Int8LayersWarning, activation_quantizers, prepare, quantized_layers, state_of
from lowbit.torch.quantizers import ActivationQuantizer, WeightQuantizer

FORMAT = "lowbit.packed.v1"


def _safetensors():
    try:
        from safetensors.numpy import load_file, save_file
    except ImportError:
        raise LowbitError("packed checkpoints need the safetensors package; pip install safetensors") from None
    return load_file, save_file


def _stores_zero_point(qp: QParams) -> bool:
    return not (qp.spec.symmetric and qp.spec.dtype_info.signed)


@torch.no_grad()
def save_packed(model: nn.Module, path: str | Path) -> Path:
    """Write a prepared model as a packed safetensors checkpoint (atomically); returns the path."""
    check_switches_on(model, "saving a packed checkpoint")
    state = state_of(model)
    _, save_file = _safetensors()
    tensors: dict[str, np.ndarray] = {}
    layers_meta: dict[str, Any] = {}
    handled: set[str] = set()
    for name, layer in quantized_layers(model).items():
        _, qp = layer.quantized_weight()
        matrix = WeightQuantizer.matrix(layer.effective_weight())
        values = quantize(matrix, qp)
        bits, signed = qp.spec.bits, qp.spec.dtype_info.signed
        tensors[f"{name}.weight.packed"] = pack(values, bits, signed)
        tensors[f"{name}.weight.scale"] = torch.as_tensor(qp.scale).detach().numpy().astype(np.float32)
        if _stores_zero_point(qp):
            tensors[f"{name}.weight.zero_point"] = pack(torch.as_tensor(qp.zero_point), bits, signed)
        if layer.weight_mask is not None:
            tensors[f"{name}.weight_mask.packed"] = pack(layer.weight_mask.to(torch.int64), 1, signed=False)
        layers_meta[name] = {"shape": list(layer.weight.shape), "bits": bits, "signed": signed,
                             "scale_shape": list(np.shape(tensors[f"{name}.weight.scale"])),
                             "pruned": layer.weight_mask is not None}
        handled.update({f"{name}.weight", f"{name}.weight_mask"})
        handled.update(f"{name}.weight_quantizer.{k}" for k in ("scale", "zero_point"))
    for key, value in model.state_dict().items():
        if key not in handled:
            tensors[key] = value.detach().cpu().numpy().copy()
    metadata = {"format": FORMAT, "recipe": state.recipe.to_json(),
                "learnable_scales": json.dumps(state.learnable_scales),
                "input_signature": json.dumps(state.input_signature), "layers": json.dumps(layers_meta),
                "int8_layers": json.dumps(list(state.int8_layers))}
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path


@torch.no_grad()
def load_packed(path: str | Path, model: nn.Module) -> nn.Module:
    """A prepared model rebuilt from `model` (a float instance of the saved architecture) and the
    packed checkpoint at `path`. `model` itself is not modified."""
    load_file, _ = _safetensors()
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"checkpoint {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise LowbitError(f"{path} is not a readable safetensors file ({str(exc)[:150]}); save it again "
                          "with lowbit.torch.save_packed") from None
    if metadata.get("format") != FORMAT:
        raise LowbitError(f"{path} is not a lowbit packed checkpoint (format {metadata.get('format')!r}); "
                          "save it with lowbit.torch.save_packed")
    recipe = Recipe.from_json(metadata["recipe"])
    examples = tuple(torch.zeros(shape, dtype=getattr(torch, dtype))
                     for shape, dtype in json.loads(metadata["input_signature"]))
    # Checkpoints from before mixed precision (no "int8_layers") have every layer at the recipe's width.
    keep_int8 = json.loads(metadata.get("int8_layers", "[]")) or "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Int8LayersWarning)  # reported when the model was prepared
        prepared = prepare(model, recipe, examples, learnable_scales=json.loads(metadata["learnable_scales"]),
                           keep_int8=keep_int8)
    layers_meta = json.loads(metadata["layers"])
    layers = quantized_layers(prepared)
    if set(layers) != set(layers_meta):
        raise LowbitError(f"{path} holds quantized layers {sorted(layers_meta)} but the model has "
                          f"{sorted(layers)}; pass an instance of the saved architecture")
    for name, layer in layers.items():
        _load_layer(layer, name, layers_meta[name], tensors)
    rest = {k: torch.from_numpy(v.copy()) for k, v in tensors.items() if not k.startswith(tuple(f"{n}.weight." for n in layers))
            and not k.endswith(".weight_mask.packed")}
    missing, unexpected = prepared.load_state_dict(rest, strict=False)
    expected_missing = {f"{n}.{k}" for n in layers
                        for k in ("weight", "weight_mask", "weight_quantizer.scale", "weight_quantizer.zero_point")}
    if set(missing) - expected_missing or unexpected:
        raise LowbitError(f"{path} does not match this model (missing {sorted(set(missing) - expected_missing)[:3]}, "
                          f"unexpected {list(unexpected)[:3]}); pass an instance of the saved architecture")
    for quantizer in activation_quantizers(prepared).values():
        _check_calibrated(quantizer)
    return prepared


def _load_layer(layer, name: str, meta: dict, tensors: dict[str, np.ndarray]) -> None:
    shape = tuple(meta["shape"])
    if tuple(layer.weight.shape) != shape:
        raise LowbitError(f"layer {name} has weight shape {list(layer.weight.shape)} but the checkpoint has "
                          f"{list(shape)}; pass an instance of the saved architecture")
    bits, signed = meta["bits"], meta["signed"]
    spec = layer.weight_quantizer.spec
    rows, count = shape[0], int(np.prod(shape))
    values = unpack(tensors[f"{name}.weight.packed"], bits, count, signed,
                    binary=spec.dtype_info.kind == "binary").reshape(rows, -1)
    scale = tensors[f"{name}.weight.scale"]
    if f"{name}.weight.zero_point" in tensors:
        zero_point = unpack(tensors[f"{name}.weight.zero_point"], bits, scale.size, signed).reshape(scale.shape)
    else:
        zero_point = np.zeros(scale.shape, np.int32)
    qp = QParams(spec, scale, zero_point.astype(np.int32))
    weight = dequantize(values, qp).reshape(shape)
    layer.weight.copy_(torch.from_numpy(weight))
    layer.weight_quantizer.fix(torch.from_numpy(scale), torch.from_numpy(zero_point.astype(np.int32)))
    if meta.get("pruned"):
        mask = unpack(tensors[f"{name}.weight_mask.packed"], 1, count, signed=False).reshape(shape)
        layer.weight_mask = torch.from_numpy(mask.astype(np.float32))


def _check_calibrated(quantizer: ActivationQuantizer) -> None:
    if not bool(quantizer.calibrated):
        raise LowbitError(f"the checkpoint has no range for activation {quantizer.name!r}; calibrate the model "
                          "before saving it")
