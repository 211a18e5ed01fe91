"""Read a lowbit QDQ ONNX model into plain data that any target converter can rebuild.

A lowbit model computes in float between QuantizeLinear -> DequantizeLinear pairs: weights are
integer initializers feeding DequantizeLinear, activations pass through Q -> DQ pairs, biases
are int32 initializers with scale input_scale x weight_scale. `read_qdq_graph` turns that into
a `QDQGraph`: the float compute ops in order, each activation Q -> DQ pair as one `FakeQuant`
op carrying lowbit's scale and zero point, each quantized weight as integer values plus its
grid, and everything else (biases, clip bounds, shapes) as float constants. Nothing is
re-quantized: the converters copy these scales and zero points into the target file.

uint8 activation grids (what lowbit writes for ONNX Runtime's fast U8S8 kernels) are read as
the identical int8 grid (zero point - 128), the form mobile runtimes take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import LowbitError

# Compute ops the PyTorch rebuild (`torch_graph`) implements; targets may accept fewer.
SUPPORTED_OPS = ("Conv", "Gemm", "MatMul", "Relu", "Clip", "Add", "Mul", "Sigmoid", "HardSwish", "MaxPool",
                 "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Concat", "Softmax")
_INT4 = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}
# ONNX Runtime's packed weight-only MatMul (lowbit's --mode weight-only output): kept opaque, only
# ONNX Runtime (Mobile) runs it.
PACKED_OP = "MatMulNBits"


@dataclass(frozen=True)
class Grid:
    """A quantization grid: value = (q - zero_point) * scale, q in [qmin, qmax].

    `axis` is None for one scale per tensor, else the channel axis of `scale` / `zero_point`."""

    scale: np.ndarray  # float32, shape () or (channels,)
    zero_point: np.ndarray  # int32, same shape
    qmin: int
    qmax: int
    axis: int | None = None

    @property
    def bits(self) -> int:
        return int(np.ceil(np.log2(self.qmax - self.qmin + 1)))


@dataclass
class QuantizedWeight:
    values: np.ndarray  # integers on `grid`, as int32
    grid: Grid

    def dequantized(self) -> np.ndarray:
        shape = [1] * self.values.ndim
        if self.grid.axis is not None:
            shape[self.grid.axis] = -1
        scale = self.grid.scale.reshape(shape)
        zero_point = self.grid.zero_point.reshape(shape)
        return ((self.values - zero_point) * scale).astype(np.float32)


@dataclass
class Op:
    op_type: str  # an ONNX op type, or "FakeQuant" (an activation Q -> DQ pair)
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    grid: Grid | None = None  # FakeQuant only


@dataclass
class QDQGraph:
    inputs: dict[str, list[int | None]]  # name -> declared shape (None: symbolic)
    outputs: list[str]
    ops: list[Op]
    constants: dict[str, np.ndarray]  # float (or integer shape) constants
    weights: dict[str, QuantizedWeight]

    @property
    def activation_points(self) -> int:
        return sum(op.op_type == "FakeQuant" for op in self.ops)

    @property
    def precision(self) -> str:
        """"static" (quantized weights and activations) or "weight-only"."""
        return "static" if self.activation_points else "weight-only"

    @property
    def weight_bits(self) -> int:
        packed = [op.attrs.get("bits", 4) for op in self.ops if op.op_type == PACKED_OP]
        return max([w.grid.bits for w in self.weights.values()] + packed)

    @property
    def packed_ops(self) -> list[Op]:
        return [op for op in self.ops if op.op_type == PACKED_OP]

    def compute_ops(self) -> list[Op]:
        return [op for op in self.ops if op.op_type != "FakeQuant"]


def read_qdq_graph(model: onnx.ModelProto, source: str = "the model") -> QDQGraph:
    """The plain-data form of a lowbit QDQ model; refuses float models and foreign layouts."""
    raw = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    raw_types = {init.name: init.data_type for init in model.graph.initializer}
    alias: dict[str, str] = {}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            raw[node.output[0]] = numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
        elif node.op_type == "Identity" or (node.op_type == "Cast" and _casts_to_float(node)):
            # lowbit's QAT export casts float activations to float around residual Adds: no-ops
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
        else:
            nodes.append(node)

    def resolve(name: str) -> str:
        return alias.get(name, name)

    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", PACKED_OP) for n in nodes):
        raise LowbitError(f"{source} is a float model (no QuantizeLinear/DequantizeLinear nodes); quantize it "
                          "first with `lowbit quantize` (or export a QAT model) and export the quantized file")

    constants: dict[str, np.ndarray] = {}
    weights: dict[str, QuantizedWeight] = {}
    dq_of_q: dict[str, onnx.NodeProto] = {}  # Q output -> its DQ consumer
    for node in nodes:
        if node.op_type == "DequantizeLinear" and resolve(node.input[0]) not in raw:
            dq_of_q[resolve(node.input[0])] = node

    def grid_of(node: onnx.NodeProto, stored_type: int | None) -> Grid:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale = raw[resolve(node.input[1])].astype(np.float32)
        zp_name = resolve(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        zero_point = raw[zp_name] if zp_name else np.zeros_like(scale, dtype=np.int32)
        zp_type = raw_types.get(zp_name, stored_type) if zp_name else stored_type
        qmin, qmax = _range_of(zp_type)
        axis = None
        if scale.ndim:
            axis = attrs.get("axis", 1)
        if attrs.get("block_size"):
            # One block spanning the whole axis (lowbit's per-channel weights in --weight-format dq)
            # is a per-channel grid along the other axis of a 2-D weight; smaller blocks are not.
            if scale.ndim != 2 or scale.shape[axis] != 1:
                raise LowbitError(f"{source} has per-group (blocked) weights at {node.name or node.output[0]}; "
                                  "mobile runtimes take per-channel or per-tensor int8/int4 grids, so quantize "
                                  "with per-channel weights (--group-size 0) for this target")
            axis = 1 - axis % 2
            scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
        return Grid(scale, zero_point.astype(np.int32), qmin, qmax, axis)

    ops: list[Op] = []
    consumed_q: set[str] = set()
    for node in nodes:
        name = node.name or node.output[0]
        if node.op_type == "DequantizeLinear":
            source_name = resolve(node.input[0])
            if source_name in raw:  # a stored weight or bias
                values = raw[source_name]
                grid = grid_of(node, raw_types.get(source_name))
                if values.dtype == np.int32:  # bias: int32 with scale input_scale x weight_scale
                    constants[node.output[0]] = QuantizedWeight(values.astype(np.int32), grid).dequantized()
                else:
                    if grid.axis is not None and grid.axis < 0:
                        grid = Grid(grid.scale, grid.zero_point, grid.qmin, grid.qmax, grid.axis + values.ndim)
                    values = values.astype(np.int32)
                    if (grid.qmin, grid.qmax) == (0, 255):  # the same grid, signed
                        values, grid = values - 128, Grid(grid.scale, grid.zero_point - 128, -128, 127, grid.axis)
                    weights[node.output[0]] = QuantizedWeight(values, grid)
            elif source_name not in consumed_q:
                raise LowbitError(f"{source} dequantizes a computed tensor at {name} without a QuantizeLinear "
                                  "before it; export takes lowbit's QDQ layout (Q -> DQ pairs on activations)")
            continue
        if node.op_type == "QuantizeLinear":
            dq = dq_of_q.get(node.output[0])
            if dq is None:
                raise LowbitError(f"{source} quantizes {node.input[0]!r} at {name} without dequantizing it again; "
                                  "export takes lowbit's QDQ layout, where every QuantizeLinear feeds a "
                                  "DequantizeLinear")
            grid = grid_of(node, raw_types.get(resolve(node.input[2])) if len(node.input) > 2 else None)
            if grid.axis is not None:
                raise LowbitError(f"{source} quantizes activation {node.input[0]!r} per channel; mobile runtimes "
                                  "take one scale per activation tensor")
            if grid.qmin == 0 and grid.qmax == 255:  # the same grid, signed
                grid = Grid(grid.scale, grid.zero_point - 128, -128, 127)
            consumed_q.add(node.output[0])
            ops.append(Op("FakeQuant", name, [resolve(node.input[0])], [dq.output[0]], grid=grid))
            continue
        if node.op_type not in SUPPORTED_OPS and node.op_type != PACKED_OP:
            raise LowbitError(f"{source} uses the {node.op_type} op ({name}), which export does not convert; "
                              f"supported ops: {', '.join(SUPPORTED_OPS)}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ops.append(Op(node.op_type, name, [resolve(i) for i in node.input], list(node.output), attrs))

    for name, value in raw.items():
        constants.setdefault(name, value if value.dtype.kind in "iu" else value.astype(np.float32))
    for alias_name, target in alias.items():
        if target in constants:
            constants[alias_name] = constants[target]
    initializer_names = set(raw)
    inputs = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return QDQGraph(inputs, [o.name for o in model.graph.output], ops, constants, weights)


def matmulnbits_codes(op: Op, constants: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unsigned codes [N, K], scales [N, blocks] and zero points [N, blocks] of a MatMulNBits
    node (ONNX Runtime's contrib-op layout: blocks of `block_size` along K, values packed low bits
    first, default zero point 2^(bits-1)); weight = (code - zero point) x scale, per block."""
    bits, block, n, k = (op.attrs.get("bits", 4), op.attrs["block_size"], op.attrs["N"], op.attrs["K"])
    codes = _unpack(constants[op.inputs[1]].reshape(n, -1), bits)[:, :k].astype(np.int32)
    blocks = -(-k // block)
    scales = constants[op.inputs[2]].reshape(n, blocks).astype(np.float32)
    zero_name = op.inputs[3] if len(op.inputs) > 3 else ""
    if not zero_name:
        zeros = np.full((n, blocks), 2 ** (bits - 1), np.int32)
    elif constants[zero_name].dtype == np.uint8:
        zeros = _unpack(constants[zero_name].reshape(n, -1), bits)[:, :blocks].astype(np.int32)
    else:  # float zero points: not lowbit's layout, kept exact as floats
        zeros = constants[zero_name].reshape(n, blocks)
    return codes, scales, zeros


def matmulnbits_dequantized(op: Op, constants: dict[str, np.ndarray]) -> np.ndarray:
    """The float [N, K] weight a MatMulNBits node multiplies with."""
    codes, scales, zeros = matmulnbits_codes(op, constants)
    index = np.arange(op.attrs["K"]) // op.attrs["block_size"]
    return ((codes - zeros[:, index]) * scales[:, index]).astype(np.float32)


def matmulnbits_weight(op: Op, constants: dict[str, np.ndarray]) -> QuantizedWeight | None:
    """A MatMulNBits weight with one block per row as a per-output-channel signed weight [N, K]
    (the same numbers: code - 2^(bits-1) on the signed grid), or None when it has several blocks
    per row or float zero points."""
    bits = op.attrs.get("bits", 4)
    codes, scales, zeros = matmulnbits_codes(op, constants)
    if op.attrs["block_size"] < op.attrs["K"] or zeros.dtype.kind == "f":
        return None
    offset = 2 ** (bits - 1)
    grid = Grid(scales[:, 0], (zeros[:, 0] - offset).astype(np.int32), -offset, offset - 1, axis=0)
    return QuantizedWeight(codes - offset, grid)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)


def _casts_to_float(node: onnx.NodeProto) -> bool:
    return any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)


def _range_of(onnx_type: int | None) -> tuple[int, int]:
    """Integer range of the quantized type (ONNX's default without a zero point: uint8)."""
    if onnx_type in _INT4:
        return _INT4[onnx_type]
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(onnx_type) if onnx_type else np.uint8)
    return int(info.min), int(info.max)
