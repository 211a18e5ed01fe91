"""Block-by-block RTN/GPTQ/AWQ on tiny randomly initialised transformers models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from _synthetic_layers import single_thread  # noqa: E402,F401 (autouse fixture)
from lowbit.algorithms import HessianAccumulator  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.numerics import quantize  # noqa: E402
from lowbit.spec import QuantSpec, per_group  # noqa: E402
from lowbit.torch.llm import ARCHITECTURES, ScaledActivation, find_blocks, find_linears, quantize_llm  # noqa: E402
from lowbit.torch.llm import sequential  # noqa: E402
from lowbit.torch.llm.linears import weight_matrix  # noqa: E402
from lowbit.torch.llm.scaling import divide_output, producer_width  # noqa: E402

VOCAB = 96
SPEC = QuantSpec("int4", granularity=per_group(32))


def _config(kind: str):
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)
    if kind == "bert":
        return transformers.BertConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=32, **common)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[kind]
    # Qwen2 with grouped-query attention (2 key/value heads for 4 query heads).
    kv_heads = 2 if kind == "qwen2" else 4
    return config_class(hidden_size=64, intermediate_size=128, num_key_value_heads=kv_heads, **common)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_config(_config(kind), attn_implementation="eager").eval()
    # Random init gives uniform activations; a few loud channels make the comparison realistic.
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight[:4] *= 8.0
    return model


def _batches(seed: int, count: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (4, 24), generator=generator)
        mask = torch.ones(4, 24, dtype=torch.long)
        mask[1, 15:] = 0  # right padding: those tokens must not count
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _output_error(reference: nn.Module, quantized: nn.Module, batches) -> float:
    with torch.no_grad():
        errors = [float(((quantized(**b).last_hidden_state - reference(**b).last_hidden_state) ** 2).mean() /
                        (reference(**b).last_hidden_state ** 2).mean()) for b in batches]
    return sum(errors) / len(errors)


KINDS = ["llama", "qwen2", "mistral", "gpt2", "bert"]


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_and_awq_beat_rtn_on_held_out_text(kind):
    model = _model(kind)
    calibration, held_out = _batches(1), _batches(2)
    errors = {}
    for algorithm in ("rtn", "gptq", "awq"):
        quantized = copy.deepcopy(model)
        result = quantize_llm(quantized, SPEC, algorithm, calibration)
        errors[algorithm] = _output_error(model, quantized, held_out)
        names = set(find_linears(find_blocks(quantized, ARCHITECTURES[kind])[1]))
        assert len(result.layers) == len(names) and len(result.block_seconds) == 2
        modules = dict(quantized.named_modules())
        for name, layer in result.layers.items():
            stored = weight_matrix(modules[name])  # the model computes with exactly these grid values
            torch.testing.assert_close(stored, layer.dequantized(), rtol=0, atol=0)
            assert torch.equal(quantize(stored, layer.qparams), layer.values)
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors


@pytest.mark.parametrize("kind", KINDS)
def test_every_scale_fold_leaves_the_float_model_unchanged(kind):
    model = _model(kind)
    batch = _batches(3, 1)[0]
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    _, blocks = find_blocks(model, ARCHITECTURES[kind])
    generator = torch.Generator().manual_seed(4)
    folded = 0
    for block in blocks:
        linears = find_linears(block)
        for group in ARCHITECTURES[kind].scale_groups:
            width = linears[group.linears[0]].weight.shape[0 if kind == "gpt2" else 1]
            if producer_width(block, group) not in (None, width):
                continue
            scales = torch.rand(width, generator=generator) * 3 + 0.25
            divide_output(block, group, scales)
            for name in group.linears:
                module = linears[name]
                with torch.no_grad():
                    if kind == "gpt2":
                        module.weight.mul_(scales[:, None])
                    else:
                        module.weight.mul_(scales[None, :])
            folded += 1
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # Qwen2 here uses grouped-query attention: v_proj cannot absorb o_proj's scale.
    assert folded == 2 * (len(ARCHITECTURES[kind].scale_groups) - (kind == "qwen2"))
    if kind in ("gpt2", "bert"):
        assert any(isinstance(m, ScaledActivation) for m in model.modules())


def _recorded_gptq(monkeypatch, **options):
    """A float llama model, its GPTQ copy, the calibration batch and the Hessian accumulators
    GPTQ created, in creation order."""
    created: list[HessianAccumulator] = []

    class Recording(HessianAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(sequential, "HessianAccumulator", Recording)
    float_model = _model("llama")
    model = copy.deepcopy(float_model)
    batches = _batches(5, 1)
    quantize_llm(model, SPEC, "gptq", batches, **options)
    return float_model, model, batches, created


def _linear_inputs(net, batch) -> dict[str, torch.Tensor]:
    """Each block linear's input on `batch`, by name, first of each input group only (k/v read
    q's input, up reads gate's), in the order the forward pass reaches them."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n, m in find_linears(net.layers).items() if not n.endswith(("k_proj", "v_proj", "up_proj"))]
    with torch.no_grad():
        net(**batch)
    for hook in hooks:
        hook.remove()
    return inputs


def _gram(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = x[mask].double()
    return rows.T @ rows / len(rows)


def test_each_layer_is_calibrated_on_the_inputs_of_the_quantized_model(monkeypatch):
    """Block 1 sees block 0's quantized outputs; inside a block, o_proj sees quantized q/k/v.
    One accumulator per input group (q/k/v share one, gate/up share one)."""
    float_model, model, batches, created = _recorded_gptq(monkeypatch, true_sequential=True)
    quantized_inputs, float_inputs = _linear_inputs(model, batches[0]), _linear_inputs(float_model, batches[0])
    assert len(created) == len(quantized_inputs) == 8
    mask = batches[0]["attention_mask"].bool()
    for accumulator, (name, x) in zip(created, quantized_inputs.items()):
        torch.testing.assert_close(accumulator.gram.double(), _gram(x, mask), rtol=1e-4, atol=1e-6)
        if name.startswith("1.") or name.endswith("o_proj"):
            assert not torch.allclose(accumulator.gram.double(), _gram(float_inputs[name], mask), rtol=1e-4,
                                      atol=1e-6), name


def test_without_true_sequential_a_block_is_calibrated_in_one_float_pass(monkeypatch):
    """true_sequential=False (the default, llm-compressor's way): every group of block 0 is calibrated on the
    float model's inputs, o_proj included, all before any of the block's weights change."""
    float_model, model, batches, created = _recorded_gptq(monkeypatch, true_sequential=False)
    float_inputs = _linear_inputs(float_model, batches[0])
    mask = batches[0]["attention_mask"].bool()
    assert len(created) == 8
    block0 = [(name, x) for name, x in float_inputs.items() if name.startswith("0.")]
    for accumulator, (name, x) in zip(created, block0):
        torch.testing.assert_close(accumulator.gram.double(), _gram(x, mask), rtol=1e-4, atol=1e-6)
    # GPTQ's statistics are summed in float32 by default (llm-compressor's precision, half the memory)
    assert {accumulator.gram.dtype for accumulator in created} == {torch.float32}


def test_rtn_needs_no_data_and_quantizes_only_block_linears():
    model = _model("bert")
    pooler = model.pooler.dense.weight.detach().clone()
    result = quantize_llm(model, QuantSpec("int8"), "rtn")
    assert len(result.layers) == 12 and all(name.startswith("encoder.layer.") for name in result.layers)
    assert torch.equal(model.pooler.dense.weight, pooler)


class _MysteryBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _MysteryModel(nn.Module):
    """An architecture lowbit has no map for."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"model_type": "mystery"})()
        self.embed = nn.Embedding(10, 16)
        self.stack = nn.ModuleList(_MysteryBlock() for _ in range(3))

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.stack:
            x = block(x)
        return x


def test_unknown_architecture_works_for_gptq_and_is_named_for_awq():
    torch.manual_seed(0)
    model = _MysteryModel()
    batches = [{"input_ids": torch.randint(0, 10, (2, 8))}]
    result = quantize_llm(model, SPEC, "gptq", batches)
    assert sorted(result.layers) == [f"stack.{i}.{n}" for i in range(3) for n in ("down", "up")]
    with pytest.raises(LowbitError, match="mystery.*ArchitectureMap.*architectures.py"):
        quantize_llm(_MysteryModel(), SPEC, "awq", batches)


def test_bad_requests_get_clear_messages():
    model = _model("llama")
    with pytest.raises(LowbitError, match="calibration data"):
        quantize_llm(model, SPEC, "gptq")
    with pytest.raises(LowbitError, match="empty"):
        quantize_llm(model, SPEC, "gptq", [])
    with pytest.raises(LowbitError, match="unknown weight algorithm"):
        quantize_llm(model, SPEC, "magic", _batches(0, 1))
    with pytest.raises(LowbitError, match="integer grids"):
        quantize_llm(model, QuantSpec("fp8_e4m3"), "awq", _batches(0, 1))


def test_calibration_runs_without_dropout_and_restores_training_mode():
    results = []
    for _ in range(2):
        model = _model("bert").train()  # hidden dropout 0.1 would make the statistics random
        result = quantize_llm(model, SPEC, "gptq", _batches(6, 1))
        assert model.training
        results.append(result.layers)
    assert all(torch.equal(results[0][n].values, results[1][n].values) for n in results[0])
