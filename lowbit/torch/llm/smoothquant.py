"""SmoothQuant W8A8 for transformers models: smoothing folded into the model, then int8 fake-quant.

1. One float pass over the calibration batches records, for every linear inside the repeated
   blocks, the per-input-channel max |x| (padding tokens left out).
2. For each scale group of the architecture map (by default the norm -> linears groups, as in
   the SmoothQuant paper), `lowbit.algorithms.smoothquant.smoothing_scales` gives s; 1/s is folded
   into the producer (norm gamma/beta) and s into the consumers' weight columns. In float this is
   exact: the model computes what it did before, but the activation outliers now live in the
   weights, where per-channel scales absorb them.
3. Every block linear becomes a `W8A8Linear`: int8 per-output-channel symmetric weights (stored
   dequantized, integers kept in the result) and int8 inputs, either on a static per-tensor
   symmetric grid from the calibrated max |x| (divided by s where the input was smoothed: the
   same numbers the smoothed model would record), or dynamic per token: each token's own
   max |x| / 127.5 at run time (compressed-tensors' W8A8 dynamic scheme; no input calibration,
   so plain dynamic W8A8 needs no calibration data at all).

Embeddings and the LM head stay float. The model is modified in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.algorithms import rtn_quantize
from lowbit.algorithms.smoothquant import DEFAULT_ALPHA, smoothing_scales
from lowbit.errors import LowbitError
from lowbit.numerics import QParams, choose_qparams, dequantize, fake_quantize
from lowbit.spec import PER_TOKEN, QuantSpec, per_channel
from lowbit.torch.llm.architectures import ProducerKind, ScaleGroup, architecture_for, find_blocks
from lowbit.torch.llm.linears import find_linears, in_features, set_weight_matrix, weight_matrix
from lowbit.torch.llm.scaling import divide_output, producer_width
from lowbit.torch.llm.sequential import QuantizedLinear

WEIGHT_SPEC = QuantSpec("int8", granularity=per_channel())
ACTIVATION_SPEC = QuantSpec("int8")  # symmetric, per-tensor, static
DYNAMIC_ACTIVATION_SPEC = QuantSpec("int8", granularity=PER_TOKEN, dynamic=True)  # symmetric, per token
ACTIVATIONS = ("static", "dynamic")


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 fake quantization with one scale per token (last axis), max|x| / 127.5,
    as compressed-tensors computes dynamic per-token scales (the grid's -128 level included;
    an all-zero token gets the dtype's eps as its scale, so it stays zero)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.5
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


class W8A8Linear(nn.Module):
    """A linear (or GPT-2 Conv1D) whose input is fake-quantized to int8, on a fixed grid
    (`input_qparams`) or per token at run time (`input_qparams=None`); its weight is already on
    the int8 per-channel grid."""

    def __init__(self, linear: nn.Module, input_qparams: QParams | None) -> None:
        super().__init__()
        self.linear = linear
        self.input_qparams = input_qparams
        if input_qparams is not None:  # buffers, so that `.to(device)` moves the grid with the layer
            self.register_buffer("input_scale", torch.as_tensor(input_qparams.scale, dtype=torch.float32).clone())
            self.register_buffer("input_zero_point", torch.as_tensor(input_qparams.zero_point).clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qparams is None:
            return self.linear(fake_quantize_per_token(x))
        qparams = QParams(self.input_qparams.spec, self.input_scale, self.input_zero_point)
        return self.linear(fake_quantize(x.float(), qparams).to(x.dtype))


@dataclass
class SmoothQuantResult:
    """What was done: the smoothing scales per producer (full module name), each linear's int8
    weights and qparams, and each linear's static input qparams (none with dynamic inputs)."""

    alpha: float
    groups: tuple[ProducerKind, ...] = ()  # the scale-group kinds asked for; () without smoothing
    smoothing: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, QuantizedLinear] = field(default_factory=dict)
    inputs: dict[str, QParams] = field(default_factory=dict)
    activations: str = "static"  # or "dynamic": per-token int8 inputs computed at run time


def collect_input_absmax(model: nn.Module, calibration: Iterable[Mapping[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every linear in the model's repeated blocks (full module
    names), over all calibration batches, padding tokens (attention_mask 0) left out."""
    architecture = architecture_for(model, need_scale_groups=False)
    blocks_name, blocks = find_blocks(model, architecture)
    targets = {f"{blocks_name}.{index}.{name}": module
               for index, block in enumerate(blocks) for name, module in find_linears(block).items()}
    if calibration is None:
        raise LowbitError("SmoothQuant needs calibration data; pass a few batches of representative text")
    was_training, seen = model.training, 0
    model.eval()
    home = next(model.parameters()).device
    try:
        with torch.no_grad(), recording_input_absmax(targets) as (absmax, mask):
            for batch in calibration:
                batch = {key: value.to(home) for key, value in batch.items()}
                token_mask = batch.get("attention_mask")
                mask[0] = None if token_mask is None else token_mask.bool()
                model(**batch)
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise LowbitError("the calibration data is empty; pass at least one batch of tokenized text")
    return absmax


@contextmanager
def recording_input_absmax(targets: Mapping[str, nn.Module]
                           ) -> Iterator[tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]]:
    """While inside, each forward call of a `targets` linear raises its entry of the yielded
    per-input-channel max |x| (float32, CPU); tokens where the yielded one-element list's mask
    ([batch, tokens], set it before each batch) is false are left out."""
    absmax = {name: torch.zeros(in_features(module)) for name, module in targets.items()}
    mask: list[torch.Tensor | None] = [None]

    def record(name):
        def hook(module, args):
            x = args[0].detach()
            if mask[0] is not None and tuple(x.shape[:2]) == tuple(mask[0].shape):
                x = x[mask[0].to(x.device)]
            if x.numel():
                if not bool(torch.isfinite(x).all()):
                    raise LowbitError(f"the input of {name} holds NaN or infinite values; check the calibration "
                                      "data and the float model (fp16 overflow?)")
                batch_max = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
                absmax[name] = torch.maximum(absmax[name], batch_max)
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in targets.items()]
    try:
        yield absmax, mask
    finally:
        for handle in handles:
            handle.remove()


def smoothable_groups(model: nn.Module, kinds: tuple[ProducerKind, ...] = ("norm",), *,
                      block_index: int | None = None) -> list[tuple[str, ScaleGroup]]:
    """The scale groups of kind `kinds` that `smooth_model` smooths, as (block prefix, group):
    those whose linears are all present and whose producer emits exactly their input width
    (under grouped-query attention v_proj is narrower than o_proj's input, so v -> o is left out).
    `block_index` limits them to that block. Reads the model only (parameter shapes; they may
    be on the meta device), so callers can check what would happen before calibrating."""
    architecture = architecture_for(model, need_scale_groups=True)
    blocks_name, blocks = find_blocks(model, architecture)
    found = []
    for index, block in enumerate(blocks):
        if block_index is not None and index != block_index:
            continue
        linears = find_linears(block)
        for group in architecture.scale_groups:
            if group.kind not in kinds or not all(name in linears for name in group.linears):
                continue
            if producer_width(block, group) not in (None, in_features(linears[group.linears[0]])):
                continue
            found.append((f"{blocks_name}.{index}.", group))
    return found


def smooth_model(model: nn.Module, input_absmax: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA, *,
                 kinds: tuple[ProducerKind, ...] = ("norm",), block_index: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into the model in place (exact in float) and update `input_absmax`
    to what the smoothed model's linears see. Returns the scales per producer (full name).

    `kinds` picks the scale groups: "norm" (the paper's choice), plus optionally "linear"
    (v_proj -> o_proj, up_proj -> down_proj) and "activation" (GPT-2's MLP activation).
    `block_index` smooths that block only (a model streamed block by block)."""
    modules = dict(model.named_modules())
    applied: dict[str, torch.Tensor] = {}
    for prefix, group in smoothable_groups(model, kinds, block_index=block_index):
        block = modules[prefix[:-1]]
        linears = [modules[prefix + name] for name in group.linears]
        absmax = input_absmax[prefix + group.linears[0]]
        matrices = [weight_matrix(linear) for linear in linears]
        scales = torch.from_numpy(smoothing_scales(absmax.numpy(), [m.cpu().numpy() for m in matrices],
                                                   alpha, input_axis=1))
        divide_output(block, group, scales.to(matrices[0].device))
        for name, linear, matrix in zip(group.linears, linears, matrices):
            set_weight_matrix(linear, matrix * scales.to(matrix.device)[None, :])
            input_absmax[prefix + name] = input_absmax[prefix + name] / scales
        applied[prefix + group.producer] = scales
    if not applied:
        raise LowbitError(f"no {'/'.join(kinds)} scale group of this architecture could be smoothed (post-norm "
                          "models such as BERT have none); pass kinds=('norm', 'linear', 'activation') or "
                          "quantize without smoothing")
    return applied


def quantize_w8a8(model: nn.Module, input_absmax: dict[str, torch.Tensor | None], result: SmoothQuantResult
                  ) -> None:
    """Replace every block linear named in `input_absmax` by a `W8A8Linear` (in place), with
    static input grids from `input_absmax`, or dynamic per-token inputs when
    `result.activations == "dynamic"` (then the absmax values are not read and may be None).

    Scales are rounded to the linear's own dtype (a no-op for float32 models), as a checkpoint
    in that dtype stores them, so the in-memory model computes what the saved one will."""
    modules = dict(model.named_modules())
    for name, absmax in input_absmax.items():
        linear = modules[name]
        dtype = linear.weight.dtype
        quantized = rtn_quantize(weight_matrix(linear), WEIGHT_SPEC, name)
        weight_qparams = _in_dtype(quantized.qparams, dtype)
        set_weight_matrix(linear, dequantize(quantized.values, weight_qparams))
        result.weights[name] = QuantizedLinear(quantized.values.cpu(), _on_cpu(weight_qparams))
        input_qparams = None
        if result.activations == "static":
            peak = absmax.max()
            input_qparams = _in_dtype(choose_qparams(-peak, peak, ACTIVATION_SPEC), dtype)
            result.inputs[name] = input_qparams
        parent_name, _, attribute = name.rpartition(".")
        setattr(modules[parent_name], attribute, W8A8Linear(linear, input_qparams).to(linear.weight.device))


def _in_dtype(qparams: QParams, dtype: torch.dtype) -> QParams:
    """The same qparams with the scale rounded to `dtype` (kept as float32)."""
    scale = torch.as_tensor(qparams.scale)
    return QParams(qparams.spec, scale.to(dtype).to(torch.float32), qparams.zero_point)


def _on_cpu(qparams: QParams) -> QParams:
    zero_point = qparams.zero_point
    return QParams(qparams.spec, torch.as_tensor(qparams.scale).cpu(),
                   zero_point.cpu() if isinstance(zero_point, torch.Tensor) else zero_point)


@contextmanager
def plain_linears(model: nn.Module) -> Iterator[dict[str, W8A8Linear]]:
    """Inside the block, each `W8A8Linear` is replaced by its inner linear (holding the int8-grid
    weight), so the model has the float model's module names again, e.g. to save its state dict
    as transformers expects. Yields the wrappers by name; they are put back on exit."""
    wrappers = {name: module for name, module in model.named_modules() if isinstance(module, W8A8Linear)}
    modules = dict(model.named_modules())
    for name, wrapper in wrappers.items():
        parent_name, _, attribute = name.rpartition(".")
        setattr(modules[parent_name], attribute, wrapper.linear)
    try:
        yield wrappers
    finally:
        for name, wrapper in wrappers.items():
            parent_name, _, attribute = name.rpartition(".")
            setattr(modules[parent_name], attribute, wrapper)


def smooth_quantize_w8a8(model: nn.Module, calibration: Iterable[Mapping[str, torch.Tensor]] | None,
                         alpha: float = DEFAULT_ALPHA, *, smooth: bool = True,
                         kinds: tuple[ProducerKind, ...] = ("norm",), activations: str = "static"
                         ) -> SmoothQuantResult:
    """SmoothQuant W8A8 in place: calibrate, smooth the `kinds` scale groups (see `smooth_model`;
    `smooth=False` gives plain W8A8), then int8 per-channel weights and int8 inputs on every
    block linear: static per-tensor, or with `activations="dynamic"` per token at run time
    (plain dynamic W8A8 reads no calibration data)."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha must be between 0 and 1, got {alpha}; 0.5 is the usual choice")
    if activations not in ACTIVATIONS:
        raise LowbitError(f"W8A8 activations are 'static' or 'dynamic', not {activations!r}")
    result = SmoothQuantResult(alpha, tuple(kinds) if smooth else (), activations=activations)
    if activations == "dynamic" and not smooth:
        architecture = architecture_for(model, need_scale_groups=False)
        blocks_name, blocks = find_blocks(model, architecture)
        input_absmax = {f"{blocks_name}.{index}.{name}": None
                        for index, block in enumerate(blocks) for name in find_linears(block)}
        quantize_w8a8(model, input_absmax, result)
        return result
    input_absmax = collect_input_absmax(model, calibration)
    if smooth:
        result.smoothing = smooth_model(model, input_absmax, alpha, kinds=kinds)
    quantize_w8a8(model, input_absmax, result)
    return result


__all__ = ["ACTIVATIONS", "ACTIVATION_SPEC", "DYNAMIC_ACTIVATION_SPEC", "SmoothQuantResult", "W8A8Linear", "WEIGHT_SPEC", "collect_input_absmax",
           "fake_quantize_per_token", "plain_linears", "quantize_w8a8", "recording_input_absmax", "smooth_model",
           "smooth_quantize_w8a8", "smoothable_groups"]
