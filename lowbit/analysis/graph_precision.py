"""Read from an ONNX graph itself what precision each compute node runs in, and what its bytes are.

The stored plan says what lowbit meant to do; the graph says what is there. A weight counts as
quantized when it reaches the node through a DequantizeLinear (possibly via Transpose/Reshape/
Cast), or when the node is an integer kernel (MatMulInteger, ConvInteger, QLinear*, MatMulNBits);
its dtype, axis and block size are read from the initializers and attributes. Activations count
as quantized when they come out of a DequantizeLinear or a DynamicQuantizeLinear.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowbit.onnx.graph_index import GraphIndex
from lowbit.onnx.registry import KERNELS, RULES, weight_input_of

# Ops a constant may flow through on its way to a compute node without changing what it is.
_PASS_THROUGH = {"Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten"}
_FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4, getattr(TensorProto, "FLOAT4E2M1", -1)}
_FLOAT_NAMES = {TensorProto.FLOAT: "float", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16",
                TensorProto.DOUBLE: "float64"}


@dataclass
class WeightInfo:
    tensor: str  # the stored initializer
    dtype: str  # int8, uint8, int4, fp16, float, ...
    granularity: str = "tensor"  # tensor | channel | group
    axis: int | None = None
    block_size: int | None = None
    stored: str | None = None  # set when the file stores another type than the node computes in (fp16 -> float)


@dataclass
class NodePrecision:
    node: str
    op_type: str
    precision: str  # int8 | int4 | ... | fp16 | bf16 | float
    weight: WeightInfo | None
    activation: str  # dtype of the data input: uint8 / int8 (quantized), fp16, float, dynamic uint8

    def to_dict(self) -> dict:
        return asdict(self)


def dtype_name(elem_type: int) -> str:
    """'int8', 'uint4', 'fp16', 'float', ... for an ONNX element type."""
    if elem_type in _FLOAT_NAMES:
        return _FLOAT_NAMES[elem_type]
    return helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "").lower()


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Stored bytes of an initializer (4-bit types packed two per byte), without loading its data."""
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    if tensor.data_type in _FOUR_BIT:
        return (count + 1) // 2
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


class GraphReader(GraphIndex):
    """The graph's index, plus the types Cast outputs have even without shape inference, for
    precision questions."""

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphReader:
        reader = super().of(model)
        for node in model.graph.node:
            if node.op_type == "Cast":
                reader.elem_type.setdefault(node.output[0], _attr(node, "to", 0))
        return reader

    def source(self, name: str) -> tuple[str, onnx.NodeProto | None]:
        """Follow `name` back through pass-through ops: (tensor reached, DequantizeLinear or None)."""
        seen = 0
        while name not in self.initializers and seen < 8:
            node = self.producer.get(name)
            if node is None:
                return name, None
            if node.op_type == "DequantizeLinear":
                return node.input[0], node
            if node.op_type not in _PASS_THROUGH:
                return name, None
            name, seen = node.input[0], seen + 1
        return name, None

    def weight(self, node: onnx.NodeProto) -> WeightInfo | None:
        index = weight_input_of(node)
        if len(node.input) <= index or not node.input[index]:
            return None
        name, dq = self.source(node.input[index])
        if dq is not None:
            stored, elem = dq.input[0], self.elem_type.get(dq.input[0], TensorProto.INT8)
            q = self.producer.get(stored)
            if q is not None and q.op_type == "QuantizeLinear":  # a float weight quantized at run time
                stored, elem = self.source(q.input[0])[0], _zero_point_type(self, q)
            if stored not in self.initializers:
                return None  # a quantized activation (e.g. attention scores x values), not a weight
            return _dequantized_weight(self, stored, dq, elem)
        if name not in self.initializers:
            return None
        tensor = self.initializers[name]
        if _is_lookup(node) and len(tensor.dims) < 2:
            return None  # a constant lookup table, not an embedding
        info = WeightInfo(name, dtype_name(tensor.data_type))
        at_node = self.elem_type.get(node.input[index])
        if info.dtype in _FLOAT_NAMES.values() and at_node in _FLOAT_NAMES and dtype_name(at_node) != info.dtype:
            info.stored, info.dtype = info.dtype, dtype_name(at_node)  # cast at load time, computed in float
        kernel = KERNELS.get(node.op_type)
        if kernel is not None and not kernel.integer_activations:  # MatMulNBits: block-wise low-bit codes
            info.dtype = f"int{_attr(node, 'bits', 4)}"
            info.granularity, info.block_size = "group", _attr(node, "block_size", 0) or None
        elif kernel is not None:
            # One weight zero point (or scale, for QLinear*) per output channel means per-channel.
            params = node.input[kernel.channel_param:][:1]
            if params and params[0] in self.initializers and int(np.prod(self.initializers[params[0]].dims)) > 1:
                info.granularity = "channel"
        return info

    def activation(self, node: onnx.NodeProto) -> str:
        """Dtype the node's data input arrives in (through a DequantizeLinear when quantized)."""
        if _is_lookup(node):
            return "indices"
        data = node.input[0]
        kernel = KERNELS.get(node.op_type)
        if kernel is not None and kernel.integer_activations:
            producer = self.producer.get(data)
            kind = "dynamic " if producer is not None and producer.op_type == "DynamicQuantizeLinear" else ""
            return kind + dtype_name(self.elem_type.get(data, TensorProto.UINT8))
        _, dq = self.source(data)
        if dq is not None:
            return dtype_name(self.elem_type.get(dq.input[0], _zero_point_type(self, dq)))
        return dtype_name(self.elem_type.get(data, TensorProto.FLOAT))


def node_precisions(model: onnx.ModelProto) -> list[NodePrecision]:
    """Precision of every compute node, read from the graph (types inferred where missing)."""
    reader = GraphReader.of(_with_types(model))
    result = []
    for node in model.graph.node:
        if weight_input_of(node) is None:
            continue
        weight = reader.weight(node)
        if _is_lookup(node) and weight is None:
            continue  # index arithmetic, not an embedding lookup
        activation = reader.activation(node)
        label = _label(weight, activation)
        rule = RULES.get(node.op_type)
        if weight is None and rule is not None and rule.activation_weight \
                and reader.source(node.input[rule.weight_input])[1] is None:
            label = "float"  # activation x activation: int8 only when both sides are dequantized
        result.append(NodePrecision(node.name, node.op_type, label, weight, activation))
    return result


# Where each input of a quantized-graph node goes in the size breakdown: Q/DQ here, kernels from the op table.
_QUANT_PARAM_INPUTS = {"DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2),
                       **{op: kernel.param_inputs for op, kernel in KERNELS.items()}}
_QUANT_VALUE_INPUTS = {"DequantizeLinear": (0,), **{op: kernel.value_inputs for op, kernel in KERNELS.items()}}


@dataclass
class SizeRow:
    category: str  # quantized weights | quantization parameters | float weights | other constants
    dtype: str
    count: int
    nbytes: int


def initializer_sizes(model: onnx.ModelProto) -> list[SizeRow]:
    """Bytes of the model's constants grouped by what they are and their stored type."""
    role: dict[str, str] = {}
    for node in model.graph.node:
        for i in _QUANT_PARAM_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                role.setdefault(node.input[i], "quantization parameters")
        for i in _QUANT_VALUE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                role.setdefault(node.input[i], "quantized weights")
    rows: dict[tuple[str, str], SizeRow] = {}
    for tensor in model.graph.initializer:
        kind = dtype_name(tensor.data_type)
        category = role.get(tensor.name)
        if category is None or (category == "quantized weights" and kind in _FLOAT_NAMES.values()):
            category = "float weights" if kind in _FLOAT_NAMES.values() else "other constants"
        row = rows.setdefault((category, kind), SizeRow(category, kind, 0, 0))
        row.count += 1
        row.nbytes += tensor_nbytes(tensor)
    order = ["quantized weights", "quantization parameters", "float weights", "other constants"]
    return sorted(rows.values(), key=lambda r: (order.index(r.category), -r.nbytes))


def _label(weight: WeightInfo | None, activation: str) -> str:
    """One word for the node: the weight's stored type decides; without a weight, the data input."""
    kind = weight.dtype if weight is not None else activation.replace("dynamic ", "")
    if kind in ("fp16", "bf16", "float", "float64"):
        return "float" if kind == "float64" else kind
    if kind.startswith(("int", "uint")) and kind not in ("int32", "int64", "indices"):
        return "int" + kind.removeprefix("u").removeprefix("int")
    return "float"


def _dequantized_weight(reader: GraphReader, stored: str, dq: onnx.NodeProto, elem: int) -> WeightInfo:
    scale = reader.initializers.get(dq.input[1]) if len(dq.input) > 1 else None
    block = _attr(dq, "block_size", 0)
    info = WeightInfo(stored, dtype_name(elem))
    if block:
        info.granularity, info.axis, info.block_size = "group", _attr(dq, "axis", 1), block
    elif scale is not None and len(scale.dims) >= 1 and int(np.prod(scale.dims)) > 1:
        info.granularity, info.axis = "channel", _attr(dq, "axis", 1)
    return info


def _is_lookup(node: onnx.NodeProto) -> bool:
    rule = RULES.get(node.op_type)
    return rule is not None and rule.is_lookup()


def _zero_point_type(reader: GraphReader, node: onnx.NodeProto) -> int:
    """Quantized type of a (De)QuantizeLinear: its zero point's type (uint8 when it has none)."""
    if len(node.input) > 2 and node.input[2]:
        return reader.elem_type.get(node.input[2], TensorProto.UINT8)
    return TensorProto.UINT8


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value types where onnx can infer them (unchanged when it cannot)."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # inference is best effort: unknown ops, huge models; types then come from the graph
        return model


def _attr(node: onnx.NodeProto | None, name: str, default: int) -> int:
    for attribute in node.attribute if node is not None else ():
        if attribute.name == name:
            return int(helper.get_attribute_value(attribute))
    return default
