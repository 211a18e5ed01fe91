"""`--mode auto` on models we did not tune for (issue 11): real accuracy against labels, next to the
explicit static runs a user would try first.

  - depthwise-rescaled: a depthwise CNN trained on 16x16 digits whose activation channels are then
    multiplied by exp(U(-3, 3)) function-preservingly (`lowbit.zoo.depthwise`);
  - mobilenetv2-highlr: the zoo's high-lr MobileNetV2 (BN folding spreads depthwise ranges to 1e5x).

Each row is one `quantize_onnx` call with only --calib/--eval (plus --per-tensor where the label
says so); accuracy on the 450 held-out digits; speedup is the one `quantize_onnx` measured in the
same run (fp32 and quantized interleaved, 2 threads, median of 10).

  - minilm: all-MiniLM-L6-v2, --mode auto against the explicit static run (wall time of both).

    python bench/auto_strategy.py [--models depthwise-rescaled,mobilenetv2-highlr,minilm]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THREADS = 2
ARTIFACTS = Path(__file__).parent / "_artifacts"


def digits(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from lowbit.zoo.digits import load_digits_split
    from lowbit.zoo.upscaled_digits import digits_as_rgb

    data = load_digits_split()
    return (digits_as_rgb(data.x_train[:256], size).numpy(), digits_as_rgb(data.x_test, size).numpy(),
            data.y_test.numpy())


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from lowbit.onnx.io import load_model
    from lowbit.onnx.session import make_session

    session = make_session(load_model(path), threads=THREADS)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return float((logits.argmax(1) == y).mean())


def rows_for(name: str, source: Path, size: int, workdir: Path) -> list[str]:
    from lowbit.onnx.config import AutoConfig, StaticConfig
    from lowbit.onnx.quantize import quantize_onnx

    calib_x, test_x, test_y = digits(size)
    calib, evaluation = workdir / f"{name}_calib.npz", workdir / f"{name}_eval.npz"
    np.savez(calib, input=calib_x)
    np.savez(evaluation, input=test_x)
    float_acc = accuracy(source, test_x, test_y)
    lines = [f"### {name} (float accuracy {100 * float_acc:.2f}%, {len(test_y)} test digits)", "",
             "| run | accuracy | drop (pt) | top-1 agreement | speedup | seconds | kept |", "|---|---|---|---|---|---|---|"]
    runs = [("static (explicit, per-channel)", StaticConfig()), ("static --per-tensor", StaticConfig(per_channel=False)),
            ("auto (default)", AutoConfig()), ("auto --per-tensor", AutoConfig(per_channel=False))]
    for label, config in runs:
        out = workdir / f"{name}_{label.split()[0]}_{int(time.time() * 1000) % 100000}.onnx"
        started = time.perf_counter()
        result = quantize_onnx(source, out, config, calib=calib, eval_data=evaluation, threads=THREADS)
        seconds = time.perf_counter() - started
        acc = accuracy(out, test_x, test_y)
        top1 = result.report.outputs[0].top1_agreement
        kept = result.auto.winner if result.auto is not None else "-"
        lines.append(f"| {label} | {100 * acc:.2f}% | {100 * (float_acc - acc):+.2f} | {100 * top1:.2f}% | "
                     f"{result.report.speedup:.2f}x | {seconds:.1f} | {kept} |")
        if result.auto is not None:
            print(result.auto.table(), file=sys.stderr)
    return lines


def minilm_rows(workdir: Path, artifacts: Path) -> list[str]:
    """MiniLM-L6-v2: --mode auto against the explicit static run, wall time of each in one process."""
    from lowbit.onnx.config import AutoConfig, StaticConfig
    from lowbit.onnx.quantize import quantize_onnx
    from lowbit.zoo import minilm

    fp32 = minilm.minilm_onnx(artifacts)
    tokenizer = minilm.load_tokenizer()
    np.savez(workdir / "eval.npz", **minilm.text_batch(64, tokenizer=tokenizer))
    np.savez(workdir / "calib.npz", **minilm.text_batch(64, skip=64, tokenizer=tokenizer))
    lines = ["### MiniLM-L6-v2 (64 sentences x 128 tokens; calibration on 64 others)", "",
             "| run | output cosine | speedup | wall s | kept |", "|---|---|---|---|---|"]
    for label, config in (("auto (default)", AutoConfig()), ("static (explicit)", StaticConfig())):
        started = time.perf_counter()
        result = quantize_onnx(fp32, workdir / f"minilm_{label.split()[0]}.onnx", config, calib=workdir / "calib.npz",
                               eval_data=workdir / "eval.npz", threads=THREADS, batch_size=16)
        worst = min(o.cosine_mean for o in result.report.outputs)
        lines.append(f"| {label} | {worst:.5f} | {result.report.speedup:.2f}x | {time.perf_counter() - started:.1f} | "
                     f"{result.auto.winner if result.auto is not None else '-'} |")
        if result.auto is not None:
            print(result.auto.table(), file=sys.stderr)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="depthwise-rescaled,mobilenetv2-highlr")
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    args = parser.parse_args(argv)
    out = [f"command: python bench/auto_strategy.py --models {args.models}",
           f"load average at start {os.getloadavg()[0]:.1f}", ""]
    with tempfile.TemporaryDirectory(prefix="lowbit-auto-bench-") as tmp:
        for name in args.models.split(","):
            if name == "depthwise-rescaled":
                from lowbit.zoo.depthwise import rescaled_depthwise_digits_onnx

                _, source, _ = rescaled_depthwise_digits_onnx(args.artifacts)
                out += rows_for(name, source, 16, Path(tmp)) + [""]
            elif name == "mobilenetv2-highlr":
                from lowbit.zoo.mobilenet import mobilenet_digits_onnx

                source, _ = mobilenet_digits_onnx(args.artifacts, recipe="high-lr")
                out += rows_for(name, source, 32, Path(tmp)) + [""]
            elif name == "minilm":
                out += minilm_rows(Path(tmp), args.artifacts) + [""]
            else:
                raise SystemExit(f"unknown model {name!r}")
    out.append(f"load average at end {os.getloadavg()[0]:.1f}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
