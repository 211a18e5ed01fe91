"""Autograd functions that compute in PyTorch exactly what they export to ONNX.

Each has a `symbolic` method, so the TorchScript exporter writes QuantizeLinear /
DequantizeLinear nodes fed by the tensors given here (stored integers, scales, zero points)
instead of tracing the float arithmetic. The forward pass uses `lowbit.numerics`, so the traced
model and the exported one are the same computation by construction.
"""

from __future__ import annotations

import torch

from lowbit.numerics import QParams, dequantize, fake_quantize
from lowbit.spec import QuantSpec


class QuantizeDequantize(torch.autograd.Function):
    """An activation through QuantizeLinear -> DequantizeLinear (per-tensor)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec: QuantSpec):  # noqa: D102
        return fake_quantize(x, QParams(spec, scale, zero_point.to(torch.int32)))

    @staticmethod
    def symbolic(g, x, scale, zero_point, spec):  # noqa: D102
        quantized = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", quantized, scale, zero_point)


class DequantizeConstant(torch.autograd.Function):
    """Stored integers -> float through DequantizeLinear.

    `axis` is the per-channel axis (None for one scale); `block_size` turns on ONNX blocked
    quantization along `axis` (opset 21); `shape`, if not None, reshapes the result (grouped conv
    weights are stored as a matrix, the layout the groups are defined on). `spec` None means an
    int32 bias with zero point 0, a type QuantSpec does not describe."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, spec: QuantSpec, axis, block_size, shape):  # noqa: D102
        if spec is None:
            return q.to(torch.float32) * scale
        values = dequantize(q, QParams(spec, scale, zero_point.to(torch.int32)))
        return values if shape is None else values.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, spec, axis, block_size, shape):  # noqa: D102
        attributes = {}
        if axis is not None:
            attributes["axis_i"] = axis
        if block_size is not None:
            attributes["block_size_i"] = block_size
        values = g.op("DequantizeLinear", q, scale, zero_point, **attributes)
        if shape is not None:
            target = g.op("Constant", value_t=torch.tensor(list(shape), dtype=torch.int64))
            values = g.op("Reshape", values, target)
        return values
