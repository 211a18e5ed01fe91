"""Multiply-accumulates of the weighted layers of an ONNX graph, from shapes measured on ONNX Runtime.

Shapes come from one real run on one sample (every layer's input and output exposed), so
symbolic dimensions (batch, sequence length) take the values the user's data gives them. The
formula of each op is its rule's `macs` in `lowbit.onnx.registry` (Conv = output elements x
input channels per group x kernel size, ...).
"""

from __future__ import annotations

import numpy as np
import onnx

from lowbit.onnx.registry import OpRule, rule_for
from lowbit.onnx.statistics import Shapes, collect


def layer_macs(model: onnx.ModelProto, nodes: list[str], feed: dict[str, np.ndarray], *,
               threads: int | None = None) -> dict[str, int]:
    """MACs of each named node (0 for op types without a rule) for the inputs in `feed`."""
    by_name = {n.name: n for n in model.graph.node}
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    wanted = [by_name[n] for n in nodes if n in by_name and _counted(rule_for(by_name[n]))]
    ports = {node.name: (node.input[0], node.input[rule_for(node).weight_input], node.output[0]) for node in wanted}
    tensors = list(dict.fromkeys(name for names in ports.values() for name in names
                                 if name not in inits and name not in feed))
    measured = Shapes(tensors)
    collect(model, [feed], [measured], threads=threads)
    shapes = dict(measured.shapes)
    shapes.update({k: tuple(np.shape(v)) for k, v in feed.items()})
    shapes.update(inits)
    macs = dict.fromkeys(nodes, 0)
    for node in wanted:
        a, b, out = (shapes.get(n) for n in ports[node.name])
        if a is None or b is None or out is None:
            continue
        macs[node.name] = rule_for(node).macs(node, a, b, out)
    return macs


def _counted(rule: OpRule | None) -> bool:
    return rule is not None and rule.macs is not None
