"""`lowbit quantize ... --max-drop X [--fallback ...]` (accuracy-budget search, static int8 or
weight-only) and `--report DIR` (HTML + markdown).

Kept out of `quantize.py` so that command stays a thin dispatcher: it adds these arguments with
`add_arguments` and hands over to `run_budget` / `write_quantize_report`.
"""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.errors import LowbitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accuracy budget and report (ONNX models, --mode static or weight-only)")
    group.add_argument("--max-drop", type=float,
                       help="--mode auto: the accuracy budget the fastest candidate must meet (default: 0.01 = 1 "
                            "point of top-1 agreement for classifiers, else 0.003 cosine); --mode static or "
                            "weight-only: search per-layer precision so the model stays within this drop of the "
                            "float model (0.005 = 0.5%% cosine, or 0.5 points of top-1 agreement), falling the most "
                            "sensitive layers back along --fallback")
    group.add_argument("--max-position-drop", type=float, default=None,
                       help="--mode auto, models whose output holds class probabilities at every position (a CTC "
                            "recognizer's frames, a tagger's tokens) or one yes/no probability per call or frame (a "
                            "voice-activity detector): the most expected share of positions whose arg-max class, or "
                            "decision at 0.5, may differ from the float model's (default: 0.002 = 0.2%%)")
    group.add_argument("--fallback", metavar="STEPS",
                       help="comma-separated precisions a layer may fall back to, cheapest first; each fallen-back "
                            "layer gets the cheapest one that meets --max-drop. --mode static: float (default) or "
                            "int16,float (16-bit Q/DQ, opset 21: more accurate than int8 and half the weight size "
                            "of float, but ONNX Runtime's CPU runs it as float math plus rounding, so slower than "
                            "float there). --mode weight-only: int8,float (default), int8 or float")
    group.add_argument("--metric", choices=("cosine", "top1"), default=None,
                       help="what --max-drop limits: output cosine, or top-1 agreement with the float model "
                            "(accuracy against the labels when the evaluation .npz holds a 'labels' array) "
                            "(default: cosine; --mode auto: top1 when the model outputs class scores)")
    group.add_argument("--time-limit", type=float, default=600.0,
                       help="seconds the budget search (or --mode auto) may take; the best model so far is saved "
                            "(default: 600)")
    group.add_argument("--report", metavar="DIR",
                       help="write report.html (self-contained, with plots) and report.md into DIR")


def run_budget(args: argparse.Namespace) -> int:
    if args.mode not in ("static", "weight-only"):
        raise LowbitError("--max-drop searches per-layer precision of static int8 or weight-only models; use it "
                          "with --mode static (and --calib) or --mode weight-only")
    if args.bias_correction:
        raise LowbitError("--max-drop cannot be combined with --bias-correction yet; drop one of the two")
    common = dict(eval_data=args.eval_data, max_drop=args.max_drop, metric=args.metric or "cosine", time_limit=args.time_limit,
                  exclude=tuple(args.exclude), samples=args.samples, batch_size=args.batch_size,
                  threads=args.threads, measure_speed=not args.no_speed, fallback=args.fallback)
    if args.mode == "weight-only":
        from lowbit.search.budget_weights import search_weight_precision

        result = search_weight_precision(
            args.model, args.output, calib=args.calib, bits=args.weight_bits, group_size=args.group_size,
            algo=args.algo, symmetric=args.symmetric, act_order=bool(args.act_order), weight_format=args.weight_format,
            accuracy_level=args.accuracy_level, embedding_bits=args.embedding_bits, **common)
    else:
        from lowbit.commands.quantize import config_from_args
        from lowbit.search.budget import search_precision

        result = search_precision(args.model, args.output, calib=args.calib, config=config_from_args(args), **common)
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
    """After a plain `lowbit quantize`: the report of the model it wrote (with --mode auto's table)."""
    _write(args, result.report, auto=result.auto)


def _write(args: argparse.Namespace, verify, budget=None, auto=None) -> None:
    from lowbit.report import build_report

    html, md = build_report(args.model, args.output, args.eval_data or args.calib, args.report, verify=verify,
                            budget=budget, auto=auto, samples=args.samples, batch_size=args.batch_size,
                            threads=args.threads,
                            measure_speed=not args.no_speed)
    print(f"report: {html} and {md}", file=sys.stderr if args.json else sys.stdout)
