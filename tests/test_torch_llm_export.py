"""Hugging Face model directory -> compressed-tensors checkpoint that transformers loads.

Tiny random LLaMA and BERT models with word-level tokenizers trained on Python's own pydoc
text are saved to tmp dirs; the checkpoint is loaded back by transformers (with the
compressed-tensors package) and must reproduce lowbit's own quantized model. The packing is
checked against compressed-tensors' own `pack_to_int32`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from _hf_checkpoints import HIDDEN, VOCAB, digest, load, outputs, text_file, word_tokenizer  # noqa: E402
from _synthetic_layers import single_thread  # noqa: E402,F401 (autouse fixture)
from lowbit.cli import main  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.numerics import dequantize  # noqa: E402
from lowbit.torch.llm import quantize_pretrained  # noqa: E402
from lowbit.torch.llm.compressed_checkpoint import pack_int32  # noqa: E402
from lowbit.torch.llm.pretrained import main_output  # noqa: E402


def _needs_compressed_tensors():
    return pytest.importorskip("compressed_tensors", reason="loading the checkpoint needs the compressed-tensors package")


def _save_model(kind: str, directory: Path, *, tokenizer: bool = True) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "bert":
            model = transformers.BertModel(transformers.BertConfig(**common))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
        with torch.no_grad():  # a few loud channels, as in trained models
            for name, module in model.named_modules():
                if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    module.weight[:4] *= 8.0
        model.save_pretrained(directory)
        if tokenizer:
            word_tokenizer(kind).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("packed_dim", [0, 1])
@pytest.mark.parametrize("columns", [70, 64])  # 64: whole words per row (the fast path for 2, 4, 8 bits)
def test_packing_matches_compressed_tensors(bits, packed_dim, columns):
    _needs_compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = torch.randint(low, high + 1, (37, columns), generator=torch.Generator().manual_seed(bits))
    ours = pack_int32(values, bits, packed_dim)
    assert torch.equal(ours, pack_to_int32(values.to(torch.int8), bits, packed_dim))
    assert torch.equal(unpack_from_int32(ours, bits, values.shape, packed_dim).long(), values)


@pytest.mark.parametrize("group", [16, 0])
def test_asymmetric_tensors_decompress_to_lowbit_weights(group):
    """The zero points are packed as the format defines (the transformers loader still drops them,
    so quantize_pretrained refuses asymmetric exports; see test_cli_bad_inputs...)."""
    _needs_compressed_tensors()
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from lowbit.algorithms import rtn_quantize
    from lowbit.torch.llm.compressed_checkpoint import compressed_tensors
    from lowbit.torch.llm.pretrained import weight_only_spec
    from lowbit.torch.llm.sequential import QuantizedLinear

    spec = weight_only_spec(3, group, symmetric=False)
    quantized = rtn_quantize(torch.randn(40, 48, generator=torch.Generator().manual_seed(1)) + 0.3, spec)
    layer = QuantizedLinear(quantized.values, quantized.qparams)
    args = QuantizationArgs(num_bits=3, type="int", symmetric=False, strategy="group" if group else "channel",
                            group_size=group or None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    theirs = PackedQuantizationCompressor.decompress(compressed_tensors(layer, torch.float32), scheme)["weight"]
    assert torch.equal(theirs, quantized.weight)


# --------------------------------------------------------------------------- round trip through transformers


@pytest.mark.parametrize("kind, algorithm, bits, group, symmetric", [
    ("llama", "gptq", 4, 32, True),
    ("llama", "awq", 3, 32, True),
    ("llama", "rtn", 8, 0, True),
    ("bert", "gptq", 4, 32, True),
    ("bert", "rtn", 2, 16, True),
])
def test_checkpoint_loads_and_matches_lowbit(tmp_path, kind, algorithm, bits, group, symmetric):
    _needs_compressed_tensors()
    model_dir = _save_model(kind, tmp_path / "model")
    before = digest(model_dir)
    out_dir = tmp_path / "out"
    result = quantize_pretrained(model_dir, out_dir, bits=bits, group_size=group, algorithm=algorithm,
                                 calib_text=text_file(tmp_path), samples=6, seq_len=32, symmetric=symmetric)
    assert digest(model_dir) == before  # the input is never touched
    config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (bits, symmetric)
    assert weights["strategy"] == ("group" if group else "channel")
    assert (out_dir / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out.*"))  # no temporary directory left behind
    assert result.eval_source == "held-out" and 0.5 < result.cosine < 1.0

    loaded = load(out_dir, kind)
    # Every quantized linear's weight, as compressed-tensors decompresses it, equals lowbit's.
    modules = dict(loaded.named_modules())
    for name, layer in result.quantization.layers.items():
        module = modules[name]
        assert getattr(module, "quantization_scheme", None) is not None, name
        ours = dequantize(layer.values, layer.qparams)
        from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
        state = {key: value for key, value in module.named_parameters(recurse=False)}
        state.update(dict(module.named_buffers(recurse=False)))
        theirs = PackedQuantizationCompressor.decompress(state, module.quantization_scheme)["weight"]
        assert torch.equal(theirs.float(), ours), name
    for expected, actual in zip(outputs(result.model, result.eval_batches, main_output),
                                outputs(loaded, result.eval_batches, main_output)):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_checkpoint_is_smaller(tmp_path):
    _needs_compressed_tensors()
    model_dir = _save_model("bert", tmp_path / "model")
    result = quantize_pretrained(model_dir, tmp_path / "out", bits=4, group_size=32, algorithm="rtn")
    packed = sum(layer.values.numel() for layer in result.quantization.layers.values())
    # Each int4 weight saves 3.5 bytes of float32, minus one float32 scale per 32 weights (a few
    # percent more go to the safetensors header naming three tensors per layer instead of one).
    saved = result.input_bytes - result.output_bytes
    assert packed * (3.5 - 4 / 32) * 0.97 < saved < packed * 3.5
    assert result.cosine is None and "fidelity not measured" in result.notes[0]


# --------------------------------------------------------------------------- command line


def test_cli_writes_checkpoint(tmp_path, capsys):
    _needs_compressed_tensors()
    model_dir = _save_model("llama", tmp_path / "model")
    code = main(["quantize", str(model_dir), "-o", str(tmp_path / "out"), "--mode", "weight-only",
                 "--weight-bits", "4", "--group-size", "32", "--algo", "gptq", "--act-order",
                 "--calib-text", str(text_file(tmp_path)), "--samples", "4", "--seq-len", "32", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration_samples"] == 4 and report["output_weight_bytes"] < report["input_weight_bytes"]
    loaded = load(tmp_path / "out", "llama")
    assert loaded.model.layers[0].mlp.down_proj.quantization_scheme.weights.group_size == 32


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    model_dir = _save_model("llama", tmp_path / "model")
    text = text_file(tmp_path)
    base = ["quantize", str(model_dir), "--mode", "weight-only", "--group-size", "32", "--seq-len", "32"]
    before = digest(model_dir)

    err = _fails(base + ["-o", str(model_dir), "--calib-text", str(text)], capsys)
    assert "is the model directory" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert "not an empty directory" in _fails(base + ["-o", str(tmp_path / "full"), "--calib-text", str(text)], capsys)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    err = _fails(base + ["-o", str(tmp_path / "o1"), "--calib-text", str(short)], capsys)
    assert "need at least 31" in err and "tokens" in err
    assert "needs calibration text" in _fails(base + ["-o", str(tmp_path / "o2")], capsys)
    assert "does not divide" in _fails(["quantize", str(model_dir), "-o", str(tmp_path / "o3"), "--mode",
                                        "weight-only", "--group-size", "48", "--algo", "rtn"], capsys)
    assert "use --symmetric" in _fails(base + ["-o", str(tmp_path / "o6"), "--algo", "rtn", "--asymmetric"], capsys)
    assert "--mode weight-only" in _fails(["quantize", str(model_dir), "-o", str(tmp_path / "o4")], capsys)

    bare = _save_model("llama", tmp_path / "bare", tokenizer=False)
    assert "no tokenizer files" in _fails(["quantize", str(bare), "-o", str(tmp_path / "o5"), "--mode", "weight-only",
                                           "--seq-len", "32", "--calib-text", str(text)], capsys)
    assert digest(model_dir) == before
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5", "o6"))
    assert not list(tmp_path.glob(".o*"))


def test_awq_refused_where_scales_cross_an_activation(tmp_path):
    model_dir = _save_model("bert", tmp_path / "model")
    with pytest.raises(LowbitError, match="intermediate_act_fn.*use --algo gptq"):
        quantize_pretrained(model_dir, tmp_path / "out", group_size=32, algorithm="awq",
                            calib_text=text_file(tmp_path), seq_len=32)
    assert not (tmp_path / "out").exists()


def test_awq_unknown_architecture_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=HIDDEN)
        transformers.OPTForCausalLM(config).save_pretrained(model_dir)
        word_tokenizer("llama").save_pretrained(model_dir)
    with pytest.raises(LowbitError, match="no scale mapping for model type 'opt'"):
        quantize_pretrained(model_dir, tmp_path / "out", group_size=32, algorithm="awq",
                            calib_text=text_file(tmp_path), seq_len=32)
    assert not (tmp_path / "out").exists()
