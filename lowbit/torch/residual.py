"""Find the residual adds in a model's forward and route them through `QuantAdd`.

Adds written as `a + b` or `torch.add(a, b)` are not modules, so `prepare` cannot swap them.
When the model can be traced by torch.fx, every add of two float tensors (shapes propagated from
the example inputs tell tensors from Python numbers) becomes a `QuantAdd` submodule named
`residual_add_<i>`, and the traced GraphModule replaces the model copy. Models that torch.fx
cannot trace keep their adds in float; `prepare` records that in `QATState.notes`.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lowbit.torch.modules import QuantAdd

_ADDS = (operator.add, operator.iadd, torch.add)


def insert_quant_adds(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[nn.Module, int, str | None]:
    """(model with QuantAdd modules, number of adds routed, a note when tracing failed)."""
    try:
        traced = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
        ShapeProp(traced).propagate(*example_inputs)
    except Exception as exc:  # any tracing failure: keep the model, say why
        return model, 0, (f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); additions written in its "
                          "forward stay float (use lowbit.torch.QuantAdd modules to quantize them)")
    adds = [node for node in traced.graph.nodes if _is_tensor_add(node)]
    if not adds:
        return model, 0, None
    for index, node in enumerate(adds):
        name = f"residual_add_{index}"
        traced.add_submodule(name, QuantAdd())
        with traced.graph.inserting_after(node):
            replacement = traced.graph.call_module(name, args=tuple(node.args[:2]))
        node.replace_all_uses_with(replacement)
        traced.graph.erase_node(node)
    traced.recompile()
    traced.train(model.training)
    return traced, len(adds), None


class _Tracer(fx.Tracer):
    """Keeps QuantAdd modules the user placed as they are (their add is already quantized)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, QuantAdd) or super().is_leaf_module(module, qualified_name)


def _is_tensor_add(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
        return False
    operands = [*node.args, node]
    metas = [a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None for a in operands]
    return all(m is not None and getattr(m, "dtype", None) is not None and m.dtype.is_floating_point
               and tuple(m.shape) == tuple(metas[-1].shape) for m in metas)
