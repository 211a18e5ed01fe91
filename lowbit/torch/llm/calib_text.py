"""Calibration samples from a plain text file, tokenized with the model's own tokenizer.

The text is tokenized once without special tokens and cut into consecutive chunks; each chunk
gets the model's own special tokens (BOS for LLaMA, [CLS] ... [SEP] for BERT) so that every sample
looks like what the model sees in use and is exactly `seq_len` tokens long (no padding).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer stored in `model_dir`, offline; a LowbitError when there is none."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise LowbitError(f"{model_dir} has no tokenizer files (tokenizer.json, vocab.txt, tokenizer.model ...); "
                          "calibration text is tokenized with the model's own tokenizer: save it there with "
                          "tokenizer.save_pretrained(MODEL_DIR)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LowbitError(f"could not load the tokenizer from {model_dir} ({str(exc).splitlines()[0]}); "
                          "save a working tokenizer there with tokenizer.save_pretrained(MODEL_DIR)") from None


def text_samples(tokenizer: Any, text: str, *, seq_len: int, minimum: int = 1) -> list[torch.Tensor]:
    """Every full token-id row of length `seq_len` in `text` (consecutive, non-overlapping).

    Text for fewer than `minimum` rows is a LowbitError naming how many tokens are needed and how
    many the text has."""
    prefix, suffix = _special_frame(tokenizer)
    special = len(prefix) + len(suffix)
    body = seq_len - special
    if body < 1:
        raise LowbitError(f"--seq-len {seq_len} leaves no room for text next to the tokenizer's {special} special "
                          "tokens; use a longer sequence length")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sequence longer than the model maximum": chunked below
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    wanted = max(1, minimum)
    if len(ids) < wanted * body:
        raise LowbitError(f"the calibration text has {len(ids)} tokens but {wanted} sample(s) of {seq_len} tokens "
                          f"need at least {wanted * body}; give more text (a few pages of representative prose), "
                          "or lower --seq-len or --samples")
    rows = []
    for index in range(len(ids) // body):
        chunk = ids[index * body:(index + 1) * body]
        rows.append(torch.tensor(prefix + chunk + suffix, dtype=torch.long))
    return rows


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text (by tokenizing a probe
    with and without them: transformers 5 tokenizers no longer expose the template directly)."""
    probe = "hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def batches(rows: list[torch.Tensor], *, batch_size: int = 8, token_type_ids: bool = False) -> list[dict[str, torch.Tensor]]:
    """Equal-length rows stacked into `model(**batch)` keyword dicts."""
    out = []
    for start in range(0, len(rows), batch_size):
        input_ids = torch.stack(rows[start:start + batch_size])
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(input_ids)
        out.append(batch)
    return out
