"""Write a static QDQ model from a float model and a QuantPlan.

- weights: quantized offline with `lowbit.numerics` and stored as int8 initializers feeding a
  DequantizeLinear (with `axis` for per-channel scales);
- biases of Conv/Gemm/ConvTranspose: int32 with scale = input scale x weight scale, the form ONNX
  Runtime folds into QLinearConv / QGemm;
- Conv weights for AMX CPUs (`conv_weights_for_qgemm`): symmetric int8 weights of large Convs
  are stored shifted by -1 with zero point -1. The dequantized numbers are identical, but ONNX
  Runtime no longer sees zero-point-0 weights, so it runs the Conv through im2col + its U8S8
  GEMM (AMX tiles) instead of its symmetric-conv kernels (AVX512-VNNI) (see `lowbit.onnx.cpu`);
- activations: a QuantizeLinear -> DequantizeLinear pair with the calibrated scale and zero point.
  The producer's output is renamed and the DequantizeLinear takes over the tensor's name, so every
  consumer and graph output sees the quantized tensor without rewiring.

The result is a standard ONNX graph (opset >= 13); ONNX Runtime fuses the Q/DQ patterns into
int8 kernels at session start.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.numerics import QParams, quantize, storage_dtype
from lowbit.onnx.graph_index import insert_after
from lowbit.onnx.recurrent import write_int8_lstms
from lowbit.plan import PlanEntry, QuantPlan

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (`axis`) starts at 13
# Smallest Conv reduction (input channels per group x kernel size) that runs faster through ORT's
# AMX GEMM than through its symmetric-conv kernel. Measured per layer (2 threads, AMX Xeon):
# 3x3 convs with 64-512 channels (576-4608) 1.2-2.3x faster; 1x1 convs with 16-384 channels
# (ResNet shortcuts, MobileNetV2 expand/project) 1.1-3x slower, the GEMM's packing not paying off.
QGEMM_MIN_REDUCTION = 512
_INT32 = np.iinfo(np.int32)


def write_qdq(model: onnx.ModelProto, plan: QuantPlan, *, conv_weights_for_qgemm: bool = False) -> onnx.ModelProto:
    """A new model with the plan's quantization applied (`model` is left untouched).

    conv_weights_for_qgemm: store the symmetric int8 weights of large ungrouped Convs with zero
    point -1 (same dequantized values) so ONNX Runtime picks its GEMM kernels; for AMX CPUs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    head_nodes: list[onnx.NodeProto] = []  # weight and graph-input DQ nodes, placed first
    after: dict[str, list[onnx.NodeProto]] = {}  # producer output -> Q/DQ nodes that follow it
    nodes_by_name = {n.name: n for n in graph.node}
    scales: dict[str, np.ndarray] = {}

    for entry in plan.quantized("activation"):
        if entry.qparams is None:
            continue
        scales[entry.tensor] = np.asarray(entry.qparams.scale, np.float32)
        _quantize_activation(graph, entry, new_inits, head_nodes, after)

    lstm_weights = write_int8_lstms(out, plan.quantized("weight"), new_inits)  # DynamicQuantizeLSTM
    for entry in plan.quantized("weight"):
        if entry.tensor in lstm_weights:
            continue
        values = numpy_helper.to_array(initializers[entry.tensor]).astype(np.float32, copy=False)  # a copy already
        scales[entry.tensor] = np.asarray(entry.qparams.scale, np.float32)
        q, qparams = quantize(values, entry.qparams), entry.qparams
        if conv_weights_for_qgemm and _large_ungrouped_convs(nodes_by_name, entry, values.shape):
            q, qparams = _shift_symmetric(q, qparams)
        _dequantized_constant(entry.tensor, q, qparams, _axis(entry), new_inits, head_nodes)
        _rewire(nodes_by_name, entry, f"{entry.tensor}_dequantized")

    written: set[str] = set()
    for entry in plan.quantized("bias"):
        act, weight = entry.scale_of
        scale = (scales[act] * scales[weight]).astype(np.float32)
        values = numpy_helper.to_array(initializers[entry.tensor]).astype(np.float64)
        q = np.clip(np.rint(values / scale.astype(np.float64)), _INT32.min, _INT32.max).astype(np.int32)
        qp = QParams(None, scale, np.zeros(scale.shape, np.int32))  # type: ignore[arg-type]
        # A bias shared by layers with different input scales (an unrolled RNN's Gemms) gets one int32 copy each.
        name = entry.tensor if entry.tensor not in written else f"{entry.tensor}_for_{entry.nodes[0]}"
        written.add(entry.tensor)
        _dequantized_constant(name, q, qp, 0 if scale.ndim else None, new_inits, head_nodes)
        _rewire(nodes_by_name, entry, f"{name}_dequantized")

    insert_after(graph, after, first=head_nodes)
    drop_unused_initializers(graph)
    graph.initializer.extend(new_inits)
    return out


def _large_ungrouped_convs(nodes_by_name: dict[str, onnx.NodeProto], entry: PlanEntry,
                           shape: tuple[int, ...]) -> bool:
    """Weights read only by group-1 Convs with a reduction of at least QGEMM_MIN_REDUCTION.
    Depthwise and grouped Convs keep zero point 0 (ORT's depthwise kernels are the symmetric
    ones; its GEMM path would loop over tiny per-group GEMMs)."""
    nodes = [nodes_by_name.get(name) for name in entry.nodes]
    reduction = int(np.prod(shape[1:])) if len(shape) >= 3 else 0
    return bool(nodes) and reduction >= QGEMM_MIN_REDUCTION and all(
        n is not None and n.op_type == "Conv"
        and all(a.i == 1 for a in n.attribute if a.name == "group") for n in nodes)


def _shift_symmetric(q: np.ndarray, qparams: QParams) -> tuple[np.ndarray, QParams]:
    """(q - 1, zero point -1): the same dequantized values as symmetric int8 (q in [-127, 127]),
    in a form ONNX Runtime does not route to its symmetric-only kernels."""
    zero_point = np.asarray(qparams.zero_point)
    if q.dtype != np.int8 or np.any(zero_point != 0) or q.size == 0 or int(q.min()) <= -128:
        return q, qparams  # not symmetric int8 on [-127, 127]: nothing to shift into
    shifted = (q.astype(np.int16) - 1).astype(np.int8)
    return shifted, QParams(qparams.spec, qparams.scale, np.full(zero_point.shape, -1, np.int32))


def _quantize_activation(graph, entry: PlanEntry, new_inits, head_nodes, after) -> None:
    name = entry.tensor
    qp = entry.qparams
    scale_name, zp_name = f"{name}_scale", f"{name}_zero_point"
    zp_dtype = storage_dtype(entry.spec)  # uint8 / int8, or int16 for the budget's 16-bit step
    new_inits.append(numpy_helper.from_array(np.asarray(qp.scale, np.float32).reshape(()), scale_name))
    new_inits.append(numpy_helper.from_array(np.asarray(qp.zero_point).astype(zp_dtype).reshape(()), zp_name))
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None:
        # The DequantizeLinear takes over the name: consumers and graph outputs need no change.
        source = f"{name}_prequant"
        for i, out in enumerate(producer.output):
            if out == name:
                producer.output[i] = source
        q_node = helper.make_node("QuantizeLinear", [source, scale_name, zp_name], [f"{name}_quantized"],
                                  name=f"{name}_QuantizeLinear")
        dq_node = helper.make_node("DequantizeLinear", [f"{name}_quantized", scale_name, zp_name], [name],
                                   name=f"{name}_DequantizeLinear")
        after.setdefault(source, []).extend([q_node, dq_node])
        return
    # A graph input keeps its name: consumers read the dequantized copy instead.
    target = f"{name}_dequantized"
    for node in graph.node:
        for i, inp in enumerate(node.input):
            if inp == name:
                node.input[i] = target
    head_nodes.append(helper.make_node("QuantizeLinear", [name, scale_name, zp_name], [f"{name}_quantized"],
                                       name=f"{name}_QuantizeLinear"))
    head_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_quantized", scale_name, zp_name], [target],
                                       name=f"{name}_DequantizeLinear"))


def _dequantized_constant(name: str, q: np.ndarray, qp: QParams, axis: int | None, new_inits, head_nodes) -> None:
    scale = np.asarray(qp.scale, np.float32)
    zero_point = np.asarray(qp.zero_point).astype(q.dtype)
    new_inits.append(numpy_helper.from_array(np.ascontiguousarray(q), f"{name}_quantized"))
    new_inits.append(numpy_helper.from_array(scale, f"{name}_scale"))
    new_inits.append(numpy_helper.from_array(zero_point, f"{name}_zero_point"))
    kwargs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
    head_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                       [f"{name}_dequantized"], name=f"{name}_DequantizeLinear", **kwargs))


def _axis(entry: PlanEntry) -> int | None:
    granularity = entry.spec.granularity
    return granularity.axis if granularity.kind == "channel" else None


def _rewire(nodes_by_name: dict[str, onnx.NodeProto], entry: PlanEntry, target: str) -> None:
    for node_name in entry.nodes:
        node = nodes_by_name[node_name]
        for i, inp in enumerate(node.input):
            if inp == entry.tensor:
                node.input[i] = target


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = _used_names(graph) | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Inputs of every node, including nodes of subgraphs (If/Loop bodies read outer tensors)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                used |= _used_names(sub)
    return used


def ensure_opset(model: onnx.ModelProto, minimum: int = MIN_OPSET) -> onnx.ModelProto:
    """The model at opset >= `minimum` (converted with onnx.version_converter when older)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), minimum)
    if current >= minimum:
        return model
    from onnx import version_converter

    from lowbit.errors import LowbitError

    try:
        return version_converter.convert_version(model, minimum)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors
        raise LowbitError(f"cannot upgrade the model from opset {current} to {minimum} ({str(exc)[:200]}); "
                          f"re-export it with opset {minimum} or newer") from None


