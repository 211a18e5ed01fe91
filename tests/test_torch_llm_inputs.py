"""What a Hugging Face model folder may make lowbit do: custom model code runs only behind
--trust-remote-code, pickled weights are never unpickled, and --seq-len adapts to the model."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _hf_checkpoints import HIDDEN, VOCAB, digest, text_file, word_tokenizer  # noqa: E402
from _synthetic_layers import single_thread  # noqa: E402,F401 (autouse fixture)
from lowbit.cli import main  # noqa: E402
from lowbit.torch.llm import quantize_pretrained  # noqa: E402


def _save_llama(directory: Path, positions: int = 64, safe: bool = True) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=positions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
        word_tokenizer("llama").save_pretrained(directory)
    return directory


CUSTOM_CODE = '''
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("custom code ran")


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


def _make_custom(model_dir: Path, marker: Path) -> None:
    """Turn a saved LLaMA folder into one whose config.json points at code in the folder."""
    (model_dir / "modeling_tiny.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "modeling_tiny.TinyCustomConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    (model_dir / "config.json").write_text(json.dumps(config))


def _fails(argv, capsys) -> str:
    capsys.readouterr()  # drop what saving the test model printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_custom_code_needs_trust_remote_code(tmp_path, capsys):
    model_dir = _save_llama(tmp_path / "model")
    marker = tmp_path / "ran.txt"
    _make_custom(model_dir, marker)
    before = digest(model_dir)
    argv = ["quantize", str(model_dir), "-o", str(tmp_path / "out"), "--mode", "weight-only", "--algo", "rtn",
            "--group-size", "32"]
    err = _fails(argv, capsys)
    assert "--trust-remote-code" in err and "auto_map" in err
    assert not marker.exists() and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    # An architecture transformers does not know, without auto_map, is custom code too.
    config = json.loads((model_dir / "config.json").read_text())
    del config["auto_map"]
    (model_dir / "config.json").write_text(json.dumps(config))
    assert "TinyCustomForCausalLM is not part of transformers" in _fails(argv, capsys)
    _make_custom(model_dir, marker)
    assert digest(model_dir) == before

    pytest.importorskip("compressed_tensors")
    assert main(argv + ["--trust-remote-code"]) == 0
    assert marker.exists()  # the opt-in really ran the folder's code
    out = tmp_path / "out"
    assert (out / "modeling_tiny.py").is_file()  # the written config still points at it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__ == "TinyCustomForCausalLM"
    assert loaded.model.layers[0].mlp.up_proj.quantization_scheme.weights.num_bits == 4


class _Payload:
    """Unpickling this creates `path`: the proof that a file was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_without_unpickling(tmp_path, capsys, name):
    model_dir = _save_llama(tmp_path / "model")
    for path in model_dir.glob("*.safetensors"):
        path.unlink()
    marker = tmp_path / "unpickled.txt"
    (model_dir / name).write_bytes(pickle.dumps(_Payload(marker)))
    for mode in (["--mode", "weight-only", "--algo", "rtn"],
                 ["--mode", "static", "--algo", "smoothquant", "--calib-text", str(text_file(tmp_path))]):
        err = _fails(["quantize", str(model_dir), "-o", str(tmp_path / "out"), "--group-size", "32"] + mode, capsys)
        assert f"pickled weights ({name})" in err and "safetensors" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("positions,expected", [(64, 64), (1024, 512)])
def test_seq_len_defaults_to_the_model_positions_capped_at_512(tmp_path, positions, expected):
    model_dir = _save_llama(tmp_path / "model", positions=positions)
    result = quantize_pretrained(model_dir, tmp_path / "out", algorithm="rtn", group_size=32,
                                 calib_text=text_file(tmp_path, pages=80))
    assert result.eval_batches[0]["input_ids"].shape[1] == expected
