"""Place activation quantization where ONNX Runtime's integer kernels need it: at layer outputs.

ONNX Runtime turns DequantizeLinear -> Conv -> QuantizeLinear into one int8 QLinearConv only when
the Conv's output is quantized (a ReLU/ReLU6 between them is dropped when the output range starts
at 0). Quantizing layer *inputs* alone leaves convolutions whose output path has no Q (e.g.
Conv -> ReLU -> GlobalAveragePool) running in float on dequantized weights, slower than fp32.

So, on the torch.fx graph of a prepared model:

- every quantized Conv and QuantAdd gets an output quantizer, after the ReLU/ReLU6 that follows
  it (the activation is fused into the layer: its module becomes nn.Identity, or its functional
  call is removed from the graph) - ONNX Runtime's QLinearConv / QLinearAdd need it; a Linear
  gets one when its output reaches another quantized layer or add (QGemm can output float);
- a consumer whose input comes from such a point through grid-preserving ops (max-pooling,
  flatten, reshapes, dropout, identity) drops its own input quantizer and re-applies the
  producer's grid (`share_input_grid`), so each tensor is quantized once, with one scale.

The PyTorch model computes exactly what the exported graph computes: the same quantizers sit at
the same points in both. Models torch.fx cannot trace keep input quantizers only (and a note).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.spec import QuantSpec
from lowbit.torch.modules import QuantAdd, QuantEmbedding, QuantizedLayer
from lowbit.torch.quantizers import ActivationQuantizer

# Ops whose outputs are input values rearranged or selected: values on a grid stay on it.
_GRID_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d,
                 nn.Dropout2d, nn.Dropout3d)
_GRID_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout, operator.getitem}
_GRID_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}
_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


class _Tracer(fx.Tracer):
    """Quantized layers, adds and quantizers are single nodes (their insides are lowbit's)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (QuantizedLayer, QuantAdd, ActivationQuantizer))
                or super().is_leaf_module(module, qualified_name))


def place_output_quantizers(model: nn.Module, spec: QuantSpec, learnable: bool) -> tuple[nn.Module, int, str | None]:
    """(model with output quantizers, number placed, a note when tracing failed).

    `model` is changed in place; the result is a GraphModule only when a functional activation
    had to be removed from the forward code (a model that already was one stays one)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # any tracing failure: keep input quantizers only, say why
        return model, 0, (f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}); layer outputs "
                          "are not quantized, so ONNX Runtime may leave some layers in float")
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    placed, graph_changed = 0, False
    for node in list(graph.nodes):
        producer = _module(model, node)
        if not _can_quantize_output(producer) or calls[node.target] != 1:
            continue
        source = _skip_identities(model, node)  # e.g. a folded BatchNorm's placeholder
        point, activation = source, _fused_activation(model, source, calls)
        if activation is not None:
            point = next(iter(source.users))
        consumers = _grid_consumers(model, point, calls)
        if not consumers and isinstance(producer, nn.Linear):
            continue  # feeding only float code or the model output: QGemm/MatMul need no Q after them
        quantizer = ActivationQuantizer(f"{node.target}.output", spec, learnable)
        producer.output_quantizer, producer.output_activation = quantizer, activation
        if activation is not None:
            if point.op == "call_module":
                model.set_submodule(point.target, nn.Identity())
            else:
                point.replace_all_uses_with(source)
                graph.erase_node(point)
                graph_changed = True
        for consumer, side in consumers:
            if isinstance(consumer, QuantAdd):
                consumer.share_input_grid(side, quantizer)
            else:
                consumer.share_input_grid(quantizer)
        placed += 1
    if graph_changed:
        training = model.training
        model = fx.GraphModule(model, graph, type(model).__name__)
        model.train(training)
    return model, placed, None


def _module(model: nn.Module, node: fx.Node) -> nn.Module | None:
    return model.get_submodule(node.target) if node.op == "call_module" else None


def _can_quantize_output(module: nn.Module | None) -> bool:
    """A quantized Conv/Linear or add whose inputs are quantized (so activations are)."""
    if isinstance(module, QuantAdd):
        return module.operand_source("lhs") is not None or module.operand_source("rhs") is not None
    return (isinstance(module, QuantizedLayer) and not isinstance(module, QuantEmbedding)
            and module.input_source() is not None)


def _skip_identities(model: nn.Module, node: fx.Node) -> fx.Node:
    """The last node of the chain node -> nn.Identity -> nn.Identity ... (single users only)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or type(model.get_submodule(user.target)) is not nn.Identity:
            break
        node = user
    return node


def _fused_activation(model: nn.Module, node: fx.Node, calls: dict[str, int]) -> str | None:
    """"relu"/"relu6" when `node`'s only user is that activation (and nothing else uses it)."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op == "call_module":
        module = model.get_submodule(user.target)
        if calls[user.target] != 1 or len(user.args) != 1:
            return None
        if type(module) is nn.ReLU:
            return "relu"
        if type(module) is nn.ReLU6 or (type(module) is nn.Hardtanh and module.min_val == 0 and module.max_val == 6):
            return "relu6"
        return None
    if user.op == "call_function" and user.target in _RELU_FUNCTIONS and user.args[0] is node \
            and len(user.args) == 1 and not user.kwargs.get("inplace", False):
        return _RELU_FUNCTIONS[user.target]
    if user.op == "call_method" and user.target == "relu" and len(user.args) == 1:
        return "relu"
    return None


def _grid_consumers(model: nn.Module, point: fx.Node, calls: dict[str, int]) -> list[tuple[nn.Module, str]]:
    """Quantized layers and adds reading `point`'s value through grid-preserving ops only, with
    the operand ("input", "lhs", "rhs") they read it as."""
    found, frontier, seen = [], [point], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            module = _module(model, user)
            if isinstance(module, QuantAdd) and calls[user.target] == 1:
                for side, arg in zip(("lhs", "rhs"), user.args):
                    if arg is node and getattr(module, f"{side}_quantizer") is not None:
                        found.append((module, side))
            elif isinstance(module, QuantizedLayer) and calls[user.target] == 1:
                if module.input_quantizer is not None and user.args and user.args[0] is node:
                    found.append((module, "input"))
            elif _preserves_grid(module, user, node):
                frontier.append(user)
    return found


def _preserves_grid(module: nn.Module | None, user: fx.Node, source: fx.Node) -> bool:
    if not user.args or user.args[0] is not source:
        return False  # the value must be the op's data operand, not e.g. a shape argument
    if user.op == "call_module":
        return type(module) in _GRID_MODULES
    if user.op == "call_function":
        return user.target in _GRID_FUNCTIONS
    return user.op == "call_method" and user.target in _GRID_METHODS
