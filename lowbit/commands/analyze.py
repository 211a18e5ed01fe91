"""`lowbit analyze FLOAT.onnx QUANT.onnx --data X.npz`: which quantized layers hurt most.

For every quantized activation of a static (QDQ) model, or every quantized layer's output of a
dynamic one: SQNR and cosine against the float model's same tensor, both run on ONNX Runtime over
the data batch by batch, ranked worst first, with the error the tensor (static) or the layer fed
float inputs (dynamic) adds on its own. With --sweep,
also per-layer sweeps of the final outputs: "solo" (each weighted layer quantized alone, the
default of a bare --sweep), "all-but" (everything quantized but that layer: the cosine it
recovers) or "both" (one calibration shared by the two).
"""

from __future__ import annotations

import argparse
import json

SWEEPS = ("solo", "all-but", "both")

def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("analyze", help="per-layer sensitivity of a quantized model vs its float original",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("float_model", help="the float ONNX model that was quantized (never modified)")
    parser.add_argument("quant_model", help="the model written by lowbit quantize --mode static or --mode dynamic "
                        "(never modified)")
    parser.add_argument("--data", help=".npz keyed by input name (samples on axis 0), or a folder of them")
    parser.add_argument("--calib", help="calibration data for --sweep (default: --data); also used as --data "
                        "when --data is not given")
    parser.add_argument("--samples", type=int, help="use only the first N samples")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per run (default: 16)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--top", type=int, default=20, help="rows of the ranked table to print (default: 20)")
    parser.add_argument("--sweep", nargs="?", const="solo", choices=SWEEPS,
                        help="also sweep the weighted layers and measure the final-output cosine: solo (each "
                             "layer quantized alone; the default of a bare --sweep), all-but (everything but that "
                             "layer quantized: what falling it back recovers) or both")
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="seconds each sweep may take; layers not reached are listed (default: 300)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--report", metavar="DIR",
                        help="also write report.html (self-contained, with plots) and report.md into DIR")
    return parser


def run(args: argparse.Namespace) -> int:
    from lowbit.analysis.sensitivity import layer_sensitivity
    from lowbit.errors import LowbitError

    data = args.data or args.calib
    if data is None:
        raise LowbitError("analyze needs inputs to run; pass --data X.npz (keyed by input name, samples on axis 0)")
    report = layer_sensitivity(args.float_model, args.quant_model, data, samples=args.samples,
                               batch_size=args.batch_size, threads=args.threads)
    sweeps = {}
    if args.sweep:
        from lowbit.search.sweep import KINDS, layer_sweeps

        sweeps = layer_sweeps(args.float_model, args.quant_model, KINDS if args.sweep == "both" else (args.sweep,),
                              calib=args.calib or data, eval_data=data, samples=args.samples,
                              batch_size=args.batch_size, threads=args.threads, time_limit=args.time_limit)
    solo, all_but = sweeps.get("solo"), sweeps.get("all-but")
    if args.json:
        print(json.dumps({"sensitivity": report.to_dict(), "sweep": None if solo is None else solo.to_dict(),
                          "all_but_sweep": None if all_but is None else all_but.to_dict()}, indent=2))
    else:
        print(report.text(args.top))
        for sweep in sweeps.values():
            print(sweep.text())
    if args.report:
        import sys

        from lowbit.report import build_report

        html, md = build_report(args.float_model, args.quant_model, data, args.report, sensitivity=report,
                                sweep=solo, all_but=all_but, samples=args.samples, batch_size=args.batch_size,
                                threads=args.threads)
        print(f"report: {html} and {md}", file=sys.stderr if args.json else sys.stdout)
    return 0
