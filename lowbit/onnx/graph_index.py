"""Lookups over one ONNX graph: who reads a tensor, who makes it, its constants and types; and
putting new nodes right after the node that makes their input.

Every pass that walks a graph (planning, folding, equalization, SmoothQuant, the outlier split,
AWQ's input scales, fp16, dynamic planning) reads these instead of building its own maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

_FLOAT_TYPES = {onnx.TensorProto.FLOAT}


def readers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order (a node reading it twice, twice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(node)
    return readers


def producers_of(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that makes it (graph inputs and initializers have none)."""
    return {name: node for node in graph.node for name in node.output}


def values_of(graph: onnx.GraphProto) -> set[str]:
    """Names a run of the graph is fed or computes: graph inputs and node outputs (initializers aside)."""
    return {i.name for i in graph.input} | {name for node in graph.node for name in node.output}


def insert_after(graph: onnx.GraphProto, after: dict[str, list[onnx.NodeProto]],
                 first: list[onnx.NodeProto] = ()) -> None:
    """Put each tensor's new nodes right after the node that makes it (at the start, for a graph
    input), which keeps the graph topologically sorted; `first` (nodes reading only constants)
    go before everything."""
    inputs = {i.name for i in graph.input}
    ordered = list(first) + [node for tensor, nodes in after.items() if tensor in inputs for node in nodes]
    for node in graph.node:
        ordered.append(node)
        for name in node.output:
            ordered.extend(after.get(name, []))
    del graph.node[:]
    graph.node.extend(ordered)


@dataclass
class GraphIndex:
    """Lookups over one graph: producers, consumers, constants and tensor types."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    elem_type: dict[str, int] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphIndex:
        graph = model.graph
        index = cls(model, producers_of(graph), readers_of(graph), {t.name: t for t in graph.initializer})
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:  # 0: unknown
                index.elem_type[value.name] = value.type.tensor_type.elem_type
        for t in graph.initializer:
            index.elem_type[t.name] = t.data_type
        index.graph_inputs = {i.name for i in graph.input} - set(index.initializers)
        index.graph_outputs = {o.name for o in graph.output}
        return index

    def is_float(self, name: str) -> bool:
        """Float32 tensor, or of unknown type (calibration will tell)."""
        return bool(name) and self.elem_type.get(name, onnx.TensorProto.FLOAT) in _FLOAT_TYPES

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def constant(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])


__all__ = ["GraphIndex", "insert_after", "producers_of", "readers_of", "values_of"]
