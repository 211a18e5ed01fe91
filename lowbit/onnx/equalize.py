"""Cross-layer equalization and bias correction on an ONNX graph (the math: lowbit.algorithms).

Equalization finds chains Conv -> [Relu | Clip(0, max)] -> Conv -> ... where each link is the only
reader of the tensor before it, the first conv of a pair is dense or depthwise and the second is
dense (group 1) or depthwise (group = channels). It rescales the weights in place of the
initializers and, as in Nagel et al. 2019, turns Clip(0, 6) (ReLU6) on an equalized link into
Relu, since ReLU6 is not scale-invariant; the float function is then exactly preserved for Relu
links and changes only where the float activation exceeded the ReLU6 bound.

Bias correction measures the per-channel mean of every int8 Conv's input on the calibration data
(float model) and subtracts dW E[x] from its bias, where dW is the weight's int8 rounding error
under the plan's scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.algorithms.bias_correction import corrected_bias
from lowbit.algorithms.equalization import Layer, equalize_chain
from lowbit.numerics import dequantize, quantize
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import DEFAULT_MEMORY_BUDGET_MB
from lowbit.onnx.graph_index import readers_of
from lowbit.onnx.statistics import ChannelMeans, collect
from lowbit.plan import QuantPlan


@dataclass
class EqualizationReport:
    chains: list[list[str]]
    relu6_replaced: list[str]


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def _conv_layout(node: onnx.NodeProto, weight: np.ndarray) -> str | None:
    """'dense', 'depthwise' or None (other grouped convs are not equalized)."""
    group = _attr(node, "group", 1)
    if group == 1:
        return "dense"
    if weight.shape[1] == 1 and group == weight.shape[0]:
        return "depthwise"
    return None


def find_chains(model: onnx.ModelProto, skip: set[str] = frozenset()) -> list[list[tuple[onnx.NodeProto, onnx.NodeProto | None]]]:
    """Chains of (conv, activation-after-it or None) whose consecutive convs can be equalized."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = readers_of(graph)
    outputs = {o.name for o in graph.output}

    def conv_ok(node: onnx.NodeProto) -> bool:
        return (node.op_type == "Conv" and node.name not in skip and node.input[1] in inits
                and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
                and _conv_layout(node, numpy_helper.to_array(inits[node.input[1]])) is not None)

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        found = readers.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in outputs else None

    def next_link(conv: onnx.NodeProto) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
        """(activation between, next conv) or (None, None)."""
        follower = only_reader(conv.output[0])
        activation = None
        if follower is not None and (follower.op_type == "Relu" or _is_relu_clip(follower, inits)):
            activation, follower = follower, only_reader(follower.output[0])
        if follower is not None and conv_ok(follower) and follower.input[0] == (activation or conv).output[0]:
            return activation, follower
        return None, None

    chains, used = [], set()
    for node in graph.node:
        if node.name in used or not conv_ok(node):
            continue
        chain = [(node, None)]
        current = node
        while True:
            activation, follower = next_link(current)
            if follower is None or follower.name in used:
                break
            chain[-1] = (current, activation)
            chain.append((follower, None))
            current = follower
        if len(chain) > 1:
            chains.append(chain)
            used.update(c.name for c, _ in chain)
    return chains


def _is_relu_clip(node: onnx.NodeProto, inits: dict) -> bool:
    """Clip with lower bound 0 (ReLU6 and friends)."""
    if node.op_type != "Clip":
        return False
    low = None
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in inits:
            return False
        low = float(numpy_helper.to_array(inits[node.input[1]]))
    else:
        low = next((a.f for a in node.attribute if a.name == "min"), None)
    return low == 0.0


def equalize_model(model: onnx.ModelProto, *, skip: set[str] = frozenset()) -> tuple[onnx.ModelProto, EqualizationReport]:
    """A new model with every conv chain equalized and its ReLU6 links turned into Relu."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    report = EqualizationReport([], [])
    for chain in find_chains(out, skip):
        layers = []
        for conv, _ in chain:
            weight = numpy_helper.to_array(inits[conv.input[1]])
            bias = numpy_helper.to_array(inits[conv.input[2]]) if len(conv.input) > 2 and conv.input[2] else None
            layers.append(Layer(weight, bias, 0 if _conv_layout(conv, weight) == "depthwise" else 1))
        new_layers, _ = equalize_chain(layers)
        for (conv, activation), layer in zip(chain, new_layers):
            conv.input[1] = _add_initializer(graph, f"{conv.input[1]}_equalized", layer.weight)
            if layer.bias is not None:
                conv.input[2] = _add_initializer(graph, f"{conv.input[2]}_equalized", layer.bias)
            if activation is not None and activation.op_type == "Clip":
                replacement = helper.make_node("Relu", [activation.input[0]], list(activation.output),
                                               name=activation.name)
                activation.CopyFrom(replacement)
                report.relu6_replaced.append(activation.name)
        report.chains.append([conv.name for conv, _ in chain])
    from lowbit.onnx.qdq import drop_unused_initializers

    drop_unused_initializers(graph)
    return out, report


def _add_initializer(graph: onnx.GraphProto, name: str, values: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
    return name


def channel_means(model: onnx.ModelProto, tensors: list[str], data: CalibrationData, *, batch_size: int = 16,
                  threads: int | None = None, memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB
                  ) -> dict[str, np.ndarray]:
    """Mean of each axis-1 channel (NCHW / (N, C)) of the given tensors over the data, streamed
    through the one statistics pass (`lowbit.onnx.statistics`, memory-bounded)."""
    means = ChannelMeans(tensors, axis=1)
    collect(model, data.batches(batch_size), [means], threads=threads, memory_budget_mb=memory_budget_mb)
    return means.result()


def conv_bias_targets(model: onnx.ModelProto, plan: QuantPlan) -> list[onnx.NodeProto]:
    """The int8 Convs of `plan` whose float bias is theirs alone (a shared bias is left as is)."""
    weights = {e.tensor for e in plan.quantized("weight")}
    biases = {e.tensor for e in plan.quantized("bias")}
    inits = {t.name for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    return [node for node in model.graph.node
            if node.op_type == "Conv" and len(node.input) >= 3 and node.input[1] in weights
            and node.input[2] in biases and node.input[2] in inits and readers.get(node.input[2]) == 1]


def correct_biases(model: onnx.ModelProto, plan: QuantPlan, data: CalibrationData | None, *, batch_size: int = 16,
                   threads: int | None = None, means: dict[str, np.ndarray] | None = None) -> list[str]:
    """Rewrite (in place) the float bias of every int8 Conv so its output mean matches float.

    Returns the corrected node names. Must run after planning (the weight scales are needed) and
    before writing (the writer quantizes the corrected bias). `means`: the Conv inputs' channel
    means measured earlier (`channel_means`); otherwise they are measured on `data` now."""
    inits = {t.name: t for t in model.graph.initializer}
    weights = {e.tensor: e for e in plan.quantized("weight")}
    targets = conv_bias_targets(model, plan)
    if not targets:
        return []
    if means is None:
        means = channel_means(model, list(dict.fromkeys(n.input[0] for n in targets)), data, batch_size=batch_size,
                              threads=threads)
    corrected = []
    for node in targets:
        entry = weights[node.input[1]]
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        quantized = dequantize(quantize(weight, entry.qparams), entry.qparams)
        bias = numpy_helper.to_array(inits[node.input[2]])
        new_bias = corrected_bias(bias, weight, np.asarray(quantized), means[node.input[0]],
                                  groups=_attr(node, "group", 1))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(new_bias, node.input[2]))
        corrected.append(node.name)
    return corrected


__all__ = ["EqualizationReport", "channel_means", "conv_bias_targets", "correct_biases", "equalize_model", "find_chains"]
