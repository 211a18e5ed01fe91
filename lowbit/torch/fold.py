"""Fold BatchNorm into the convolution or linear layer before it, as deployment runtimes do.

Quantizing the folded weights is what matters in practice: folding multiplies each output
channel by gamma / sigma, which spreads channel ranges apart and is why per-tensor scales often
fail where per-channel ones do not.

Pairs are found two ways: consecutive modules of an nn.Sequential, and, for any model torch.fx
can trace, a BatchNorm call whose input is the output of a Conv/Linear call used nowhere else
(ResNet-style `self.bn1(self.conv1(x))`). Models torch.fx cannot trace get the Sequential pass
only; BatchNorms left over stay float and `prepare` lists them.
"""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` in which every BatchNorm that directly follows a Conv or
    Linear (see the module notes) is folded into that layer and replaced by nn.Identity.

    Outputs match the original in eval mode up to float rounding. The input is not modified."""
    folded = copy.deepcopy(model).eval()
    _fold_sequentials(folded)
    _fold_traced(folded)
    return folded


def _fused(layer: nn.Module, norm: nn.Module) -> nn.Module | None:
    if not isinstance(norm, _BATCHNORM) or not norm.track_running_stats:
        return None
    if isinstance(layer, _CONV):
        return fuse_conv_bn_eval(layer, norm)
    if isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
        return fuse_linear_bn_eval(layer, norm)
    return None


def _fold_sequentials(model: nn.Module) -> None:
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            fused = _fused(container._modules[first], container._modules[second])
            if fused is not None:
                container._modules[first] = fused
                container._modules[second] = nn.Identity()


def _fold_traced(model: nn.Module) -> None:
    if not any(isinstance(m, _BATCHNORM) for m in model.modules()):
        return
    try:
        graph = fx.Tracer().trace(model)
    except Exception:  # untraceable forward: the Sequential pass is all we can do
        return
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), _BATCHNORM):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        # Both modules called once, the layer's output read by this BatchNorm only: the fold
        # changes nothing else the model computes.
        if (not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1
                or calls[source.target] != 1 or calls[node.target] != 1):
            continue
        fused = _fused(model.get_submodule(source.target), model.get_submodule(node.target))
        if fused is not None:
            model.set_submodule(source.target, fused)
            model.set_submodule(node.target, nn.Identity())
