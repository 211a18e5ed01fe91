"""SmoothQuant W8A8 on tiny randomly initialised LLaMA, Qwen2 and GPT-2 models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _synthetic_layers import single_thread  # noqa: E402,F401 (autouse fixture)
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.torch.llm.smoothquant import (W8A8Linear, collect_input_absmax, smooth_model,  # noqa: E402
                                          smooth_quantize_w8a8)

VOCAB = 96
KINDS = ["llama", "qwen2", "gpt2"]


def _model(kind: str, outliers: float = 1.0):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
    else:
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
        config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2 if kind == "qwen2" else 4, vocab_size=VOCAB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    # Real LLMs have a few input channels far louder than the rest: make them with the norm gains.
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight[:3] *= outliers
    return model


def _batches(seed: int, count: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (4, 24), generator=generator)
        mask = torch.ones(4, 24, dtype=torch.long)
        mask[1, 15:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _outputs(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**batch).last_hidden_state for batch in batches]


def _relative_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    return float(sum(((c - r) ** 2).mean() / (r ** 2).mean() for r, c in zip(reference, candidate)) / len(reference))


@pytest.mark.parametrize("kind", KINDS)
def test_smoothing_alone_keeps_float_outputs(kind):
    model = _model(kind, outliers=20.0)
    reference = _outputs(model, _batches(2))
    absmax = collect_input_absmax(model, _batches(1))
    before = {name: value.clone() for name, value in absmax.items()}
    scales = smooth_model(model, absmax, alpha=0.5, kinds=("norm", "linear", "activation"))
    assert scales and all(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())
    for ref, out in zip(reference, _outputs(model, _batches(2))):
        assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    # The updated statistics are what the smoothed model's linears really see.
    recollected = collect_input_absmax(model, _batches(1))
    changed = [name for name in absmax if not torch.equal(absmax[name], before[name])]
    assert changed
    for name in absmax:
        torch.testing.assert_close(absmax[name], recollected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_smoothing_lowers_w8a8_error_with_outlier_channels(kind):
    model = _model(kind, outliers=40.0)
    reference = _outputs(model, _batches(2))
    plain, smoothed = copy.deepcopy(model), copy.deepcopy(model)
    smooth_quantize_w8a8(plain, _batches(1), smooth=False)
    smooth_quantize_w8a8(smoothed, _batches(1), alpha=0.5)
    plain_error = _relative_error(reference, _outputs(plain, _batches(2)))
    smoothed_error = _relative_error(reference, _outputs(smoothed, _batches(2)))
    assert smoothed_error < 0.7 * plain_error, (smoothed_error, plain_error)


def test_w8a8_linear_matches_int8_arithmetic():
    model = _model("llama", outliers=10.0)
    result = smooth_quantize_w8a8(model, _batches(1))
    name = "layers.0.mlp.down_proj"
    layer = dict(model.named_modules())[name]
    assert isinstance(layer, W8A8Linear)
    assert len(result.weights) == 14 and len(result.smoothing) == 4  # 2 blocks x 7 linears, 2 norms each
    # Integer reference: weight = int8 * per-row scale; input = clamp(round(x / s), -128, 127) * s.
    weights = result.weights[name]
    assert weights.values.dtype == torch.int8
    row_scale = torch.as_tensor(weights.qparams.scale).reshape(-1, 1)
    torch.testing.assert_close(layer.weight, weights.values.float() * row_scale)
    input_scale = float(result.inputs[name].scale)
    x = torch.randn(5, layer.weight.shape[1]) * input_scale * 200  # some values beyond the grid
    x_int = torch.clamp(torch.round(x / input_scale), -128, 127)
    expected = (x_int @ weights.values.float().T) * input_scale * row_scale.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_bad_inputs_get_clear_errors():
    model = _model("llama")
    with pytest.raises(LowbitError, match="alpha"):
        smooth_quantize_w8a8(model, _batches(1), alpha=1.5)
    with pytest.raises(LowbitError, match="empty"):
        smooth_quantize_w8a8(copy.deepcopy(model), [])
    bert = transformers.AutoModel.from_config(transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=32)).eval()
    with pytest.raises(LowbitError, match="post-norm"):
        smooth_quantize_w8a8(bert, _batches(1))
