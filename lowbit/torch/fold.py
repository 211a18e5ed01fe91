"""Fold BatchNorm into the convolution or linear layer before it, as deployment runtimes do.

Quantizing the folded weights is what matters in practice: folding multiplies each output
channel by gamma / sigma, which spreads channel ranges apart and is why per-tensor scales often
fail where per-channel ones do not.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` in which every BatchNorm that directly follows a Conv or
    Linear inside an nn.Sequential is folded into that layer (and replaced by nn.Identity).

    Outputs match the original in eval mode up to float rounding. The input is not modified."""
    folded = copy.deepcopy(model).eval()
    for container in folded.modules():
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            layer, norm = container._modules[first], container._modules[second]
            if not isinstance(norm, _BATCHNORM) or not norm.track_running_stats:
                continue
            if isinstance(layer, _CONV):
                container._modules[first] = fuse_conv_bn_eval(layer, norm)
            elif isinstance(layer, nn.Linear):
                container._modules[first] = fuse_linear_bn_eval(layer, norm)
            else:
                continue
            container._modules[second] = nn.Identity()
    return folded
