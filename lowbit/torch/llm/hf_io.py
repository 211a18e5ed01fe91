"""Reading a Hugging Face model directory and writing a checkpoint directory next to it.

Shared by every `... -> compressed-tensors checkpoint` path (weight-only, W8A8): input checks
that cost seconds and write nothing, offline loading of config / model / calibration text,
output fidelity against the float model, and atomic directory writes (temporary sibling, then
rename), so OUT_DIR is either complete or absent and MODEL_DIR is only read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.torch.llm.calib_text import TOKENIZER_FILES, batches, text_samples

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # torch.save files: unpickling them can run code
DEFAULT_SEQ_LEN = 512  # tokens per calibration row, capped by the model's positions
DEFAULT_SAMPLES = 128  # calibration rows when the user gives no --samples
EVAL_SAMPLES = 2  # held-out text rows the fidelity is measured on


# --------------------------------------------------------------------------- checks and loading

def check_paths(model_dir: Path, out_dir: Path) -> None:
    """A LowbitError unless `model_dir` holds config.json and `out_dir` is new (or an empty
    directory) outside it."""
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


def load_config(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """The transformers config of a float (not yet quantized) model stored as safetensors.

    Refused before anything is imported from the folder: custom model code without
    `trust_remote_code`, and pickled weights (never unpickled: that can run code)."""
    from transformers import AutoConfig

    check_custom_code(model_dir, trust_remote_code)
    check_safetensors(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise LowbitError(f"could not read {model_dir / 'config.json'} ({str(exc).splitlines()[0]}); check that "
                          "it is a transformers model config") from None
    if getattr(config, "quantization_config", None):
        raise LowbitError(f"{model_dir} is already quantized (its config.json has a quantization_config); "
                          "start from the float model")
    return config


def custom_code_reason(model_dir: Path) -> str | None:
    """Why config.json needs model code that transformers does not ship (None when it does not)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowbitError(f"could not read {model_dir / 'config.json'} ({exc}); it must be a JSON object") from None
    if not isinstance(raw, dict):
        raise LowbitError(f"{model_dir / 'config.json'} is not a JSON object; check that it is a transformers config")
    if raw.get("auto_map"):
        return f"its auto_map names code in the folder ({', '.join(sorted(raw['auto_map']))})"
    unknown = [name for name in raw.get("architectures") or [] if not hasattr(transformers, str(name))]
    if unknown:
        return f"its architecture {unknown[0]} is not part of transformers"
    if raw.get("model_type") and raw["model_type"] not in CONFIG_MAPPING_NAMES:
        return f"its model_type {raw['model_type']!r} is not part of transformers"
    return None


def check_custom_code(model_dir: Path, trust_remote_code: bool) -> None:
    """Refuse a folder whose model needs its own Python code unless the user opted in."""
    reason = custom_code_reason(model_dir)
    if reason and not trust_remote_code:
        raise LowbitError(f"{model_dir} needs custom model code ({reason}), which lowbit runs only with "
                          "--trust-remote-code; add that flag if you trust the Python files in that folder")


def check_safetensors(model_dir: Path) -> None:
    """Refuse pickled weights (pytorch_model.bin ...) without opening them: only safetensors load."""
    if any(model_dir.glob("*.safetensors")):
        return
    pickled = sorted(path.name for path in model_dir.iterdir() if path.suffix in PICKLED_SUFFIXES and path.is_file())
    if pickled:
        raise LowbitError(f"{model_dir} holds pickled weights ({pickled[0]}), which lowbit never loads (unpickling "
                          "can run code); convert them to safetensors (model.save_pretrained(DIR, "
                          "safe_serialization=True) in a trusted environment) and pass that folder")
    raise LowbitError(f"{model_dir} has no weight files (*.safetensors); pass the folder that holds config.json and "
                      "the model's safetensors weights")


def seq_len_for(config: Any, seq_len: int | None) -> int:
    """`seq_len`, or by default min(DEFAULT_SEQ_LEN, the model's positions)."""
    if seq_len is not None:
        return seq_len
    return min(DEFAULT_SEQ_LEN, max_positions(config) or DEFAULT_SEQ_LEN)


def max_positions(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def read_text(path: str | os.PathLike) -> str:
    """A non-empty UTF-8 text file's content."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LowbitError(f"calibration text file {path} does not exist; pass a UTF-8 text file") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise LowbitError(f"could not read {path} as UTF-8 text ({type(exc).__name__}); pass a plain text file") from None
    if not text.strip():
        raise LowbitError(f"calibration text file {path} is empty; fill it with representative text")
    return text


def model_class_for(config: Any, trust_remote_code: bool = False) -> Any:
    """The class that keeps the model's heads: config.json's `architectures` entry (transformers'
    own, or the folder's code through the Auto classes with `trust_remote_code`)."""
    import transformers

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"):
            if auto in auto_map:
                return getattr(transformers, auto)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    return model_class or transformers.AutoModel


def load_model(model_dir: Path, config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The model with its own class (config.json `architectures`, so heads are kept), in eval mode,
    from safetensors only (`check_safetensors` ran in `load_config`)."""
    model_class = model_class_for(config, trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = model_class.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise LowbitError(f"could not load the model weights from {model_dir} ({str(exc).splitlines()[0]}); "
                              "check that the folder holds the checkpoint named in config.json") from None
    return model.eval()


def check_sample_options(config: Any, samples: int | None, seq_len: int) -> None:
    """--samples and --seq-len make sense (for this model's positions unless `config` is None)."""
    if samples is not None and samples < 1:
        raise LowbitError(f"--samples must be a positive number of calibration samples, not {samples}")
    if seq_len < 2:
        raise LowbitError(f"--seq-len must be at least 2 tokens, not {seq_len}")
    if config is None:
        return
    positions = max_positions(config)
    if positions and seq_len > positions:
        raise LowbitError(f"--seq-len {seq_len} exceeds the model's {positions} positions; use --seq-len "
                          f"{positions} or less")


@dataclass
class TextBatches:
    """Calibration batches, evaluation batches (held-out rows when the text has some left over,
    else the first calibration rows: `eval_source` says which) and how many rows calibrate."""

    calibration: list[dict[str, torch.Tensor]]
    evaluation: list[dict[str, torch.Tensor]]
    eval_source: str
    samples: int


def text_batches(tokenizer: Any, text: str, *, seq_len: int, samples: int | None) -> TextBatches:
    """Cut `text` into `seq_len`-token rows: the first `samples` (default: all, at most
    DEFAULT_SAMPLES) calibrate, the next EVAL_SAMPLES measure fidelity."""
    wants_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    rows = text_samples(tokenizer, text, seq_len=seq_len, minimum=samples or 1)
    used = min(len(rows), samples or DEFAULT_SAMPLES)
    held_out = rows[used:used + EVAL_SAMPLES]
    return TextBatches(batches(rows[:used], token_type_ids=wants_types),
                       batches(held_out or rows[:EVAL_SAMPLES], token_type_ids=wants_types),
                       "held-out" if held_out else "calibration", used)


# --------------------------------------------------------------------------- fidelity

def main_output(output: Any) -> torch.Tensor:
    """The tensor a model's result is judged by: logits if present, else the last hidden state."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output[0]


def model_outputs(model: nn.Module, eval_batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """`main_output` of every batch, as float32 CPU tensors."""
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for batch in eval_batches:
            outputs.append(main_output(model(**{k: v.to(device) for k, v in batch.items()})).float().cpu())
    return outputs


def fidelity(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """(mean cosine over output rows, SQNR in dB) of `candidate` against `reference`."""
    ref = torch.cat([r.reshape(-1, r.shape[-1]) for r in reference])
    out = torch.cat([c.reshape(-1, c.shape[-1]) for c in candidate])
    cosine = torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=-1).mean().item()
    noise = (ref.double() - out.double()).pow(2).sum().item()
    sqnr = float("inf") if noise == 0 else 10 * torch.log10(ref.double().pow(2).sum() / noise).item()
    return cosine, sqnr


# --------------------------------------------------------------------------- writing

def copy_tokenizer(model_dir: Path, directory: Path, tokenizer: Any | None) -> None:
    """Copy the tokenizer files of `model_dir` (or save `tokenizer` when it has none on disk), and
    the folder's Python files, which a custom-code config.json (`auto_map`) points at."""
    for path in model_dir.glob("*.py"):
        shutil.copyfile(path, directory / path.name)
    copied = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    for name in copied:
        shutil.copyfile(model_dir / name, directory / name)
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
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


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def weight_bytes(directory: Path) -> int:
    """Bytes of the weight files directly in `directory`."""
    return sum(path.stat().st_size for path in directory.iterdir() if path.suffix in WEIGHT_SUFFIXES and path.is_file())


def checkpoint_dtype(config) -> torch.dtype:
    """The weights' dtype a config.json names (float32 when it names none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
