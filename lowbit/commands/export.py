"""`lowbit export QUANTIZED.onnx -o OUT.{ort,pte,tflite}`: ship a lowbit model to a mobile runtime.

The target follows from the output's extension: .ort (ONNX Runtime Mobile), .pte (ExecuTorch,
XNNPACK delegate; `pip install 'lowbit[executorch]'`), .tflite (LiteRT; `pip install
'lowbit[litert]'`). lowbit's own scales and zero points are copied into the file (never
re-quantized); the file is then loaded in the target's runtime and compared with ONNX Runtime on
the QDQ model (top-1 agreement, max error in output quantization steps), its size with the
target's float export of the same network, and its latency with that float export.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="convert a quantized ONNX model to .ort / .pte / .tflite and "
                                                  "verify it in that runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="quantized QDQ ONNX model written by lowbit (never modified)")
    parser.add_argument("-o", "--output", required=True,
                        help="file to write: OUT.ort (ORT Mobile), OUT.pte (ExecuTorch) or OUT.tflite (LiteRT)")
    parser.add_argument("--data", help=".npz keyed by input name, samples on axis 0, for the parity check "
                                       "(default: synthetic standard-normal inputs)")
    parser.add_argument("--samples", type=int, default=256, help="parity samples taken from --data (default: 256)")
    parser.add_argument("--batch", type=int, default=1, help="fixed batch size of the exported file (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads for parity and timing (default: 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per model (default: 20)")
    parser.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    parser.add_argument("--float-output", metavar="PATH",
                        help="also keep the target's float export of the same network (for ratios on a device)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    from lowbit.deploy.export import export_model

    report = export_model(args.model, args.output, data=args.data, samples=args.samples, batch=args.batch,
                          threads=args.threads, repeats=args.repeats, measure_speed=not args.no_speed,
                          float_output=args.float_output)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.describe())
    return 0
