"""Quantize a local Hugging Face model directory into a compressed-tensors checkpoint directory.

`quantize_pretrained(MODEL_DIR, OUT_DIR, ...)`:
1. checks every input before any heavy work (paths, tokenizer, calibration text, whether the
   format can express the request), so bad input costs seconds and writes nothing;
2. loads the model with its own class (config.json `architectures`, so heads are kept), cuts the
   calibration text into samples with the model's own tokenizer, and runs `quantize_llm`;
3. measures the quantized model against the float one on held-out text (output cosine, SQNR);
4. writes the checkpoint into a temporary sibling of OUT_DIR and renames it into place, so OUT_DIR
   is either complete or absent. MODEL_DIR is only read.

AWQ on models whose scale fusion goes through an activation (BERT's and GPT-2's GELU) needs a
`ScaledActivation` module that the standard model classes, and so the format, cannot express:
such requests are refused up front (use GPTQ or RTN there). GPT-2's Conv1D layers are refused for
the same reason: compressed-tensors quantizes `nn.Linear` layers only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec, per_channel, per_group
from lowbit.torch.llm.architectures import architecture_for, find_blocks
from lowbit.torch.llm.calib_text import TOKENIZER_FILES, batches, load_tokenizer, text_samples
from lowbit.torch.llm.compressed_checkpoint import check_exportable, write_checkpoint
from lowbit.torch.llm.linears import find_linears, in_features, is_conv1d
from lowbit.torch.llm.scaling import ScaledActivation
from lowbit.torch.llm.sequential import ALGORITHMS, LLMQuantization, quantize_llm

DEFAULT_SAMPLES = 128
EVAL_SAMPLES = 2  # held-out text rows the fidelity is measured on
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
                        symmetric: bool = True, act_order: bool = False, samples: int | None = None,
                        seq_len: int = 512, device: str | torch.device | None = None) -> PretrainedQuantization:
    """Weight-only quantize the Hugging Face model in `model_dir` and write a compressed-tensors
    checkpoint (loadable by `transformers.AutoModel*.from_pretrained`) to the new `out_dir`.

    `calib_text` (a UTF-8 text file) is needed for GPTQ and AWQ; with RTN it is optional and only
    used to measure fidelity. `samples` caps the calibration rows (default: all the text gives, at
    most 128), each `seq_len` tokens long. See the module docstring."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_paths(model_dir, out_dir)
    if algorithm not in ALGORITHMS:
        raise LowbitError(f"unknown weight algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if samples is not None and samples < 1:
        raise LowbitError(f"--samples must be a positive number of calibration samples, not {samples}")
    if seq_len < 2:
        raise LowbitError(f"--seq-len must be at least 2 tokens, not {seq_len}")
    spec = weight_only_spec(bits, group_size, symmetric)
    config = _load_config(model_dir)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_positions and seq_len > max_positions and calib_text is not None:
        raise LowbitError(f"--seq-len {seq_len} exceeds the model's {max_positions} positions; use --seq-len "
                          f"{max_positions} or less")

    text = _read_text(calib_text, algorithm)
    tokenizer = load_tokenizer(model_dir) if text is not None else None
    calib_batches, eval_batches, eval_source, used = [], [], "none", 0
    if text is not None:
        wants_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        rows = text_samples(tokenizer, text, seq_len=seq_len, minimum=samples or 1)
        used = min(len(rows), samples or DEFAULT_SAMPLES)
        held_out = rows[used:used + EVAL_SAMPLES]
        eval_source = "held-out" if held_out else "calibration"
        calib_batches = batches(rows[:used], token_type_ids=wants_types)
        eval_batches = batches(held_out or rows[:EVAL_SAMPLES], token_type_ids=wants_types)

    model = _load_model(model_dir, config)
    blocks_name, blocks = find_blocks(model, architecture_for(model, need_scale_groups=algorithm == "awq"))
    _check_expressible(model, blocks, spec, algorithm)

    reference = _outputs(model, eval_batches)
    quantization = quantize_llm(model, spec, algorithm, calib_batches if algorithm != "rtn" else None,
                                device=device, act_order=act_order)
    if any(isinstance(module, ScaledActivation) for module in model.modules()):
        raise RuntimeError("AWQ left a ScaledActivation that the checkpoint cannot express")  # checked above
    cosine, sqnr = _fidelity(reference, _outputs(model, eval_batches)) if reference else (None, None)

    _write_atomically(out_dir, lambda tmp: _write(model, quantization, blocks_name, model_dir, tmp, tokenizer))
    notes = []
    if algorithm == "rtn" and text is None:
        notes.append("no --calib-text given: fidelity not measured")
    if next(model.parameters()).dtype != torch.float32:
        notes.append(f"scales are stored in {next(model.parameters()).dtype} (the model's dtype), so loaded "
                     "weights can differ from lowbit's float32 ones by one scale rounding")
    return PretrainedQuantization(out_dir, model, quantization, spec, used, eval_batches, eval_source, cosine, sqnr,
                                  _weight_bytes(model_dir), _weight_bytes(out_dir), time.perf_counter() - start, notes)


# --------------------------------------------------------------------------- checks

def _check_paths(model_dir: Path, out_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise LowbitError(f"{model_dir} is not a Hugging Face model directory (no config.json); pass the folder "
                          "that holds config.json and the weights")
    if out_dir.resolve() == model_dir.resolve():
        raise LowbitError("the output directory is the model directory; the input is never overwritten, so "
                          "pass a new directory with -o")
    if model_dir.resolve() in out_dir.resolve().parents:
        raise LowbitError(f"the output directory {out_dir} is inside the model directory; pass a directory "
                          "outside it so the input stays untouched")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LowbitError(f"{out_dir} already exists and is not an empty directory; pass a new directory with -o "
                          "or remove it first")


def _load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise LowbitError(f"could not read {model_dir / 'config.json'} ({str(exc).splitlines()[0]}); check that "
                          "it is a transformers model config") from None
    if getattr(config, "quantization_config", None):
        raise LowbitError(f"{model_dir} is already quantized (its config.json has a quantization_config); "
                          "start from the float model")
    return config


def _read_text(path: str | os.PathLike | None, algorithm: str) -> str | None:
    if path is None:
        if algorithm != "rtn":
            raise LowbitError(f"{algorithm.upper()} needs calibration text; pass --calib-text FILE with a few pages of "
                              "representative text (or use --algo rtn, which needs none)")
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LowbitError(f"calibration text file {path} does not exist; pass a UTF-8 text file") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise LowbitError(f"could not read {path} as UTF-8 text ({type(exc).__name__}); pass a plain text file") from None
    if not text.strip():
        raise LowbitError(f"calibration text file {path} is empty; fill it with representative text")
    return text


def _load_model(model_dir: Path, config: Any) -> nn.Module:
    import transformers

    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    model_class = model_class or transformers.AutoModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = model_class.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise LowbitError(f"could not load the model weights from {model_dir} ({str(exc).splitlines()[0]}); "
                              "check that the folder holds the checkpoint named in config.json") from None
    return model.eval()


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
    if algorithm == "awq":
        architecture = architecture_for(model, need_scale_groups=True)
        through = [group.producer for group in architecture.scale_groups
                   if group.kind == "activation" and _has_attribute(blocks[0], group.producer)]
        if through:
            raise LowbitError(f"AWQ on this model type scales the output of {through[0]!r} (an activation function), "
                              "which a standard transformers model loaded from a compressed-tensors checkpoint "
                              "cannot reproduce; use --algo gptq (or rtn) for this export")


def _has_attribute(root: nn.Module, dotted: str) -> bool:
    for piece in dotted.split("."):
        if not hasattr(root, piece):
            return False
        root = getattr(root, piece)
    return True


# --------------------------------------------------------------------------- fidelity

def _outputs(model: nn.Module, eval_batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for batch in eval_batches:
            outputs.append(main_output(model(**{k: v.to(device) for k, v in batch.items()})).float().cpu())
    return outputs


def main_output(output: Any) -> torch.Tensor:
    """The tensor a model's result is judged by: logits if present, else the last hidden state."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output[0]


def _fidelity(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    ref = torch.cat([r.reshape(-1, r.shape[-1]) for r in reference])
    out = torch.cat([c.reshape(-1, c.shape[-1]) for c in candidate])
    cosine = torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=-1).mean().item()
    noise = (ref.double() - out.double()).pow(2).sum().item()
    sqnr = float("inf") if noise == 0 else 10 * torch.log10(ref.double().pow(2).sum() / noise).item()
    return cosine, sqnr


# --------------------------------------------------------------------------- writing

def _write(model, quantization, blocks_name: str, model_dir: Path, directory: Path, tokenizer) -> None:
    write_checkpoint(model, quantization, blocks_name, directory)
    copied = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    for name in copied:
        shutil.copyfile(model_dir / name, directory / name)
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _write_atomically(out_dir: Path, write) -> None:
    """Run `write(tmp)` in a temporary sibling of `out_dir`, then rename it to `out_dir`."""
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".lowbit-tmp", dir=parent))
    try:
        write(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked at the start); a non-empty one makes this fail loudly
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _weight_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.suffix in WEIGHT_SUFFIXES and path.is_file())
