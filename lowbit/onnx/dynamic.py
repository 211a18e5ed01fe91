"""Write a dynamic int8 model: int8 weights, activations quantized at run time.

Each planned MatMul/Gemm becomes the standard-op pattern

    DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, W_zp) -> Cast -> Mul(x_scale * W_scale)

which ONNX Runtime fuses on CPU into MatMulIntegerToFloat / DynamicQuantizeMatMul (uint8 x int8,
the U8S8 kernels). Weights are quantized offline by `lowbit.numerics`; per-column weight scales
ride along in the final Mul. One DynamicQuantizeLinear is shared by all MatMuls reading the same
input (Q/K/V projections). Embedding tables (Gather from a constant 2-D table) are stored int8 with
one scale per row, and only the gathered rows are dequantized.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.numerics import quantize
from lowbit.onnx.qdq import drop_unused_initializers
from lowbit.onnx.recurrent import write_int8_lstms
from lowbit.plan import QuantPlan


def write_dynamic(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """A new model with the plan's MatMul/Gemm nodes rewritten to dynamic int8."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    lstm_weights = write_int8_lstms(out, plan.quantized("weight"), new_inits)  # DynamicQuantizeLSTM
    weights = {node: e for e in plan.quantized("weight") if e.tensor not in lstm_weights for node in e.nodes}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    quantized_weights: dict[tuple[str, bool], tuple[str, str, str]] = {}
    ordered: list[onnx.NodeProto] = []
    for node in graph.node:
        entry = weights.get(node.name)
        if entry is None:
            ordered.append(node)
            continue
        if node.op_type == "Gather":
            ordered += _int8_embedding(node, entry, initializers, new_inits)
            continue
        x = node.input[0]
        if x not in quantized_inputs:
            names = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
            ordered.append(helper.make_node("DynamicQuantizeLinear", [x], list(names),
                                            name=f"{x}_DynamicQuantizeLinear"))
            quantized_inputs[x] = names
        x_q, x_scale, x_zp = quantized_inputs[x]
        alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        transposed = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
        # One int8 copy per weight (and layout): an unrolled RNN's Gemms share one weight per step.
        w_name, w_zp, w_scale = quantized_weights.get((entry.tensor, transposed), (None, None, None))
        if w_name is None:
            w = numpy_helper.to_array(initializers[entry.tensor]).astype(np.float32)
            w_q = quantize(w, entry.qparams)
            scale = np.asarray(entry.qparams.scale, np.float32)
            if transposed:
                w_q = w_q.T
            w_name, w_zp, w_scale = (f"{node.name}_W_quantized", f"{node.name}_W_zero_point", f"{node.name}_W_scale")
            new_inits += [numpy_helper.from_array(np.ascontiguousarray(w_q), w_name),
                          numpy_helper.from_array(np.zeros(scale.shape, np.int8), w_zp),
                          numpy_helper.from_array(scale, w_scale)]
            quantized_weights[(entry.tensor, transposed)] = (w_name, w_zp, w_scale)
        base = node.name
        product = f"{base}_output_int32"
        y = node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
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
            bias = node.input[2]
            beta = float(_attr(node, "beta", 1.0))
            if beta != 1.0:
                new_inits.append(numpy_helper.from_array(np.asarray(beta, np.float32), f"{base}_beta"))
                ordered.append(helper.make_node("Mul", [bias, f"{base}_beta"], [f"{base}_bias_scaled"],
                                                name=f"{base}_BetaMul"))
                bias = f"{base}_bias_scaled"
            ordered.append(helper.make_node("Add", [scaled, bias], [y], name=f"{base}_BiasAdd"))
    del graph.node[:]
    graph.node.extend(ordered)
    drop_unused_initializers(graph)
    graph.initializer.extend(new_inits)
    return out


def _int8_embedding(node: onnx.NodeProto, entry, initializers, new_inits) -> list[onnx.NodeProto]:
    """Gather(int8 table) and Gather(per-row scales), multiplied: only the looked-up rows are
    dequantized, so the table is stored at 1 byte per value and lookups stay cheap."""
    table = numpy_helper.to_array(initializers[entry.tensor]).astype(np.float32)
    q = quantize(table, entry.qparams)
    scale = np.asarray(entry.qparams.scale, np.float32).reshape(-1, 1)  # (rows, 1): broadcasts
    base, ids, y = node.name, node.input[1], node.output[0]
    new_inits += [numpy_helper.from_array(np.ascontiguousarray(q), f"{base}_table_quantized"),
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


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default
