"""Multiply-accumulates of the weighted layers of an ONNX graph, from shapes measured on ONNX Runtime.

Shapes come from one real run on one sample (every layer's input and output exposed), so
symbolic dimensions (batch, sequence length) take the values the user's data gives them.
Per node: Conv = output elements x (input channels per group x kernel size); ConvTranspose =
input elements x (output channels per group x kernel size); MatMul = output elements x K;
Gemm = output elements x K.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from lowbit.onnx.statistics import Shapes, collect

WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def layer_macs(model: onnx.ModelProto, nodes: list[str], feed: dict[str, np.ndarray], *,
               threads: int | None = None) -> dict[str, int]:
    """MACs of each named node (0 for op types without a rule) for the inputs in `feed`."""
    by_name = {n.name: n for n in model.graph.node}
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    wanted = [by_name[n] for n in nodes if n in by_name and by_name[n].op_type in WEIGHTED_OPS]
    tensors = list(dict.fromkeys(name for node in wanted for name in (node.input[0], node.input[1], node.output[0])
                                 if name not in inits and name not in feed))
    measured = Shapes(tensors)
    collect(model, [feed], [measured], threads=threads)
    shapes = dict(measured.shapes)
    shapes.update({k: tuple(np.shape(v)) for k, v in feed.items()})
    shapes.update(inits)
    macs = dict.fromkeys(nodes, 0)
    for node in wanted:
        a, b, out = (shapes.get(n) for n in (node.input[0], node.input[1], node.output[0]))
        if a is None or b is None or out is None:
            continue
        if node.op_type == "Conv":
            macs[node.name] = math.prod(out) * math.prod(b[1:])
        elif node.op_type == "ConvTranspose":
            macs[node.name] = math.prod(a) * math.prod(b[1:])
        elif node.op_type == "MatMul":
            macs[node.name] = math.prod(out) * a[-1]
        else:  # Gemm
            trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
            macs[node.name] = math.prod(out) * (a[0] if trans_a else a[-1])
    return macs
