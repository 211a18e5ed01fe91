"""Rebuild a `QDQGraph` as a PyTorch module whose quantize/dequantize ops carry lowbit's grids.

The module runs the graph's ops with torch functions; `torch.export` traces it into the flat
graph ExecuTorch and LiteRT lower. Activation points become
`quantized_decomposed.quantize_per_tensor` -> `dequantize_per_tensor` with lowbit's scale and
zero point, the pattern both runtimes' converters turn into integer kernels. Weights take one of
three forms (`WeightForm`):

- "int":   integer buffer -> dequantize (ExecuTorch's XNNPACK delegate packs the int8 buffer; in a
           weight-only model the linear layers' inputs are quantized per row at run time, the
           pattern of XNNPACK's dynamic-quantization kernels, the only ones with 4-bit weights);
- "float": dequantized float buffer -> quantize -> dequantize (litert-torch rejects integer
           buffers and re-derives the same integers from the float values and lowbit's grid);
- "plain": dequantized float weights, no quantize/dequantize anywhere: the target's float export
           of the same network, the reference for size and latency.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.deploy.qdq_graph import (PACKED_OP, Grid, Op, QDQGraph, QuantizedWeight, matmulnbits_dequantized,
                                     matmulnbits_weight)

WeightForm = Literal["int", "float", "plain"]

# Registers torch.ops.quantized_decomposed.* (the q/dq ops of the PT2E flow).
import torch.ao.quantization.fx._decomposed  # noqa: E402,F401

_QD = torch.ops.quantized_decomposed


class QDQModule(nn.Module):
    def __init__(self, graph: QDQGraph, weight_form: WeightForm) -> None:
        super().__init__()
        self.graph = graph
        self.weight_form = weight_form
        self.buffer_of: dict[str, str] = {}  # ONNX tensor name -> name of the buffer holding it
        # Layers whose float output is a graph output have no output grid to requantize to, so no
        # integer kernel: their weights go in as the (exact) dequantized floats and run float. In
        # integer form a linear layer's weight stays an int8 buffer dequantized in the program (the
        # same float values, a quarter of the bytes; ExecuTorch runs that layer in float).
        output_layers = [op for op in graph.ops if set(op.outputs) & set(graph.outputs)]
        self.float_weights = {name for op in output_layers for name in op.inputs if name in graph.weights
                              and not (weight_form == "int" and op.op_type in ("Gemm", "MatMul"))
                              } if graph.precision == "static" else set()
        # Weight-only models in integer form: activations into linear layers are quantized per row
        # at run time (XNNPACK's dynamic-quantization kernels: int8 activations, int8/int4 weights).
        self.dynamic_activations = weight_form == "int" and graph.precision == "weight-only"
        self.weights = dict(graph.weights)  # quantized weights by tensor name, MatMulNBits' included
        unpacked: dict[str, np.ndarray] = {}  # MatMulNBits weights going in as floats
        for op in graph.packed_ops:
            weight = matmulnbits_weight(op, graph.constants) if weight_form == "int" else None
            if weight is None:
                unpacked[op.inputs[1]] = matmulnbits_dequantized(op, graph.constants)
            else:
                self.weights[op.inputs[1]] = weight
        names = [n for op in graph.ops for n in op.inputs if n]
        for index, name in enumerate(dict.fromkeys(names)):
            if name in unpacked:
                value = torch.from_numpy(unpacked[name])
            elif name in self.weights:
                form = "plain" if name in self.float_weights else weight_form
                value = _weight_tensor(self.weights[name], form, transpose=self._is_matmul_weight(name))
            elif name in graph.constants:
                value = torch.from_numpy(np.ascontiguousarray(graph.constants[name]))
            else:
                continue
            buffer = f"c{index}"
            self.register_buffer(buffer, value)
            self.buffer_of[name] = buffer
            if (weight_form != "plain" and name in self.weights and name not in self.float_weights
                    and self.weights[name].grid.axis is not None):
                # Per-channel grids as buffers: converters read them as named constants of the program.
                # Not in the float export: torch.export keeps unused buffers as program constants.
                scale, zero_point = _channel_params(self.weights[name].grid)
                self.register_buffer(f"{buffer}_scale", scale)
                self.register_buffer(f"{buffer}_zero_point", zero_point)

    def _is_matmul_weight(self, name: str) -> bool:
        return any(op.op_type == "MatMul" and op.inputs[1] == name for op in self.graph.ops)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: dict[str, torch.Tensor] = dict(zip(self.graph.inputs, inputs))
        # Quantized activations are kept as integers and dequantized once per consumer, the
        # layout the PT2E converters expect (a dq shared by two consumers makes XNNPACK's
        # partitioner see a dependency cycle around residual Adds).
        quantized: dict[str, tuple[torch.Tensor, Grid]] = {}

        def value(name: str) -> torch.Tensor:
            if name in quantized:
                q, grid = quantized[name]
                return _dequantize(q, grid, None)
            if name in env:
                return env[name]
            tensor = getattr(self, self.buffer_of[name])
            if name in self.weights and name not in self.float_weights:
                tensor = self._weight(self.buffer_of[name], self.weights[name], self._is_matmul_weight(name))
            return tensor

        for op in self.graph.ops:
            if op.op_type == "FakeQuant":
                x = value(op.inputs[0])
                if self.weight_form == "plain":
                    env[op.outputs[0]] = x
                else:
                    quantized[op.outputs[0]] = (_quantize(x, op.grid, None), op.grid)
            elif op.op_type == PACKED_OP:
                inputs = self._inputs_of(op, value)
                bias = inputs(op.inputs[5]) if len(op.inputs) > 5 and op.inputs[5] else None
                env[op.outputs[0]] = F.linear(inputs(op.inputs[0]), inputs(op.inputs[1]), bias)
            else:
                env[op.outputs[0]] = run_op(op, self._inputs_of(op, value), self.graph)
        return tuple(value(name) for name in self.graph.outputs)

    def _inputs_of(self, op: Op, value):
        """The input lookup for `op`: in a weight-only model in integer form, a linear layer's
        activation input is quantized per row first."""
        linear = op.op_type in ("Gemm", "MatMul", PACKED_OP) and op.inputs[1] in self.weights
        if not (self.dynamic_activations and linear):
            return value
        return lambda name: _dynamic_quantize(value(name)) if name == op.inputs[0] else value(name)

    def _weight(self, buffer: str, weight: QuantizedWeight, transpose: bool) -> torch.Tensor:
        tensor = getattr(self, buffer)
        if self.weight_form == "plain":
            return tensor
        grid = weight.grid
        if grid.axis is None:
            params = None
        else:
            params = (getattr(self, f"{buffer}_scale"), getattr(self, f"{buffer}_zero_point"),
                      1 - grid.axis if transpose else grid.axis)
        if self.weight_form == "float":
            tensor = _quantize(tensor, grid, params)
        return _dequantize(tensor, grid, params)


def _weight_tensor(weight: QuantizedWeight, form: WeightForm, transpose: bool) -> torch.Tensor:
    values = weight.values if form == "int" else weight.dequantized()
    tensor = torch.from_numpy(np.ascontiguousarray(values.T if transpose else values))
    return tensor.to(torch.int8) if form == "int" else tensor


ChannelParams = tuple[torch.Tensor, torch.Tensor, int]  # scale, zero point, axis


def _quantize(x: torch.Tensor, grid: Grid, channel: ChannelParams | None) -> torch.Tensor:
    if channel is None:
        return _QD.quantize_per_tensor.default(x, float(grid.scale), int(grid.zero_point), grid.qmin, grid.qmax,
                                               torch.int8)
    return _QD.quantize_per_channel.default(x, *channel, grid.qmin, grid.qmax, torch.int8)


def _dequantize(q: torch.Tensor, grid: Grid, channel: ChannelParams | None) -> torch.Tensor:
    if channel is None:
        return _QD.dequantize_per_tensor.default(q, float(grid.scale), int(grid.zero_point), grid.qmin, grid.qmax,
                                                 torch.int8)
    return _QD.dequantize_per_channel.default(q, *channel, grid.qmin, grid.qmax, torch.int8)


def _dynamic_quantize(x: torch.Tensor) -> torch.Tensor:
    """int8 per row (asymmetric), scales chosen at run time: XNNPACK's dynamic-quantization input."""
    scale, zero_point = _QD.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    q = _QD.quantize_per_token.default(x, scale, zero_point, -128, 127, torch.int8)
    return _QD.dequantize_per_token.default(q, scale, zero_point, -128, 127, torch.int8, torch.float32)


def _channel_params(grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(grid.scale.astype(np.float32)),
            torch.from_numpy(grid.zero_point.astype(np.int64)))


def run_op(op: Op, value, graph: QDQGraph) -> torch.Tensor:
    """One ONNX op on torch tensors (the subset in `qdq_graph.SUPPORTED_OPS`)."""
    a, t = op.attrs, op.op_type
    args = [value(name) if name else None for name in op.inputs]
    if t == "Conv":
        return _conv(args[0], args[1], args[2] if len(args) > 2 else None, a, op.name)
    if t == "Gemm":
        x, w = args[0], args[1]
        if a.get("transA", 0):
            x = x.t()
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise _unsupported(op, "alpha or beta other than 1")
        bias = args[2] if len(args) > 2 else None
        if a.get("transB", 0):
            return F.linear(x, w, bias)
        return x @ w + bias if bias is not None else x @ w
    if t == "MatMul":
        if op.inputs[1] in graph.weights:  # stored transposed: a linear layer
            return F.linear(args[0], args[1])
        return torch.matmul(args[0], args[1])
    if t == "Relu":
        return F.relu(args[0])
    if t == "Clip":
        bounds = [float(graph.constants[n]) if n else None for n in op.inputs[1:3]] + [None, None]
        low = bounds[0] if bounds[0] is not None else a.get("min", float("-inf"))
        high = bounds[1] if bounds[1] is not None else a.get("max", float("inf"))
        if low == 0.0 and high == 6.0:
            return F.relu6(args[0])
        return F.hardtanh(args[0], low, high)
    if t == "Add":
        return args[0] + args[1]
    if t == "Mul":
        return args[0] * args[1]
    if t == "Sigmoid":
        return torch.sigmoid(args[0])
    if t == "HardSwish":
        return F.hardswish(args[0])
    if t in ("MaxPool", "AveragePool"):
        return _pool(args[0], a, op)
    if t == "GlobalAveragePool":
        return torch.mean(args[0], dim=tuple(range(2, args[0].dim())), keepdim=True)
    if t == "Flatten":
        axis = a.get("axis", 1)
        return torch.flatten(args[0], axis) if axis > 0 else args[0].reshape(1, -1)
    if t == "Reshape":
        shape = [int(s) for s in graph.constants[op.inputs[1]]]
        shape = [args[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return args[0].reshape(shape)
    if t == "Concat":
        return torch.cat(args, dim=a["axis"])
    if t == "Softmax":
        return torch.softmax(args[0], dim=a.get("axis", -1))
    raise _unsupported(op, "no conversion")


def _conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: dict, name: str) -> torch.Tensor:
    spatial = w.dim() - 2
    pads = list(a.get("pads", [0] * 2 * spatial))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        from lowbit.errors import LowbitError
        raise LowbitError(f"Conv {name} uses auto_pad; re-export the model with explicit pads")
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end:
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in (begin[i], end[i])])
        begin = [0] * spatial
    conv = F.conv2d if spatial == 2 else F.conv1d
    return conv(x, w, bias, stride=a.get("strides", [1] * spatial), padding=begin,
                dilation=a.get("dilations", [1] * spatial), groups=a.get("group", 1))


def _pool(x: torch.Tensor, a: dict, op: Op) -> torch.Tensor:
    kernel = a["kernel_shape"]
    spatial = len(kernel)
    pads = list(a.get("pads", [0] * 2 * spatial))
    if pads[:spatial] != pads[spatial:]:
        raise _unsupported(op, "asymmetric padding")
    strides = a.get("strides", [1] * spatial)
    ceil = bool(a.get("ceil_mode", 0))
    if op.op_type == "MaxPool":
        return F.max_pool2d(x, kernel, strides, pads[:spatial], ceil_mode=ceil)
    return F.avg_pool2d(x, kernel, strides, pads[:spatial], ceil_mode=ceil,
                        count_include_pad=bool(a.get("count_include_pad", 0)))


def _unsupported(op: Op, what: str) -> Exception:
    from lowbit.errors import LowbitError
    return LowbitError(f"{op.op_type} {op.name} has {what}, which export does not convert; re-export it in the "
                       "plain form (ONNX defaults)")


def export_program(graph: QDQGraph, weight_form: WeightForm, example: tuple[torch.Tensor, ...]):
    """torch.export of the rebuilt graph (eval mode, static shapes of `example`)."""
    module = QDQModule(graph, weight_form).eval()
    with torch.no_grad():
        return torch.export.export(module, example, strict=False)
