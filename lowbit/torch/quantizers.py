"""Fake-quantization state for one weight or one activation, on top of `lowbit.numerics`.

Both quantizers call `numerics.fake_quantize`, the one quantize/dequantize implementation, so
training, export and the parity check compute the same numbers. Gradients are straight-through
for the values; learnable scales (LSQ) get numerics' LSQ gradient, scaled by 1/sqrt(N * qmax)
as the LSQ paper does so that step sizes move at the pace of the weights.

Weights are seen as the matrix [out_channels, in_features * kernel] (see `torch.weights`):
channels along axis 0, groups along axis 1.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import QParams, choose_qparams, fake_quantize, qparams_for
from lowbit.spec import QuantSpec
from lowbit.torch.weights import matrix_spec

_MIN_SCALE = float(np.finfo(np.float32).tiny)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (bit-exact, so eval and export see the very same scale); the backward
    pass multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor: float):  # noqa: D102
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad * ctx.factor, None


def _grad_scaled(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """`scale` in the forward pass, `factor` times its gradient in the backward pass."""
    return _ScaleGradient.apply(scale, factor)


def _grid_size(spec: QuantSpec) -> int:
    """LSQ's Q_P: the number of positive grid steps (at least 1)."""
    return max(1, spec.qmax - (0 if spec.dtype_info.signed else spec.qmin))


class WeightQuantizer(nn.Module):
    """Fake-quantizes one weight tensor.

    Scales follow the weight (min/max, or mean |w| for binary, recomputed every step) unless
    they are learnable (LSQ: initialized from the weight, then trained) or fixed (a checkpoint
    loaded with `load_packed` keeps exactly the stored scales)."""

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, learnable: bool = False) -> None:
        super().__init__()
        self.spec = matrix_spec(spec)
        self.learnable = learnable
        self.fixed = False
        initial = qparams_for(self.matrix(weight.detach()), self.spec)
        scale = torch.as_tensor(initial.scale, dtype=torch.float32).clone()
        self.register_buffer("zero_point", torch.as_tensor(initial.zero_point, dtype=torch.int32).clone())
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    @staticmethod
    def matrix(weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def qparams(self, weight: torch.Tensor) -> QParams:
        """The quantization parameters for `weight` in matrix layout."""
        if self.learnable:
            factor = 1.0 / math.sqrt(weight.numel() * _grid_size(self.spec))
            scale = _grad_scaled(self.scale.clamp_min(_MIN_SCALE), factor)
            return QParams(self.spec, scale, self.zero_point)
        if self.fixed:
            return QParams(self.spec, self.scale, self.zero_point)
        qp = qparams_for(self.matrix(weight.detach()), self.spec)
        with torch.no_grad():  # keep the last scales visible (and saved) for inspection
            self.scale.copy_(qp.scale)
            self.zero_point.copy_(qp.zero_point)
        return qp

    def fix(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Use exactly these scales from now on (a loaded checkpoint)."""
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
            self.zero_point.copy_(torch.as_tensor(zero_point, dtype=torch.int32))
        self.fixed = not self.learnable

    def forward(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """The fake-quantized weight (same shape) and the parameters used."""
        qp = self.qparams(weight)
        return fake_quantize(self.matrix(weight), qp).reshape(weight.shape), qp

    def extra_repr(self) -> str:
        mode = "learnable" if self.learnable else "fixed" if self.fixed else "from weights"
        return f"{self.spec.describe()}, scales {mode}"


class ActivationQuantizer(nn.Module):
    """Fake-quantizes one activation tensor with a per-tensor range found by calibration.

    Until `lowbit.torch.calibrate` has run, using the model is an error rather than a silent
    float pass. While calibrating, the quantizer only observes. Ranges stay fixed during training
    unless scales are learnable (LSQ); the zero point stays where calibration put it.

    `enabled = False` switches it off: values pass through unchanged (no range needed), while
    calibration still observes, so it can be switched back on. Off is a what-if for analysis
    (a plain attribute, kept by deepcopy, not saved in the state dict); export refuses it."""

    def __init__(self, name: str, spec: QuantSpec, learnable: bool = False) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self.learnable = learnable
        self.observer = None  # a calibration.RangeObserver while calibrating
        self.enabled = True
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        scale = torch.ones((), dtype=torch.float32)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def set_range(self, low: float, high: float) -> None:
        qp = choose_qparams(np.float32(low), np.float32(high), self.spec)
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(np.asarray(qp.scale, np.float32)))
            self.zero_point.copy_(torch.as_tensor(np.asarray(qp.zero_point, np.int32)))
            self.calibrated.fill_(True)

    def qparams(self, numel: int = 1) -> QParams:
        if not self.learnable:
            return QParams(self.spec, self.scale, self.zero_point)
        factor = 1.0 / math.sqrt(max(numel, 1) * _grid_size(self.spec))
        return QParams(self.spec, _grad_scaled(self.scale.clamp_min(_MIN_SCALE), factor), self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())
            return x
        return self._fake_quantize(x) if self.enabled else x

    def reapply(self, x: torch.Tensor) -> torch.Tensor:
        """Put `x` back on this quantizer's grid without observing it: for a consumer of a tensor
        this quantizer already quantized where it was produced (through max-pooling, reshapes...).
        Values already on the grid come back unchanged, so this costs no accuracy; it gives the
        exported graph the Q/DQ pair in front of the consumer that ONNX Runtime fuses."""
        return self._fake_quantize(x) if self.observer is None and self.enabled else x

    def export_params(self, as_uint8: bool) -> tuple[torch.Tensor, torch.Tensor, QuantSpec]:
        """(scale, zero point in its storage type, spec) for QuantizeLinear/DequantizeLinear.

        `as_uint8` writes an int8 grid as the identical uint8 grid (every integer and the zero
        point shifted by 128): same numbers, but ONNX Runtime's fast x86 kernels are U8S8."""
        if not self.enabled:
            raise LowbitError(f"activation quantizer {self.name!r} is switched off (enabled = False), so the "
                              "model runs it in float; set enabled = True before exporting, or prepare with "
                              "exclude=[...] to keep that layer float")
        scale = self.qparams().scale.detach().clone()
        if as_uint8 and self.spec.dtype == "int8" and not self.spec.narrow_range:
            spec = replace(self.spec, dtype="uint8", symmetric=False)
            return scale, (self.zero_point + 128).to(torch.uint8).clone(), spec
        container = torch.uint8 if self.spec.dtype == "uint8" else torch.int8
        return scale, self.zero_point.to(container).clone(), self.spec

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.calibrated):
            raise LowbitError(f"activation {self.name!r} has no quantization range yet; call "
                              "lowbit.torch.calibrate(model, batches) before running the prepared model")
        # LSQ scales the gradient by the elements per sample, not per batch.
        return fake_quantize(x, self.qparams(x[0].numel() if x.ndim else 1))

    def extra_repr(self) -> str:
        state = f"scale={float(self.scale.detach()):.4g}, zero_point={int(self.zero_point)}" if bool(self.calibrated) else "not calibrated"
        flags = (", learnable" if self.learnable else "") + ("" if self.enabled else ", off")
        return f"{self.spec.describe()}, {state}{flags}"
