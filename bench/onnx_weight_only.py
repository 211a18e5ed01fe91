"""Weight-only int4 on ONNX Runtime: all-MiniLM-L6-v2, RTN vs GPTQ vs AWQ, block-wise int4 forms.

For group sizes 32 and 128, every MatMul weight of the encoder is quantized by `lowbit quantize
--mode weight-only` (RTN, GPTQ, AWQ; GPTQ/AWQ calibrated on sentences disjoint from the evaluation
ones) and written as MatMulNBits (float activations). Extra rows compare the output forms on RTN:
standard blocked DequantizeLinear (opset 21) and MatMulNBits with accuracy_level 4 (int8
activations inside the kernel).

Per row: mean/min cosine of the sentence embeddings vs fp32 on 64 x 128 tokens of real English
text, file size, build time, and latency vs fp32 at batch 64 x 128 and 1 x 128, all variants timed
round-robin in the same run (each timed run after an untimed one of the same session), 2 ONNX
Runtime threads, median of the repeats; speedup = fp32 median / variant median.

    python bench/onnx_weight_only.py
    python bench/onnx_weight_only.py --groups 32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_baseline as base  # noqa: E402  (MiniLM task, sessions, CPU description)

ARTIFACTS = Path(__file__).parent / "_artifacts"


def variants(groups: list[int]) -> list[tuple[str, dict]]:
    rows = []
    for group in groups:
        for algo in ("rtn", "gptq", "awq"):
            rows.append((f"int4 g{group} {algo.upper()} MatMulNBits", {"group_size": group, "algo": algo}))
    first = groups[0]
    rows.append((f"int4 g{first} RTN blocked DQ (opset 21)", {"group_size": first, "algo": "rtn", "weight_format": "dq"}))
    rows.append((f"int4 g{first} RTN MatMulNBits accuracy_level 4", {"group_size": first, "algo": "rtn",
                                                                     "accuracy_level": 4}))
    return rows


def timed(sessions: dict, feed: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, sess in sessions.items():
            sess.run(None, feed)  # untimed: lets the previous session's spinning threads settle
            started = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    parser.add_argument("--groups", default="32,128")
    parser.add_argument("--sentences", type=int, default=64, help="evaluation batch (x 128 tokens)")
    parser.add_argument("--calibration-sentences", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    from lowbit.onnx.quantize import quantize_onnx

    torch.set_num_threads(base.THREADS)
    print(f"CPU: {base.cpu_model()}; onnxruntime {ort.__version__}; {base.THREADS} threads\n", flush=True)
    task = base.minilm_task(args.artifacts, args.sentences, args.calibration_sentences)
    workdir = args.artifacts / "onnx_weight_only"
    workdir.mkdir(parents=True, exist_ok=True)
    calib_path = workdir / "calibration.npz"
    np.savez(calib_path, **{k: np.concatenate([b[k] for b in task.calibration]) for k in task.calibration[0]})

    rows: list[dict] = [{"variant": "fp32", "path": task.fp32}]
    for label, options in variants([int(g) for g in args.groups.split(",")]):
        target = workdir / (label.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        started = time.perf_counter()
        result = quantize_onnx(task.fp32, target, mode="weight-only", calib=calib_path, verify=False,
                               threads=base.THREADS, **options)
        rows.append({"variant": label, "path": target, "build_s": time.perf_counter() - started,
                     "calib_s": result.calibration_seconds, "warnings": result.warnings})
        print(f"built {label} in {rows[-1]['build_s']:.1f} s", flush=True)

    reference = base.run_all(base.session(task.fp32), task.evaluation)
    sessions = {}
    for row in rows:
        sess = base.session(row["path"])
        row.update(task.fidelity(reference, base.run_all(sess, task.evaluation)))
        row["size_mb"] = row["path"].stat().st_size / 1e6
        sessions[row["variant"]] = sess
    one = {k: v[:1] for k, v in task.timing.items()}
    for key, feed in (("batch64", task.timing), ("batch1", one)):
        latency = timed(sessions, feed, args.repeats if key == "batch64" else 5 * args.repeats)
        for row in rows:
            row[f"{key}_ms"] = latency[row["variant"]]
            row[f"{key}_speedup"] = latency["fp32"] / latency[row["variant"]]

    shape = "x".join(str(d) for d in task.timing["input_ids"].shape)
    print(f"\n### all-MiniLM-L6-v2 weight-only (eval {shape} tokens; {base.THREADS} ORT threads; "
          f"calibration {args.calibration_sentences} other sentences)\n")
    print("| variant | cosine mean | cosine min | MB | build s | batch 64x128 ms | speedup | batch 1x128 ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {r['size_mb']:.1f} | "
              f"{r.get('build_s', 0):.1f} | {r['batch64_ms']:.1f} | {r['batch64_speedup']:.2f}x | "
              f"{r['batch1_ms']:.2f} | {r['batch1_speedup']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps([{k: str(v) if isinstance(v, Path) else v for k, v in r.items()}
                                         for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
