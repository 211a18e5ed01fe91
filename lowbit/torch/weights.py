"""Weight-only quantization of a module's Conv and Linear layers, through lowbit.numerics.

Each weight is seen as a matrix [out_channels, in_channels * kernel]: rows are output channels
(axis 0, the per-channel axis) and groups run along the input features (axis 1), the layout of
ONNX blocked quantization and of int4 GPU kernels. The quantized model holds the dequantized
weights, so it runs wherever the float model runs; the byte count is what the packed integers,
scales and zero points occupy in storage. Biases and every other parameter stay as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.numerics import QParams, dequantize, pack, packed_nbytes, qparams_for, quantize, storage_dtype
from lowbit.spec import QuantSpec

QUANTIZABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SCALE_BYTES = 4  # scales are stored as float32


def matrix_spec(spec: QuantSpec) -> QuantSpec:
    """The spec with its axis resolved for the weight-matrix view: channels along axis 0,
    groups along axis 1 (input features). Explicit axes are kept."""
    return spec.with_axis(1 if spec.granularity.kind == "group" else 0)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> tuple[torch.Tensor, int]:
    """Quantize one Conv/Linear weight (output channels first) under `spec`.

    Returns the dequantized weight (same shape and dtype as `weight`) and its storage size in
    bytes: the values packed to `spec.bits` bits, plus float32 scales, plus zero points when
    they are not all zero by construction."""
    matrix = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    spec = matrix_spec(spec)
    qparams = qparams_for(matrix, spec, name)
    values = quantize(matrix, qparams)
    restored = dequantize(values, qparams).reshape(weight.shape).to(weight.dtype)
    return restored, stored_nbytes(values, qparams)


def stored_nbytes(values: torch.Tensor, qparams: QParams) -> int:
    """Bytes to store quantized `values` with their scales and zero points."""
    spec = qparams.spec
    dtype = spec.dtype_info
    n_scales = int(torch.as_tensor(qparams.scale).numel())
    if dtype.is_float:
        # fp16/bf16 use no scale (it is always 1); fp8 stores one per scale group.
        return packed_nbytes(values.numel(), dtype.bits) + (SCALE_BYTES * n_scales if dtype.saturates else 0)
    signed = dtype.signed
    if dtype.bits <= 8:
        value_bytes = pack(values, dtype.bits, signed).nbytes  # really packed, sub-byte included
    else:
        value_bytes = values.numel() * storage_dtype(spec).itemsize
    # Signed symmetric grids (and binary/ternary) have zero points fixed at 0: nothing to store.
    zero_point_bytes = 0
    if not (spec.symmetric and signed):
        zero_point_bytes = (pack(torch.as_tensor(qparams.zero_point), dtype.bits, signed).nbytes
                            if dtype.bits <= 8 else n_scales * storage_dtype(spec).itemsize)
    return value_bytes + SCALE_BYTES * n_scales + zero_point_bytes


def float_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters as they are stored now (4 per value for a float32 model)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quantize_module_weights(model: nn.Module, spec: QuantSpec) -> tuple[nn.Module, int]:
    """A copy of `model` whose Conv and Linear weights are quantized under `spec` (stored
    dequantized), and the bytes the whole model needs with those weights packed and every
    other parameter (biases, norms) kept as it is. The input model is not modified."""
    quantized = copy.deepcopy(model)
    done: set[int] = set()  # tied weights are quantized and counted once
    total = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, QUANTIZABLE_LAYERS) or id(module.weight) in done:
            continue
        restored, nbytes = quantize_weight(module.weight, spec, f"{name}.weight")
        with torch.no_grad():
            module.weight.copy_(restored)
        done.add(id(module.weight))
        total += nbytes
    total += sum(p.numel() * p.element_size() for p in quantized.parameters() if id(p) not in done)
    return quantized, total
