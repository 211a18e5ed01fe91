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
entry in `RULES`: its rule also says what the rest of lowbit needs to know (weight port and axis,
per-channel eligibility, MAC formula, dynamic and weight-only forms, fallback-unit inputs), so
no other module names an op type for these questions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import onnx

RuleKind = Literal["compute", "elementwise", "passthrough", "fold", "float", "shape", "weights"]


@dataclass(frozen=True)
class OpRule:
    """Everything lowbit knows about one op type; the planner, the dynamic and weight-only writers,
    the MAC count, the graph reader and the searches read it from here (nowhere else)."""

    kind: RuleKind
    # Inputs quantized as activations (None: all inputs).
    activation_inputs: tuple[int, ...] | None = (0,)
    # The weight (a compute op's constant operand; the table of a lookup such as Gather).
    weight_input: int | None = None
    # Output-channel axis of the weight for per-channel scales; a function of the node.
    weight_axis: Callable[[onnx.NodeProto], int] | None = None
    bias_input: int | None = None
    reason: str = ""
    # Further constant weight inputs with the same per-channel axis (LSTM's recurrence weight R).
    more_weights: tuple[int, ...] = ()
    # Whether a weight of this rank gets one scale per output channel (else one per tensor).
    channel_scales: Callable[[onnx.NodeProto, int], bool] | None = None
    # The weight input may be a computed tensor (A x B of attention), then quantized as an activation.
    activation_weight: bool = False
    # Its int8 kernel also has a float-output form (MatMulIntegerToFloat, QGemm without y_scale), so
    # the output gets Q/DQ only when an int8 reader wants it, and counts as float downstream.
    float_output: bool = False
    # Multiply-accumulates from the shapes of (data input, weight, output).
    macs: Callable[[onnx.NodeProto, tuple, tuple, tuple], int] | None = None
    # How dynamic mode rewrites it: a key of `lowbit.onnx.dynamic.FORMS` (None: static only).
    dynamic: str | None = None
    # How weight-only mode rewrites it: "matmul" (MatMulNBits / blocked DequantizeLinear) or
    # "table" (GatherBlockQuantized); None: not weight-only eligible.
    weight_only: str | None = None
    # A slicing op: its outputs are parts of its input (a tensor whose slices differ widely in
    # range cannot share one int8 scale, see `planner.mixed_range_nodes`).
    slices: bool = False

    def is_lookup(self) -> bool:
        """A row lookup (Gather): its weight is a table, its other input the indices."""
        return self.kind == "passthrough" and self.weight_input is not None

    def unit_inputs(self) -> tuple[int, ...]:
        """Inputs that carry a quantized activation into this node: the ones whose Q/DQ pair it
        shares with every other reader (the accuracy budget's fallback units)."""
        inputs = tuple(self.activation_inputs or ())
        if self.activation_weight and self.weight_input is not None:
            inputs += (self.weight_input,)
        return inputs


@dataclass(frozen=True)
class KernelRule:
    """An op that computes on quantized weights (what lowbit's writers and ONNX Runtime emit), as
    the graph reader (`analysis.graph_precision`) sees it."""

    weight_input: int
    value_inputs: tuple[int, ...]  # stored quantized values
    param_inputs: tuple[int, ...]  # scales and zero points
    channel_param: int | None = None  # a scale / zero point with more than one value means per-channel
    integer_activations: bool = True  # False: float activations (MatMulNBits dequantizes the weight)


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


def _matrix_or_more(node: onnx.NodeProto, rank: int) -> bool:
    return rank >= 2


def _matrix(node: onnx.NodeProto, rank: int) -> bool:
    return rank == 2  # a batched (..., K, N) MatMul weight keeps one scale


def _ungrouped(node: onnx.NodeProto, rank: int) -> bool:
    # Grouped ConvTranspose: output channels span groups x axis 1; one scale per tensor.
    return rank >= 2 and _attr(node, "group", 1) == 1


def _any_rank(node: onnx.NodeProto, rank: int) -> bool:
    return True  # an embedding table: one scale per row


def _conv_macs(node, data, weight, out) -> int:
    return math.prod(out) * math.prod(weight[1:])  # output elements x (input channels / group x kernel)


def _conv_transpose_macs(node, data, weight, out) -> int:
    return math.prod(data) * math.prod(weight[1:])  # input elements x (output channels / group x kernel)


def _matmul_macs(node, data, weight, out) -> int:
    return math.prod(out) * data[-1]


def _gemm_macs(node, data, weight, out) -> int:
    return math.prod(out) * (data[0] if _attr(node, "transA", 0) else data[-1])


# Order matters only for messages that list ops ("MatMul/Gemm").
_COMPUTE = {
    "MatMul": OpRule("compute", (0,), 1, _matmul_axis, None, channel_scales=_matrix, activation_weight=True,
                     float_output=True, macs=_matmul_macs, dynamic="matmul", weight_only="matmul"),
    "Gemm": OpRule("compute", (0,), 1, _gemm_axis, 2, channel_scales=_matrix_or_more, activation_weight=True,
                   float_output=True, macs=_gemm_macs, dynamic="matmul", weight_only="matmul"),
    "Conv": OpRule("compute", (0,), 1, _axis0, 2, channel_scales=_matrix_or_more, macs=_conv_macs),
    "ConvTranspose": OpRule("compute", (0,), 1, _conv_transpose_axis, 2, channel_scales=_ungrouped,
                            macs=_conv_transpose_macs),
}
_ELEMENTWISE = {op: OpRule("elementwise", None) for op in (
    "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu",
)}
_PASSTHROUGH = {op: OpRule("passthrough", (0,), slices=op in ("Slice", "Split")) for op in (
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "GlobalMaxPool", "Resize",
    "Identity", "Slice", "Split", "Pad", "DepthToSpace", "SpaceToDepth", "Expand", "Tile",
)}
# A row lookup: from a constant table it is an embedding (int8 rows, one scale per row).
_PASSTHROUGH["Gather"] = OpRule("passthrough", (0,), weight_input=0, weight_axis=_axis0, channel_scales=_any_rank,
                                dynamic="embedding", weight_only="table", slices=True)
_RECURRENT = {"LSTM": OpRule("weights", (), 1, _gates_axis, None, more_weights=(2,), channel_scales=_matrix_or_more,
                              dynamic="lstm")}
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

# Kernels on quantized weights, by op type (any domain): ONNX Runtime's integer ops and the
# weight-only MatMulNBits. A new dynamic or weight-only form that emits another kernel adds it here.
KERNELS: dict[str, KernelRule] = {
    "MatMulInteger": KernelRule(1, (1,), (2, 3), channel_param=3),
    "ConvInteger": KernelRule(1, (1,), (2, 3), channel_param=3),
    "QLinearConv": KernelRule(3, (3, 8), (1, 2, 4, 5, 6, 7), channel_param=4),
    "QLinearMatMul": KernelRule(3, (3,), (1, 2, 4, 5, 6, 7), channel_param=4),
    "MatMulNBits": KernelRule(1, (1,), (2, 3), integer_activations=False),
}

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


def weight_input_of(node: onnx.NodeProto) -> int | None:
    """Input index of the weight of a node that carries multiply-accumulate work or a weight
    lookup, in a float or a quantized graph (any domain): compute ops, table lookups, kernels."""
    rule = RULES.get(node.op_type)
    if rule is not None and (rule.kind == "compute" or rule.is_lookup()):
        return rule.weight_input
    kernel = KERNELS.get(node.op_type)
    return kernel.weight_input if kernel is not None else None


def ops_where(predicate: Callable[[OpRule], bool]) -> list[str]:
    """Op types whose rule satisfies `predicate`, in table order (for messages: "MatMul/Gemm")."""
    return [op for op, rule in RULES.items() if predicate(rule)]


def node_matches(node: onnx.NodeProto, patterns: set[str]) -> bool:
    """True when the user named this node, its op type or one of its outputs in `patterns`."""
    return node.name in patterns or node.op_type in patterns or any(o in patterns for o in node.output)
