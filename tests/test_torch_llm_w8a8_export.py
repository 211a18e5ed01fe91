"""SmoothQuant W8A8 of a Hugging Face model directory -> compressed-tensors `int-quantized` checkpoint.

Tiny random LLaMA, Qwen2, Mistral and BERT models (word-level tokenizers trained on Python's
pydoc text) are saved to tmp dirs, quantized by `smoothquant_pretrained` / `lowbit quantize`,
and loaded back by transformers with the compressed-tensors package. The loaded model must
reproduce lowbit's own quantized model, each loaded linear must compute the int8 arithmetic
of the tensors on disk, and the weights on disk must be the float model's with the smoothing
scales folded in (norm groups into the norms, linear groups into v/o and up/down).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("compressed_tensors", reason="loading the checkpoint needs the compressed-tensors package")

from safetensors.torch import load_file  # noqa: E402

from _hf_checkpoints import HIDDEN, VOCAB, digest, load, outputs, text_file, word_tokenizer  # noqa: E402
from _synthetic_layers import single_thread  # noqa: E402,F401 (autouse fixture)
from lowbit.cli import main  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.torch.llm import pretrained_w8a8  # noqa: E402
from lowbit.torch.llm.hf_io import main_output  # noqa: E402
from lowbit.torch.llm.pretrained_w8a8 import smoothquant_pretrained  # noqa: E402


def _float_model(kind: str, kv_heads: int):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**common))
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4,
                                                                    vocab_size=VOCAB, n_positions=64))
    if kind == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=HIDDEN))
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    return model_class(config_class(num_key_value_heads=kv_heads, **common))


def _save_model(kind: str, directory: Path, *, kv_heads: int = 2, loud_down_proj: bool = False) -> Path:
    """`kv_heads=4` (= attention heads) gives multi-head attention, where v_proj -> o_proj can be
    smoothed; `loud_down_proj` makes a few down_proj input channels 8x louder, as in trained LLaMAs."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _float_model(kind, kv_heads)
        with torch.no_grad():  # a few loud channels, as in trained models
            for module in model.modules():
                if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    module.weight[:4] *= 8.0
            for name, module in model.named_modules():
                if loud_down_proj and name.endswith("mlp.up_proj"):
                    module.weight[:4] *= 8.0
        model.save_pretrained(directory)
        word_tokenizer(kind).save_pretrained(directory)
    return directory


def _saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in directory.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


# --------------------------------------------------------------------------- round trip through transformers


# Grouped-query attention (2 value heads for 4 query heads): v_proj -> o_proj cannot be smoothed,
# so "linear" smooths up_proj -> down_proj only (2 blocks). BERT is post-norm: no norm groups, and
# its linear group is value -> attention.output.dense.
@pytest.mark.parametrize("kind, groups, smoothed, norms_changed", [
    ("llama", "norm", 4, 4), ("qwen2", "norm,linear", 6, 4), ("mistral", "all", 6, 4), ("bert", None, 0, 0),
    ("bert", "linear", 2, 0)])
def test_checkpoint_loads_and_matches_lowbit(tmp_path, kind, groups, smoothed, norms_changed):
    model_dir = _save_model(kind, tmp_path / "model")
    before = digest(model_dir)
    out_dir = tmp_path / "out"
    options = dict(smooth=False) if groups is None else dict(smooth_groups=groups)
    result = smoothquant_pretrained(model_dir, out_dir, calib_text=text_file(tmp_path), samples=6, seq_len=32,
                                    **options)
    assert digest(model_dir) == before  # the input is never touched
    assert not list(tmp_path.glob(".out.*"))  # no temporary directory left behind
    assert (out_dir / "tokenizer.json").is_file()
    assert result.eval_source == "held-out" and 0.9 < result.cosine < 1.0
    assert len(result.result.smoothing) == smoothed
    assert any("grouped-query" in note for note in result.notes) == (kind != "bert" and groups != "norm")

    config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert (group["weights"]["num_bits"], group["weights"]["strategy"], group["weights"]["symmetric"]) == \
        (8, "channel", True)
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("tensor", False)

    # On disk: int8 weights, one float scale per output row, one per-tensor input scale.
    saved = _saved_tensors(out_dir)
    for name, layer in result.result.weights.items():
        weight = saved[f"{name}.weight"]
        assert weight.dtype == torch.int8 and torch.equal(weight, layer.values)
        assert saved[f"{name}.weight_scale"].shape == (weight.shape[0], 1)
        assert saved[f"{name}.input_scale"].shape == (1,)
    original = _saved_tensors(model_dir)
    norms = [key for key in original if "layernorm" in key and key.endswith("weight")]
    changed = [key for key in norms if not torch.equal(original[key], saved[key])]
    assert len(changed) == norms_changed  # the norm groups' scales live in the saved norms
    recorded = json.loads((out_dir / "config.json").read_text())["quantization_config"]["lowbit"]
    assert recorded["smooth_groups"] == {None: [], "norm": ["norm"], "linear": ["linear"],
                                         "norm,linear": ["norm", "linear"], "all": ["norm", "linear"]}[groups]
    assert recorded["smoothed"] == sorted(result.result.smoothing)

    loaded = load(out_dir, kind)
    modules = dict(loaded.named_modules())
    assert all(getattr(modules[name], "quantization_scheme", None) is not None for name in result.result.weights)
    for expected, actual in zip(outputs(result.model, result.eval_batches, main_output),
                                outputs(loaded, result.eval_batches, main_output)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_loaded_linear_computes_int8_arithmetic_of_the_saved_tensors(tmp_path):
    """Independent of lowbit's model: the loaded linear is int8(x) @ int8(W)^T rescaled, from the
    tensors on disk, with inputs beyond the calibrated range saturating."""
    model_dir = _save_model("qwen2", tmp_path / "model")  # q/k/v carry biases
    smoothquant_pretrained(model_dir, tmp_path / "out", calib_text=text_file(tmp_path), samples=4, seq_len=32)
    saved = _saved_tensors(tmp_path / "out")
    loaded = load(tmp_path / "out", "qwen2")
    with torch.no_grad():
        loaded(input_ids=torch.tensor([[5, 6, 7]]))  # the first forward decompresses the weights
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = dict(loaded.named_modules())[name]
        weight, row_scale = saved[f"{name}.weight"].double(), saved[f"{name}.weight_scale"].double()
        input_scale = saved[f"{name}.input_scale"].double()
        x = torch.randn(7, weight.shape[1], generator=torch.Generator().manual_seed(3)) * float(input_scale) * 60
        x_int = torch.clamp(torch.round(x.double() / input_scale), -128, 127)
        assert (x_int.abs() == 128).any() or (x_int == 127).any()  # some inputs saturate
        expected = (x_int @ weight.T) * input_scale * row_scale.T
        if layer.bias is not None:
            expected = expected + layer.bias.double()
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_linear_groups_are_folded_into_the_saved_weights(tmp_path, kind):
    """Multi-head attention, norm and linear groups: on disk, each weight is the float model's
    with the smoothing scales folded in, rounded to its int8 row grid; reloaded, the checkpoint
    still computes exactly what lowbit's model does."""
    model_dir = _save_model(kind, tmp_path / "model", kv_heads=4)
    result = smoothquant_pretrained(model_dir, tmp_path / "out", calib_text=text_file(tmp_path),
                                    smooth_groups=("norm", "linear"), samples=6, seq_len=32)
    scales = result.result.smoothing
    assert len(scales) == 8 and result.notes == []  # per block: 2 norms, v_proj and up_proj
    assert sorted(result.smoothed_kinds.values()) == ["linear"] * 4 + ["norm"] * 4
    original, saved = _saved_tensors(model_dir), _saved_tensors(tmp_path / "out")
    for block in range(2):
        prefix = f"model.layers.{block}."
        s_in, s_v = scales[prefix + "input_layernorm"], scales[prefix + "self_attn.v_proj"]
        s_post, s_up = scales[prefix + "post_attention_layernorm"], scales[prefix + "mlp.up_proj"]
        # Producers' rows divided by their group's s, consumers' columns multiplied by it.
        folded = {"self_attn.v_proj": s_in[None, :] / s_v[:, None], "self_attn.o_proj": s_v[None, :],
                  "mlp.up_proj": s_post[None, :] / s_up[:, None], "mlp.down_proj": s_up[None, :]}
        for name, factor in folded.items():
            key = prefix + name
            row_scale = saved[f"{key}.weight_scale"].float()
            on_disk = saved[f"{key}.weight"].float() * row_scale
            expected = original[f"{key}.weight"] * factor
            assert ((on_disk - expected).abs() <= row_scale / 2 * (1 + 1e-5) + 1e-7).all(), key
            assert ((on_disk - original[f"{key}.weight"]).abs() > 4 * row_scale).any(), key  # not the float weight
        if kind == "qwen2":  # v_proj's bias is divided by s too
            torch.testing.assert_close(saved[prefix + "self_attn.v_proj.bias"],
                                       original[prefix + "self_attn.v_proj.bias"] / s_v)
    loaded = load(tmp_path / "out", kind)
    for expected, actual in zip(outputs(result.model, result.eval_batches, main_output),
                                outputs(loaded, result.eval_batches, main_output)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_linear_groups_reach_the_down_proj_outliers_that_norm_groups_miss(tmp_path):
    """Why norm,linear is the default: loud down_proj inputs (after the gated product, as in
    trained LLaMAs) are out of every norm's reach; smoothing up_proj -> down_proj tames them.
    (Grouped-query attention, so up_proj -> down_proj is the only linear group.)"""
    model_dir = _save_model("llama", tmp_path / "model", loud_down_proj=True)
    text = text_file(tmp_path)
    sqnr = {}
    for groups in ("norm", "norm,linear"):
        sqnr[groups] = smoothquant_pretrained(model_dir, tmp_path / groups.replace(",", "_"), calib_text=text,
                                              smooth_groups=groups, samples=6, seq_len=32).sqnr_db
    default = smoothquant_pretrained(model_dir, tmp_path / "default", calib_text=text, samples=6, seq_len=32)
    assert default.result.groups == ("norm", "linear") and default.sqnr_db == sqnr["norm,linear"]
    assert sqnr["norm,linear"] > sqnr["norm"] + 1.0, sqnr


def test_checkpoint_is_smaller_and_summary_names_the_format(tmp_path):
    model_dir = _save_model("llama", tmp_path / "model")
    result = smoothquant_pretrained(model_dir, tmp_path / "out", calib_text=text_file(tmp_path), alpha=0.7,
                                    samples=4, seq_len=32)
    int8 = sum(layer.values.numel() for layer in result.result.weights.values())
    # Each int8 weight saves 3 bytes of float32, minus a float32 scale per output row (and the
    # safetensors header naming three tensors per layer instead of one).
    saved = result.input_bytes - result.output_bytes
    assert int8 * 3 * 0.95 < saved < int8 * 3
    summary = result.summary()
    assert "int-quantized" in summary and "SmoothQuant alpha 0.7, norm+linear groups" in summary
    assert "smoothed groups: 6 (norm 4, linear 2)" in summary and "cosine" in summary
    assert "note: self_attn.v_proj -> self_attn.o_proj not smoothed" in summary  # grouped-query attention


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("flags, groups, smoothed", [
    ([], ["norm", "linear"], 6),  # default: 4 norms, up_proj -> down_proj in both blocks (v -> o needs MHA)
    (["--smooth-groups", "norm"], ["norm"], 4),
    (["--mode", "dynamic"], ["norm"], 4)])  # dynamic per-token inputs: the norm groups by default
def test_cli_writes_w8a8_checkpoint(tmp_path, capsys, flags, groups, smoothed):
    model_dir = _save_model("llama", tmp_path / "model")
    code = main(["quantize", str(model_dir), "-o", str(tmp_path / "out"), "--mode", "static", "--algo", "smoothquant",
                 "--calib-text", str(text_file(tmp_path)), "--smooth-alpha", "0.6", "--samples", "4",
                 "--seq-len", "32", "--json", *flags])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "int-quantized" and report["algorithm"] == "smoothquant"
    assert report["alpha"] == 0.6 and report["calibration_samples"] == 4 and report["quantized_linears"] == 14
    assert report["smooth_groups"] == groups and len(report["smoothed"]) == smoothed
    assert ("model.layers.1.mlp.up_proj" in report["smoothed"]) == ("linear" in groups)
    assert report["output_weight_bytes"] < report["input_weight_bytes"] and 0.9 < report["cosine"] < 1.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["lowbit"]["alpha"] == 0.6 and config["lowbit"]["smooth_groups"] == groups
    assert config["lowbit"]["smoothed"] == report["smoothed"]
    loaded = load(tmp_path / "out", "llama")
    inputs = loaded.model.layers[0].mlp.down_proj.quantization_scheme.input_activations
    assert inputs.strategy == ("token" if "dynamic" in flags else "tensor")


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("lowbit: error") == 1 and "Traceback" not in err, err  # one sentence, no traceback
    return err


def test_cli_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    model_dir = _save_model("llama", tmp_path / "model")
    text = text_file(tmp_path)
    before = digest(model_dir)

    def w8a8(model, out, *extra):
        return ["quantize", str(model), "-o", str(tmp_path / out), "--mode", "static", "--algo", "smoothquant",
                "--seq-len", "32", *extra]

    assert "is the model directory" in _fails(w8a8(model_dir, "model", "--calib-text", str(text)), capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert "not an empty directory" in _fails(w8a8(model_dir, "full", "--calib-text", str(text)), capsys)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    err = _fails(w8a8(model_dir, "o1", "--calib-text", str(short)), capsys)
    assert "need at least 31" in err and "tokens" in err
    assert "needs calibration text" in _fails(w8a8(model_dir, "o2"), capsys)
    assert "between 0 and 1" in _fails(w8a8(model_dir, "o3", "--calib-text", str(text), "--smooth-alpha", "1.5"),
                                       capsys)
    for groups, expected in [("norm,activation", "'activation' groups cannot be written"),
                             ("norm,bogus", "unknown SmoothQuant scale group 'bogus'"), (",", "no SmoothQuant scale")]:
        assert expected in _fails(w8a8(model_dir, "o3", "--calib-text", str(text), "--smooth-groups", groups), capsys)
    assert "contradict" in _fails(w8a8(model_dir, "o3", "--calib-text", str(text), "--smooth-groups", "norm",
                                       "--no-smooth"), capsys)
    err = _fails(["quantize", str(model_dir), "-o", str(tmp_path / "o3"), "--mode", "weight-only", "--algo", "rtn",
                  "--smooth-groups", "norm"], capsys)
    assert "needs --mode static --algo smoothquant" in err
    err = _fails(["quantize", str(model_dir), "-o", str(tmp_path / "o4"), "--mode", "weight-only", "--algo",
                  "smoothquant", "--calib-text", str(text)], capsys)
    assert "needs --mode static or --mode dynamic" in err  # --mode dynamic: W8A8 with per-token inputs
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"")
    assert "for Hugging Face model directories" in _fails(["quantize", str(onnx_path), "-o", str(tmp_path / "o5.onnx"),
                                                           "--algo", "smoothquant"], capsys)
    assert "--smooth-groups is for Hugging Face model directories" in _fails(
        ["quantize", str(onnx_path), "-o", str(tmp_path / "o5.onnx"), "--smooth-groups", "norm"], capsys)

    for kind, groups, expected in [("opt", "all", "no SmoothQuant mapping for model type 'opt'"),
                                   ("gpt2", "all", "Conv1D"), ("gpt2", "activation", "'activation' groups cannot"),
                                   ("bert", "norm", "post-norm.*--smooth-groups linear.*--no-smooth")]:
        other = tmp_path / kind
        if not other.exists():
            _save_model(kind, other)
        with pytest.raises(LowbitError, match=expected):
            smoothquant_pretrained(other, tmp_path / "o6", calib_text=text, seq_len=32, smooth_groups=groups)
    assert digest(model_dir) == before
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5.onnx", "o6"))
    assert not list(tmp_path.glob(".o*"))


def test_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
    model_dir = _save_model("llama", tmp_path / "model")

    def write_then_fail(model, result, blocks_name, directory):
        (Path(directory) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(pretrained_w8a8, "write_w8a8_checkpoint", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        smoothquant_pretrained(model_dir, tmp_path / "out", calib_text=text_file(tmp_path), samples=2, seq_len=32)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("smooth", [False, True])
def test_dynamic_per_token_inputs_load_and_compute_int8_arithmetic(tmp_path, capsys, smooth):
    """--mode dynamic: no input scales on disk, config says per-token dynamic; the loaded model
    reproduces lowbit's, and a loaded linear computes int8(x per token) @ int8(W)^T from the
    tensors on disk, each token with scale max|x| / 127.5 (its extreme lands on -128 or 127)."""
    model_dir = _save_model("qwen2", tmp_path / "model")
    out_dir = tmp_path / "out"
    argv = ["quantize", str(model_dir), "-o", str(out_dir), "--mode", "dynamic", "--algo", "smoothquant",
            "--calib-text", str(text_file(tmp_path)), "--samples", "4", "--seq-len", "32", "--json"]
    capsys.readouterr()
    assert main(argv + ([] if smooth else ["--no-smooth"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "dynamic" and 0.99 < report["cosine"] < 1.0
    assert (len(report["smoothed"]) > 0) == smooth
    group = json.loads((out_dir / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("token", True)
    saved = _saved_tensors(out_dir)
    assert not [key for key in saved if key.endswith("input_scale")]

    loaded = load(out_dir, "qwen2")
    batch = {"input_ids": torch.tensor([[4, 9, 17, 33, 5, 120]])}
    with torch.no_grad():
        loaded(**batch)  # the first forward decompresses the weights
    name = "model.layers.1.mlp.down_proj"
    layer = dict(loaded.named_modules())[name]
    weight, row_scale = saved[f"{name}.weight"].double(), saved[f"{name}.weight_scale"].double()
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(4))
    x[1] *= 100.0  # a loud token does not coarsen the others' grids
    token_scale = x.abs().amax(dim=1, keepdim=True) / 127.5  # in the input's dtype, as the loader does
    x_int = torch.clamp(torch.round(x / token_scale), -128, 127).double()
    assert x_int.abs().amax(dim=1).min() >= 127  # every token's extreme reaches the grid's end
    expected = (x_int @ weight.T) * token_scale.double() * row_scale.T
    with torch.no_grad():
        # [batch, tokens, features], as in the model (compressed-tensors reduces over the features)
        torch.testing.assert_close(layer(x[None])[0].double(), expected, rtol=1e-4, atol=1e-5)
