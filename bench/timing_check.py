"""Independent check of lowbit's reported speedup (issue 12: agree within 10%).

For each model: the fp32 ONNX model and lowbit's default static int8 model (`quantize_onnx`, no
flags), timed on the same input batch (the one the quantize table times) with the same thread
count, `--rounds` rounds, each round all three ways in turn so they see the same load drift:

  lowbit        what `lowbit quantize` prints: `lowbit.onnx.timing.time_models` with the quantize
                table's warm-up and repeats (one process, spin-waiting off, interleaved in turns
                of one untimed and three timed runs of a model, median);
  independent   without lowbit: each model in its own fresh Python process (plain onnxruntime, the
                same session options written out below), `--runs` back-to-back timed runs after a
                warm-up, median; fp32 and int8 processes alternate which goes first;
  spin on       the old `lowbit bench` method: one process, ONNX Runtime's default options
                (spin-waiting on), timed run by run alternately with no untimed run in between.

Speedups are medians over the rounds (the range is printed too); "difference" is lowbit's median
speedup over the independent one, minus 1.

Models: the zoo's digits CNN (8x8), ResNet-18-style (digits 224x224), MobileNetV2-style (digits
32x32), all-MiniLM-L6-v2 (128 tokens), and "gru": a GRU of 32 unrolled steps over the 32 rows of
a 32x32 digit (hidden 32; ~20 tiny ops per step, a few hundred in all), trained here for 3 epochs.
Everything is built offline into bench/_artifacts/timing (cached).

    python bench/timing_check.py                             # all models, every core
    python bench/timing_check.py --models gru,digits --threads 1 --rounds 7 --runs 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ARTIFACTS = Path(__file__).parent / "_artifacts" / "timing"
TOLERANCE = 0.10

# The independent worker: plain onnxruntime, no lowbit import.
WORKER = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
model, feed_path, threads, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
options.add_session_config_entry("session.inter_op.allow_spinning", "0")
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
with np.load(feed_path) as archive:
    feed = {k: archive[k] for k in archive.files}
for _ in range(5):
    session.run(None, feed)
times = []
for _ in range(runs):
    start = time.perf_counter()
    session.run(None, feed)
    times.append(1000 * (time.perf_counter() - start))
print(json.dumps({"median_ms": float(np.median(times))}))
"""


# ----------------------------------------------------------------------------- models (cached)

def digits_images(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration images, evaluation images, evaluation labels) of the fixed digits split, RGB at `size`."""
    from lowbit.zoo.digits import load_digits_split
    from lowbit.zoo.upscaled_digits import digits_as_rgb

    data = load_digits_split()
    calib = digits_as_rgb(data.x_train[:64], size).numpy()
    return calib, digits_as_rgb(data.x_test[:64], size).numpy(), data.y_test[:64].numpy()


def build_digits() -> tuple[Path, dict, dict, int]:
    import torch

    from lowbit.zoo.onnx_export import export_to_onnx
    from lowbit.zoo.digits import load_digits_split, train_digits_cnn

    path = ARTIFACTS / "digits_cnn.onnx"
    if not path.is_file():
        model, _ = train_digits_cnn()
        export_to_onnx(model, (torch.zeros(1, 1, 8, 8),), path, input_names=["input"], output_names=["logits"],
                       dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    data = load_digits_split()
    return path, {"input": data.x_train[:128].numpy()}, {"input": data.x_test[:64].numpy()}, 16


def build_resnet() -> tuple[Path, dict, dict, int]:
    from lowbit.zoo.resnet import resnet18_digits_onnx

    calib, evaluation, _ = digits_images(224)
    return resnet18_digits_onnx(ARTIFACTS)[0], {"input": calib[:32]}, {"input": evaluation[:16]}, 4


def build_mobilenet() -> tuple[Path, dict, dict, int]:
    from lowbit.zoo.mobilenet import mobilenet_digits_onnx

    calib, evaluation, _ = digits_images(32)
    return mobilenet_digits_onnx(ARTIFACTS)[0], {"input": calib}, {"input": evaluation}, 16


def build_minilm() -> tuple[Path, dict, dict, int]:
    from lowbit.zoo import minilm

    tokenizer = minilm.load_tokenizer()
    evaluation = minilm.text_batch(16, tokenizer=tokenizer)
    calib = minilm.text_batch(32, skip=16, tokenizer=tokenizer)
    return minilm.minilm_onnx(ARTIFACTS), calib, evaluation, 16


def build_gru() -> tuple[Path, dict, dict, int]:
    """A GRU written out step by step (as exporters unroll a fixed-length recurrence): many tiny ops."""
    import torch
    from torch import nn

    from lowbit.zoo.onnx_export import export_to_onnx
    from lowbit.zoo.digits import load_digits_split, train_classifier
    from lowbit.zoo.upscaled_digits import digits_as_rgb

    hidden, steps = 32, 32

    class UnrolledGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_gates = nn.Linear(steps, 3 * hidden)
            self.hidden_gates = nn.Linear(hidden, 3 * hidden)
            self.head = nn.Linear(hidden, 10)

        def forward(self, rows: torch.Tensor) -> torch.Tensor:  # (batch, 1, 32, 32): one row per step
            rows = rows[:, 0]
            state = torch.zeros(rows.shape[0], hidden)
            for t in range(steps):
                gx, gh = self.input_gates(rows[:, t]), self.hidden_gates(state)
                reset = torch.sigmoid(gx[:, :hidden] + gh[:, :hidden])
                update = torch.sigmoid(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
                candidate = torch.tanh(gx[:, 2 * hidden:] + reset * gh[:, 2 * hidden:])
                state = (1 - update) * candidate + update * state
            return self.head(state)

    data = load_digits_split()
    gray = lambda x: digits_as_rgb(x, steps)[:, :1].contiguous()  # noqa: E731  (one channel, 32x32)
    path = ARTIFACTS / "gru_digits.onnx"
    if not path.is_file():
        torch.manual_seed(0)
        model = UnrolledGRU()
        train_classifier(model, gray(data.x_train), data.y_train, epochs=3, seed=0, desc="training GRU")
        export_to_onnx(model.eval(), (torch.zeros(1, 1, steps, steps),), path, input_names=["input"],
                       output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path, {"input": gray(data.x_train[:64]).numpy()}, {"input": gray(data.x_test[:16]).numpy()}, 1


MODELS = {"digits": build_digits, "resnet": build_resnet, "mobilenet": build_mobilenet, "minilm": build_minilm,
          "gru": build_gru}


# ----------------------------------------------------------------------------- the three timings

def quantized(name: str, fp32: Path, calib: dict) -> Path:
    from lowbit.onnx.quantize import quantize_onnx

    path = ARTIFACTS / f"{name}_int8.onnx"
    if not path.is_file():
        quantize_onnx(fp32, path, calib=calib, verify=False)
    return path


def independent(fp32: Path, int8: Path, feed_path: Path, threads: int, runs: int, first_float: bool) -> list[float]:
    """[fp32 ms, int8 ms], each the median of `runs` in a fresh process of its own."""
    medians = {}
    for model in ((fp32, int8) if first_float else (int8, fp32)):
        out = subprocess.run([sys.executable, "-c", WORKER, str(model), str(feed_path), str(threads), str(runs)],
                             capture_output=True, text=True, check=True).stdout
        medians[model] = json.loads(out.strip().splitlines()[-1])["median_ms"]
    return [medians[fp32], medians[int8]]


def spinning_on(fp32: Path, int8: Path, feed: dict, threads: int, repeats: int) -> float:
    """ONNX Runtime's default options (spin-waiting on), interleaved in one process."""
    import onnxruntime as ort

    def session(path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = [session(fp32), session(int8)]
    for _ in range(5):
        for s in sessions:
            s.run(None, feed)
    times: list[list[float]] = [[], []]
    for round_ in range(repeats):
        for i in ((0, 1) if round_ % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append(time.perf_counter() - start)
    return float(np.median(times[0]) / np.median(times[1]))


def check(name: str, threads: int, runs: int, rounds: int) -> dict:
    """`rounds` rounds, each: lowbit's quantize-table timing of the pair, then the two independent
    processes, so both methods see the same load drift; medians over the rounds."""
    import onnx

    from lowbit.onnx.calib_data import CalibrationData
    from lowbit.onnx.session import make_session
    from lowbit.onnx.timing import time_models
    from lowbit.onnx.verify import TIMING_REPEATS, TIMING_WARMUP, batches_with_calls

    fp32, calib, evaluation, batch_size = MODELS[name]()
    int8 = quantized(name, fp32, calib)
    data = CalibrationData(evaluation, onnx.load(fp32), what="evaluation data")
    feed, calls = next(batches_with_calls(data, batch_size))  # the batch compare_models times
    sessions = [make_session(onnx.load(fp32), threads=threads), make_session(onnx.load(int8), threads=threads)]
    lowbit, independent_ms, spin_on = [], [], []
    with tempfile.TemporaryDirectory(prefix="timing-check-") as tmp:
        feed_path = Path(tmp) / "feed.npz"
        np.savez(feed_path, **feed)
        for round_ in range(rounds):
            timing = time_models(sessions, feed, warmup=TIMING_WARMUP, repeats=TIMING_REPEATS)
            lowbit.append(timing.medians_ms)
            independent_ms.append(independent(fp32, int8, feed_path, threads, runs, first_float=round_ % 2 == 0))
            spin_on.append(spinning_on(fp32, int8, feed, threads, TIMING_REPEATS))
    reported = [a / b for a, b in lowbit]
    measured = [a / b for a, b in independent_ms]
    row = {"model": name, "calls_per_run": calls or 1, "threads": threads, "rounds": rounds,
           "lowbit_ms": np.median(lowbit, axis=0).tolist(), "independent_ms": np.median(independent_ms, axis=0).tolist(),
           "reported": float(np.median(reported)), "reported_range": [min(reported), max(reported)],
           "independent": float(np.median(measured)), "independent_range": [min(measured), max(measured)],
           "spin_on": float(np.median(spin_on)), "method": timing.method()}
    row["agreement"] = row["reported"] / row["independent"] - 1
    row["within_10pct"] = abs(row["agreement"]) <= TOLERANCE
    return row


def cold_cache_probe(name: str, threads: int, runs: int = 200) -> str:
    """The fp32 model's median latency three ways in one process (spin-waiting off): alone, back to back;
    alternating run by run with the int8 model; alternating, each timed run after an untimed one."""
    import onnx

    from lowbit.onnx.session import make_session

    fp32, calib, evaluation, batch_size = MODELS[name]()
    first, other = (make_session(onnx.load(p), threads=threads) for p in (fp32, quantized(name, fp32, calib)))
    feed = {k: v[:batch_size] for k, v in evaluation.items()}

    def timed(before: list, block: int = 1) -> float:
        times = []
        for _ in range(runs // block):
            for session in before:
                session.run(None, feed)
            for _ in range(block):
                start = time.perf_counter()
                first.run(None, feed)
                times.append(1000 * (time.perf_counter() - start))
        return float(np.median(times))

    timed([first, other])  # warm-up
    alone, interleaved, settled, turns = timed([]), timed([other]), timed([other, first]), timed([other, first], 3)
    return (f"{name} fp32, {threads} thread(s): alone {alone:.3f} ms; right after the int8 model {interleaved:.3f} ms; "
            f"after the int8 model and an untimed run of its own {settled:.3f} ms; in turns of 1 untimed + 3 timed "
            f"(time_models) {turns:.3f} ms")


def table(rows: list[dict]) -> str:
    lines = ["| model | calls/run | threads | lowbit fp32 / int8 ms | lowbit speedup (range) | independent fp32 / int8 ms "
             "| independent speedup (range) | difference | spin-on, old bench |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (lf, lq), (inf, inq) = r["lowbit_ms"], r["independent_ms"]
        lines.append(f"| {r['model']} | {r['calls_per_run']} | {r['threads']} | {lf:.3f} / {lq:.3f} | "
                     f"{r['reported']:.2f}x ({r['reported_range'][0]:.2f}-{r['reported_range'][1]:.2f}) | "
                     f"{inf:.3f} / {inq:.3f} | {r['independent']:.2f}x ({r['independent_range'][0]:.2f}-"
                     f"{r['independent_range'][1]:.2f}) | {100 * r['agreement']:+.1f}%"
                     f"{'' if r['within_10pct'] else ' (over 10%)'} | {r['spin_on']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lowbit.onnx.session import default_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--runs", type=int, default=30, help="timed runs per independent process")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per model (each: lowbit's timing, then one "
                        "independent process per model)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cold-probe", action="store_true", help="only time each model's fp32 session alone, "
                        "right after the int8 one, and after an untimed run of its own")
    args = parser.parse_args(argv)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if args.cold_probe:
        for name in args.models.split(","):
            print(cold_cache_probe(name, args.threads))
        return 0
    load = os.getloadavg()
    rows = [check(name, args.threads, args.runs, args.rounds) for name in args.models.split(",")]
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()) + f"; {os.cpu_count()} cores")
    print(f"lowbit timing: {rows[0]['method']}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["within_10pct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
