"""Quantize a local Hugging Face model directory into a compressed-tensors checkpoint directory.

`quantize_pretrained(MODEL_DIR, OUT_DIR, ...)`:
1. checks every input before any heavy work (paths, tokenizer, calibration text, whether the
   format can express the request), so bad input costs seconds and writes nothing;
2. loads the model with its own class (config.json `architectures`, so heads are kept), cuts the
   calibration text into samples with the model's own tokenizer, and runs `quantize_llm`;
3. measures the quantized model against the float one on held-out text (output cosine, SQNR);
4. writes the checkpoint into a temporary sibling of OUT_DIR and renames it into place, so OUT_DIR
   is either complete or absent. MODEL_DIR is only read.

With `low_memory` (on by default when the weights take more than half the available memory)
steps 2-4 stream instead (`lowbit.torch.llm.streamed`): the model is built without weights,
each block is read from the shards, quantized, written and freed in turn, so peak memory is
about one block whatever the depth; fidelity against the float model is then not measured.

AWQ on models whose scale fusion goes through an activation (BERT's and GPT-2's GELU) needs a
`ScaledActivation` module that the standard model classes, and so the format, cannot express:
such requests are refused up front (use GPTQ or RTN there). GPT-2's Conv1D layers are refused for
the same reason: compressed-tensors quantizes `nn.Linear` layers only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec, per_channel, per_group
from lowbit.torch.llm.architectures import architecture_for, find_blocks
from lowbit.torch.llm.calib_text import load_tokenizer
from lowbit.torch.llm.compressed_checkpoint import check_exportable, quantization_config, write_checkpoint
from lowbit.torch.llm.hf_io import (check_paths, check_sample_options, checkpoint_dtype,
                                    copy_tokenizer, fidelity, load_config, load_model, main_output, model_class_for,
                                    model_outputs, read_text, seq_len_for, text_batches, weight_bytes,
                                    write_atomically)
from lowbit.torch.llm.linears import find_linears, in_features, is_conv1d
from lowbit.torch.llm.scaling import ScaledActivation
from lowbit.torch.llm.sequential import ALGORITHMS, LLMQuantization, quantize_llm
from lowbit.torch.llm.streamed import ShardReader, ShardStore, materialize_outside_blocks, skeleton, stream_blocks



@dataclass
class PretrainedQuantization:
    """The written checkpoint and what was measured on the way.

    `model` is lowbit's own quantized model in memory (dequantized weights), the reference the
    checkpoint must reproduce. Fidelity compares its outputs with the float model's on
    `eval_source` text ("held-out" or "calibration" when the text had nothing left over)."""

    output_dir: Path
    model: nn.Module
    quantization: LLMQuantization
    spec: QuantSpec
    calibration_samples: int
    eval_batches: list[dict[str, torch.Tensor]]
    eval_source: str
    cosine: float | None
    sqnr_db: float | None
    input_bytes: int
    output_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        q = self.quantization
        lines = [f"wrote {self.output_dir} (compressed-tensors pack-quantized, {self.spec.describe()}, {q.algorithm})",
                 f"  quantized linears : {len(q.layers)}, calibration samples: {self.calibration_samples}"]
        if self.cosine is not None:
            lines.append(f"  output vs float   : cosine {self.cosine:.5f}, SQNR {self.sqnr_db:.1f} dB "
                         f"({self.eval_source} text)")
        ratio = self.output_bytes / self.input_bytes if self.input_bytes else float("nan")
        lines.append(f"  weights on disk   : {self.input_bytes / 1e6:.2f} MB -> {self.output_bytes / 1e6:.2f} MB "
                     f"({ratio:.3f}x)")
        lines.append(f"  time              : {self.seconds:.1f} s ({sum(q.block_seconds):.1f} s in "
                     f"{len(q.block_seconds)} blocks)")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def weight_only_spec(bits: int, group_size: int | None, symmetric: bool = True) -> QuantSpec:
    """The weight spec for `bits` with groups of `group_size` input features (None/0/-1: per channel)."""
    if bits not in (2, 3, 4, 8):
        raise LowbitError(f"weight-only quantization uses 2, 3, 4 or 8 bits, not {bits}")
    granularity = per_channel() if group_size in (None, 0, -1) else None
    if granularity is None:
        if group_size < 1:
            raise LowbitError(f"group size must be positive (or 0 / -1 for per-channel scales), not {group_size}")
        granularity = per_group(group_size)
    return QuantSpec(f"int{bits}", symmetric=symmetric, granularity=granularity)


def quantize_pretrained(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, bits: int = 4,
                        group_size: int | None = 128, algorithm: str = "gptq", calib_text: str | os.PathLike | None = None,
                        symmetric: bool = True, act_order: bool = True, samples: int | None = None,
                        seq_len: int | None = None, trust_remote_code: bool = False,
                        device: str | torch.device | None = None, rtn_mse: bool = False,
                        low_memory: bool | None = None) -> PretrainedQuantization:
    """Weight-only quantize the Hugging Face model in `model_dir` and write a compressed-tensors
    checkpoint (loadable by `transformers.AutoModel*.from_pretrained`) to the new `out_dir`.

    `calib_text` (a UTF-8 text file) is needed for GPTQ and AWQ; with RTN it is optional and only
    used to measure fidelity. `samples` caps the calibration rows (default: all the text gives, at
    most 128), each `seq_len` tokens long (default: min(512, the model's positions)).
    `trust_remote_code` allows a model folder whose config.json needs its own Python code.
    `rtn_mse` shrinks RTN's ranges to the least squared weight error. `low_memory` streams the
    checkpoint block by block (default: when it is bigger than half the available memory).
    See the module docstring."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_paths(model_dir, out_dir)
    if algorithm not in ALGORITHMS:
        raise LowbitError(f"unknown weight algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    spec = weight_only_spec(bits, group_size, symmetric)
    config = load_config(model_dir, trust_remote_code)
    seq_len = seq_len_for(config, seq_len)
    text = _read_text(calib_text, algorithm)
    check_sample_options(config if text is not None else None, samples, seq_len)  # positions matter with text only
    input_bytes = weight_bytes(model_dir)
    low_memory = stream_blocks(input_bytes, low_memory)
    tokenizer = load_tokenizer(model_dir, trust_remote_code) if text is not None else None
    calib_batches, eval_batches, eval_source, used = [], [], "none", 0
    if text is not None:
        cut = text_batches(tokenizer, text, seq_len=seq_len, samples=samples)
        calib_batches, eval_batches, eval_source, used = cut.calibration, cut.evaluation, cut.eval_source, cut.samples

    if low_memory:
        model = skeleton(model_class_for(config, trust_remote_code), config)
    else:
        model = load_model(model_dir, config, trust_remote_code)
    scales_inputs = ALGORITHMS[algorithm].scales_inputs
    blocks_name, blocks = find_blocks(model, architecture_for(model, need_scale_groups=scales_inputs))
    _check_expressible(model, blocks, spec, algorithm)
    options = dict(device=device, act_order=act_order, rtn_mse=rtn_mse)
    calibration = calib_batches if ALGORITHMS[algorithm].needs_statistics else None

    if low_memory:
        quantization, cosine, sqnr = _streamed(model, model_dir, out_dir, blocks_name, len(blocks), spec,
                                               algorithm, calibration, tokenizer, options), None, None
    else:
        reference = model_outputs(model, eval_batches)
        quantization = quantize_llm(model, spec, algorithm, calibration, **options)
        if any(isinstance(module, ScaledActivation) for module in model.modules()):
            raise RuntimeError("AWQ left a ScaledActivation that the checkpoint cannot express")  # checked above
        cosine, sqnr = fidelity(reference, model_outputs(model, eval_batches)) if reference else (None, None)
        write_atomically(out_dir, lambda tmp: _write(model, quantization, blocks_name, model_dir, tmp, tokenizer))
    notes = []
    if low_memory:
        notes.append("streamed block by block (--low-memory): the float model never existed whole, so fidelity "
                     "was not measured")
    elif text is None:
        notes.append("no --calib-text given: fidelity not measured")
    dtype = next(model.parameters()).dtype if not low_memory else checkpoint_dtype(config)
    if dtype != torch.float32:
        notes.append(f"scales are stored in {dtype} (the model's dtype), so loaded "
                     "weights can differ from lowbit's float32 ones by one scale rounding")
    return PretrainedQuantization(out_dir, model, quantization, spec, used, eval_batches, eval_source, cosine, sqnr,
                                  input_bytes, weight_bytes(out_dir), time.perf_counter() - start, notes)


# --------------------------------------------------------------------------- checks

def _read_text(path: str | os.PathLike | None, algorithm: str) -> str | None:
    if path is None:
        if ALGORITHMS[algorithm].needs_statistics:
            raise LowbitError(f"{algorithm.upper()} needs calibration text; pass --calib-text FILE with a few pages of "
                              "representative text (or use --algo rtn, which needs none)")
        return None
    return read_text(path)


def _check_expressible(model: nn.Module, blocks: nn.ModuleList, spec: QuantSpec, algorithm: str) -> None:
    """Refuse, before any work, what the compressed-tensors checkpoint cannot hold."""
    linears = {name: module for block in blocks for name, module in find_linears(block).items()}
    if any(is_conv1d(module) for module in linears.values()):
        raise LowbitError("this model's linear layers are GPT-2 style Conv1D modules, which compressed-tensors "
                          "checkpoints cannot hold (it quantizes nn.Linear only); quantize it in memory with "
                          "lowbit.torch.llm.quantize_llm instead")
    check_exportable(spec, {name: in_features(module) for name, module in linears.items()})
    if not spec.symmetric:
        # The format packs zero points, but transformers 5 + compressed-tensors 0.20 re-initialise
        # them on load (llm-compressor issues 1618 and 1704), so the loaded model would be wrong.
        raise LowbitError("asymmetric weights are not exported: transformers does not load the zero points of "
                          "compressed-tensors pack-quantized checkpoints correctly yet; use --symmetric")
    if ALGORITHMS[algorithm].scales_inputs:
        architecture = architecture_for(model, need_scale_groups=True)
        through = [group.producer for group in architecture.scale_groups
                   if group.kind == "activation" and _has_attribute(blocks[0], group.producer)]
        if through:
            raise LowbitError(f"{algorithm.upper()} on this model type scales the output of {through[0]!r} (an activation function), "
                              "which a standard transformers model loaded from a compressed-tensors checkpoint "
                              "cannot reproduce; use --algo gptq (or rtn) for this export")


def _has_attribute(root: nn.Module, dotted: str) -> bool:
    for piece in dotted.split("."):
        if not hasattr(root, piece):
            return False
        root = getattr(root, piece)
    return True


# --------------------------------------------------------------------------- writing

def _streamed(model, model_dir: Path, out_dir: Path, blocks_name: str, n_blocks: int, spec: QuantSpec,
              algorithm: str, calibration, tokenizer, options: dict) -> LLMQuantization:
    """Quantize the weightless `model` block by block from `model_dir`'s shards into `out_dir`."""
    reader = ShardReader(model_dir)
    # The calibration text reaches block 0 through the embeddings; they are freed right after.
    loaded = materialize_outside_blocks(model, blocks_name, reader) if calibration is not None else []
    done: list[LLMQuantization] = []

    def write(directory: Path) -> None:
        store = ShardStore(reader, directory, blocks_name, n_blocks, calibration_only=loaded)
        done.append(quantize_llm(model, spec, algorithm, calibration, store=store, **options))
        store.copy_rest()
        store.finish(model_dir, quantization_config(done[0], blocks_name, store.quantized))
        copy_tokenizer(model_dir, directory, tokenizer)

    write_atomically(out_dir, write)
    return done[0]


def _write(model, quantization, blocks_name: str, model_dir: Path, directory: Path, tokenizer) -> None:
    write_checkpoint(model, quantization, blocks_name, directory)
    copy_tokenizer(model_dir, directory, tokenizer)


__all__ = ["PretrainedQuantization", "main_output", "quantize_pretrained", "weight_only_spec"]  # main_output: re-exported
