"""Fake-quantized drop-in replacements for Linear, Conv1d/2d/3d, Embedding, and a residual add.

Each layer keeps the float module's own parameters (the "latent" weights an optimizer trains)
and applies, in order: the pruning mask (if any), weight fake quantization, and fake
quantization of its input. With a quantized input and a per-channel or per-tensor weight, the
bias is rounded to the int32 grid of scale input_scale * weight_scale, which is what ONNX
Runtime's integer kernels use, so the exported model computes what this one computes.

Quantization points (see `points`): a layer (or QuantAdd) may also quantize its *output*, after
the ReLU/ReLU6 that follows it (fused into the layer, as ONNX Runtime's QDQ fusion expects), and
a layer whose input was already quantized upstream re-applies that grid (`share_input_grid`)
instead of owning a second quantizer, so every tensor has one scale.

`quantize_weights = False` on a layer (and `enabled = False` on an activation quantizer) is the
switch a what-if analysis uses: the layer then computes with its float weight and float bias.

`freeze_for_export` stores the integer tensors as buffers and switches the forward pass to the
functions of `onnx_ops`, which the TorchScript exporter writes as Q/DQ nodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import QParams, quantize, storage_dtype
from lowbit.spec import QuantSpec
from lowbit.torch.onnx_ops import DequantizeConstant, QuantizeDequantize
from lowbit.torch.quantizers import ActivationQuantizer, WeightQuantizer


class QuantizedLayer:
    """Shared behaviour of the fake-quantized layers (a mixin over the torch module class)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    input_quantizer: ActivationQuantizer | None
    weight_quantizer: WeightQuantizer
    weight_mask: torch.Tensor | None
    output_quantizer: ActivationQuantizer | None
    output_activation: str | None  # "relu" / "relu6" fused before the output quantizer
    quantize_weights: bool  # off: float weight and bias (activations have their own switches)
    exporting: bool

    @classmethod
    def from_float(cls, module: nn.Module, weight_spec: QuantSpec,
                   input_quantizer: ActivationQuantizer | None, learnable: bool = False):
        """The quantized layer, sharing `module`'s parameters (no copy, no re-initialization)."""
        layer = cls.__new__(cls)
        layer.__dict__ = module.__dict__.copy()
        for registry in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[registry] = dict(getattr(module, registry))
        layer._init_quantization(weight_spec, input_quantizer, learnable)
        return layer

    def _init_quantization(self, weight_spec: QuantSpec, input_quantizer: ActivationQuantizer | None,
                           learnable: bool) -> None:
        self.input_quantizer = input_quantizer
        self.weight_quantizer = WeightQuantizer(weight_spec, self.weight, learnable)
        self.register_buffer("weight_mask", None)
        self.output_quantizer = None
        self.output_activation = None
        self._input_grid = ()  # a tuple, so the shared quantizer is not registered twice
        self.quantize_weights = True
        self.exporting = False

    def share_input_grid(self, quantizer: ActivationQuantizer) -> None:
        """Take inputs on `quantizer`'s grid (owned by the producer) instead of an own quantizer."""
        self.input_quantizer = None
        self.__dict__["_input_grid"] = (quantizer,)

    def input_source(self) -> ActivationQuantizer | None:
        """The quantizer whose grid the input is on (own or shared), or None for float inputs."""
        if self.input_quantizer is not None:
            return self.input_quantizer
        return self.__dict__.get("_input_grid", ())[0] if self.__dict__.get("_input_grid") else None

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The fused activation and output quantization, if any."""
        return finish_output(self, y)

    def effective_weight(self) -> torch.Tensor:
        """The float weight after pruning (what gets quantized)."""
        return self.weight if self.weight_mask is None else self.weight * self.weight_mask

    def quantized_weight(self) -> tuple[torch.Tensor, QParams]:
        return self.weight_quantizer(self.effective_weight())

    def _bias_scale(self, weight_qp: QParams) -> torch.Tensor | None:
        """Scale of the int32 bias grid, or None where the bias stays float."""
        source = self.input_source()
        if getattr(self, "bias", None) is None or source is None:
            return None
        if weight_qp.spec.granularity.kind == "group":
            return None  # one weight scale per group: no single per-channel bias scale exists
        input_scale = source.qparams().scale.detach()
        return (input_scale * torch.as_tensor(weight_qp.scale).detach()).to(torch.float32)

    def quantized_bias(self, weight_qp: QParams) -> torch.Tensor | None:
        scale = self._bias_scale(weight_qp)
        if scale is None:
            return getattr(self, "bias", None)
        rounded = torch.round(self.bias / scale) * scale
        return self.bias + (rounded - self.bias).detach()  # straight-through

    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input, weight, bias) as the layer computes with them."""
        if self.exporting:
            return self._exported_operands(x)
        source = self.input_source()
        if source is not None:
            x = self.input_quantizer(x) if source is self.input_quantizer else source.reapply(x)
            if source.observer is not None:  # calibrating: run in float
                return x, self.effective_weight(), getattr(self, "bias", None)
        if not self.quantize_weights:
            return x, self.effective_weight(), getattr(self, "bias", None)
        weight, qp = self.quantized_weight()
        return x, weight, self.quantized_bias(qp)

    # ------------------------------------------------------------------ export

    @torch.no_grad()
    def freeze_for_export(self, uint8_activations: bool = True) -> None:
        """Store the integer weight (and int32 bias) as buffers and export through Q/DQ."""
        if not self.quantize_weights:
            raise LowbitError(f"{self._describe()} has weight quantization switched off (quantize_weights = "
                              "False); set it back to True before exporting, or prepare with exclude=[...] "
                              "to keep that layer float")
        weight = self.effective_weight().detach()
        _, qp = self.quantized_weight()
        spec = qp.spec
        matrix = WeightQuantizer.matrix(weight)
        q = quantize(matrix, qp)
        self.export_axis, self.export_block, self.export_shape = None, None, None
        if spec.granularity.kind == "group":
            self.export_axis, self.export_block = 1, spec.granularity.group_size
            self.export_shape = tuple(weight.shape) if weight.ndim != 2 else None
        else:
            q = q.reshape(weight.shape)
            if spec.granularity.kind == "channel":
                self.export_axis = 0
        self.export_spec = spec
        self.register_buffer("export_weight", q)
        self.register_buffer("export_weight_scale", torch.as_tensor(qp.scale, dtype=torch.float32).detach().clone())
        container = _torch_dtype(storage_dtype(spec))
        self.register_buffer("export_weight_zero_point", torch.as_tensor(qp.zero_point).to(container).clone())
        bias_scale = self._bias_scale(qp)
        self.export_bias_quantized = bias_scale is not None
        if bias_scale is not None:
            self.register_buffer("export_bias", torch.round(self.bias / bias_scale).to(torch.int32))
            self.register_buffer("export_bias_scale", bias_scale.clone())
            self.register_buffer("export_bias_zero_point", torch.zeros(bias_scale.shape, dtype=torch.int32))
        freeze_activation(self, "input", self.input_source(), uint8_activations)
        freeze_activation(self, "output", self.output_quantizer, uint8_activations)
        self.exporting = True

    def _describe(self) -> str:
        """The layer's name where a quantizer of its own carries it, else its type and shape."""
        own = self.input_quantizer or self.output_quantizer
        if own is not None:
            return f"layer {own.name.rsplit('.', 1)[0]!r}"
        return f"a {type(self).__name__} layer with weight {list(self.weight.shape)}"

    def _exported_operands(self, x):
        x = exported_activation(self, "input", x)
        weight = DequantizeConstant.apply(self.export_weight, self.export_weight_scale,
                                          self.export_weight_zero_point, self.export_spec,
                                          self.export_axis, self.export_block, self.export_shape)
        bias = getattr(self, "bias", None)
        if self.export_bias_quantized:
            axis = 0 if self.export_bias_scale.ndim == 1 else None
            bias = DequantizeConstant.apply(self.export_bias, self.export_bias_scale,
                                            self.export_bias_zero_point, None, axis, None, None)
        return x, weight, bias


def check_switches_on(model: nn.Module, action: str) -> None:
    """Raise if any quantizer of `model` is switched off: `action` (export, saving) would write a
    quantized model that computes differently from the one the caller ran."""
    off = [name for name, m in model.named_modules()
           if isinstance(m, QuantizedLayer) and not m.quantize_weights
           or isinstance(m, ActivationQuantizer) and not m.enabled]
    if off:
        raise LowbitError(f"quantization is switched off for {', '.join(off)} (quantize_weights / enabled = "
                          f"False); switch it back on before {action}, or prepare with exclude=[...] to keep "
                          "those layers float")


def _torch_dtype(numpy_dtype) -> torch.dtype:
    return {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16}[str(numpy_dtype)]


_ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6}


def finish_output(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Apply `module`'s fused activation, then its output quantizer (or the exported Q/DQ)."""
    if module.output_activation is not None:
        y = _ACTIVATIONS[module.output_activation](y)
    if module.output_quantizer is None:
        return y
    return exported_activation(module, "output", y) if module.exporting else module.output_quantizer(y)


def freeze_activation(module: nn.Module, role: str, quantizer: ActivationQuantizer | None,
                      uint8: bool) -> None:
    """Store `quantizer`'s export parameters on `module` as export_<role>_scale / _zero_point."""
    if quantizer is None:
        module.__dict__[f"export_{role}_spec"] = None
        return
    scale, zero_point, spec = quantizer.export_params(uint8)
    module.register_buffer(f"export_{role}_scale", scale)
    module.register_buffer(f"export_{role}_zero_point", zero_point)
    module.__dict__[f"export_{role}_spec"] = spec


def exported_activation(module: nn.Module, role: str, x: torch.Tensor) -> torch.Tensor:
    """`x` through the QuantizeLinear -> DequantizeLinear pair frozen for `role` (if any)."""
    spec = module.__dict__.get(f"export_{role}_spec")
    if spec is None:
        return x
    return QuantizeDequantize.apply(x, getattr(module, f"export_{role}_scale"),
                                    getattr(module, f"export_{role}_zero_point"), spec)


class QuantLinear(QuantizedLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = self.quantized_operands(x)
        return self.finish(F.linear(x, weight, bias))


class _QuantConvMixin(QuantizedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = self.quantized_operands(x)
        return self.finish(self._conv_forward(x, weight, bias))


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    pass


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    pass


class QuantConv3d(_QuantConvMixin, nn.Conv3d):
    pass


class QuantEmbedding(QuantizedLayer, nn.Embedding):
    """Embedding rows quantized per row (axis 0) or in groups along the embedding dimension."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, weight, _ = self.quantized_operands(ids)
        return F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class QuantAdd(nn.Module):
    """`a + b` with both operands fake-quantized: a residual add ONNX Runtime can run in int8.

    Use it in a model's forward (`self.add = QuantAdd()`, then `self.add(x, shortcut)`); it is a
    plain add until `prepare` gives it quantizers."""

    def __init__(self) -> None:
        super().__init__()
        self.lhs_quantizer: ActivationQuantizer | None = None
        self.rhs_quantizer: ActivationQuantizer | None = None
        self.output_quantizer: ActivationQuantizer | None = None
        self.output_activation: str | None = None
        self._grids: dict[str, ActivationQuantizer] = {}  # operands quantized upstream (not registered)
        self.exporting = False

    def share_input_grid(self, side: str, quantizer: ActivationQuantizer) -> None:
        """Take operand `side` ("lhs"/"rhs") on the producer's grid instead of an own quantizer."""
        setattr(self, f"{side}_quantizer", None)
        self.__dict__.setdefault("_grids", {})[side] = quantizer

    def operand_source(self, side: str) -> ActivationQuantizer | None:
        own = getattr(self, f"{side}_quantizer")
        return own if own is not None else self.__dict__.get("_grids", {}).get(side)

    @torch.no_grad()
    def freeze_for_export(self, uint8_activations: bool = True) -> None:
        for side in ("lhs", "rhs"):
            freeze_activation(self, side, self.operand_source(side), uint8_activations)
        freeze_activation(self, "output", self.output_quantizer, uint8_activations)
        self.exporting = True

    def _operand(self, side: str, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            return exported_activation(self, side, x)
        own, source = getattr(self, f"{side}_quantizer"), self.operand_source(side)
        if source is None:
            return x
        return own(x) if source is own else source.reapply(x)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return finish_output(self, self._operand("lhs", a) + self._operand("rhs", b))


FLOAT_TO_QUANTIZED: dict[type, type] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Embedding: QuantEmbedding,
}
