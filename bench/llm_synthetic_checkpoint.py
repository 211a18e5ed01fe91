"""Write a synthetic LLaMA-shaped Hugging Face checkpoint of a chosen size, shard by shard.

Random weights (std 0.02; norms 1), written one block per safetensors shard, so memory
stays at one block whatever the size. Each tensor is a random window of a pool of 2^24 normal
values, tiled with a random offset per row (drawing 10^10 normals one by one takes longer than the
quantization this checkpoint is for; the pool still gives every row of every weight its own values): the way to test quantizing checkpoints bigger than this
machine's memory without downloading one. A word-level tokenizer trained on Python's pydoc text
comes along, so calibration text can be tokenized (the model's outputs are meaningless: this is
for memory, time and format checks, not fidelity).

    python bench/llm_synthetic_checkpoint.py /work/big/llama-25g --size-gb 25     # 7B-like blocks
    python bench/llm_synthetic_checkpoint.py /work/big/llama-4g --size-gb 4 --hidden 2048 --intermediate 5632
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"


def block_tensors(index: int, hidden: int, intermediate: int, heads: int, kv_heads: int, dtype: torch.dtype,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    head_dim = hidden // heads
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
              "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
              "mlp.down_proj.weight": (hidden, intermediate)}
    prefix = f"model.layers.{index}."
    tensors = {prefix + name: random_weight(shape, dtype, generator) for name, shape in shapes.items()}
    tensors[prefix + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    return tensors


POOL: dict[torch.dtype, torch.Tensor] = {}


def random_weight(shape: tuple[int, int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A [rows, cols] weight: each row a window of the shared normal pool at a random offset."""
    if dtype not in POOL:
        pool = (torch.randn(2**24, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
        POOL[dtype] = torch.cat([pool, pool])  # windows may wrap around
    pool = POOL[dtype]
    rows, cols = shape
    offsets = torch.randint(0, 2**24, (rows,), generator=generator)
    return torch.stack([pool[o:o + cols] for o in offsets.tolist()])


def block_bytes(hidden: int, intermediate: int, heads: int, kv_heads: int, dtype: torch.dtype) -> int:
    kv = kv_heads * (hidden // heads)
    return (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate + 2 * hidden) * dtype.itemsize


def word_tokenizer(vocab: int):
    import pydoc_data.topics
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    text = "\n".join(pydoc_data.topics.topics.values())
    backend.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=["[UNK]", "<s>"]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")


def write_checkpoint(out: Path, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                     vocab: int, dtype: torch.dtype, seed: int = 0) -> int:
    """Write the checkpoint into the new folder `out`; returns the bytes of weights written."""
    import transformers
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=2048,
                                      tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."),
                                      architectures=["LlamaForCausalLM"])
    config.save_pretrained(out)
    generator = torch.Generator().manual_seed(seed)
    files = layers + 1
    weight_map, total = {}, 0
    for index in range(files):
        if index < layers:
            tensors = block_tensors(index, hidden, intermediate, heads, kv_heads, dtype, generator)
        else:
            tensors = {"model.embed_tokens.weight": random_weight((vocab, hidden), dtype, generator),
                       "lm_head.weight": random_weight((vocab, hidden), dtype, generator),
                       "model.norm.weight": torch.ones(hidden, dtype=dtype)}
        name = f"model-{index + 1:05d}-of-{files:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    word_tokenizer(min(vocab, 8000)).save_pretrained(out)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="new folder to write")
    parser.add_argument("--size-gb", type=float, help="target weight size in GB (sets --layers)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    layers = args.layers
    if args.size_gb:
        rest = (2 * args.vocab * args.hidden + args.hidden) * dtype.itemsize
        per_block = block_bytes(args.hidden, args.intermediate, args.heads, args.kv_heads, dtype)
        layers = max(1, round((args.size_gb * 1e9 - rest) / per_block))
    start = time.perf_counter()
    total = write_checkpoint(args.out, layers=layers, hidden=args.hidden, intermediate=args.intermediate,
                             heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab, dtype=dtype)
    print(json.dumps({"out": str(args.out), "layers": layers, "weight_bytes": total, "dtype": args.dtype,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
