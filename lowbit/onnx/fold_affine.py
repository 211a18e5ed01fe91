"""Fold a constant per-channel scale and shift after a Conv into the Conv's weight and bias.

Some exporters write a learnable affine after a convolution as separate nodes: PaddlePaddle's
PP-LCNetV3 (PP-OCRv4's backbone) has `Conv -> Mul(scale) -> Add(shift)` in every block, and a
ConvTranspose whose bias is a separate `Add`. ONNX Runtime's own Conv+Mul/Add fusions skip these
(the constant is the Mul's first input, or a shape it does not match), so a quantizer sees three
int8 tensors where there is one: each extra Q/DQ pair rounds again, and ONNX Runtime runs the Mul and
Add as extra float ops. Folding is exact in float (up to float rounding):

    Conv(x, W, B) * s + d  ==  Conv(x, W * s, B * s + d)      s, d: scalars or one value per output channel

An inference BatchNormalization after a ConvTranspose (ONNX Runtime fuses it only after a Conv) is
the same scale and shift.

Only a node's sole consumer is folded, and never a graph output (its name must stay).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.onnx.graph_index import readers_of

_FOLDABLE = ("Conv", "ConvTranspose")
_FOLLOWERS = ("Mul", "Add", "BatchNormalization")


def fold_conv_affine(model: onnx.ModelProto) -> int:
    """Fold every foldable Mul/Add of a constant into the Conv/ConvTranspose before it, in place.
    Returns how many Mul/Add nodes were removed."""
    graph = model.graph
    folded = 0
    while True:
        step = _fold_one(graph)
        if not step:
            break
        folded += step
    if folded:
        used = {name for node in graph.node for name in node.input}
        kept = [t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return folded


def _fold_one(graph: onnx.GraphProto) -> int:
    """One pass over the graph; folds each Conv's next Mul/Add at most once. Returns the count."""
    initializers = {t.name: t for t in graph.initializer}
    consumers = readers_of(graph)
    outputs = {o.name for o in graph.output}
    names = {t.name for t in graph.initializer}
    removed: set[int] = set()
    count = 0
    for conv in list(graph.node):
        if conv.op_type not in _FOLDABLE or conv.domain not in ("", "ai.onnx") or id(conv) in removed:
            continue
        out = conv.output[0]
        readers = consumers.get(out, [])
        if out in outputs or len(readers) != 1 or readers[0].op_type not in _FOLLOWERS or id(readers[0]) in removed:
            continue
        follower = readers[0]
        weight = initializers.get(conv.input[1]) if len(conv.input) > 1 else None
        bias_name = conv.input[2] if len(conv.input) > 2 else ""
        bias = initializers.get(bias_name) if bias_name else None
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT or (bias_name and bias is None):
            continue
        w = numpy_helper.to_array(weight)
        channels = _output_channels(conv, w)
        if channels is None:
            continue
        if follower.op_type == "BatchNormalization":
            scale, shift = _batch_norm(follower, initializers, channels)
        elif follower.op_type == "Mul":
            scale, shift = _channel_constant(follower, out, initializers, w.ndim, channels), 0.0
        else:
            scale, shift = 1.0, _channel_constant(follower, out, initializers, w.ndim, channels)
        if scale is None or shift is None:
            continue
        b = numpy_helper.to_array(bias).astype(np.float32) if bias is not None else np.zeros(channels, np.float32)
        w = _scale_output_channels(conv, w, np.broadcast_to(np.asarray(scale, np.float32), (channels,)))
        b = b * scale + shift
        new_w = _unique(f"{weight.name}_folded", names)
        new_b = _unique(f"{bias_name or conv.name + '_bias'}_folded", names)
        graph.initializer.extend([numpy_helper.from_array(w.astype(np.float32), new_w),
                                  numpy_helper.from_array(b.astype(np.float32), new_b)])
        del conv.input[1:]
        conv.input.extend([new_w, new_b])
        conv.output[0] = follower.output[0]
        removed.add(id(follower))
        count += 1
    if removed:
        kept = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(kept)
    return count


def _output_channels(conv: onnx.NodeProto, w: np.ndarray) -> int | None:
    """Output channels of the Conv/ConvTranspose, None for a grouped ConvTranspose (its output
    channels span two weight axes)."""
    if w.ndim < 3:
        return None
    if conv.op_type == "Conv":
        return int(w.shape[0])
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    return int(w.shape[1]) if group == 1 else None


def _channel_constant(node: onnx.NodeProto, data: str, initializers: dict, rank: int,
                      channels: int) -> np.ndarray | None:
    """The Mul/Add's other operand as one float per output channel, when it is a float constant that
    broadcasts along the channel axis only (a scalar, (C,1,1), (1,C,1,1), ...); otherwise None."""
    others = [name for name in node.input if name != data]
    if len(node.input) != 2 or len(others) != 1 or others[0] not in initializers:
        return None
    tensor = initializers[others[0]]
    if tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    value = numpy_helper.to_array(tensor)
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


def _batch_norm(node: onnx.NodeProto, initializers: dict, channels: int) -> tuple:
    """(scale, shift) per channel of an inference BatchNormalization with constant parameters, else (None, None)."""
    if len(node.input) != 5 or len(node.output) != 1 or not all(n in initializers for n in node.input[1:]):
        return None, None
    gamma, beta, mean, var = (numpy_helper.to_array(initializers[n]).astype(np.float64) for n in node.input[1:])
    if any(v.shape != (channels,) for v in (gamma, beta, mean, var)):
        return None, None
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    scale = gamma / np.sqrt(var + epsilon)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def _scale_output_channels(conv: onnx.NodeProto, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    axis = 0 if conv.op_type == "Conv" else 1
    shape = [1] * w.ndim
    shape[axis] = -1
    return w * scale.reshape(shape)


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate
