"""Where the repeated blocks of a transformers model are, and which op feeds which linears.

GPTQ and round-to-nearest need only the blocks (found generically when the architecture is
unknown). AWQ and SmoothQuant also move a per-input-channel scale from a group of linears into
the op that produces their input, so they need to know that op:

- "norm": a LayerNorm/RMSNorm whose output feeds only these linears (pre-norm models; the
  residual stream is taken *before* the norm, so scaling the norm's output is exact);
- "linear": a linear whose output rows feed these linears linearly (v_proj -> o_proj through
  attention, up_proj -> down_proj through the gated product); `part` picks a slice of a fused
  output (GPT-2's c_attn holds q, k, v: the v part is (2, 3), the third of three);
- "activation": an activation module/function attribute; it is wrapped to divide its output.

Post-norm encoders (BERT) feed q/k/v and the first MLP linear from a LayerNorm whose output is
also the residual stream, so no scale can be folded there: those linears get clipping only.

A new architecture is one `ArchitectureMap` entry in `ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lowbit.errors import LowbitError
from lowbit.torch.llm.linears import find_linears

ProducerKind = Literal["norm", "linear", "activation"]


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (names relative to a block) that read one input, and the op producing it."""

    producer: str
    linears: tuple[str, ...]
    kind: ProducerKind
    part: tuple[int, int] | None = None  # (index, count): slice of a fused producer's outputs


@dataclass(frozen=True)
class ArchitectureMap:
    blocks: str  # name (or dotted suffix) of the ModuleList holding the repeated blocks
    scale_groups: tuple[ScaleGroup, ...]


_LLAMA_STYLE = ArchitectureMap("layers", (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear"),  # skipped under grouped-query attention
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
))

_GPT2_STYLE = ArchitectureMap("h", (
    ScaleGroup("ln_1", ("attn.c_attn",), "norm"),
    ScaleGroup("attn.c_attn", ("attn.c_proj",), "linear", part=(2, 3)),
    ScaleGroup("ln_2", ("mlp.c_fc",), "norm"),
    ScaleGroup("mlp.act", ("mlp.c_proj",), "activation"),
))

_BERT_STYLE = ArchitectureMap("encoder.layer", (
    ScaleGroup("attention.self.value", ("attention.output.dense",), "linear"),
    ScaleGroup("intermediate.intermediate_act_fn", ("output.dense",), "activation"),
))

ARCHITECTURES: dict[str, ArchitectureMap] = {
    "llama": _LLAMA_STYLE, "mistral": _LLAMA_STYLE, "qwen2": _LLAMA_STYLE, "qwen3": _LLAMA_STYLE,
    "gpt2": _GPT2_STYLE,
    "bert": _BERT_STYLE, "roberta": _BERT_STYLE, "xlm-roberta": _BERT_STYLE,
}


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def architecture_for(model: nn.Module, *, need_scale_groups: bool) -> ArchitectureMap | None:
    """The known map for this model's `config.model_type`; None when unknown and only the
    blocks are needed; a LowbitError when unknown and scale fusions are needed."""
    kind = model_type(model)
    if kind in ARCHITECTURES:
        return ARCHITECTURES[kind]
    if need_scale_groups:
        raise LowbitError(
            f"lowbit has no scale mapping for model type {kind!r} (known: {', '.join(sorted(ARCHITECTURES))}); "
            "add an ArchitectureMap to lowbit/torch/llm/architectures.py naming which norm or linear feeds "
            "which linears, or use --algo gptq or rtn, which need none")
    return None


def find_blocks(model: nn.Module, architecture: ArchitectureMap | None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks: by the map's name, or else the largest ModuleList whose
    entries contain linear layers."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    if architecture is not None:
        for name, module in lists:
            if name == architecture.blocks or name.endswith("." + architecture.blocks):
                return name, module
        raise LowbitError(f"model type {model_type(model)!r} should hold its blocks in a ModuleList named "
                          f"{architecture.blocks!r} but has none; update its ArchitectureMap")
    candidates = [(name, module) for name, module in lists
                  if len(module) > 0 and all(find_linears(block) for block in module)]
    if not candidates:
        raise LowbitError("found no repeated transformer blocks (a ModuleList of layers with Linear weights) in "
                          "this model; add an ArchitectureMap for it in lowbit/torch/llm/architectures.py")
    return max(candidates, key=lambda item: len(item[1]))
