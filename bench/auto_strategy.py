"""`--mode auto` on models we did not tune for (issue 11), side by side with ONNX Runtime's quantizer
and NNCF 3.x `nncf.quantize` on the same ONNX model, in one run:

  - mobilenetv2-highlr: the zoo's high-lr MobileNetV2 on 32x32 digits (BN folding spreads its
    depthwise ranges to 1e5x);
  - depthwise-rescaled: a depthwise CNN trained on 16x16 digits whose activation channels are then
    multiplied by exp(U(-3, 3)) function-preservingly (`lowbit.zoo.depthwise`);
  - minilm: all-MiniLM-L6-v2, 64 sentences x 128 tokens (calibration: 64 other sentences).

Every quantizer runs in its own subprocess (build seconds, peak RSS = that process's VmHWM):
lowbit's explicit modes and `--mode auto` with only --calib/--eval (and --per-tensor where the row
says so); ORT `quantize_static` (its documented recipe: quant_pre_process, QDQ, QInt8, MinMax;
per-tensor and per-channel) and, for MiniLM, `quantize_dynamic` per-channel; NNCF `nncf.quantize`
(PERFORMANCE preset for the CNNs, MIXED + ModelType.TRANSFORMER for MiniLM, fast bias correction
on). Same calibration samples for every tool (lowbit reads one .npz, the peers one call each).

Then, in this process, every model is scored on the same evaluation data: the CNNs' accuracy on
the 450 held-out digits and top-1 agreement with fp32; MiniLM's output cosine both ways the
project uses it: "per call" (each sentence's whole 128x384 output as one vector, the metric
`lowbit quantize` and --mode auto report and budget) and "sentence" (cosine of the mean-pooled,
normalized sentence embeddings, the metric of bench/ptq_onnx.py); plus per-token cosine over all
128 positions and over the real (not padding) tokens only. Speed:
every model in one `lowbit.onnx.timing.time_models` call (2 threads, spin-waiting off, interleaved
turns, median) on the first --timing-batch evaluation samples; speedup = fp32 median / model median.

    python bench/auto_strategy.py --models mobilenetv2-highlr
    python bench/auto_strategy.py --models depthwise-rescaled
    python bench/auto_strategy.py --models minilm
Run it in a venv with nncf installed (BENCHMARKS.md, field corpus); without nncf those rows say so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from field_quantize import quantize_nncf, quantize_ort, read_calls  # noqa: E402  (the peers' recipes)
from ptq_onnx import build as run_worker  # noqa: E402
from ptq_onnx import peak_rss_mb  # noqa: E402

THREADS = 2
ARTIFACTS = Path(__file__).parent / "_artifacts"
MODELS = ("mobilenetv2-highlr", "depthwise-rescaled", "minilm")


# ----------------------------------------------------------------------------- one build per subprocess

def _worker(spec: dict) -> dict:
    """Build one quantized model in this process; its build time, peak memory and auto table."""
    import onnxruntime  # noqa: F401  (the runtime's import is not the build's memory)

    info: dict = {"rss_before_mb": peak_rss_mb()}
    started = time.perf_counter()
    tool, source, target = spec["tool"], Path(spec["source"]), Path(spec["target"])
    if tool == "lowbit":
        from lowbit.onnx.config import config_for_mode
        from lowbit.onnx.quantize import quantize_onnx

        options = dict(spec["options"])
        result = quantize_onnx(source, target, config_for_mode(options.pop("mode"), **options), calib=spec["calib"],
                               eval_data=spec["eval"], threads=THREADS, batch_size=spec["batch_size"])
        if result.auto is not None:
            info["auto"] = {"winner": result.auto.winner, "seconds": result.auto.seconds,
                            "table": result.auto.table()}
            info["verified_speedup"] = result.report.speedup
        info["warnings"] = result.warnings
    elif tool == "ort-dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(source), str(target), per_channel=True)
    elif tool in ("ort", "ort-per-channel"):
        quantize_ort(source, read_calls(Path(spec["calib_dir"])), target, per_channel=tool == "ort-per-channel")
    elif tool in ("nncf", "nncf-transformer"):
        quantize_nncf(source, read_calls(Path(spec["calib_dir"])), target, transformer=tool == "nncf-transformer")
    else:
        raise SystemExit(f"unknown tool {tool}")
    info["build_s"] = time.perf_counter() - started
    info["peak_rss_mb"] = peak_rss_mb()
    return info


def build(spec: dict) -> dict:
    return run_worker(spec, script=__file__, threads=THREADS)


# ----------------------------------------------------------------------------- models and their data

def digits(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from lowbit.zoo.digits import load_digits_split
    from lowbit.zoo.upscaled_digits import digits_as_rgb

    data = load_digits_split()
    return (digits_as_rgb(data.x_train[:256], size).numpy(), digits_as_rgb(data.x_test, size).numpy(),
            data.y_test.numpy())


def model_task(name: str, artifacts: Path) -> dict:
    """The float model, calibration and evaluation inputs, and the rows to build for `name`."""
    cnn_rows = [("lowbit static (explicit, per-channel)", "lowbit", {"mode": "static"}),
                ("lowbit static --per-tensor", "lowbit", {"mode": "static", "per_channel": False}),
                ("lowbit auto (default)", "lowbit", {"mode": "auto"}),
                ("lowbit auto --per-tensor", "lowbit", {"mode": "auto", "per_channel": False}),
                ("ORT static per-tensor", "ort", {}), ("ORT static per-channel", "ort-per-channel", {}),
                ("NNCF PERFORMANCE", "nncf", {})]
    if name == "mobilenetv2-highlr":
        from lowbit.zoo.mobilenet import mobilenet_digits_onnx

        calib, test, labels = digits(32)
        return {"fp32": mobilenet_digits_onnx(artifacts, recipe="high-lr")[0], "calib": {"input": calib},
                "eval": {"input": test}, "labels": labels, "rows": cnn_rows}
    if name == "depthwise-rescaled":
        from lowbit.zoo.depthwise import rescaled_depthwise_digits_onnx

        calib, test, labels = digits(16)
        return {"fp32": rescaled_depthwise_digits_onnx(artifacts)[1], "calib": {"input": calib},
                "eval": {"input": test}, "labels": labels, "rows": cnn_rows}
    if name == "minilm":
        from lowbit.zoo import minilm

        tokenizer = minilm.load_tokenizer()
        return {"fp32": minilm.minilm_onnx(artifacts), "eval": minilm.text_batch(64, tokenizer=tokenizer),
                "calib": minilm.text_batch(64, skip=64, tokenizer=tokenizer), "labels": None,
                "rows": [("lowbit static (explicit)", "lowbit", {"mode": "static"}),
                         ("lowbit dynamic + calib", "lowbit", {"mode": "dynamic"}),
                         ("lowbit auto (default)", "lowbit", {"mode": "auto"}),
                         ("ORT static per-channel", "ort-per-channel", {}),
                         ("ORT dynamic per-channel", "ort-dynamic", {}),
                         ("NNCF MIXED + TRANSFORMER", "nncf-transformer", {})]}
    raise SystemExit(f"unknown model {name!r}; use {', '.join(MODELS)}")


# ----------------------------------------------------------------------------- scoring and timing

def outputs(session, data: dict[str, np.ndarray], step: int = 16) -> np.ndarray:
    count = len(next(iter(data.values())))
    return np.concatenate([session.run(None, {k: v[i:i + step] for k, v in data.items()})[0]
                           for i in range(0, count, step)])


def fidelity(name: str, ref: np.ndarray, got: np.ndarray, task: dict) -> dict:
    from lowbit.onnx.verify import OutputErrors, cosine_per_row

    errors = OutputErrors("output")  # lowbit's own metric, as `lowbit quantize` and --mode auto report it
    errors.add(ref, got, len(ref))
    result = errors.result()
    if task["labels"] is not None:
        labels = task["labels"]
        return {"accuracy": float((got.argmax(1) == labels).mean()),
                "drop_pt": 100 * float((ref.argmax(1) == labels).mean() - (got.argmax(1) == labels).mean()),
                "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}
    from lowbit.zoo import minilm

    mask = task["eval"]["attention_mask"]
    sentence = np.sum(minilm.sentence_embedding(ref, mask) * minilm.sentence_embedding(got, mask), axis=-1)
    real = mask.reshape(-1).astype(bool)  # tokens that are not padding
    tokens = cosine_per_row(ref.reshape(-1, ref.shape[-1])[real], got.reshape(-1, got.shape[-1])[real])
    return {"cosine_per_call": result.cosine_mean, "cosine_sentence": float(sentence.mean()),
            "cosine_sentence_min": float(sentence.min()), "cosine_per_token": result.frame_cosine_mean,
            "cosine_real_tokens": float(tokens.mean())}


def run_model(name: str, args, workdir: Path) -> list[str]:
    from lowbit.onnx.session import make_session
    from lowbit.onnx.timing import time_models

    task = model_task(name, args.artifacts)
    calib_npz, eval_npz, calib_dir = workdir / "calib.npz", workdir / "eval.npz", workdir / "calib_calls"
    np.savez(calib_npz, **task["calib"])
    np.savez(eval_npz, **task["eval"])
    calib_dir.mkdir()
    for i in range(len(next(iter(task["calib"].values())))):
        np.savez(calib_dir / f"{i:04d}.npz", **{k: v[i:i + 1] for k, v in task["calib"].items()})
    rows = [{"label": "fp32", "path": task["fp32"]}]
    for label, tool, options in task["rows"]:
        target = workdir / f"{len(rows):02d}.onnx"
        print(f"  {name}: building {label} ...", file=sys.stderr, flush=True)
        info = build({"tool": tool, "source": str(task["fp32"]), "target": str(target), "options": options,
                      "calib": str(calib_npz), "eval": str(eval_npz), "calib_dir": str(calib_dir),
                      "batch_size": args.timing_batch})
        rows.append({"label": label, **info, **({} if "error" in info else {"path": target})})
        if "auto" in info:
            print(f"{name}, {label}:\n{info['auto']['table']}", file=sys.stderr, flush=True)
    working = [r for r in rows if "path" in r]
    reference = outputs(make_session(task["fp32"], threads=THREADS), task["eval"])
    for row in working:
        row.update(fidelity(name, reference, outputs(make_session(row["path"], threads=THREADS), task["eval"]), task))
        row["size_mb"] = Path(row["path"]).stat().st_size / 1e6
    feed = {k: v[:args.timing_batch] for k, v in task["eval"].items()}
    timing = time_models([r["path"] for r in working], feed, threads=THREADS, warmup=2,
                         repeats=args.repeats or (10 if name == "minilm" else 300))
    for row, median in zip(working, timing.medians_ms):
        row["latency_ms"], row["speedup"] = median, timing.medians_ms[0] / median
    return table(name, task, rows, timing, args.timing_batch)


def table(name: str, task: dict, rows: list[dict], timing, timing_batch: int) -> list[str]:
    keys = (["accuracy", "drop_pt", "top1_agreement"] if task["labels"] is not None else
            ["cosine_per_call", "cosine_sentence", "cosine_sentence_min", "cosine_per_token", "cosine_real_tokens"])
    batch = ", ".join(f"{k}{list(v.shape[1:])}" for k, v in task["eval"].items())
    lines = [f"### {name} (fp32 {Path(task['fp32']).name}; evaluation {len(next(iter(task['eval'].values())))} "
             f"samples; timing batch {timing_batch} x {batch})", "",
             f"timing: {timing.method()}", "",
             "| run | " + " | ".join(keys) + " | speedup | latency ms | build s | peak RSS MB | MB | kept |",
             "|---" * (len(keys) + 7) + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | FAILED: {row['error']} |" + " |" * (len(keys) + 5))
            continue
        cells = [f"{row[k]:+.2f}" if k == "drop_pt" else (f"{100 * row[k]:.2f}%" if k in ("accuracy", "top1_agreement")
                                                           else f"{row[k]:.5f}") for k in keys]
        kept = row.get("auto", {}).get("winner", "-")
        verified = f" (quantize's own: {row['verified_speedup']:.2f}x)" if row.get("verified_speedup") else ""
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {row['speedup']:.2f}x{verified} | "
                     f"{row['latency_ms']:.3g} | {row.get('build_s', 0):.1f} | {row.get('peak_rss_mb', 0):.0f} | "
                     f"{row['size_mb']:.2f} | {kept} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    parser.add_argument("--timing-batch", type=int, default=16,
                        help="samples per timed run (and the batch --mode auto scores and times with)")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per model (default: 300 CNN, 10 MiniLM)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    import onnxruntime as ort

    try:
        import nncf
        peers = f"onnxruntime {ort.__version__}, nncf {nncf.__version__}"
    except ImportError:
        peers = f"onnxruntime {ort.__version__}, nncf NOT INSTALLED (its rows fail)"
    out = [f"command: python bench/auto_strategy.py {' '.join(argv if argv is not None else sys.argv[1:])}",
           f"{peers}; load average at start {os.getloadavg()[0]:.1f}", ""]
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"lowbit-auto-{name}-") as tmp:
            out += run_model(name, args, Path(tmp)) + [""]
    out.append(f"load average at end {os.getloadavg()[0]:.1f}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
