"""Dynamic int8: plan and write int8 weights whose activations are quantized at run time.

Which ops take part, and how, is the op table's `dynamic` form (`registry.OpRule.dynamic`), a key
of `FORMS` here:

- "matmul" (MatMul, Gemm with a constant 2-D weight) becomes the standard-op pattern

      DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, W_zp) -> Cast -> Mul(x_scale * W_scale)

  which ONNX Runtime fuses on CPU into MatMulIntegerToFloat / DynamicQuantizeMatMul (uint8 x int8,
  the U8S8 kernels). Weights are quantized offline by `lowbit.numerics`; per-column weight scales
  ride along in the final Mul. One DynamicQuantizeLinear is shared by all MatMuls reading the same
  input (Q/K/V projections). A node's alpha / beta / transB / bias are read generically.
- "embedding" (Gather from a constant 2-D table): int8 rows with one scale per row; only the
  gathered rows are dequantized.
- "lstm": int8 W and R for ONNX Runtime's DynamicQuantizeLSTM (`lowbit.onnx.recurrent`).

A new dynamic form is one `DynamicForm` in `FORMS` (its planning and writing) plus its name in the
rule of each op that takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.numerics import quantize, qparams_for
from lowbit.onnx.graph_index import GraphIndex
from lowbit.onnx.planner import DYNAMIC_ACTIVATION_SPEC, WEIGHT_SPEC, check_exclude, classify_nodes
from lowbit.onnx.qdq import drop_unused_initializers
from lowbit.onnx.recurrent import write_int8_lstms
from lowbit.onnx.registry import OpRule, ops_where, rule_for, weight_axis
from lowbit.plan import PlanEntry, QuantPlan
from lowbit.spec import QuantSpec, per_channel


@dataclass(frozen=True)
class DynamicForm:
    """How one kind of node is quantized dynamically.

    `plan(plan, node, rule, index, per_channel_weights)` adds the node's entries to `plan`, or
    returns why it stays float (None when it simply does not apply). `write(node, entry, ctx)`
    returns the nodes replacing it (None: written elsewhere, as the LSTMs are)."""

    plan: Callable[..., str | None]
    write: Callable[..., list[onnx.NodeProto]] | None = None


def plan_dynamic(model: onnx.ModelProto, *, per_channel_weights: bool = True,
                 exclude: tuple[str, ...] | list[str] = ()) -> QuantPlan:
    """Dynamic int8 plan: every active node whose rule has a dynamic form gets its int8 weights
    (and, for MatMul-like nodes, a run-time-quantized activation)."""
    index = GraphIndex.of(model)
    check_exclude(model, set(exclude))
    plan = QuantPlan("dynamic")
    active, float_nodes, unsupported = classify_nodes(index, set(exclude))
    plan.unsupported_ops = unsupported
    plan.float_nodes = float_nodes
    for node in model.graph.node:
        rule = active.get(node.name)
        if rule is None:
            continue
        form = FORMS.get(rule.dynamic)
        if form is None:
            if rule.kind == "compute":
                ops = "/".join(ops_where(lambda r: r.kind == "compute" and r.dynamic is not None))
                plan.float_nodes[node.name] = f"dynamic mode quantizes {ops} only; use --mode static"
            continue
        why = form.plan(plan, node, rule, index, per_channel_weights)
        if why:
            plan.float_nodes[node.name] = why
    return plan


def _weight_spec(per_channel_weights: bool, axis: int) -> QuantSpec:
    return QuantSpec("int8", granularity=per_channel(axis)) if per_channel_weights else WEIGHT_SPEC


def _plan_matmul(plan: QuantPlan, node: onnx.NodeProto, rule: OpRule, index: GraphIndex,
                 per_channel_weights: bool) -> str | None:
    weight = node.input[rule.weight_input]
    if not index.is_constant(weight) or len(index.initializers[weight].dims) != 2 or _attr(node, "transA", 0):
        return "needs a constant 2-D weight (and no transA)"
    values = index.constant(weight)
    # MatMulInteger takes B as (K, N): a transposed (N, K) weight (Gemm's transB) is transposed when written.
    spec = _weight_spec(per_channel_weights, weight_axis(node, 2))
    plan.add(PlanEntry(weight, "weight", spec=spec, qparams=qparams_for(values, spec, weight), nodes=[node.name]))
    plan.add(PlanEntry(node.input[0], "activation", spec=DYNAMIC_ACTIVATION_SPEC, nodes=[node.name],
                       reason="quantized at run time"))
    return None


def _plan_embedding(plan: QuantPlan, node: onnx.NodeProto, rule: OpRule, index: GraphIndex,
                    per_channel_weights: bool) -> str | None:
    if _embedding_table(index, node, rule):
        # int8 rows with one scale per row; only the gathered rows are dequantized.
        table = node.input[rule.weight_input]
        spec = QuantSpec("int8", granularity=per_channel(0))
        plan.add(PlanEntry(table, "weight", spec=spec, qparams=qparams_for(index.constant(table), spec, table),
                           nodes=[node.name], reason="embedding table: int8 rows, per-row scales"))
    return None


def _plan_lstm(plan: QuantPlan, node: onnx.NodeProto, rule: OpRule, index: GraphIndex,
               per_channel_weights: bool) -> str | None:
    for i in (rule.weight_input, *rule.more_weights):  # int8 W and R (DynamicQuantizeLSTM)
        name = node.input[i]
        spec = _weight_spec(per_channel_weights, rule.weight_axis(node))
        plan.add(PlanEntry(name, "weight", spec=spec, qparams=qparams_for(index.constant(name), spec, name),
                           nodes=[node.name]))
    return None


def _embedding_table(index: GraphIndex, node: onnx.NodeProto, rule: OpRule) -> bool:
    """A lookup along axis 0 in a constant float 2-D table read by nothing else."""
    table = node.input[rule.weight_input]
    indices = next(name for i, name in enumerate(node.input) if i != rule.weight_input)
    return (index.is_constant(table) and index.is_float(table) and len(index.initializers[table].dims) == 2
            and _attr(node, "axis", 0) == 0 and len(index.consumers.get(table, [])) == 1
            and not index.is_constant(indices))


@dataclass
class WriteContext:
    """What the writers share while rewriting one graph."""

    initializers: dict[str, onnx.TensorProto]
    new_inits: list[onnx.TensorProto]
    # Input tensor -> its DynamicQuantizeLinear outputs, shared by every MatMul reading it.
    quantized_inputs: dict[str, tuple[str, str, str]]
    # (weight, transposed) -> its int8 initializers (values, zero point, scale): one copy per weight,
    # since an unrolled RNN's Gemms share one weight among all time steps.
    quantized_weights: dict[tuple[str, bool], tuple[str, str, str]] = field(default_factory=dict)


def write_dynamic(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """A new model with the plan's nodes rewritten to dynamic int8 (each by its rule's form)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    ctx = WriteContext({t.name: t for t in graph.initializer}, [], {})
    lstm_weights = write_int8_lstms(out, plan.quantized("weight"), ctx.new_inits)  # DynamicQuantizeLSTM
    weights = {node: e for e in plan.quantized("weight") if e.tensor not in lstm_weights for node in e.nodes}
    ordered: list[onnx.NodeProto] = []
    for node in graph.node:
        entry = weights.get(node.name)
        rule = rule_for(node) if entry is not None else None
        form = FORMS.get(rule.dynamic) if rule is not None else None
        if form is None or form.write is None:
            ordered.append(node)
            continue
        ordered += form.write(node, rule, entry, ctx)
    del graph.node[:]
    graph.node.extend(ordered)
    drop_unused_initializers(graph)
    graph.initializer.extend(ctx.new_inits)
    return out


def _write_matmul(node: onnx.NodeProto, rule: OpRule, entry: PlanEntry, ctx: WriteContext) -> list[onnx.NodeProto]:
    ordered: list[onnx.NodeProto] = []
    new_inits = ctx.new_inits
    x = node.input[0]
    if x not in ctx.quantized_inputs:
        names = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
        ordered.append(helper.make_node("DynamicQuantizeLinear", [x], list(names),
                                        name=f"{x}_DynamicQuantizeLinear"))
        ctx.quantized_inputs[x] = names
    x_q, x_scale, x_zp = ctx.quantized_inputs[x]
    alpha = float(_attr(node, "alpha", 1.0))
    base = node.name
    transposed = bool(_attr(node, "transB", 0))
    key = (entry.tensor, transposed)
    if key not in ctx.quantized_weights:
        w = numpy_helper.to_array(ctx.initializers[entry.tensor]).astype(np.float32)
        w_q = quantize(w, entry.qparams)
        scale = np.asarray(entry.qparams.scale, np.float32)
        if transposed:
            w_q = w_q.T
        names = (f"{base}_W_quantized", f"{base}_W_zero_point", f"{base}_W_scale")
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(w_q), names[0]),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), names[1]),
                      numpy_helper.from_array(scale, names[2])]
        ctx.quantized_weights[key] = names
    w_name, w_zp, w_scale = ctx.quantized_weights[key]
    product = f"{base}_output_int32"
    y = node.output[0]
    at = rule.bias_input
    has_bias = at is not None and len(node.input) > at and node.input[at]
    scaled = f"{base}_output_scaled" if has_bias else y
    ordered += [
        helper.make_node("MatMulInteger", [x_q, w_name, x_zp, w_zp],
                         [product], name=f"{base}_MatMulInteger"),
        helper.make_node("Cast", [product], [f"{base}_output_float"], to=TensorProto.FLOAT,
                         name=f"{base}_Cast"),
        helper.make_node("Mul", [x_scale, w_scale], [f"{base}_scale"], name=f"{base}_ScaleMul"),
    ]
    output_scale = f"{base}_scale"
    if alpha != 1.0:
        # Gemm's alpha rides on the (tiny) scale vector; the stored weight scales stay the plan's.
        new_inits.append(numpy_helper.from_array(np.asarray(alpha, np.float32), f"{base}_alpha"))
        ordered.append(helper.make_node("Mul", [output_scale, f"{base}_alpha"], [f"{base}_scale_alpha"],
                                        name=f"{base}_AlphaMul"))
        output_scale = f"{base}_scale_alpha"
    ordered.append(helper.make_node("Mul", [f"{base}_output_float", output_scale], [scaled], name=f"{base}_Mul"))
    if has_bias:
        bias = node.input[at]
        beta = float(_attr(node, "beta", 1.0))
        if beta != 1.0:
            new_inits.append(numpy_helper.from_array(np.asarray(beta, np.float32), f"{base}_beta"))
            ordered.append(helper.make_node("Mul", [bias, f"{base}_beta"], [f"{base}_bias_scaled"],
                                            name=f"{base}_BetaMul"))
            bias = f"{base}_bias_scaled"
        ordered.append(helper.make_node("Add", [scaled, bias], [y], name=f"{base}_BiasAdd"))
    return ordered


def _write_embedding(node: onnx.NodeProto, rule: OpRule, entry: PlanEntry, ctx: WriteContext
                     ) -> list[onnx.NodeProto]:
    """Gather(int8 table) and Gather(per-row scales), multiplied: only the looked-up rows are
    dequantized, so the table is stored at 1 byte per value and lookups stay cheap."""
    table = numpy_helper.to_array(ctx.initializers[entry.tensor]).astype(np.float32)
    q = quantize(table, entry.qparams)
    scale = np.asarray(entry.qparams.scale, np.float32).reshape(-1, 1)  # (rows, 1): broadcasts
    base, ids, y = node.name, node.input[1], node.output[0]
    ctx.new_inits += [numpy_helper.from_array(np.ascontiguousarray(q), f"{base}_table_quantized"),
                      numpy_helper.from_array(scale, f"{base}_row_scale")]
    return [
        helper.make_node("Gather", [f"{base}_table_quantized", ids], [f"{base}_rows_int8"], axis=0,
                         name=f"{base}_GatherInt8"),
        helper.make_node("Cast", [f"{base}_rows_int8"], [f"{base}_rows_float"], to=TensorProto.FLOAT,
                         name=f"{base}_Cast"),
        helper.make_node("Gather", [f"{base}_row_scale", ids], [f"{base}_rows_scale"], axis=0,
                         name=f"{base}_GatherScale"),
        helper.make_node("Mul", [f"{base}_rows_float", f"{base}_rows_scale"], [y], name=f"{base}_Dequantize"),
    ]


FORMS: dict[str, DynamicForm] = {
    "matmul": DynamicForm(_plan_matmul, _write_matmul),
    "embedding": DynamicForm(_plan_embedding, _write_embedding),
    "lstm": DynamicForm(_plan_lstm),  # written by `recurrent.write_int8_lstms`
}


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


__all__ = ["FORMS", "DynamicForm", "WriteContext", "plan_dynamic", "write_dynamic"]
