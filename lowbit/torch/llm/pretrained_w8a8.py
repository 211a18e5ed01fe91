"""SmoothQuant W8A8 of a local Hugging Face model directory, written as a compressed-tensors
`int-quantized` checkpoint directory.

`smoothquant_pretrained(MODEL_DIR, OUT_DIR, calib_text=...)`:
1. checks every input before any heavy work (paths, config, alpha, tokenizer, calibration text,
   whether the architecture can be smoothed and the format can hold its linears), so bad input
   costs seconds and writes nothing;
2. loads the model with its own class, cuts the calibration text into samples with the model's
   own tokenizer, and runs `smooth_quantize_w8a8` (smoothing folded into the pre-norms, int8
   per-channel weights, static per-tensor int8 inputs on every block linear);
3. measures lowbit's quantized model against the float one on held-out text;
4. writes the checkpoint into a temporary sibling of OUT_DIR and renames it into place.

Refused up front: GPT-2 style Conv1D linears (compressed-tensors quantizes nn.Linear only) and,
with smoothing on, architectures without a norm -> linears map (post-norm BERT; unknown types):
`smooth=False` gives plain W8A8 for those.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.smoothquant import DEFAULT_ALPHA
from lowbit.errors import LowbitError
from lowbit.torch.llm.architectures import ARCHITECTURES, architecture_for, find_blocks, model_type
from lowbit.torch.llm.calib_text import load_tokenizer
from lowbit.torch.llm.hf_io import (check_paths, check_sample_options, copy_tokenizer, fidelity, load_config,
                                    load_model, model_outputs, read_text, text_batches, weight_bytes,
                                    write_atomically)
from lowbit.torch.llm.linears import find_linears, is_conv1d
from lowbit.torch.llm.smoothquant import SmoothQuantResult, smooth_quantize_w8a8
from lowbit.torch.llm.w8a8_checkpoint import FORMAT, write_w8a8_checkpoint


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
    cosine: float
    sqnr_db: float
    input_bytes: int
    output_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def algorithm(self) -> str:
        return "smoothquant" if self.result.smoothing else "w8a8 (no smoothing)"

    def summary(self) -> str:
        r = self.result
        smoothing = f"SmoothQuant alpha {r.alpha}" if r.smoothing else "no smoothing"
        lines = [f"wrote {self.output_dir} (compressed-tensors {FORMAT}: int8 per-channel weights, static per-tensor "
                 f"int8 inputs, {smoothing})",
                 f"  quantized linears : {len(r.weights)}, smoothed norms: {len(r.smoothing)}, "
                 f"calibration samples: {self.calibration_samples}",
                 f"  output vs float   : cosine {self.cosine:.5f}, SQNR {self.sqnr_db:.1f} dB ({self.eval_source} text)"]
        ratio = self.output_bytes / self.input_bytes if self.input_bytes else float("nan")
        lines.append(f"  weights on disk   : {self.input_bytes / 1e6:.2f} MB -> {self.output_bytes / 1e6:.2f} MB "
                     f"({ratio:.3f}x)")
        lines.append(f"  time              : {self.seconds:.1f} s")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output_dir), "format": FORMAT, "mode": "static", "algorithm": self.algorithm,
                "alpha": self.result.alpha if self.result.smoothing else None,
                "quantized_linears": len(self.result.weights), "smoothed_norms": sorted(self.result.smoothing),
                "calibration_samples": self.calibration_samples, "cosine": self.cosine, "sqnr_db": self.sqnr_db,
                "eval_text": self.eval_source, "input_weight_bytes": self.input_bytes,
                "output_weight_bytes": self.output_bytes, "seconds": self.seconds, "notes": self.notes}


def smoothquant_pretrained(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                           calib_text: str | os.PathLike | None, alpha: float = DEFAULT_ALPHA, smooth: bool = True,
                           samples: int | None = None, seq_len: int = 512,
                           device: str | torch.device | None = None) -> PretrainedW8A8:
    """SmoothQuant W8A8 the Hugging Face model in `model_dir` and write a compressed-tensors
    `int-quantized` checkpoint (loadable by `transformers.AutoModel*.from_pretrained`) to the new
    `out_dir`. `calib_text` is a UTF-8 text file of representative text; `samples` caps the
    calibration rows (default: all the text gives, at most 128), each `seq_len` tokens long;
    `smooth=False` quantizes without smoothing; `device` runs calibration there (default: where
    the model loads, the CPU). See the module docstring."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_paths(model_dir, out_dir)
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha must be between 0 and 1, got {alpha}; 0.5 is the usual choice")
    config = load_config(model_dir)
    if smooth and config.model_type not in ARCHITECTURES:
        raise LowbitError(f"lowbit has no SmoothQuant mapping for model type {config.model_type!r} (known: "
                          f"{', '.join(sorted(ARCHITECTURES))}); add an ArchitectureMap to "
                          "lowbit/torch/llm/architectures.py, or pass --no-smooth for plain W8A8")
    if calib_text is None:
        raise LowbitError("W8A8 needs calibration text to set the activation ranges; pass --calib-text FILE with a "
                          "few pages of representative text")
    check_sample_options(config, samples, seq_len)
    text = read_text(calib_text)
    tokenizer = load_tokenizer(model_dir)
    cut = text_batches(tokenizer, text, seq_len=seq_len, samples=samples)

    model = load_model(model_dir, config)
    blocks_name, blocks = find_blocks(model, architecture_for(model, need_scale_groups=False))
    _check_expressible(model, blocks, smooth)
    if device is not None:
        model.to(device)

    reference = model_outputs(model, cut.evaluation)
    result = smooth_quantize_w8a8(model, cut.calibration, alpha, smooth=smooth)
    cosine, sqnr = fidelity(reference, model_outputs(model, cut.evaluation))

    def write(directory: Path) -> None:
        write_w8a8_checkpoint(model, result, blocks_name, directory)
        copy_tokenizer(model_dir, directory, tokenizer)

    write_atomically(out_dir, write)
    notes = []
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        notes.append(f"the model runs in {dtype}: lowbit rounds activations to the int8 grid in float32, "
                     f"transformers in {dtype}, so the loaded model can differ by one grid step on a few values")
    return PretrainedW8A8(out_dir, model, result, cut.samples, cut.evaluation, cut.eval_source, cosine, sqnr,
                          weight_bytes(model_dir), weight_bytes(out_dir), time.perf_counter() - start, notes)


def _check_expressible(model: nn.Module, blocks: nn.ModuleList, smooth: bool) -> None:
    """Refuse, before any work, what the int-quantized checkpoint or the smoothing cannot do."""
    linears = [module for block in blocks for module in find_linears(block).values()]
    if any(is_conv1d(module) for module in linears):
        raise LowbitError("this model's linear layers are GPT-2 style Conv1D modules, which compressed-tensors "
                          "checkpoints cannot hold (it quantizes nn.Linear only); quantize it in memory with "
                          "lowbit.torch.llm.smooth_quantize_w8a8 instead")
    if smooth:
        groups = architecture_for(model, need_scale_groups=True).scale_groups
        if not any(group.kind == "norm" for group in groups):
            raise LowbitError(f"model type {model_type(model)!r} is post-norm (its LayerNorms also feed the residual "
                              "stream), so SmoothQuant has no norm to fold its scales into; pass --no-smooth for "
                              "plain W8A8, or export the model to ONNX for static int8")


__all__ = ["PretrainedW8A8", "smoothquant_pretrained"]
