"""`lowbit quantize MODEL_DIR -o OUT_DIR ...` for a Hugging Face model directory.

- `--mode weight-only --algo rtn|gptq|awq`: low-bit weights through
  `lowbit.torch.llm.quantize_pretrained`, written as a compressed-tensors `pack-quantized`
  checkpoint;
- `--mode static --algo smoothquant`: W8A8 (SmoothQuant on the `--smooth-groups` scale groups,
  norm,linear by default; plain with --no-smooth) through
  `lowbit.torch.llm.pretrained_w8a8.smoothquant_pretrained`, written as `int-quantized`;
  `--mode dynamic --algo smoothquant`: the same with dynamic per-token int8 inputs.

Both load with `transformers.AutoModel*.from_pretrained` (with the compressed-tensors package).
"""

from __future__ import annotations

import argparse
import json

from lowbit.errors import LowbitError


def run_hf(args: argparse.Namespace) -> int:
    w8a8 = args.mode in ("static", "dynamic") and args.algo == "smoothquant"
    if args.smooth_groups is not None and not w8a8:
        raise LowbitError("--smooth-groups picks SmoothQuant's scale groups and needs --mode static --algo "
                          "smoothquant; add those, or drop --smooth-groups")
    if w8a8:
        return _run_w8a8(args)
    if args.algo == "smoothquant":
        raise LowbitError(f"--algo smoothquant quantizes weights and activations to int8 and needs --mode static "
                          f"or --mode dynamic, not --mode {args.mode}; add --mode static")
    if args.mode != "weight-only":
        raise LowbitError(f"Hugging Face model directories support --mode weight-only, or --mode static/dynamic with "
                          f"--algo smoothquant (W8A8), not --mode {args.mode!r} with --algo {args.algo}; add --mode "
                          "weight-only or --algo smoothquant (or export the model to ONNX for other int8 modes)")
    from lowbit.torch.llm.pretrained import quantize_pretrained

    result = quantize_pretrained(
        args.model, args.output, bits=args.weight_bits, group_size=args.group_size, algorithm=args.algo,
        calib_text=args.calib_text, symmetric=args.symmetric, act_order=args.act_order is not False, samples=args.samples,
        seq_len=args.seq_len, trust_remote_code=args.trust_remote_code, low_memory=args.low_memory)
    if args.json:
        print(json.dumps({
            "output": str(result.output_dir), "mode": "weight-only", "algorithm": args.algo,
            "spec": result.spec.to_dict(), "quantized_linears": len(result.quantization.layers),
            "calibration_samples": result.calibration_samples, "cosine": result.cosine, "sqnr_db": result.sqnr_db,
            "eval_text": result.eval_source, "input_weight_bytes": result.input_bytes,
            "output_weight_bytes": result.output_bytes, "seconds": result.seconds,
            "block_seconds": result.quantization.block_seconds, "notes": result.notes,
        }, indent=2))
    else:
        print(result.summary())
    return 0


def _run_w8a8(args: argparse.Namespace) -> int:
    from lowbit.torch.llm.pretrained_w8a8 import smoothquant_pretrained

    groups = args.smooth_groups
    if groups is not None and args.smooth is False:
        raise LowbitError("--smooth-groups and --no-smooth contradict each other; drop one of them")
    result = smoothquant_pretrained(
        args.model, args.output, calib_text=args.calib_text, alpha=args.smooth_alpha,
        smooth=args.smooth is not False, smooth_groups=groups,
        samples=args.samples, seq_len=args.seq_len, trust_remote_code=args.trust_remote_code, activations=args.mode,
        low_memory=args.low_memory)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0
