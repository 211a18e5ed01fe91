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

from lowbit.deploy.qdq_graph import PACKED_OP, QDQGraph, matmulnbits_dequantized

NAME = "ORT Mobile"
SUFFIX = ".ort"
EXTRA = None  # onnxruntime is a core dependency
PRECISIONS = "every precision ONNX Runtime runs (static int8, weight-only int8/int4)"


def check(graph: QDQGraph) -> None:
    """Every graph ONNX Runtime runs is fine."""


def write(graph: QDQGraph, onnx_model: onnx.ModelProto, example: dict[str, np.ndarray], path: Path,
          *, as_float: bool = False) -> None:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    model = onnx.ModelProto()
    model.CopyFrom(float_onnx(onnx_model, graph) if as_float else onnx_model)
    short_names(model)
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as scratch:
        source, optimized = Path(scratch) / "source.onnx", Path(scratch) / "model.onnx"
        onnx.save_model(model, source)
        optimize_for_arm(source, optimized)
        with contextlib.redirect_stdout(io.StringIO()):  # the tool prints one line per step
            convert_onnx_models_to_ort(optimized, Path(scratch), optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform="arm")
        Path(path).write_bytes((Path(scratch) / "model.ort").read_bytes())


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
