"""`lowbit quantize ... --max-drop X` (accuracy-budget search) and `--report DIR` (HTML + markdown).

Kept out of `quantize.py` so that command stays a thin dispatcher: it adds these arguments with
`add_arguments` and hands over to `run_budget` / `write_quantize_report`.
"""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.errors import LowbitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accuracy budget and report (static ONNX quantization)")
    group.add_argument("--max-drop", type=float,
                       help="search per-layer precision so the model stays within this drop of the float model "
                            "(0.005 = 0.5%% cosine, or 0.5 points of top-1 agreement); falls the most sensitive "
                            "layers back to float")
    group.add_argument("--metric", choices=("cosine", "top1"), default="cosine",
                       help="what --max-drop limits: output cosine, or top-1 agreement with the float model "
                            "(default: cosine)")
    group.add_argument("--time-limit", type=float, default=600.0,
                       help="seconds the budget search may take; the best model so far is saved (default: 600)")
    group.add_argument("--report", metavar="DIR",
                       help="write report.html (self-contained, with plots) and report.md into DIR")


def run_budget(args: argparse.Namespace) -> int:
    from lowbit.analysis.budget import search_precision

    if args.mode != "static":
        raise LowbitError("--max-drop searches static int8 precision; use it with --mode static (and --calib)")
    if args.bias_correction:
        raise LowbitError("--max-drop cannot be combined with --bias-correction yet; drop one of the two")
    result = search_precision(
        args.model, args.output, calib=args.calib, eval_data=args.eval_data, max_drop=args.max_drop,
        metric=args.metric, time_limit=args.time_limit, calib_method=args.calib_method,
        per_channel=not args.per_tensor, exclude=tuple(args.exclude), samples=args.samples,
        batch_size=args.batch_size, threads=args.threads, smooth=args.smooth, smooth_alpha=args.smooth_alpha,
        equalize=args.equalize, measure_speed=not args.no_speed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    if not result.met:
        print(f"WARNING: accuracy budget NOT met ({result.metric} drop {result.drop:.5f} > {result.max_drop:g}); "
              f"saved the best model found to {result.output_path}", file=sys.stderr if args.json else sys.stdout)
    if args.report:
        _write(args, result.report, budget=result)
    return 0


def write_quantize_report(args: argparse.Namespace, result) -> None:
    """After a plain `lowbit quantize`: the report of the model it wrote."""
    _write(args, result.report)


def _write(args: argparse.Namespace, verify, budget=None) -> None:
    from lowbit.report import build_report

    html, md = build_report(args.model, args.output, args.eval_data or args.calib, args.report, verify=verify,
                            budget=budget, samples=args.samples, batch_size=args.batch_size, threads=args.threads,
                            measure_speed=not args.no_speed)
    print(f"report: {html} and {md}", file=sys.stderr if args.json else sys.stdout)
