"""How each ONNX op type is quantized: one `OpRule` per op type.

Kinds of rule (they mirror the node patterns ONNX Runtime fuses into int8 kernels):

- compute: Conv, ConvTranspose, MatMul, Gemm. Activation inputs get Q/DQ, the weight is stored
  as int8 with a DequantizeLinear (per-channel along `weight_axis`), the bias as int32 with scale
  act_scale * weight_scale, and the output gets Q/DQ, so ORT runs QLinearConv / QLinearMatMul /
  QGemm;
- elementwise: Add, Mul, Concat, average pooling, ... inputs and output get Q/DQ (QLinearAdd, ...);
- passthrough: shape and data-movement ops (Reshape, Transpose, MaxPool, Resize, ...) do not change
  values, so their output reuses the input's scale and zero point and ORT drops the Q/DQ pair;
- weights: LSTM: int8 W and R, activations quantized at run time by ONNX Runtime's
  DynamicQuantizeLSTM (see `lowbit.onnx.recurrent`); GRU and RNN have no int8 kernel and stay float;
- fold: Relu / Clip right after a quantized node: no Q/DQ between them (the output quantization's
  zero point already clips at 0, and ORT removes the activation);
- float: ops int8 would break (Softmax, normalizations and their decomposed forms, exp/log);
- shape: ops that compute shapes or indices, with no float math to quantize.

Any op type not listed is *unsupported*: left float and listed in the plan. A new op type is one
entry in `RULES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import onnx

RuleKind = Literal["compute", "elementwise", "passthrough", "fold", "float", "shape", "weights"]


@dataclass(frozen=True)
class OpRule:
    kind: RuleKind
    # Inputs quantized as activations (None: all inputs).
    activation_inputs: tuple[int, ...] | None = (0,)
    weight_input: int | None = None
    # Output-channel axis of the weight for per-channel scales; a function of the node.
    weight_axis: Callable[[onnx.NodeProto], int] | None = None
    bias_input: int | None = None
    reason: str = ""
    # Further constant weight inputs with the same per-channel axis (LSTM's recurrence weight R).
    more_weights: tuple[int, ...] = ()


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(onnx.helper.get_attribute_value(attribute))
    return default


def _axis0(node: onnx.NodeProto) -> int:
    return 0


def _conv_transpose_axis(node: onnx.NodeProto) -> int:
    # Weight layout (C_in, C_out / group, k...): output channels sit on axis 1.
    return 1


def _gemm_axis(node: onnx.NodeProto) -> int:
    # B is (K, N) or, with transB, (N, K): the output-feature axis is N.
    return 0 if _attr(node, "transB", 0) else 1


def _matmul_axis(node: onnx.NodeProto) -> int:
    return -1  # B is (..., K, N)


def _gates_axis(node: onnx.NodeProto) -> int:
    return 1  # W / R are (directions, gates x hidden, features): one scale per gate row


_COMPUTE = {
    "Conv": OpRule("compute", (0,), 1, _axis0, 2),
    "ConvTranspose": OpRule("compute", (0,), 1, _conv_transpose_axis, 2),
    "Gemm": OpRule("compute", (0,), 1, _gemm_axis, 2),
    "MatMul": OpRule("compute", (0,), 1, _matmul_axis, None),
}
_ELEMENTWISE = {op: OpRule("elementwise", None) for op in (
    "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu",
)}
_PASSTHROUGH = {op: OpRule("passthrough", (0,)) for op in (
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "GlobalMaxPool", "Resize",
    "Identity", "Slice", "Split", "Gather", "Pad", "DepthToSpace", "SpaceToDepth", "Expand", "Tile",
)}
_RECURRENT = {"LSTM": OpRule("weights", (), 1, _gates_axis, None, more_weights=(2,))}
_FOLD = {op: OpRule("fold", (0,)) for op in ("Relu", "Clip")}
_SENSITIVE = "sensitive op: int8 would break its accuracy"
_FLOAT = {op: OpRule("float", (), reason=_SENSITIVE) for op in (
    "Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization",
    "GroupNormalization", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "Sub", "Pow",
    "Sqrt", "Div", "Reciprocal", "Exp", "Log", "Erf", "Tanh", "Gelu", "Where", "Neg", "Abs", "Sin", "Cos",
    "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Mish", "Min", "Max", "Sum", "Mean",
    "TopK", "CumSum", "Einsum", "Dropout",
)}
_NO_INT8_KERNEL = "ONNX Runtime has no int8 kernel for it; int8 weights would add a dequantize per call"
_FLOAT.update({op: OpRule("float", (), reason=_NO_INT8_KERNEL) for op in ("GRU", "RNN")})
_SHAPE = {op: OpRule("shape", (), reason="computes shapes or indices") for op in (
    "Shape", "Size", "Constant", "ConstantOfShape", "Range", "Cast", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "NonZero", "ArgMax", "ArgMin", "OneHot",
    "CastLike", "If", "Loop",
)}

RULES: dict[str, OpRule] = {**_COMPUTE, **_ELEMENTWISE, **_PASSTHROUGH, **_FOLD, **_FLOAT, **_SHAPE, **_RECURRENT}

STANDARD_DOMAINS = ("", "ai.onnx")


def rule_for(node: onnx.NodeProto) -> OpRule | None:
    """The rule for a node, or None when lowbit does not know the op (it is left float)."""
    if node.domain not in STANDARD_DOMAINS:
        return None
    return RULES.get(node.op_type)


def weight_axis(node: onnx.NodeProto, rank: int) -> int:
    """Concrete (non-negative) per-channel axis of the node's weight of the given rank."""
    rule = RULES[node.op_type]
    assert rule.weight_axis is not None
    return rule.weight_axis(node) % rank


def node_matches(node: onnx.NodeProto, patterns: set[str]) -> bool:
    """True when the user named this node, its op type or one of its outputs in `patterns`."""
    return node.name in patterns or node.op_type in patterns or any(o in patterns for o in node.output)
