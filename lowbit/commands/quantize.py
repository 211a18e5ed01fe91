"""`lowbit quantize MODEL.onnx -o OUT.onnx`: post-training quantization of an ONNX model.

Writes OUT.onnx (static or dynamic int8, or fp16), then runs the calibration (or --eval) inputs
through both models on ONNX Runtime and prints fidelity, size and speedup measured in the same run.
"""

from __future__ import annotations

import argparse
import json

MODES = ("static", "dynamic", "fp16")
CALIB_METHODS = ("auto", "minmax", "percentile", "entropy", "mse")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "quantize", help="quantize an ONNX model (static int8, dynamic int8 or fp16) and measure it",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="float ONNX model to quantize (never modified)")
    parser.add_argument("-o", "--output", required=True, help="path of the quantized model to write")
    parser.add_argument("--mode", choices=MODES, default="static",
                        help="static: calibrated int8 activations (needs --calib); dynamic: int8 weights, "
                             "activations quantized at run time; fp16: half precision (default: static)")
    parser.add_argument("--calib", help=".npz keyed by input name with samples on axis 0, or a folder of them")
    parser.add_argument("--calib-method", choices=CALIB_METHODS, default="auto",
                        help="how activation ranges are chosen from the statistics (default: auto)")
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE_OR_OP",
                        help="node names, op types or output tensor names to keep float")
    parser.add_argument("--samples", type=int, help="use only the first N calibration samples")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per calibration run (default: 16)")
    parser.add_argument("--eval", dest="eval_data", help=".npz to compare the models on (default: the calibration data)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads for calibration and timing (default: all cores)")
    parser.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    parser.add_argument("--smooth", dest="smooth", action="store_true", default=None,
                        help="SmoothQuant scale migration into LayerNorm-fed MatMuls (default: on when present)")
    parser.add_argument("--no-smooth", dest="smooth", action="store_false", help="turn SmoothQuant off")
    parser.add_argument("--smooth-alpha", type=float, default=0.5,
                        help="SmoothQuant migration strength in [0, 1] (default: 0.5)")
    parser.add_argument("--equalize", action="store_true",
                        help="cross-layer equalization of Conv chains (helps per-tensor int8 on depthwise nets)")
    parser.add_argument("--bias-correction", action="store_true",
                        help="correct Conv biases for the output mean shift caused by weight rounding")
    parser.add_argument("--calib-memory-mb", type=float,
                        help="bound the activations held per calibration run; tensors are split across runs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return parser


def run(args: argparse.Namespace) -> int:
    from lowbit.onnx.quantize import quantize_onnx

    result = quantize_onnx(
        args.model, args.output, mode=args.mode, calib=args.calib, calib_method=args.calib_method,
        per_channel=not args.per_tensor, exclude=tuple(args.exclude), samples=args.samples,
        batch_size=args.batch_size, eval_data=args.eval_data, measure_speed=not args.no_speed,
        threads=args.threads, smooth=args.smooth if args.mode == "static" else None,
        smooth_alpha=args.smooth_alpha, equalize=args.equalize, bias_correction=args.bias_correction,
        calib_memory_mb=args.calib_memory_mb)
    if args.json:
        print(json.dumps({
            "output": str(result.output_path), "mode": args.mode, "plan": result.plan.summary(),
            "unsupported_ops": result.plan.unsupported_ops,
            "report": None if result.report is None else result.report.to_dict(),
            "calibration_seconds": result.calibration_seconds, "warnings": result.warnings,
        }, indent=2))
    else:
        print(result.summary())
    return 0
