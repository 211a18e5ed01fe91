"""SmoothQuant on an ONNX graph: find the MatMuls to smooth, measure their inputs, rewrite.

The math (scales from activation and weight maxima) is `lowbit.algorithms.smoothquant`; this
module does the graph side:

1. `smoothing_groups`: every float activation X read by MatMuls with a constant 2-D weight
   (Q/K/V projections share one X and form one group);
2. `channel_absmax`: one pass of the calibration data through ONNX Runtime, keeping only the
   running per-channel max |X_j| of each group input (last axis), never the activations;
3. `apply_smoothing`: multiply the weights' rows by s and divide X by s. When X comes from a
   LayerNormalization that feeds nothing else, 1/s folds into its gamma and beta for free; when
   X also feeds something else (post-LN BERT: the residual Add reads the LayerNorm output too),
   a Mul by 1/s is inserted on the branch to the MatMuls only, so the rest of the graph is
   untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.algorithms.smoothquant import (DEFAULT_ALPHA, smooth_activation_producer, smooth_weights,
                                           smoothing_scales)
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.graph_index import insert_after, producers_of, readers_of
from lowbit.onnx.qdq import drop_unused_initializers

# Consumers that read only X's shape, not its values: they do not block folding into LayerNorm.
_SHAPE_READERS = ("Shape", "Size")


@dataclass
class SmoothGroup:
    """One activation and the MatMul nodes (with constant weights) that read it."""

    activation: str
    nodes: list[str]
    weights: list[str]
    alpha: float = DEFAULT_ALPHA
    scales: np.ndarray | None = field(default=None, repr=False)
    folded_into: str | None = None  # LayerNormalization node name, or None when a Mul was inserted


# Measured on all-MiniLM-L6-v2 (bench/ptq_onnx.py): smoothing the LayerNorm-fed Q/K/V and FFN-in
# projections lifts static int8 from cosine 0.987 to 0.993; also smoothing the MatMuls fed by GELU
# and attention outputs makes it worse (0.988), so by default only LayerNorm outputs are smoothed.
DEFAULT_PRODUCERS = ("LayerNormalization",)


def smoothing_groups(model: onnx.ModelProto, quantized_nodes: set[str], *,
                     alpha: float | dict[str, float] = DEFAULT_ALPHA,
                     producers: tuple[str, ...] | None = DEFAULT_PRODUCERS) -> list[SmoothGroup]:
    """Groups of int8 MatMuls sharing an activation input. `alpha` may map a group's activation
    name or any of its node names to its own alpha (per-layer migration strength). `producers`:
    only activations made by these op types (None: any activation)."""
    initializers = {t.name: t for t in model.graph.initializer}
    made_by = producers_of(model.graph)
    groups: dict[str, SmoothGroup] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name not in quantized_nodes:
            continue
        x, w = node.input[0], node.input[1]
        if x in initializers or w not in initializers or len(initializers[w].dims) != 2:
            continue
        if producers is not None and (x not in made_by or made_by[x].op_type not in producers):
            continue
        group = groups.setdefault(x, SmoothGroup(x, [], []))
        group.nodes.append(node.name)
        group.weights.append(w)
    for group in groups.values():
        group.alpha = _alpha_for(group, alpha)
    return list(groups.values())


def _alpha_for(group: SmoothGroup, alpha: float | dict[str, float]) -> float:
    if not isinstance(alpha, dict):
        return float(alpha)
    for key in (group.activation, *group.nodes):
        if key in alpha:
            return float(alpha[key])
    return float(alpha.get("default", DEFAULT_ALPHA))


def channel_absmax(model: onnx.ModelProto, tensors: list[str], data: CalibrationData, *, batch_size: int = 16,
                   threads: int | None = None, memory_budget_mb: float | None = None) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the data (non-finite values ignored).

    Activations stream through in chunks that fit `memory_budget_mb` (None: the calibration
    default, `lowbit.onnx.collect.DEFAULT_MEMORY_BUDGET_MB`)."""
    from lowbit.onnx.collect import DEFAULT_MEMORY_BUDGET_MB
    from lowbit.onnx.statistics import ChannelAbsMax, collect

    absmax = ChannelAbsMax(tensors)
    collect(model, data.batches(batch_size), [absmax], threads=threads,
            memory_budget_mb=DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else memory_budget_mb)
    return absmax.result()


def apply_smoothing(model: onnx.ModelProto, groups: list[SmoothGroup], absmax: dict[str, np.ndarray]
                    ) -> onnx.ModelProto:
    """A new model with every group smoothed; fills each group's `scales` and `folded_into`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    producer, readers = producers_of(graph), readers_of(graph)
    inserted: dict[str, list[onnx.NodeProto]] = {}  # tensor -> the Mul nodes reading it
    for group in groups:
        if group.activation not in absmax:
            continue
        weights = [numpy_helper.to_array(initializers[w]) for w in group.weights]
        s = smoothing_scales(absmax[group.activation], weights, group.alpha)
        group.scales = s
        for node_name, w_name, w in zip(group.nodes, group.weights, weights):
            smoothed = numpy_helper.from_array(smooth_weights(w, s), f"{w_name}_smoothed")
            graph.initializer.append(smoothed)
            node = nodes[node_name]
            node.input[1] = smoothed.name
        x = group.activation
        source = producer.get(x)
        others = [r for r in readers.get(x, []) if r.name not in group.nodes and r.op_type not in _SHAPE_READERS]
        if source is not None and source.op_type == "LayerNormalization" and not others \
                and _constant_affine(source, initializers) and _last_axis(source):
            gamma = numpy_helper.to_array(initializers[source.input[1]])
            beta = numpy_helper.to_array(initializers[source.input[2]]) if len(source.input) > 2 and source.input[2] \
                else None
            new_gamma, new_beta = smooth_activation_producer(gamma, beta, s)
            graph.initializer.append(numpy_helper.from_array(new_gamma, f"{source.input[1]}_smoothed"))
            source.input[1] = f"{source.input[1]}_smoothed"
            if new_beta is not None:
                graph.initializer.append(numpy_helper.from_array(new_beta, f"{source.input[2]}_smoothed"))
                source.input[2] = f"{source.input[2]}_smoothed"
            group.folded_into = source.name
            continue
        inverse = f"{x}_smooth_inverse"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
        smoothed_x = f"{x}_smoothed"
        for node_name in group.nodes:
            node = nodes[node_name]
            node.input[0] = smoothed_x
        inserted.setdefault(x, []).append(helper.make_node("Mul", [x, inverse], [smoothed_x], name=f"{x}_SmoothMul"))
    insert_after(graph, inserted)
    # X * (1/s) has X's type and shape: say so, so the statistics pass sizes it without a
    # shape inference of the whole graph.
    known = {v.name: v for v in graph.value_info}
    for x, muls in inserted.items():
        for mul in muls:
            if x in known:
                graph.value_info.append(helper.make_value_info(mul.output[0], known[x].type))
    drop_unused_initializers(graph)
    return out


def _constant_affine(node: onnx.NodeProto, initializers: dict) -> bool:
    return len(node.input) > 1 and node.input[1] in initializers and \
        (len(node.input) < 3 or not node.input[2] or node.input[2] in initializers)


def _last_axis(node: onnx.NodeProto) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis == -1  # gamma then spans exactly the last (channel) axis


__all__ = ["SmoothGroup", "apply_smoothing", "channel_absmax", "smoothing_groups"]
