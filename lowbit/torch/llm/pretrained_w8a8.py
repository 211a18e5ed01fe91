"""SmoothQuant W8A8 of a local Hugging Face model directory, written as a compressed-tensors
`int-quantized` checkpoint directory.

`smoothquant_pretrained(MODEL_DIR, OUT_DIR, calib_text=...)`:
1. checks every input before any heavy work (paths, config, alpha, tokenizer, calibration text,
   whether the architecture can be smoothed and the format can hold its linears), so bad input
   costs seconds and writes nothing;
2. loads the model with its own class, cuts the calibration text into samples with the model's
   own tokenizer, and runs `smooth_quantize_w8a8` (smoothing folded into the weights of the
   chosen scale groups, int8 per-channel weights, static per-tensor int8 inputs on every block
   linear);
3. measures lowbit's quantized model against the float one on held-out text;
4. writes the checkpoint into a temporary sibling of OUT_DIR and renames it into place.

Scale groups (`smooth_groups`), each exact in float and folded into weights the checkpoint stores:
- "norm": pre-norm -> q/k/v and pre-norm -> gate/up (the SmoothQuant paper's choice);
- "linear": v_proj -> o_proj (multi-head attention only: under grouped-query attention v_proj is
  narrower than o_proj's input) and up_proj -> down_proj (BERT: value -> attention output);
- "all": both. "activation" groups (a scale through GELU/SiLU) are refused: that scale lives in a
  wrapper module transformers cannot load.

Refused up front: GPT-2 style Conv1D linears (compressed-tensors quantizes nn.Linear only) and,
with smoothing on, architectures without a scale-group map (unknown types) or without any group of
the chosen kinds (post-norm BERT has no norm group): `smooth=False` gives plain W8A8 for those.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.smoothquant import DEFAULT_ALPHA
from lowbit.errors import LowbitError
from lowbit.torch.llm.architectures import (ARCHITECTURES, ProducerKind, ScaleGroup, architecture_for, find_blocks,
                                            model_type)
from lowbit.torch.llm.calib_text import load_tokenizer
from lowbit.torch.llm.hf_io import (check_paths, check_sample_options, checkpoint_dtype,
                                    copy_tokenizer, fidelity, load_config, load_model, model_class_for,
                                    model_outputs, read_text, seq_len_for, text_batches, weight_bytes,
                                    write_atomically)
from lowbit.torch.llm.linears import find_linears, is_conv1d
from lowbit.torch.llm.smoothquant import SmoothQuantResult, smooth_quantize_w8a8, smoothable_groups
from lowbit.torch.llm.streamed import ShardReader, ShardStore, materialize_outside_blocks, skeleton, stream_blocks
from lowbit.torch.llm.streamed_w8a8 import smooth_quantize_w8a8_streamed
from lowbit.torch.llm.w8a8_checkpoint import FORMAT, w8a8_quantization_config, write_w8a8_checkpoint

EXPORTABLE_GROUPS: tuple[ProducerKind, ...] = ("norm", "linear")  # what "all" means here
# Default: every exportable group. Both kinds are exact in float and live in weights the checkpoint
# stores, so they cost nothing at run time; and the linear groups reach inputs no norm feeds. In
# bench/llm_perplexity.py (LLaMA-style, trained) the largest outlier sits in down_proj's input
# (10.8x the median channel), after the gated product: W8A8 held-out perplexity is +0.93% plain,
# +0.89% with norm groups only (no gain), +0.20% with norm and linear groups; up_proj -> down_proj
# does that work (+0.21% with it alone beside the norms), v_proj -> o_proj is neutral (+0.91%).
DEFAULT_SMOOTH_GROUPS: tuple[ProducerKind, ...] = EXPORTABLE_GROUPS
# With dynamic per-token inputs the norm groups alone do better: each token gets its own scale,
# so the input outliers the linear groups tame cost less, while their scales still coarsen the
# weights' per-channel grids. bench/llm_vs_llmcompressor.py (Qwen2-shaped, W8A8 dynamic, token
# cosine vs fp32): norm+linear 0.99862, norm only 0.99897 (llm-compressor, norm groups: 0.99886).
DEFAULT_DYNAMIC_SMOOTH_GROUPS: tuple[ProducerKind, ...] = ("norm",)


def default_smooth_groups(activations: str) -> tuple[ProducerKind, ...]:
    """The scale groups smoothed when none are asked for: see the two defaults above."""
    return DEFAULT_DYNAMIC_SMOOTH_GROUPS if activations == "dynamic" else DEFAULT_SMOOTH_GROUPS


@dataclass
class PretrainedW8A8:
    """The written checkpoint and what was measured on the way.

    `model` is lowbit's own quantized model in memory (`W8A8Linear`s), the reference the
    checkpoint must reproduce; `eval_batches` are the rows fidelity was measured on."""

    output_dir: Path
    model: nn.Module
    result: SmoothQuantResult
    calibration_samples: int
    eval_batches: list[dict[str, torch.Tensor]]
    eval_source: str
    cosine: float | None  # None when streamed (--low-memory): the float model never existed whole
    sqnr_db: float | None
    input_bytes: int
    output_bytes: int
    seconds: float
    smoothed_kinds: dict[str, str] = field(default_factory=dict)  # producer (full name) -> its group kind
    notes: list[str] = field(default_factory=list)

    @property
    def algorithm(self) -> str:
        return "smoothquant" if self.result.smoothing else "w8a8 (no smoothing)"

    def summary(self) -> str:
        r = self.result
        smoothing = f"SmoothQuant alpha {r.alpha}, {'+'.join(r.groups)} groups" if r.smoothing else "no smoothing"
        counts = ", ".join(f"{kind} {list(self.smoothed_kinds.values()).count(kind)}" for kind in r.groups)
        inputs = "dynamic per-token" if r.activations == "dynamic" else "static per-tensor"
        lines = [f"wrote {self.output_dir} (compressed-tensors {FORMAT}: int8 per-channel weights, {inputs} "
                 f"int8 inputs, {smoothing})",
                 f"  quantized linears : {len(r.weights)}, smoothed groups: {len(r.smoothing)}"
                 + (f" ({counts})" if r.smoothing else "") + f", calibration samples: {self.calibration_samples}",
                 ]
        if self.cosine is not None:
            lines.append(f"  output vs float   : cosine {self.cosine:.5f}, SQNR {self.sqnr_db:.1f} dB "
                         f"({self.eval_source} text)")
        ratio = self.output_bytes / self.input_bytes if self.input_bytes else float("nan")
        lines.append(f"  weights on disk   : {self.input_bytes / 1e6:.2f} MB -> {self.output_bytes / 1e6:.2f} MB "
                     f"({ratio:.3f}x)")
        lines.append(f"  time              : {self.seconds:.1f} s")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output_dir), "format": FORMAT, "mode": self.result.activations,
                "algorithm": self.algorithm,
                "alpha": self.result.alpha if self.result.smoothing else None,
                "smooth_groups": list(self.result.groups), "quantized_linears": len(self.result.weights),
                "smoothed": sorted(self.result.smoothing),
                "calibration_samples": self.calibration_samples, "cosine": self.cosine, "sqnr_db": self.sqnr_db,
                "eval_text": self.eval_source, "input_weight_bytes": self.input_bytes,
                "output_weight_bytes": self.output_bytes, "seconds": self.seconds, "notes": self.notes}


def smoothquant_pretrained(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                           calib_text: str | os.PathLike | None, alpha: float = DEFAULT_ALPHA, smooth: bool = True,
                           smooth_groups: str | Iterable[str] | None = None,
                           samples: int | None = None, seq_len: int | None = None, trust_remote_code: bool = False,
                           activations: str = "static", device: str | torch.device | None = None,
                           low_memory: bool | None = None) -> PretrainedW8A8:
    """SmoothQuant W8A8 the Hugging Face model in `model_dir` and write a compressed-tensors
    `int-quantized` checkpoint (loadable by `transformers.AutoModel*.from_pretrained`) to the new
    `out_dir`. `calib_text` is a UTF-8 text file of representative text; `samples` caps the
    calibration rows (default: all the text gives, at most 128), each `seq_len` tokens long;
    `smooth_groups` picks the scale groups ("norm", "linear" or "all", a sequence or a comma-separated
    string; default norm and linear with static inputs, norm with dynamic ones); `smooth=False` quantizes without smoothing; `activations`
    "static" (per-tensor input scales from calibration) or "dynamic" (per-token scales at run
    time, compressed-tensors' W8A8 dynamic scheme); `device` runs
    calibration there (default: where the model loads, the CPU). `low_memory` streams the
    checkpoint block by block (`streamed_w8a8`; default: when it is bigger than half the
    available memory); fidelity is then not measured. See the module docstring."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_paths(model_dir, out_dir)
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha must be between 0 and 1, got {alpha}; 0.5 is the usual choice")
    if smooth_groups is None:
        smooth_groups = default_smooth_groups(activations)
    groups = parse_smooth_groups(smooth_groups) if smooth else ()
    config = load_config(model_dir, trust_remote_code)
    seq_len = seq_len_for(config, seq_len)
    if smooth and config.model_type not in ARCHITECTURES:
        raise LowbitError(f"lowbit has no SmoothQuant mapping for model type {config.model_type!r} (known: "
                          f"{', '.join(sorted(ARCHITECTURES))}); add an ArchitectureMap to "
                          "lowbit/torch/llm/architectures.py, or pass --no-smooth for plain W8A8")
    if calib_text is None:
        raise LowbitError("W8A8 needs calibration text to set the activation ranges; pass --calib-text FILE with a "
                          "few pages of representative text")
    check_sample_options(config, samples, seq_len)
    text = read_text(calib_text)
    input_bytes = weight_bytes(model_dir)
    low_memory = stream_blocks(input_bytes, low_memory)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    cut = text_batches(tokenizer, text, seq_len=seq_len, samples=samples)

    if low_memory:
        model = skeleton(model_class_for(config, trust_remote_code), config)
    else:
        model = load_model(model_dir, config, trust_remote_code)
    blocks_name, blocks = find_blocks(model, architecture_for(model, need_scale_groups=False))
    _check_expressible(model, blocks)
    planned = _plan_smoothing(model, groups) if groups else []
    smoothed_kinds = {prefix + group.producer: group.kind for prefix, group in planned}
    if device is not None and not low_memory:
        model.to(device)

    notes = []
    if low_memory:
        result = _streamed(model, model_dir, out_dir, blocks_name, len(blocks), cut.calibration, tokenizer,
                           alpha=alpha, smooth=bool(groups), kinds=groups, activations=activations)
        cosine = sqnr = None
        notes.append("streamed block by block (--low-memory): the float model never existed whole, so fidelity "
                     "was not measured")
    else:
        reference = model_outputs(model, cut.evaluation)
        result = smooth_quantize_w8a8(model, cut.calibration, alpha, smooth=bool(groups), kinds=groups,
                                      activations=activations)
        cosine, sqnr = fidelity(reference, model_outputs(model, cut.evaluation))

        def write(directory: Path) -> None:
            write_w8a8_checkpoint(model, result, blocks_name, directory)
            copy_tokenizer(model_dir, directory, tokenizer)

        write_atomically(out_dir, write)
    notes += _skipped_group_notes(model, groups, planned) if groups else []
    dtype = checkpoint_dtype(config) if low_memory else next(model.parameters()).dtype
    if dtype != torch.float32:
        notes.append(f"the model runs in {dtype}: lowbit rounds activations to the int8 grid in float32, "
                     f"transformers in {dtype}, so the loaded model can differ by one grid step on a few values")
    return PretrainedW8A8(out_dir, model, result, cut.samples, cut.evaluation, cut.eval_source, cosine, sqnr,
                          input_bytes, weight_bytes(out_dir), time.perf_counter() - start,
                          smoothed_kinds, notes)


def _streamed(model: nn.Module, model_dir: Path, out_dir: Path, blocks_name: str, n_blocks: int, calibration,
              tokenizer, **options) -> SmoothQuantResult:
    """W8A8 of the weightless `model` block by block from `model_dir`'s shards into `out_dir`."""
    reader = ShardReader(model_dir)
    calibrated = options["smooth"] or options["activations"] == "static"
    # The calibration text reaches block 0 through the embeddings; they are freed right after.
    loaded = materialize_outside_blocks(model, blocks_name, reader) if calibrated else []
    done: list[SmoothQuantResult] = []

    def write(directory: Path) -> None:
        store = ShardStore(reader, directory, blocks_name, n_blocks, calibration_only=loaded)
        result = smooth_quantize_w8a8_streamed(model, calibration, store, **options)
        done.append(result)
        store.copy_rest()
        store.finish(model_dir, w8a8_quantization_config(result, blocks_name, store.quantized))
        copy_tokenizer(model_dir, directory, tokenizer)

    write_atomically(out_dir, write)
    return done[0]


def parse_smooth_groups(groups: str | Iterable[str]) -> tuple[ProducerKind, ...]:
    """"norm", "linear", "all" (a sequence or comma-separated) -> the kinds, in canonical order."""
    names = groups.split(",") if isinstance(groups, str) else list(groups)
    names = [name.strip().lower() for name in names if name.strip()]
    if not names:
        raise LowbitError("no SmoothQuant scale groups were given; pass norm, linear or all (comma-separated), e.g. "
                          "--smooth-groups norm,linear, or --no-smooth for plain W8A8")
    for name in names:
        if name == "activation":
            raise LowbitError("SmoothQuant 'activation' groups cannot be written to a compressed-tensors checkpoint "
                              "(the scale would need a wrapper module around GELU/SiLU, which transformers does not "
                              "load); use --smooth-groups norm,linear, or lowbit.torch.llm.smooth_quantize_w8a8 to "
                              "keep the model in memory")
        if name not in EXPORTABLE_GROUPS + ("all",):
            raise LowbitError(f"unknown SmoothQuant scale group {name!r}; choose from norm, linear and all "
                              "(comma-separated, e.g. --smooth-groups norm,linear)")
    return EXPORTABLE_GROUPS if "all" in names else tuple(kind for kind in EXPORTABLE_GROUPS if kind in names)


def _plan_smoothing(model: nn.Module, groups: tuple[ProducerKind, ...]) -> list[tuple[str, ScaleGroup]]:
    """The scale groups that will be smoothed; refuses, before calibrating, when there are none."""
    planned = smoothable_groups(model, groups)
    if planned:
        return planned
    kinds = {group.kind for group in architecture_for(model, need_scale_groups=True).scale_groups}
    if "norm" not in kinds and "norm" in groups:
        raise LowbitError(f"model type {model_type(model)!r} is post-norm (its LayerNorms also feed the residual "
                          "stream), so SmoothQuant has no norm to fold its scales into; pass --smooth-groups linear "
                          "to smooth the linear -> linear groups only, --no-smooth for plain W8A8, or export the "
                          "model to ONNX for static int8")
    raise LowbitError(f"model type {model_type(model)!r} has no {'/'.join(groups)} scale group that can be smoothed; "
                      "pass --smooth-groups all, or --no-smooth for plain W8A8")


def _skipped_group_notes(model: nn.Module, groups: tuple[ProducerKind, ...],
                         planned: list[tuple[str, ScaleGroup]]) -> list[str]:
    """One note per chosen scale group of the architecture that no block could smooth."""
    done = {group for _, group in planned}
    notes = []
    for group in architecture_for(model, need_scale_groups=True).scale_groups:
        if group.kind in groups and group not in done:
            why = ("the producer emits fewer channels than the linears read (grouped-query attention shares each "
                   "value head), so no per-channel scale can pass between them") if group.kind == "linear" else \
                "this model lacks one of its modules"
            notes.append(f"{group.producer} -> {', '.join(group.linears)} not smoothed: {why}")
    if "norm" in groups and not any(group.kind == "norm" for group in done):
        notes.append("this post-norm model has no norm groups; only its linear groups were smoothed")
    return notes


def _check_expressible(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Refuse, before any work, what the int-quantized checkpoint cannot hold."""
    linears = [module for block in blocks for module in find_linears(block).values()]
    if any(is_conv1d(module) for module in linears):
        raise LowbitError("this model's linear layers are GPT-2 style Conv1D modules, which compressed-tensors "
                          "checkpoints cannot hold (it quantizes nn.Linear only); quantize it in memory with "
                          "lowbit.torch.llm.smooth_quantize_w8a8 instead")


__all__ = ["DEFAULT_DYNAMIC_SMOOTH_GROUPS", "DEFAULT_SMOOTH_GROUPS", "EXPORTABLE_GROUPS", "default_smooth_groups", "PretrainedW8A8", "parse_smooth_groups",
           "smoothquant_pretrained"]
