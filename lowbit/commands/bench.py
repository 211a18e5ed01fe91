"""`lowbit bench MODEL.onnx [OTHER.onnx]`: latency, throughput and their ratio, measured in one run.

Both models are timed by the same function as the quantize table (lowbit.onnx.timing.time_models):
same session options, spin-waiting off, interleaved in one process, median of the repeats.
Inputs are generated from the models' declared input shapes (set symbolic dims with --shape) or
taken from --data. The CPU's int8 features are printed with the numbers, with what they mean.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="time one or two ONNX models (median, p90, throughput, ratio)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="MODEL", help="one or two ONNX models (the second is "
                        "compared with the first)")
    parser.add_argument("--shape", action="append", metavar="NAME=DIMS",
                        help="shape of an input with symbolic dims, e.g. input_ids=1x128 (repeatable)")
    parser.add_argument("--data", help=".npz keyed by input name; its first batch is the timed input")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per run taken from --data (default: 1)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads, the same for both models (default: every core "
                        "this process may use); spin-waiting is off, inter-op threads 1")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per model first (default: 5)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model, at least (default: 30; two models: more until "
                        "the speedup's 95%% interval is within +-4%%, else 3 s per model)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    from lowbit.analysis.bench import bench_models
    from lowbit.analysis.feeds import parse_shapes
    from lowbit.errors import LowbitError

    if len(args.models) > 2:
        raise LowbitError(f"bench takes one or two models, got {len(args.models)}; compare two at a time")
    report = bench_models(args.models, shapes=parse_shapes(args.shape), data=args.data, batch_size=args.batch_size,
                          threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0
