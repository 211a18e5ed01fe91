"""Where silero-vad's int8 speech decisions flip, and what each quantized configuration trades.

For each configuration (built with `lowbit quantize --mode static|dynamic [--exclude ...]`, or an
existing .onnx), on the field corpus's evaluation clips (bench/field_corpus.py, 4 clips, 1663 frames):
  - closed loop, as the package runs it (OnnxWrapper, state carried from call to call): per-frame
    decision agreement at 0.5, flips and the fp32 margins |p - 0.5| of the flipped frames, the
    package's segments (`get_speech_timestamps_from_probs`) sample agreement;
  - open loop (each recorded fp32 call fed as is, the way `lowbit quantize` scores candidates):
    flips, and lowbit's expected-flip estimate (`verify.expected_binary_flips`) on the evaluation
    calls and on the calibration calls lowbit was given;
  - size, and speed: fp32 time / model time over the same recorded calls, every model timed in this
    process, interleaved, 1 thread, spin-waiting off (bench/field.py's `time_models`).

    cp -r CALIB_WORKDIR /tmp/vad-field     # a bench/field.py --workdir holding silero-vad/calib
    PYTHONPATH=. /work/venvs/field-bench/bin/python bench/vad_decisions.py --workdir /tmp/vad-field
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import field  # noqa: E402
import field_corpus as corpus  # noqa: E402

from lowbit.onnx.verify import expected_binary_flips, log_odds  # noqa: E402

# Node name prefixes: the 16 kHz branch of silero_vad.onnx, the main graph of the op15 export (no If).
PREFIX = {"silero-vad": "If_0_then_branch__Inline_0__", "silero-vad-op15": "/model"}


def configurations(model: str) -> dict[str, list[str]]:
    prefix = PREFIX[model]
    stft, enc = f"{prefix}/stft/Conv", [f"{prefix}/encoder/{i}/reparam_conv/Conv" for i in range(4)]
    head = [f"{prefix}/decoder/decoder/2/Conv", f"{prefix}/decoder/decoder/3/Sigmoid"]
    return {
        "static int8 (per-channel)": ["--mode", "static"],
        "static, LSTMs float": ["--mode", "static", "--exclude", "LSTM"],
        "static, head Conv + Sigmoid float": ["--mode", "static", "--exclude", *head],
        "static, encoder 1-3 float": ["--mode", "static", "--exclude", *enc[1:]],
        "static, STFT Conv float": ["--mode", "static", "--exclude", stft],
        "static, STFT + encoder 0 float": ["--mode", "static", "--exclude", stft, enc[0]],
        "static, STFT + encoder 0-1 float": ["--mode", "static", "--exclude", stft, *enc[:2]],
        "static, STFT + encoder 0 + LSTMs float": ["--mode", "static", "--exclude", stft, enc[0], "LSTM"],
        "static, every Conv float (LSTMs int8)": ["--mode", "static", "--exclude", "Conv"],
        "dynamic (LSTMs int8, Convs float)": ["--mode", "dynamic"],
        "auto (the default run; --no-speed here)": [],
    }


def build(source: Path, calib: Path, output: Path, args: list[str]) -> Path:
    command = [sys.executable, "-m", "lowbit", "quantize", str(source), "-o", str(output), "--calib", str(calib),
               "--threads", "1", "--no-speed", *args]
    subprocess.run(command, check=True, capture_output=True, cwd=output.parent,
                   env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    return output


def open_loop(path: Path, feeds: list[dict]) -> np.ndarray:
    session = corpus.open_session(path)
    return np.array([float(session.run(None, f)[0].reshape(-1)[0]) for f in feeds])


def estimate(ref: np.ndarray, got: np.ndarray) -> float:
    ref_logit = log_odds(ref)
    return expected_binary_flips(np.abs(ref_logit), np.abs(log_odds(got) - ref_logit))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="silero-vad", choices=["silero-vad", "silero-vad-op15"])
    parser.add_argument("--workdir", default="/tmp/vad-field", help="bench/field.py's workdir (MODEL/calib)")
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    model = corpus.BY_NAME[args.model]
    source, calib = model.path(workdir), workdir / args.model / "calib"
    out = workdir / args.model / "vad_decisions"
    out.mkdir(exist_ok=True)
    items = model.make_items("eval", model.eval_count)
    reference, eval_feeds = corpus.run_pipeline(model, source, workdir, items)
    calib_feeds = [dict(np.load(f)) for f in sorted(glob.glob(str(calib / "*.npz")))]
    ref_eval, ref_calib = open_loop(source, eval_feeds), open_loop(source, calib_feeds)
    frames = np.concatenate(reference)
    print(f"load {os.getloadavg()}; {args.model}: {frames.size} frames ({int((frames >= 0.5).sum())} speech) in "
          f"{len(items)} clips; {len(calib_feeds)} calibration calls", flush=True)
    print("| configuration | frames agree (closed loop) | flips | flipped frames' fp32 margin, max | segments: "
          "samples agree | open-loop flips (eval) | expected flips, eval | expected flips, calib | MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    written: dict[str, Path] = {}
    for index, (name, flags) in enumerate(configurations(args.model).items()):
        if args.only and name not in args.only:
            continue
        path = build(source, calib, out / f"config{index}.onnx", flags)
        written[name] = path
        candidate, _ = corpus.run_pipeline(model, path, workdir, items)
        score = corpus.match_speech(reference, candidate)
        got = np.concatenate(candidate)
        flips = (frames >= 0.5) != (got >= 0.5)
        margin = f"{np.abs(frames - 0.5)[flips].max():.3f}" if flips.any() else "-"
        got_eval, got_calib = open_loop(path, eval_feeds), open_loop(path, calib_feeds)
        open_flips = int(((ref_eval >= 0.5) != (got_eval >= 0.5)).sum())
        print(f"| {name} | {score['frame_agreement']:.4f} | {int(flips.sum())} | {margin} | "
              f"{score['segment_sample_agreement']:.4f} | {open_flips} | {100 * estimate(ref_eval, got_eval):.3f}% | "
              f"{100 * estimate(ref_calib, got_calib):.3f}% | {path.stat().st_size / 1e6:.2f} |", flush=True)
    feeds = field.speed_feeds(source, eval_feeds)
    seconds = field.time_models({"fp32": source, **written}, feeds, args.repeats)
    print(f"\nspeed ({len(feeds)} recorded calls a pass, median of {args.repeats} interleaved passes, 1 thread; "
          f"load {os.getloadavg()}):")
    for name in written:
        print(f"  {name}: {seconds['fp32'] / seconds[name]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
