"""Outlier-channel splitting for the FFN of transformers, exact in float arithmetic.

BERT-style FFNs compute  Y = act(X @ W1 + b1) @ W2.  A handful of the hidden channels of
act(...) carry values 4-10x larger than the rest on a few tokens (measured on all-MiniLM-L6-v2:
one channel reaches 24.7 where the median channel peaks at 1.3). A per-tensor int8 scale for
that activation, as dynamic quantization uses, is then set by one channel and wastes most of
the grid on the others.

The rewrite moves those channels into a small float branch:

    main:     act(X @ W1' + b1') @ W2'        W1', b1' with the outlier columns zeroed,
                                              W2' with the outlier rows zeroed
    outliers: act(X @ W1[:, O] + b1[O]) @ W2[O, :]
    Y = main + outliers

Because act(0) = 0 (checked, not assumed), the zeroed channels contribute nothing to the main
path, so the sum equals the original Y; the main path's activation range shrinks to the
largest ordinary channel. The outlier branch is k columns wide (k is typically 1-3 of 1536), so
it costs two thin float MatMuls and one Add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.onnx.graph_index import producers_of, readers_of
from lowbit.onnx.qdq import drop_unused_initializers

# Element-wise ops an activation chain may consist of (other inputs must be scalar constants).
_POINTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Pow", "Gelu"}
# Channels whose peak exceeds this multiple of the `_REFERENCE_RANK`-th largest peak are outliers.
OUTLIER_RATIO = 2.0
_REFERENCE_RANK = 16


@dataclass
class SplitSite:
    """One FFN: the up projection, its bias Add, the activation chain and the down projection."""

    up: str                      # MatMul node X @ W1
    bias_add: str                # Add node (+ b1)
    chain: list[str]             # element-wise nodes from the bias Add to the down projection
    down: str                    # MatMul node act(...) @ W2
    activation: str              # tensor read by the down projection
    channels: list[int] = field(default_factory=list)
    float_branch: list[str] = field(default_factory=list)  # the branch's MatMuls, set by apply_split


def split_sites(model: onnx.ModelProto, candidates: set[str]) -> list[SplitSite]:
    """FFNs whose down projection is in `candidates` and whose chain maps 0 to 0."""
    init = {t.name: t for t in model.graph.initializer}
    made_by = producers_of(model.graph)
    readers = readers_of(model.graph)
    outputs = {o.name for o in model.graph.output}
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    sites = []
    for down in model.graph.node:
        if down.name not in candidates or down.op_type != "MatMul" or not _matrix(init, down.input[1]):
            continue
        found = _activation_chain(down.input[0], made_by, init)
        if found is None:
            continue
        bias_add, chain = found
        up = made_by[_other_input(bias_add, init)]
        chain.sort(key=lambda n: order[n.name])
        inner = [o for n in [up, bias_add, *chain] for o in n.output]
        allowed = {id(n) for n in [bias_add, *chain, down]}
        if any(o in outputs or any(id(r) not in allowed for r in readers.get(o, [])) for o in inner):
            continue  # an intermediate tensor is read elsewhere: splitting would change it
        if not _maps_zero_to_zero(bias_add.output[0], chain, init):
            continue
        sites.append(SplitSite(up.name, bias_add.name, [n.name for n in chain], down.name, down.input[0]))
    return sites


def _activation_chain(tensor: str, made_by: dict, init: dict
                      ) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """Walk back from `tensor` through element-wise nodes to the one bias Add (of a MatMul with a
    constant weight) they all start from: (bias Add, chain nodes), or None if it is not so."""
    chain: dict[int, onnx.NodeProto] = {}
    starts: dict[int, onnx.NodeProto] = {}
    pending = [tensor]
    while pending:
        name = pending.pop()
        node = made_by.get(name)
        if node is None or node.op_type not in _POINTWISE:
            return None
        if _is_bias_add(node, made_by, init):
            starts[id(node)] = node
            continue
        if id(node) in chain:
            continue
        chain[id(node)] = node
        pending += [i for i in node.input if not _scalar(init, i)]
    if len(starts) != 1 or not chain:
        return None
    return next(iter(starts.values())), list(chain.values())


def _is_bias_add(node: onnx.NodeProto, made_by: dict, init: dict) -> bool:
    if node.op_type != "Add" or _bias(node, init) is None:
        return False
    producer = made_by.get(_other_input(node, init) or "")
    return producer is not None and producer.op_type == "MatMul" and _matrix(init, producer.input[1])


def _other_input(node: onnx.NodeProto, init: dict) -> str | None:
    others = [name for name in node.input if name not in init]
    return others[0] if len(others) == 1 else None


def outlier_channels(absmax: np.ndarray, *, ratio: float = OUTLIER_RATIO) -> list[int]:
    """Channels peaking above `ratio` times the peak of the `_REFERENCE_RANK`-th largest one."""
    if absmax.size <= 4 * _REFERENCE_RANK:
        return []
    reference = float(np.sort(absmax)[::-1][_REFERENCE_RANK])
    if reference <= 0.0:
        return []
    return [int(i) for i in np.flatnonzero(absmax > ratio * reference)]


def apply_split(model: onnx.ModelProto, sites: list[SplitSite]) -> onnx.ModelProto:
    """A new model with each site's outlier channels moved to a float branch (whose MatMul names
    are recorded in `site.float_branch`: they must stay float)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    init = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    readers = readers_of(graph)
    inserted: dict[str, list[onnx.NodeProto]] = {}
    for site in sites:
        if not site.channels:
            continue
        up, bias_add, down = nodes[site.up], nodes[site.bias_add], nodes[site.down]
        channels = np.asarray(site.channels)
        w1 = numpy_helper.to_array(init[up.input[1]])
        w2 = numpy_helper.to_array(init[down.input[1]])
        bias_name = _bias(bias_add, init)
        b1 = numpy_helper.to_array(init[bias_name])
        base = site.down
        # The main path's copies (shared initializers are never edited in place).
        _replace_input(graph, up, 1, numpy_helper.from_array(_zeroed(w1, channels, axis=1), f"{base}_up_weight_main"))
        _replace_input(graph, bias_add, list(bias_add.input).index(bias_name),
                       numpy_helper.from_array(_zeroed(b1, channels, axis=0), f"{base}_up_bias_main"))
        _replace_input(graph, down, 1, numpy_helper.from_array(_zeroed(w2, channels, axis=0),
                                                               f"{base}_down_weight_main"))
        # The float branch: thin copies of the up projection, bias, chain and down projection.
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(w1[:, channels]), f"{base}_up_weight_outliers"),
            numpy_helper.from_array(np.ascontiguousarray(b1[channels]), f"{base}_up_bias_outliers"),
            numpy_helper.from_array(np.ascontiguousarray(w2[channels, :]), f"{base}_down_weight_outliers")])
        rename = {up.output[0]: f"{base}_outliers_up", bias_add.output[0]: f"{base}_outliers_biased"}
        branch = [helper.make_node("MatMul", [up.input[0], f"{base}_up_weight_outliers"], [rename[up.output[0]]],
                                   name=f"{base}_outliers_up_MatMul"),
                  helper.make_node("Add", [rename[up.output[0]], f"{base}_up_bias_outliers"],
                                   [rename[bias_add.output[0]]], name=f"{base}_outliers_bias_Add")]
        for name in site.chain:
            copy = onnx.NodeProto()
            copy.CopyFrom(nodes[name])
            copy.name = f"{name}_outliers"
            for i, tensor in enumerate(copy.input):
                copy.input[i] = rename.get(tensor, tensor)
            rename[copy.output[0]] = f"{copy.output[0]}_outliers"
            copy.output[0] = rename[copy.output[0]]
            branch.append(copy)
        # Join after the down projection's bias Add when it has one, so ORT still fuses that bias
        # into its int8 MatMul kernel.
        joined = down
        bias_reader = readers.get(down.output[0], [])
        if len(bias_reader) == 1 and bias_reader[0].op_type == "Add" and _bias(bias_reader[0], init) is not None:
            joined = bias_reader[0]
        y = joined.output[0]
        joined.output[0] = f"{y}_main"
        branch += [helper.make_node("MatMul", [rename[site.activation], f"{base}_down_weight_outliers"],
                                    [f"{base}_outliers_down"], name=f"{base}_outliers_down_MatMul"),
                   helper.make_node("Add", [f"{y}_main", f"{base}_outliers_down"], [y], name=f"{base}_outliers_Add")]
        site.float_branch = [f"{base}_outliers_up_MatMul", f"{base}_outliers_down_MatMul"]
        inserted[joined.name] = branch
    ordered = []
    for node in graph.node:
        ordered.append(node)
        ordered += inserted.get(node.name, [])
    del graph.node[:]
    graph.node.extend(ordered)
    drop_unused_initializers(graph)
    return out


def _matrix(init: dict, name: str) -> bool:
    return name in init and len(init[name].dims) == 2


def _scalar(init: dict, name: str) -> bool:
    return name in init and int(np.prod(init[name].dims, dtype=np.int64)) == 1


def _bias(node: onnx.NodeProto, init: dict) -> str | None:
    """The 1-D constant input of an Add, if it has one."""
    found = [name for name in node.input if name in init and len(init[name].dims) == 1]
    return found[0] if len(found) == 1 else None


def _maps_zero_to_zero(start: str, chain: list[onnx.NodeProto], init: dict) -> bool:
    """Evaluate the chain on x = 0 with scalar arithmetic: the split is exact only if act(0) = 0."""
    values = {start: 0.0}
    for node in chain:
        args = []
        for name in node.input:
            if name in values:
                args.append(values[name])
            elif _scalar(init, name):
                args.append(float(numpy_helper.to_array(init[name]).reshape(())))
            else:
                return False
        result = _scalar_op(node.op_type, args)
        if result is None:
            return False
        values[node.output[0]] = result
    return abs(values[chain[-1].output[0]]) < 1e-12


def _scalar_op(op: str, args: list[float]) -> float | None:
    a = args[0]
    b = args[1] if len(args) > 1 else None
    table = {"Add": lambda: a + b, "Sub": lambda: a - b, "Mul": lambda: a * b,
             "Div": lambda: a / b if b else math.nan, "Pow": lambda: a ** b,
             "Erf": lambda: math.erf(a), "Tanh": lambda: math.tanh(a), "Relu": lambda: max(a, 0.0),
             "Sigmoid": lambda: 1.0 / (1.0 + math.exp(-a)), "Gelu": lambda: 0.5 * a * (1.0 + math.erf(a / math.sqrt(2)))}
    try:
        return float(table[op]())
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None


def _zeroed(values: np.ndarray, channels: np.ndarray, *, axis: int) -> np.ndarray:
    result = values.copy()
    index = [slice(None)] * values.ndim
    index[axis] = channels
    result[tuple(index)] = 0
    return result


def _replace_input(graph: onnx.GraphProto, node: onnx.NodeProto, position: int, tensor: onnx.TensorProto) -> None:
    graph.initializer.append(tensor)
    node.input[position] = tensor.name
