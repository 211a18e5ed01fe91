"""Checkpoints bigger than memory: `quantize_pretrained(low_memory=True)` builds the model without
weights and reads, quantizes, writes and frees one block at a time. Its checkpoint must hold the
same tensors as the in-memory path's and load in transformers + compressed-tensors; no two
blocks may hold weights at once."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from _hf_checkpoints import HIDDEN, VOCAB, load, outputs, text_file, word_tokenizer  # noqa: E402
from _synthetic_layers import single_thread  # noqa: E402,F401 (autouse fixture)
from lowbit.cli import main  # noqa: E402
from lowbit.torch.llm import quantize_pretrained, streamed  # noqa: E402
from lowbit.torch.llm.hf_io import main_output  # noqa: E402


def _save(directory: Path, kind: str = "llama", shard: str | None = None) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(config_class(**common))
        with torch.no_grad():
            for module in model.modules():
                if "norm" in type(module).__name__.lower():
                    module.weight[:4] *= 8.0
        model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
        word_tokenizer("llama").save_pretrained(directory)
    return directory


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in directory.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("algorithm, kind", [("rtn", "llama"), ("gptq", "qwen2"), ("awq", "llama")])
def test_streamed_checkpoint_equals_the_in_memory_one(tmp_path, algorithm, kind):
    pytest.importorskip("compressed_tensors")
    model_dir = _save(tmp_path / "model", kind, shard="200KB")  # several input shards and an index
    assert (model_dir / streamed.INDEX).is_file()
    options = dict(algorithm=algorithm, group_size=32, calib_text=text_file(tmp_path), samples=4, seq_len=32)
    whole = quantize_pretrained(model_dir, tmp_path / "whole", low_memory=False, **options)
    streamed_result = quantize_pretrained(model_dir, tmp_path / "streamed", low_memory=True, **options)
    assert streamed_result.cosine is None and any("streamed" in note for note in streamed_result.notes)

    expected, actual = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    reference = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"] == reference["config_groups"]
    assert (tmp_path / "streamed" / "tokenizer.json").is_file()

    loaded = load(tmp_path / "streamed", "llama")
    for want, got in zip(outputs(whole.model, whole.eval_batches, main_output),
                         outputs(loaded, whole.eval_batches, main_output)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activations, smooth", [("static", True), ("dynamic", True), ("dynamic", False)])
def test_streamed_w8a8_checkpoint_equals_the_in_memory_one(tmp_path, activations, smooth):
    """SmoothQuant W8A8 (static per-tensor and dynamic per-token inputs; plain dynamic reads no
    calibration) streamed block by block writes the in-memory path's tensors, which load in
    transformers + compressed-tensors and compute what lowbit's quantized model computes."""
    pytest.importorskip("compressed_tensors")
    from lowbit.torch.llm.pretrained_w8a8 import smoothquant_pretrained

    model_dir = _save(tmp_path / "model", "llama", shard="200KB")
    options = dict(calib_text=text_file(tmp_path), samples=4, seq_len=32, activations=activations, smooth=smooth,
                   smooth_groups="norm,linear" if smooth else None)
    whole = smoothquant_pretrained(model_dir, tmp_path / "whole", low_memory=False, **options)
    streamed_result = smoothquant_pretrained(model_dir, tmp_path / "streamed", low_memory=True, **options)
    assert streamed_result.cosine is None and any("streamed" in note for note in streamed_result.notes)
    assert sorted(streamed_result.result.smoothing) == sorted(whole.result.smoothing)

    expected, actual = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert sorted(actual) == sorted(expected)
    assert any(name.endswith("down_proj.weight") and tensor.dtype == torch.int8 for name, tensor in actual.items())
    assert any(name.endswith("input_scale") for name in actual) == (activations == "static")
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    reference = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"] == reference["config_groups"]

    loaded = load(tmp_path / "streamed", "llama")
    for want, got in zip(outputs(whole.model, whole.eval_batches, main_output),
                         outputs(loaded, whole.eval_batches, main_output)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_only_one_block_holds_weights_at_a_time(tmp_path, monkeypatch):
    model_dir = _save(tmp_path / "model")
    seen = []
    original_load = streamed.ShardStore.load

    def load_and_count(self, index, block):
        blocks = block_list[0]
        seen.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))
        original_load(self, index, block)

    original_skeleton = streamed.skeleton
    block_list = []

    def remember(model_class, config):
        model = original_skeleton(model_class, config)
        block_list.append(model.model.layers)
        return model

    monkeypatch.setattr(streamed.ShardStore, "load", load_and_count)
    monkeypatch.setattr("lowbit.torch.llm.pretrained.skeleton", remember)
    quantize_pretrained(model_dir, tmp_path / "out", algorithm="gptq", group_size=32,
                        calib_text=text_file(tmp_path), samples=4, seq_len=32, low_memory=True)
    assert seen == [0, 0, 0]  # when each block loads, no other block holds weights
    assert all(p.device.type == "meta" for p in block_list[0].parameters())


def test_cli_low_memory_flag(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    model_dir = _save(tmp_path / "model")
    capsys.readouterr()
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "out"), "--mode", "weight-only", "--algo", "rtn",
                 "--group-size", "32", "--low-memory", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cosine"] is None and report["output_weight_bytes"] < report["input_weight_bytes"]
    assert load(tmp_path / "out", "llama").model.layers[2].mlp.up_proj.quantization_scheme is not None


def test_shard_reader_matches_safetensors_and_names_damaged_files(tmp_path):
    from safetensors.torch import save_file

    from lowbit.errors import LowbitError

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2), "d": torch.zeros(0, 4, dtype=torch.float16)}
    save_file(tensors, tmp_path / "model.safetensors")
    read = streamed.ShardReader(tmp_path).read(list(tensors))
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)
    with pytest.raises(LowbitError, match="no tensor 'missing'"):
        streamed.ShardReader(tmp_path).read(["missing"])
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(LowbitError, match="truncated"):
        streamed.ShardReader(tmp_path).read(list(tensors))
