"""Per-layer sensitivity of a dynamic int8 model: each quantized layer's output vs the float one.

A dynamic model has no stored activation quantizers to read: each quantized MatMul/Gemm became
DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (and an embedding Gather an int8 Gather
times per-row scales), ending in the float node's own output name. So the tensors compared are
the outputs of the quantized layers, named alike in both models:

- `sqnr_db` / `cosine`: the quantized model's layer output vs the float model's (error
  accumulated up to and including this layer);
- `local_sqnr_db` ("own"): the layer's quantized subgraph, copied out of the quantized model, fed
  the *float* model's input of that layer, vs the float layer: what quantizing this layer alone
  costs. The copies run inside the float model, next to the layer they shadow, so one extra pass
  measures every layer.

The float model is pre-processed and outlier-split exactly as `quantize_onnx` did (the stored plan
says which FFN channels were split off), so layer names and inputs match. Both models stream
through `ActivationStream` (memory-bounded chunks, unoptimized sessions: ONNX Runtime evaluates
the ONNX ops as the spec defines them); a float-model value waits only until its quantized partner
arrives, and only running sums are kept.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from lowbit.analysis.sensitivity_report import SensitivityReport, Sums, TensorSensitivity
from lowbit.errors import LowbitError
from lowbit.memory import release_freed_memory
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.collect import ActivationStream
from lowbit.onnx.graph_index import GraphIndex, producers_of, values_of
from lowbit.onnx.io import load_model
from lowbit.onnx.pipeline import reference_model
from lowbit.onnx.statistics import Partners, paired_stream_budget, with_last
from lowbit.onnx.stored_plan import StoredSettings
from lowbit.plan import QuantPlan
from lowbit.progress import progress

OWN_SUFFIX = "__lowbit_own"  # the float model's copy of a layer's quantized subgraph


def dynamic_sensitivity(float_path: str | os.PathLike, quant_path: str | os.PathLike, quant: onnx.ModelProto,
                        plan: QuantPlan, data, *, samples: int | None = None, batch_size: int = 16,
                        threads: int | None = None,
                        memory_budget_mb: float | None = None) -> SensitivityReport:
    """SQNR/cosine of every quantized layer output of the dynamic model `quant` vs the float model
    (see the module docstring); `plan` is the plan stored in `quant`."""
    original = load_model(float_path)
    inputs = model_inputs(original)
    reference = reference_model(original, StoredSettings.of(plan).records, copy=False)
    del original  # the prepared reference is what runs: the raw float model would only hold memory
    layers = _layers(plan, reference, quant)
    measured = [t for t in layers if not t.skipped]
    if not measured:
        raise LowbitError(f"no quantized layer of {quant_path} matches a node of {float_path}; "
                          "pass the float model it was quantized from")
    dataset = CalibrationData(data, inputs, samples=samples, what="analysis data")
    notes: list[str] = []
    own = _add_own_copies(reference, quant, [t.nodes[0] for t in measured], notes)
    release_freed_memory()  # the graph's node list was rebuilt: the old copies go back to the OS
    outputs = [t.tensor for t in measured]
    budget = paired_stream_budget(memory_budget_mb)
    ref_stream = ActivationStream(reference, outputs + list(own.values()), memory_budget_mb=budget, threads=threads)
    quant_stream = ActivationStream(quant, outputs, memory_budget_mb=budget, threads=threads)
    sums = {t.tensor: Sums() for t in measured}
    uses = {t.tensor: 1 + (t.tensor in own) for t in measured}  # the quantized model's value, the own copy's
    own_of = {copy: tensor for tensor, copy in own.items()}

    def own_copy(name: str, value: np.ndarray, take) -> None:
        ref = take(own_of[name])  # a copy runs right after its layer, whose value is held by now
        if _is_float(ref) and _is_float(value):
            sums[own_of[name]].add_own(ref, value)

    seen = 0
    total = -(-dataset.num_samples // dataset.feed_batch_size(batch_size))
    with progress(total=total, desc="analyzing", unit="batch") as bar:
        for batch, last in with_last(dataset.batches(batch_size)):
            partners = Partners(ref_stream.chunks(batch, last=last), uses, on_extra=own_copy)
            for found in quant_stream.chunks(batch, last=last):
                for name, got in found.items():
                    ref = partners.take(name)
                    if _is_float(ref) and _is_float(got):
                        sums[name].add_error(ref, got)
                del found
            partners.finish()
            seen += next(iter(batch.values())).shape[0] if batch else 0
            bar.update(1)
    for t in measured:
        sums[t.tensor].result(t)
    return SensitivityReport(str(float_path), str(quant_path), seen, layers, notes, mode="dynamic")


def _layers(plan: QuantPlan, reference: onnx.ModelProto, quant: onnx.ModelProto) -> list[TensorSensitivity]:
    """One row per quantized layer, named by its output tensor; unmatched layers are skipped."""
    nodes = {n.name: n for n in reference.graph.node}
    produced = producers_of(quant.graph)
    rows = []
    for name in dict.fromkeys(node for e in plan.quantized("weight") for node in e.nodes):
        node = nodes.get(name)
        row = TensorSensitivity(node.output[0] if node is not None else name, [name])
        if node is None:
            row.skipped = "no node of this name in the float model (pass the float model it was quantized from)"
        elif node.output[0] not in produced:
            row.skipped = "its output is not computed by the quantized model"
        rows.append(row)
    return rows


def _add_own_copies(reference: onnx.ModelProto, quant: onnx.ModelProto, layer_names: list[str],
                    notes: list[str]) -> dict[str, str]:
    """Copy each layer's quantized subgraph into `reference`, right after the float layer and fed
    by the same float inputs; returns {layer output: copy's output}."""
    graph = reference.graph
    known = values_of(graph)
    index = GraphIndex.of(quant)
    producer, quant_inits = index.producer, index.initializers
    order = {id(n): i for i, n in enumerate(quant.graph.node)}
    position = {n.name: i for i, n in enumerate(graph.node)}
    inserted: dict[int, list[onnx.NodeProto]] = {}
    own: dict[str, str] = {}
    copied: set[str] = set()  # a DynamicQuantizeLinear shared by Q/K/V is copied once, after the first
    for name in sorted(layer_names, key=position.__getitem__):
        layer = graph.node[position[name]]
        output = layer.output[0]
        found = _slice(output, producer, order, quant_inits, known)
        if found is None:
            notes.append(f"{name}: its quantized subgraph reads tensors the float model lacks; own dB not measured")
            continue
        nodes, initializers = found
        rename = {t: f"{t}{OWN_SUFFIX}" for n in nodes for t in n.output}
        rename.update({t: f"{t}{OWN_SUFFIX}" for t in initializers})
        for node in nodes:
            if node.output[0] in copied:
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}{OWN_SUFFIX}"
            copy.input[:] = [rename.get(t, t) for t in node.input]
            copy.output[:] = [rename[t] for t in node.output]
            inserted.setdefault(position[name], []).append(copy)
            copied.add(node.output[0])
        for tensor in initializers:
            if tensor in copied:
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(quant_inits[tensor])
            copy.name = rename[tensor]
            graph.initializer.append(copy)
            copied.add(tensor)
        own[output] = rename[output]
    ordered = []
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(inserted.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return own


def _slice(output: str, producer: dict, order: dict[int, int], quant_inits: dict, known: set[str]
           ) -> tuple[list[onnx.NodeProto], list[str]] | None:
    """The quantized model's nodes computing `output` from tensors the float model also has (the
    layer's inputs), in graph order, and the initializers they read; None when it reads others."""
    nodes: dict[int, onnx.NodeProto] = {}
    initializers: list[str] = []
    pending = [output]
    while pending:
        node = producer.get(pending.pop())
        if node is None:
            return None  # a graph input of the quantized model that the float model does not have
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        for name in node.input:
            if not name:
                continue
            if name in quant_inits:
                if name not in initializers:
                    initializers.append(name)
            elif name not in known:
                pending.append(name)
            # else: a float-model tensor (the layer's input): the copy reads the float one
    return sorted(nodes.values(), key=lambda n: order[id(n)]), initializers


def _is_float(value) -> bool:
    return value.dtype.kind == "f"
