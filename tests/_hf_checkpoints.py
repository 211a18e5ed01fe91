"""Helpers shared by the Hugging Face checkpoint tests: a word-level tokenizer trained on
Python's own pydoc text (no hub access), calibration text files, directory digests, reloading."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

VOCAB = 160
HIDDEN = 64


def english(pages: int) -> str:
    import pydoc_data.topics

    return "\n".join(list(pydoc_data.topics.topics.values())[:pages])


def word_tokenizer(kind: str):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "<s>"]
    backend.train_from_iterator([english(40)], trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=specials))
    if kind == "bert":
        backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                               special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                                    sep_token="[SEP]", pad_token="[PAD]")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 4)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                                                pad_token="[PAD]")


def text_file(tmp_path: Path, pages: int = 40) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(english(pages), encoding="utf-8")
    return path


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def load(directory: Path, kind: str):
    import transformers

    auto = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_pretrained(directory).eval()


def outputs(model, batches, main_output):
    with torch.no_grad():
        return [main_output(model(**batch)) for batch in batches]
