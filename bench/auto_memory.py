"""Resident memory of one `quantize_onnx` run over time, by step: which step reaches the peak.

Samples VmRSS every 5 ms in a thread while `quantize_onnx` runs (no verification), and records
the RSS as each step starts and ends (prepare, calibrate, the candidate scorer, each candidate's
build / fidelity / timing, the re-timing, the final load check and save). Prints the peak, the step
it fell in and VmHWM; with --steps, the timeline. One run per process (peaks do not mix).

    python bench/auto_memory.py MODEL.onnx CALIB.npz --mode auto --steps
    python bench/auto_memory.py MODEL.onnx CALIB.npz --mode static
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", action="store_true", help="print the RSS at every step's start and end")
    args = parser.parse_args(argv)

    import onnxruntime  # noqa: F401  (the baseline includes the runtime, as bench/ptq_onnx.py's does)

    import lowbit.onnx.pipeline as pipeline
    import lowbit.onnx.quantize as quantize
    import lowbit.search.auto as auto
    from lowbit.onnx.config import config_for_mode

    step, events, samples, done = ["start"], [], [], threading.Event()

    def watch(owner, name: str, label: str) -> None:
        function = getattr(owner, name)

        def watched(*a, **k):
            step.append(label + ">")
            events.append((time.perf_counter(), label + ">", rss_mb()))
            try:
                return function(*a, **k)
            finally:
                step.append(label + "<")
                events.append((time.perf_counter(), label + "<", rss_mb()))
        setattr(owner, name, watched)

    for owner, name, label in ((quantize, "prepare_model", "prepare"), (pipeline.StaticPipeline, "calibrate", "calibrate"),
                               (pipeline.StaticPipeline, "build", "build"), (auto._Scorer, "__init__", "scorer"),
                               (auto._Scorer, "fidelity", "fidelity"), (auto._Scorer, "speedup", "timing"),
                               (auto._Scorer, "retime", "re-timing"), (quantize, "_check_runs", "load check"),
                               (quantize, "save_model", "save")):
        watch(owner, name, label)

    def sample() -> None:
        while not done.is_set():
            samples.append((rss_mb(), step[-1]))
            time.sleep(0.005)

    baseline = rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = quantize.quantize_onnx(args.model, Path(tmp) / "out.onnx", config_for_mode(args.mode),
                                        calib=args.calib, verify=False, threads=args.threads)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak, at = max(samples)
    hwm = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    print(f"{args.model.name} --mode {args.mode}: {seconds:.1f} s; RSS after imports {baseline:.0f} MB; "
          f"sampled peak {peak:.0f} MB in step '{at}'; VmHWM {hwm:.0f} MB")
    if result.auto is not None:
        print(f"auto kept: {result.auto.winner}")
    if args.steps:
        for when, label, mb in events:
            print(f"  {when - started:7.1f} s  {label:<12} {mb:6.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
