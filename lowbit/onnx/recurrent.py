"""LSTM with int8 weights: ONNX Runtime's `DynamicQuantizeLSTM` (com.microsoft).

Standard ONNX has no int8 LSTM, and a DequantizeLinear in front of a float LSTM is not folded by
ONNX Runtime, so it runs on every call and makes the model slower. `DynamicQuantizeLSTM` keeps
int8 W and R (per gate-row scales) and quantizes the input and hidden state at run time.
Measured on this project's CPU (1 thread, hidden 128, median of 7x200 interleaved runs): one step
float 79 us, DequantizeLinear+LSTM 148 us, DynamicQuantizeLSTM 52 us; 32 steps 418 / 578 / 288 us
(bench: `python bench/lstm_int8.py`). GRU and RNN have no such kernel and stay float.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.numerics import quantize
from lowbit.onnx.subgraphs import bodies, scope_values
from lowbit.plan import PlanEntry

MS_DOMAIN = "com.microsoft"


def int8_lstm_ok(node: onnx.NodeProto) -> bool:
    """The LSTM forms DynamicQuantizeLSTM takes: default layout (sequence first)."""
    return node.op_type == "LSTM" and not any(a.name == "layout" and a.i != 0 for a in node.attribute)


def has_int8_lstms(model: onnx.ModelProto) -> bool:
    """An LSTM with constant W and R that DynamicQuantizeLSTM takes, in the main graph or in an
    If/Loop/Scan body (a dynamic int8 candidate then has something to quantize even without MatMuls)."""
    graphs = [model.graph, *(b.graph for b in bodies(model.graph))]
    constants, _ = scope_values(model)
    return any(int8_lstm_ok(node) and len(node.input) >= 3 and node.input[1] in constants
               and node.input[2] in constants for graph in graphs for node in graph.node)


def write_int8_lstms(model: onnx.ModelProto, weights: list[PlanEntry],
                     new_inits: list[onnx.TensorProto]) -> set[str]:
    """Rewrite, in `model`'s main graph, every LSTM whose W and R both have int8 plan entries
    into DynamicQuantizeLSTM; returns the names of the weights it consumed."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    by_tensor = {e.tensor: e for e in weights}
    handled: set[str] = set()
    for position, node in enumerate(graph.node):
        if not int8_lstm_ok(node) or len(node.input) < 3:
            continue
        w, r = (by_tensor.get(node.input[1]), by_tensor.get(node.input[2]))
        if w is None or r is None or w.tensor not in initializers or r.tensor not in initializers:
            continue
        extra = []
        for entry in (w, r):
            values = numpy_helper.to_array(initializers[entry.tensor]).astype(np.float32)
            q = quantize(values, entry.qparams)  # (directions, 4 x hidden, features), scales on axis 1
            directions = values.shape[0]
            scale = np.broadcast_to(np.asarray(entry.qparams.scale, np.float32).reshape(1, -1),
                                    (directions, values.shape[1]))
            zero_point = np.broadcast_to(np.asarray(entry.qparams.zero_point).astype(q.dtype).reshape(1, -1),
                                         scale.shape)
            base = f"{node.name}_{entry.tensor}"
            new_inits += [numpy_helper.from_array(np.ascontiguousarray(q.transpose(0, 2, 1)), f"{base}_int8"),
                          numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}_scale"),
                          numpy_helper.from_array(np.ascontiguousarray(zero_point), f"{base}_zero_point")]
            extra.append(base)
        inputs = list(node.input) + [""] * (8 - len(node.input))
        quantized = helper.make_node(
            "DynamicQuantizeLSTM",
            [inputs[0], f"{extra[0]}_int8", f"{extra[1]}_int8", *inputs[3:8],
             f"{extra[0]}_scale", f"{extra[0]}_zero_point", f"{extra[1]}_scale", f"{extra[1]}_zero_point"],
            list(node.output), name=node.name, domain=MS_DOMAIN)
        quantized.attribute.extend(a for a in node.attribute if a.name != "layout")
        graph.node[position].CopyFrom(quantized)
        handled |= {w.tensor, r.tensor}
    if handled and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return handled
