"""`lowbit inspect MODEL.onnx`: what was done to a model, each compute node's precision, sizes.

Reads the stored lowbit plan (recipe, mode, settings, algorithms) and, independently, the graph
itself: which weights reach their node through a DequantizeLinear, in which dtype, per tensor,
channel or group. A float model is reported as not quantized by lowbit, with its sizes.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("inspect", help="show what was done to a model: plan, node precisions, sizes",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="ONNX model to describe (never modified)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--max-nodes", type=int, default=200, help="rows of the node table to print (default: 200)")
    return parser


def run(args: argparse.Namespace) -> int:
    from lowbit.analysis.inspect import inspect_model

    report = inspect_model(args.model)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.text(args.max_nodes))
    return 0
