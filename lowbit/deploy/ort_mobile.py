"""ONNX Runtime Mobile: the QDQ model in ORT format (.ort), converted by onnxruntime's own tool.

`onnxruntime.tools.convert_onnx_models_to_ort` applies ORT's fixed graph optimizations for ARM
(no x86-only NCHWc layout) and serializes the result; the file loads in a full or a minimal
(mobile) ORT build. Any model ONNX Runtime runs converts, so every lowbit precision is native
here: static int8, weight-only int8/int4, blocked weights.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx

from lowbit.deploy.flatbuffer_repack import repack
from lowbit.deploy.qdq_graph import PACKED_OP, QDQGraph, matmulnbits_dequantized

NAME = "ORT Mobile"
SUFFIX = ".ort"
EXTRA = None  # onnxruntime is a core dependency
PRECISIONS = "every precision ONNX Runtime runs (static int8, weight-only int8/int4)"


def check(graph: QDQGraph) -> None:
    """Every graph ONNX Runtime runs is fine."""


def write(graph: QDQGraph, onnx_model: onnx.ModelProto, example: dict[str, np.ndarray], path: Path,
          *, as_float: bool = False) -> None:
    """Short names, ARM-optimized, one initializer per distinct constant, converted, then repacked
    so that identical FlatBuffers objects (type-and-shape entries, attributes, strings) are stored
    once (`flatbuffer_repack`; 22 KB of 276 KB on the MobileNetV2-style net). Outputs unchanged."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    model = onnx.ModelProto()
    model.CopyFrom(float_onnx(onnx_model, graph) if as_float else onnx_model)
    short_names(model)
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as scratch:
        source, optimized = Path(scratch) / "source.onnx", Path(scratch) / "model.onnx"
        onnx.save_model(model, source)
        optimize_for_arm(source, optimized)
        fused = onnx.load(optimized)
        share_initializers(fused)
        short_names(fused)  # the optimizer's new nodes carry long names and doc strings
        onnx.save_model(fused, optimized)
        with contextlib.redirect_stdout(io.StringIO()):  # the tool prints one line per step
            convert_onnx_models_to_ort(optimized, Path(scratch), optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform="arm")
        content = (Path(scratch) / "model.ort").read_bytes()
        Path(path).write_bytes(repack(content, ORT_SCHEMA, "InferenceSession", b"ORTM") or content)


def share_initializers(model: onnx.ModelProto) -> None:
    """One initializer per distinct constant: the fused QLinear nodes each name their own scale and
    zero-point scalars (50 duplicates on the MobileNetV2-style net), and the .ort stores a tensor
    and a typed entry for each."""
    from onnx import numpy_helper

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return  # subgraphs may name outer initializers: left as they are
    boundary = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for tensor in model.graph.initializer:
        key = (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
        if key in first and tensor.name not in boundary:
            renamed[tensor.name] = first[key]
        else:
            first[key] = tensor.name
            kept.append(tensor)
    if not renamed:
        return
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def short_names(model: onnx.ModelProto) -> None:
    """Rename every node and inner tensor to a short name (v0, v1, ...; the graph's inputs and
    outputs keep theirs) and drop doc strings and metadata (lowbit's plan and recipe: for tools, not
    for the device). An .ort file stores each name in full: lowbit's QDQ names (the exporter's
    paths plus _QuantizeLinear_Output ...) were a tenth of a small model's file."""
    keep = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return renamed.setdefault(name, f"v{len(renamed)}")

    for tensor in model.graph.initializer:
        tensor.name = short(tensor.name)
    for index, node in enumerate(model.graph.node):
        node.name, node.doc_string = f"n{index}", ""
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    for value in model.graph.value_info:
        value.name = short(value.name)
    model.doc_string = model.graph.doc_string = ""
    del model.metadata_props[:]


def optimize_for_arm(source: Path, destination: Path) -> None:
    """ONNX Runtime's graph optimizations with the converter's ARM settings (all levels, no x86
    NCHWc layout, int8 QDQ kept), saved as ONNX. The converter applies the same optimizations,
    but its .ort keeps a typed entry for every tensor of the graph it started from, including
    those of the QuantizeLinear/DequantizeLinear nodes it fused away (a sixth of a small
    model's file); converting the already-fused graph stores only the tensors that remain."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(destination)
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["NchwcTransformer"])


def load(path: Path, threads: int, input_names: list[str]):
    """An InferenceSession on the .ort file (spin-waiting off, `threads` threads)."""
    from lowbit.onnx.session import make_session

    return make_session(str(path), threads=threads)


def float_onnx(model: onnx.ModelProto, graph: QDQGraph) -> onnx.ModelProto:
    """The same network in float: weights dequantized, activation Q -> DQ pairs removed."""
    from onnx import helper, numpy_helper

    quantize_ops = {"QuantizeLinear", "DequantizeLinear", PACKED_OP}
    nodes = [n for n in model.graph.node if n.op_type not in quantize_ops]
    nodes += [helper.make_node("Identity", op.inputs, op.outputs) for op in graph.ops if op.op_type == "FakeQuant"]
    tensors = {name: w.dequantized() for name, w in graph.weights.items()}
    for op in graph.packed_ops:  # MatMulNBits -> MatMul (+ Add) on the dequantized weight
        weight = f"{op.outputs[0]}_float_weight"
        tensors[weight] = matmulnbits_dequantized(op, graph.constants).T.copy()
        has_bias = len(op.inputs) > 5 and op.inputs[5]
        product = f"{op.outputs[0]}_product" if has_bias else op.outputs[0]
        nodes.append(helper.make_node("MatMul", [op.inputs[0], weight], [product]))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, op.inputs[5]], [op.outputs[0]]))
    tensors.update({name: value for name, value in graph.constants.items() if name not in tensors})
    used = {i for n in nodes for i in n.input}
    initializers = [numpy_helper.from_array(value, name) for name, value in tensors.items() if name in used]
    float_graph = helper.make_graph(_topological(nodes), model.graph.name, list(model.graph.input),
                                    list(model.graph.output), initializers)
    result = helper.make_model(float_graph, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result


def _topological(nodes: list) -> list:
    produced_by = {out: n for n in nodes for out in n.output}
    done, ordered = set(), []

    def visit(node) -> None:
        if id(node) in done:
            return
        done.add(id(node))
        for name in node.input:
            if name in produced_by:
                visit(produced_by[name])
        ordered.append(node)

    for node in nodes:
        visit(node)
    return ordered


# The ORT format's tables (onnxruntime/core/flatbuffers/schema/ort.fbs), for `flatbuffer_repack`.
_S, _I32, _I64 = ("string",), ("scalar", 4), ("scalar", 8)
ORT_SCHEMA = {
    "InferenceSession": {0: _S, 1: ("table", "Model"), 3: ("table", "KernelTypeStrResolver")},
    "Model": {0: _I64, 1: ("tables", "OperatorSetId"), 2: _S, 3: _S, 4: _S, 5: _I64, 6: _S, 7: ("table", "Graph"),
              8: _S, 9: ("tables", "StringStringEntry")},
    "OperatorSetId": {0: _S, 1: _I64},
    "StringStringEntry": {0: _S, 1: _S},
    "Graph": {0: ("tables", "Tensor"), 1: ("tables", "ValueInfo"), 2: ("tables", "Node"), 3: _I32,
              4: ("tables", "NodeEdge"), 5: ("strings",), 6: ("strings",), 7: ("tables", "SparseTensor"),
              8: ("table", "RuntimeOptimizations")},
    # written empty for an optimized model; any content makes the repack give up (file kept as is)
    "SparseTensor": {}, "RuntimeOptimizations": {0: ("tables", "RuntimeOptimizationRecordContainerEntry")},
    "RuntimeOptimizationRecordContainerEntry": {},
    "Tensor": {0: _S, 1: _S, 2: ("scalars", 8), 3: _I32, 4: ("scalars", 1), 5: ("strings",), 6: _I64},
    "ValueInfo": {0: _S, 1: _S, 2: ("table", "TypeInfo")},
    "TypeInfo": {0: _S, 1: ("scalar", 1),
                 2: ("union", 1, {1: "TensorTypeAndShape", 2: "SequenceType", 3: "MapType"})},
    "TensorTypeAndShape": {0: _I32, 1: ("table", "Shape")},
    "SequenceType": {0: ("table", "TypeInfo")},
    "MapType": {0: _I32, 1: ("table", "TypeInfo")},
    "Shape": {0: ("tables", "Dimension")},
    "Dimension": {0: ("table", "DimensionValue"), 1: _S},
    "DimensionValue": {0: ("scalar", 1), 1: _I64, 2: _S},
    "Node": {0: _S, 1: _S, 2: _S, 3: _I32, 4: _I32, 5: _S, 6: _I32, 7: _S, 8: ("strings",), 9: ("strings",),
             10: ("tables", "Attribute"), 11: ("scalars", 4), 12: ("strings",)},
    "Attribute": {0: _S, 1: _S, 2: _I32, 3: ("scalar", 4), 4: _I64, 5: _S, 6: ("table", "Tensor"), 7: ("table", "Graph"),
                  8: ("scalars", 4), 9: ("scalars", 8), 10: ("strings",), 11: ("tables", "Tensor"),
                  12: ("tables", "Graph")},
    "NodeEdge": {0: _I32, 1: ("scalars", 12), 2: ("scalars", 12)},
    "KernelTypeStrResolver": {0: ("tables", "OpIdKernelTypeStrArgsEntry")},
    "OpIdKernelTypeStrArgsEntry": {0: _S, 1: ("tables", "KernelTypeStrArgsEntry")},
    "KernelTypeStrArgsEntry": {0: _S, 1: ("tables", "ArgTypeAndIndex")},
    "ArgTypeAndIndex": {0: ("scalar", 1), 1: _I32},
}
