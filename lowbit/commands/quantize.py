"""`lowbit quantize MODEL -o OUT`: post-training quantization of an ONNX model or a Hugging Face model.

MODEL.onnx: writes OUT.onnx (static or dynamic int8, or fp16), then runs the calibration (or
--eval) inputs through both models on ONNX Runtime and prints fidelity, size and speedup measured
in the same run. A Hugging Face model directory (one holding config.json) with --mode weight-only:
writes a compressed-tensors checkpoint directory (see `lowbit/commands/_quantize_hf.py`).
"""

from __future__ import annotations

import argparse
import json
import os

from lowbit.calibration.observer import CALIBRATION_METHODS
from lowbit.onnx.config import MODES
from lowbit.weight_algorithms import ALGORITHMS as WEIGHT_ALGORITHMS
from lowbit.weight_algorithms import cli_help


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "quantize", help="quantize an ONNX model or a Hugging Face model directory and measure it",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="float ONNX model, or Hugging Face model directory, to quantize (never modified)")
    parser.add_argument("-o", "--output", required=True,
                        help="path of the quantized model to write (a new directory for a Hugging Face model)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="auto: try static / hybrid / dynamic / fp16 / weight-only candidates built from one "
                             "calibration and keep the fastest within --max-drop (needs --calib); static: calibrated "
                             "int8 activations (needs --calib); dynamic: int8 weights, activations quantized at run "
                             "time; fp16: half precision; weight-only: low-bit weights, float activations (default: "
                             "auto with --calib, else static)")
    parser.add_argument("--calib", help=".npz keyed by input name with samples on axis 0, or a folder of them")
    parser.add_argument("--calib-method", choices=CALIBRATION_METHODS, default="auto",
                        help="how activation ranges are chosen from the statistics (default: auto)")
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE_OR_OP",
                        help="node names, op types or output tensor names to keep float")
    parser.add_argument("--samples", type=int, help="use only the first N calibration samples")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per calibration run (default: 16)")
    parser.add_argument("--eval", dest="eval_data", help=".npz to compare the models on (default: the calibration data)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads for calibration and timing (default: all cores)")
    parser.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    from lowbit.onnx.passes import PASSES

    for rewrite in PASSES:  # --no-outlier-split, --equalize, --smooth/--no-smooth/--smooth-alpha, --bias-correction
        rewrite.add_arguments(parser)
    parser.add_argument("--smooth-groups", metavar="GROUPS",
                        help="Hugging Face models, --algo smoothquant: comma-separated scale groups to smooth: norm "
                             "(pre-norm -> q/k/v and gate/up), linear (v_proj -> o_proj when v_proj is as wide as "
                             "o_proj's input, i.e. no grouped-query attention, and up_proj -> down_proj), or all; "
                             "each is exact in float, folded into weights the checkpoint stores (default: norm,linear)")
    parser.add_argument("--calib-memory-mb", type=float,
                        help="bound the activations ONNX Runtime holds at once while calibrating (default: 256; "
                             "inf for unbounded, which is faster on small models and needs more memory)")
    weights = parser.add_argument_group("weight-only quantization (--mode weight-only)")
    weights.add_argument("--weight-bits", type=int, choices=(2, 3, 4, 8), default=4, help="weight bits (default: 4)")
    weights.add_argument("--group-size", type=int, default=128,
                         help="input features sharing one scale; 0 or -1 for one scale per output channel (default: 128)")
    # smoothquant: W8A8 of a Hugging Face model (--mode static), not a weight-only algorithm.
    weights.add_argument("--algo", choices=(*WEIGHT_ALGORITHMS, "smoothquant"), default="gptq",
                         help=f"{cli_help()} (default: gptq); smoothquant: W8A8 of a Hugging Face model directory, "
                              "with --mode static and --calib-text")
    weights.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                         help="GPTQ: quantize columns by decreasing activation energy (default: on for Hugging Face "
                              "models, off for ONNX)")
    weights.add_argument("--symmetric", dest="symmetric", action="store_true", default=True,
                         help="zero point fixed at 0 (default)")
    weights.add_argument("--asymmetric", dest="symmetric", action="store_false", help="a zero point per scale group")
    weights.add_argument("--weight-format", choices=("matmulnbits", "dq"), default="matmulnbits",
                         help="ONNX models: matmulnbits (ONNX Runtime's fused int4 kernel, default) or dq (standard "
                              "blocked DequantizeLinear, opset 21, portable to any ONNX runtime)")
    weights.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=0,
                         help="ONNX models, MatMulNBits: 0 keeps float activations (default); 4 lets ONNX Runtime "
                              "quantize activations to int8 inside the kernel")
    weights.add_argument("--embedding-bits", type=int, choices=(0, 4, 8), default=8,
                         help="ONNX models: bits of the embedding tables (Gather), blocks of --group-size; 0 keeps "
                              "them float (default: 8)")
    weights.add_argument("--calib-text", help="Hugging Face models: a UTF-8 text file of representative text for calibration")
    weights.add_argument("--seq-len", type=int,
                         help="Hugging Face models: tokens per calibration sample (default: min(512, the model's "
                              "positions))")
    weights.add_argument("--low-memory", dest="low_memory", action="store_true", default=None,
                         help="Hugging Face models: read, quantize, write and free one block at a time from the "
                              "safetensors shards, for checkpoints bigger than memory (default: on when the weights "
                              "exceed half the available memory); fidelity is then not measured")
    weights.add_argument("--trust-remote-code", action="store_true",
                         help="Hugging Face models: allow a model folder whose config.json needs its own Python "
                              "code (auto_map); that code runs, so only for folders you trust")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    from lowbit.commands._budget_report import add_arguments

    add_arguments(parser)  # --max-drop, --fallback, --metric, --time-limit, --report
    return parser


def run(args: argparse.Namespace) -> int:
    args.mode = resolve_mode(args)
    if _is_hf_model_dir(args.model):
        from lowbit.commands._quantize_hf import run_hf

        return run_hf(args)
    if args.algo == "smoothquant" or args.smooth_groups is not None:
        from lowbit.errors import LowbitError

        flag = "--algo smoothquant" if args.algo == "smoothquant" else "--smooth-groups"
        raise LowbitError(f"{flag} is for Hugging Face model directories; for an ONNX model use --mode static, "
                          "where SmoothQuant is on by default for LayerNorm-fed MatMuls (tune it with --smooth-alpha)")
    if args.max_position_drop is not None and args.mode != "auto":
        from lowbit.errors import LowbitError

        raise LowbitError(f"--max-position-drop gates --mode auto's candidates; drop it, or use --mode auto "
                          f"(not {args.mode})")
    if args.max_drop is not None and args.mode != "auto":
        from lowbit.commands._budget_report import run_budget

        return run_budget(args)
    from lowbit.onnx.quantize import quantize_onnx

    result = quantize_onnx(args.model, args.output, config_from_args(args), calib=args.calib,
                           eval_data=args.eval_data, samples=args.samples, batch_size=args.batch_size,
                           measure_speed=not args.no_speed, threads=args.threads)
    if args.json:
        print(json.dumps({
            "output": str(result.output_path), "mode": args.mode, "plan": result.plan.summary(),
            "unsupported_ops": result.plan.unsupported_ops,
            "report": None if result.report is None else result.report.to_dict(),
            "calibration_seconds": result.calibration_seconds, "warnings": result.warnings,
            **({} if result.auto is None else {"auto": result.auto.to_dict()}),
        }, indent=2))
    else:
        print(result.summary())
    if args.report:
        from lowbit.commands._budget_report import write_quantize_report

        write_quantize_report(args, result)
    return 0


def resolve_mode(args: argparse.Namespace) -> str:
    """--mode as given; without it auto when calibration data is given (ONNX models), else static.
    Flags that name one static recipe (--equalize, --bias-correction, --smooth, --fallback) mean static."""
    if args.mode is not None:
        return args.mode
    from lowbit.onnx.passes import PASSES

    static_recipe = any(getattr(args, p.name) for p in PASSES if p.static_only) or args.fallback is not None
    return "auto" if args.calib is not None and not static_recipe and not _is_hf_model_dir(args.model) else "static"


def config_from_args(args: argparse.Namespace):
    """The `lowbit.onnx.config` config of the flags (each mode takes the flags it knows)."""
    from lowbit.onnx.config import config_for_mode
    from lowbit.onnx.passes import PASSES

    options = {field: getattr(args, field) for rewrite in PASSES for field in rewrite.options}
    options.update(calib_method=args.calib_method, per_channel=not args.per_tensor, exclude=tuple(args.exclude),
                   calib_memory_mb=args.calib_memory_mb)
    if args.mode == "weight-only":
        options.update(bits=args.weight_bits, group_size=args.group_size, algo=args.algo, act_order=bool(args.act_order),
                       symmetric=args.symmetric, weight_format=args.weight_format,
                       accuracy_level=args.accuracy_level, embedding_bits=args.embedding_bits)
    if args.mode == "auto":
        options.update(max_drop=args.max_drop, metric=args.metric or "auto", time_limit=args.time_limit,
                       measure_speed=not args.no_speed, per_channel=False if args.per_tensor else None)
        if args.max_position_drop is not None:
            options["max_position_drop"] = args.max_position_drop
    return config_for_mode(args.mode, **options)


def _is_hf_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
