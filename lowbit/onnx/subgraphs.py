"""Quantization inside control flow: the bodies of `If`, `Loop` and `Scan`.

Exporters put whole networks inside control flow (a voice-activity detector's LSTM network sits
in a top-level `If` on the sample rate). Three pieces make those bodies quantizable with the same
planner and writer as the main graph:

- observation: ONNX Runtime can only return main-graph tensors, so `expose` threads each wanted
  body tensor out as an extra output of its control-flow node (an `If` branch returns it and the
  other branch an empty tensor; a `Loop`/`Scan` body returns it as an extra scan output, stacked
  over iterations). Only the branch that runs on a call yields values, so each branch is
  calibrated on exactly the calls that take it, and a branch no call takes stays float;
- planning and writing: each body becomes a standalone model (its formal inputs plus the outer
  tensors it reads as inputs, Constant nodes and outer weights as initializers), planned by
  `StaticPlanner` and written by `write_qdq`, then put back (see `quantize_subgraphs`);
- size: ONNX Runtime's optimizer copies an outer constant into every body that reads it (two
  LSTM branches, one weight: 2x); `hoist_shared_initializers` moves such copies back up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
EXPOSED_PREFIX = "lowbit_seen_"


@dataclass
class Body:
    """A subgraph, the node that owns it, and the graph that node sits in."""

    graph: onnx.GraphProto
    owner: onnx.NodeProto
    parent: onnx.GraphProto
    depth: int


def subgraphs_of(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attribute.graphs)
    return graphs


def bodies(graph: onnx.GraphProto, depth: int = 1) -> Iterator[Body]:
    """Every subgraph under `graph`, outer ones before the ones nested in them."""
    for node in graph.node:
        for sub in subgraphs_of(node):
            yield Body(sub, node, graph, depth)
            yield from bodies(sub, depth + 1)


def has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(subgraphs_of(n) for n in model.graph.node)


def defined_in(graph: onnx.GraphProto) -> set[str]:
    """Names a graph itself defines: formal inputs, initializers, node outputs."""
    return ({i.name for i in graph.input} | {t.name for t in graph.initializer}
            | {o for n in graph.node for o in n.output if o})


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """Names the graph (or a body nested in it) reads from enclosing scopes, in first-use order."""
    own = defined_in(graph)
    reads: dict[str, None] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in own:
                reads[name] = None
        for sub in subgraphs_of(node):
            for name in outer_reads(sub):
                if name not in own:
                    reads[name] = None
    return list(reads)


# ---------------------------------------------------------------------------------- observation

def expose(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of `model` whose main graph carries every wanted body tensor out, and a map from the
    main-graph name that carries it to the body tensor. Tensors of the main graph map to
    themselves. Float32 body tensors only (the empty stand-in of an untaken branch is float32)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    types = _elem_types(exposed.graph)
    wanted = {t for t in tensors if types.get(t, TensorProto.FLOAT) == TensorProto.FLOAT}
    counter = iter(range(10**9))
    carried = _expose_in(exposed.graph, wanted, counter)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in carried if n not in present and n not in
                                {i.name for i in exposed.graph.input})
    aliases = {name: original for name, original in carried.items()}
    for name in tensors:
        if name in defined_in(model.graph):
            aliases.setdefault(name, name)
    return exposed, aliases


def _expose_in(graph: onnx.GraphProto, wanted: set[str], counter) -> dict[str, str]:
    """{name visible in `graph`: wanted tensor it carries} for the wanted tensors of its bodies."""
    carried: dict[str, str] = {}
    for node in graph.node:
        subs = subgraphs_of(node)
        if not subs or node.op_type not in CONTROL_FLOW_OPS:
            continue
        found = [_found_in(sub, wanted, counter) for sub in subs]
        if not any(found):
            continue
        if node.op_type == "If":
            for index, (sub, seen) in enumerate(zip(subs, found)):
                others = [s for i, s in enumerate(subs) if i != index]
                for inner, original in seen.items():
                    outer = f"{EXPOSED_PREFIX}{next(counter)}"
                    _add_output(sub, inner)
                    for other in others:
                        _add_output(other, _empty_float(other, outer))
                    node.output.append(outer)
                    carried[outer] = original
        else:  # Loop / Scan: an extra scan output, stacked over the iterations
            (body,), (seen,) = subs, found
            for inner, original in seen.items():
                outer = f"{EXPOSED_PREFIX}{next(counter)}"
                _add_output(body, inner)
                node.output.append(outer)
                if node.op_type == "Scan":
                    _extend_scan_axes(node)
                carried[outer] = original
    return carried


def _found_in(sub: onnx.GraphProto, wanted: set[str], counter) -> dict[str, str]:
    """{name defined in `sub` to route out: wanted tensor} (own tensors, then nested bodies')."""
    own = {name: name for name in defined_in(sub) & wanted if name not in {t.name for t in sub.initializer}}
    nested = _expose_in(sub, wanted, counter)
    found = {}
    for inner, original in {**own, **nested}.items():
        # An Identity gives the body output a fresh name (a body output may not be a formal input,
        # and the same tensor may already be a body output).
        routed = f"{EXPOSED_PREFIX}{next(counter)}"
        sub.node.append(helper.make_node("Identity", [inner], [routed], name=f"{routed}_identity"))
        found[routed] = original
    return found


def _add_output(graph: onnx.GraphProto, name: str) -> None:
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))


def _empty_float(graph: onnx.GraphProto, tag: str) -> str:
    name = f"{tag}_none"
    graph.node.append(helper.make_node("Constant", [], [name], name=f"{name}_const",
                                       value=numpy_helper.from_array(np.zeros(0, np.float32), name)))
    return name


def _extend_scan_axes(node: onnx.NodeProto) -> None:
    for attribute in node.attribute:
        if attribute.name in ("scan_output_axes", "scan_output_directions"):
            attribute.ints.append(0)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    for node in graph.node:
        for sub in subgraphs_of(node):
            types.update(_elem_types(sub))
    return types


# ---------------------------------------------------------------------------------- planning

@dataclass
class Standalone:
    """A body as a model of its own, plus what is needed to put it back."""

    body: Body
    model: onnx.ModelProto
    borrowed: set[str]  # outer initializers copied in as initializers (they stay outside)


def standalone(body: Body, model: onnx.ModelProto, outer_constants: dict[str, onnx.TensorProto],
               value_infos: dict[str, onnx.ValueInfoProto]) -> Standalone:
    """`body` as a model: formal inputs and outer activations it reads become graph inputs; its
    Constant nodes and the outer weights it reads become initializers, so the planner sees weights."""
    graph = body.graph
    nodes, constants = [], list(graph.initializer)
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                     None) if node.op_type == "Constant" and not node.domain else None
        if value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            constants.append(tensor)
        else:
            nodes.append(node)
    reads = outer_reads(graph)
    borrowed = {n for n in reads if n in outer_constants}
    constants += [outer_constants[n] for n in reads if n in borrowed]
    inputs = list(graph.input)
    for name in reads:
        if name not in borrowed:
            inputs.append(value_infos.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    part = helper.make_graph(nodes, graph.name or "body", inputs, list(graph.output), constants,
                             value_info=list(graph.value_info))
    sub = helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)
    return Standalone(body, sub, borrowed)


def put_back(part: Standalone, written: onnx.ModelProto, taken: set[str]) -> None:
    """Replace the body's nodes and initializers with the written standalone model's; names the
    writer created that clash with names elsewhere in the model (`taken`) are renamed."""
    graph = written.graph
    before = defined_in(part.model.graph) | {n.name for n in part.model.graph.node}
    created = ({t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}) - before
    renames = {}
    for name in sorted(created):
        if name in taken:
            fresh, k = f"{name}_{part.body.depth}", 0
            while fresh in taken or fresh in created:
                k += 1
                fresh = f"{name}_{part.body.depth}_{k}"
            renames[name] = fresh
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        if node.name in taken and node.name not in before:
            node.name = f"{node.name}_{part.body.depth}"
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    target = part.body.graph
    del target.node[:]
    target.node.extend(graph.node)
    del target.initializer[:]
    target.initializer.extend(t for t in graph.initializer if t.name not in part.borrowed)
    del target.value_info[:]
    taken |= defined_in(target) | {n.name for n in target.node}


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in the graph and its bodies."""
    names = defined_in(graph) | {n.name for n in graph.node}
    for node in graph.node:
        for sub in subgraphs_of(node):
            names |= all_names(sub)
    return names


def scope_values(model: onnx.ModelProto) -> tuple[dict[str, onnx.TensorProto], dict[str, onnx.ValueInfoProto]]:
    """Constants (initializers, Constant-node tensors) and value infos of every scope, by name."""
    constants: dict[str, onnx.TensorProto] = {}
    infos: dict[str, onnx.ValueInfoProto] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            constants[tensor.name] = tensor
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type"):
                infos[value.name] = value
        for node in graph.node:
            if node.op_type == "Constant" and not node.domain:
                for attribute in node.attribute:
                    if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                        tensor = onnx.TensorProto()
                        tensor.CopyFrom(attribute.t)
                        tensor.name = node.output[0]
                        constants[tensor.name] = tensor
            for sub in subgraphs_of(node):
                visit(sub)

    visit(model.graph)
    return constants, infos


# ---------------------------------------------------------------------------------- size

def hoist_shared_initializers(graph: onnx.GraphProto) -> int:
    """Move initializers that several bodies of `graph` hold as identical copies (same bytes,
    whatever their names) up into `graph`, bottom-up, and return the bytes saved. ONNX Runtime's
    constant folding materializes an outer weight inside each body that reads it (silero VAD: the
    LSTM weights once per branch, +44% size)."""
    saved = 0
    for node in graph.node:
        for sub in subgraphs_of(node):
            saved += hoist_shared_initializers(sub)
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for node in graph.node:
        for sub in subgraphs_of(node):
            outputs = {o.name for o in sub.output}
            for tensor in sub.initializer:
                if tensor.name not in outputs and tensor.ByteSize() >= HOIST_MIN_BYTES:
                    copies.setdefault(_digest(tensor), []).append((sub, tensor))
    for held in copies.values():
        if len({id(sub) for sub, _ in held}) < 2:
            continue
        kept = onnx.TensorProto()
        kept.CopyFrom(held[0][1])
        if kept.name in defined_in(graph):
            continue
        for sub, tensor in held:
            old = tensor.name
            remaining = [t for t in sub.initializer if t.name != old]
            del sub.initializer[:]
            sub.initializer.extend(remaining)
            if old != kept.name:
                _rename_reads(sub, old, kept.name)
        graph.initializer.append(kept)
        saved += kept.ByteSize() * (len(held) - 1)
    return saved


# Small constants (shapes, axes) are not worth a rename.
HOIST_MIN_BYTES = 1024


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        for sub in subgraphs_of(node):
            if old not in defined_in(sub):
                _rename_reads(sub, old, new)


def _digest(tensor: onnx.TensorProto) -> str:
    """Identity of a constant's value: type, shape and bytes, not its name."""
    content = onnx.TensorProto()
    content.CopyFrom(tensor)
    content.name = ""
    return hashlib.sha1(content.SerializeToString()).hexdigest()


def node_reads(node: onnx.NodeProto) -> list[str]:
    """What a node reads: its inputs, plus the outer names its bodies read implicitly."""
    reads = [n for n in node.input if n]
    for sub in subgraphs_of(node):
        reads += [n for n in outer_reads(sub) if n not in reads]
    return reads
