"""Write a float16 model: fp16 weights and compute where ONNX Runtime's CPU provider has half
kernels, float32 everywhere else.

Which ops have half kernels is not guessed from a list: each (op type, input types) combination
is probed once by building a one-node session, so the answer is the runtime's own. Graph inputs
and outputs stay float32 (callers feed and read what they did before); Cast nodes are inserted
where an fp16 region meets a float32 one. fp16 weights feeding float32 ops are cast back at load
time (ONNX Runtime folds those casts once), so the file is half the size either way.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx.graph_index import GraphIndex
from lowbit.plan import PlanEntry, QuantPlan
from lowbit.spec import QuantSpec

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
_FP16_SPEC = QuantSpec("fp16")


def plan_fp16(model: onnx.ModelProto, exclude: set[str] = frozenset()) -> QuantPlan:
    """Which nodes run in fp16 (the rest stay float32, with the reason)."""
    from lowbit.onnx.registry import node_matches

    index = GraphIndex.of(model)
    plan = QuantPlan("fp16")
    for node in model.graph.node:
        if node.op_type in ("Cast", "Constant"):
            continue
        floats = [i for i in node.input if i and index.elem_type.get(i) == FLOAT]
        if not floats and not any(index.elem_type.get(o) == FLOAT for o in node.output):
            continue
        if node_matches(node, exclude):
            plan.float_nodes[node.name] = "excluded by the user"
        elif not has_half_kernel(node.op_type, node.domain, _opset(model, node.domain),
                                 tuple(index.elem_type.get(i, 0) if i else -1 for i in node.input),
                                 _attributes_key(node)):
            plan.float_nodes[node.name] = "no float16 CPU kernel in ONNX Runtime; kept float32"
    for init in model.graph.initializer:
        if init.data_type == FLOAT:
            plan.add(PlanEntry(init.name, "weight", spec=_FP16_SPEC,
                               nodes=[n.name for n in index.consumers.get(init.name, [])]))
    return plan


def write_fp16(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = GraphIndex.of(out)
    half_nodes = {n.name for n in graph.node if n.name not in plan.float_nodes and n.op_type != "Cast"}
    precision: dict[str, int] = {}  # float tensor -> FLOAT or HALF, as produced
    for name in index.graph_inputs:
        if index.elem_type.get(name) == FLOAT:
            precision[name] = FLOAT
    for init in graph.initializer:
        if init.data_type == FLOAT:
            converted = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
            init.CopyFrom(converted)
            precision[init.name] = HALF
    ordered: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        if precision.get(name, to) == to:
            return name
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}_as_{'fp16' if to == HALF else 'fp32'}"
            ordered.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"{casts[key]}_Cast"))
        return casts[key]

    for node in graph.node:
        if node.op_type == "Constant":
            _constant_to_half(node, precision)
        elif node.op_type == "Cast":
            for o in node.output:
                if index.elem_type.get(o) == FLOAT or _attr(node, "to") == FLOAT:
                    precision[o] = FLOAT
        else:
            # Half only where half data already flows in: a lone data-movement op between float32
            # ops would just add two Casts.
            half_in = any(precision.get(i) == HALF for i in node.input)
            target = HALF if node.name in half_nodes and half_in else FLOAT
            for i, name in enumerate(node.input):
                if name in precision:
                    node.input[i] = cast(name, target)
            for o in node.output:
                if index.elem_type.get(o, FLOAT) == FLOAT and _produces_float(node, index):
                    precision[o] = target
        ordered.append(node)
    # Graph outputs stay float32: the producer writes a half tensor, a Cast restores the name.
    for output in graph.output:
        if precision.get(output.name) == HALF:
            half_name = f"{output.name}_fp16"
            for node in ordered:
                for i, o in enumerate(node.output):
                    if o == output.name:
                        node.output[i] = half_name
                for i, inp in enumerate(node.input):
                    if inp == output.name:
                        node.input[i] = half_name
            ordered.append(helper.make_node("Cast", [half_name], [output.name], to=FLOAT,
                                            name=f"{output.name}_Cast"))
    del graph.node[:]
    graph.node.extend(ordered)
    # Types changed under the annotations; ORT re-infers them.
    del graph.value_info[:]
    return out


def _produces_float(node: onnx.NodeProto, index: GraphIndex) -> bool:
    return any(index.elem_type.get(o, FLOAT) == FLOAT for o in node.output)


def _constant_to_half(node: onnx.NodeProto, precision: dict[str, int]) -> None:
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.t.data_type == FLOAT:
            half = numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float16))
            attribute.t.CopyFrom(half)
            precision[node.output[0]] = HALF


@functools.lru_cache(maxsize=None)
def has_half_kernel(op_type: str, domain: str, opset: int, input_types: tuple[int, ...],
                    attributes: tuple) -> bool:
    """True when ONNX Runtime's CPU provider can run this op with its float inputs in fp16."""
    inputs, names = [], []
    for i, elem in enumerate(input_types):
        if elem == -1:
            names.append("")
            continue
        names.append(f"in{i}")
        inputs.append(helper.make_tensor_value_info(f"in{i}", HALF if elem == FLOAT else elem or FLOAT, None))
    node = helper.make_node(op_type, names, ["out"], domain=domain or None, **dict(attributes))
    graph = helper.make_graph([node], "probe", inputs, [onnx.ValueInfoProto(name="out")])
    imports = [helper.make_opsetid(domain, opset)] + ([] if domain == "" else [helper.make_opsetid("", 17)])
    # IR 8: understood by every ONNX Runtime this project supports.
    model = helper.make_model(graph, opset_imports=imports, ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="lowbit-fp16-probe-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            placed = onnx.load(options.optimized_model_filepath)
        except Exception:  # an op this probe cannot build: keep it float32
            return False
    # Without a half kernel ORT silently wraps the node in Casts to float32.
    return not any(n.op_type == "Cast" for n in placed.graph.node)


def _attributes_key(node: onnx.NodeProto) -> tuple:
    items = []
    for attribute in node.attribute:
        if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            return (("__subgraph__", node.name),)
        value = helper.get_attribute_value(attribute)
        if isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, onnx.TensorProto):
            value = value.SerializeToString()
        items.append((attribute.name, value))
    return tuple(items)


def _opset(model: onnx.ModelProto, domain: str) -> int:
    for imp in model.opset_import:
        if imp.domain == domain or (domain in ("", "ai.onnx") and imp.domain in ("", "ai.onnx")):
            return imp.version
    return 1


def _attr(node: onnx.NodeProto, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None
