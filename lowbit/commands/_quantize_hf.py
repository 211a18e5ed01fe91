"""`lowbit quantize MODEL_DIR -o OUT_DIR --mode weight-only ...` for a Hugging Face model directory.

Weight-only RTN/GPTQ/AWQ through `lowbit.torch.llm.quantize_pretrained`, written as a
compressed-tensors checkpoint that `transformers.AutoModel*.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import json

from lowbit.errors import LowbitError


def run_hf(args: argparse.Namespace) -> int:
    if args.mode != "weight-only":
        raise LowbitError(f"Hugging Face model directories support --mode weight-only, not {args.mode!r}; "
                          "add --mode weight-only (or export the model to ONNX for static/dynamic int8)")
    from lowbit.torch.llm.pretrained import quantize_pretrained

    result = quantize_pretrained(
        args.model, args.output, bits=args.weight_bits, group_size=args.group_size, algorithm=args.algo,
        calib_text=args.calib_text, symmetric=args.symmetric, act_order=args.act_order, samples=args.samples,
        seq_len=args.seq_len)
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
