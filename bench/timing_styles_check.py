"""Do the quantize table's turns and the field bench's passes measure the same speedup? In ONE
process, every round times fp32 and the written model in each style back to back (order
alternating), so all styles see the same seconds of machine load and differ only by method:

  turn U+T     U untimed runs, then T timed runs of one call (`lowbit.onnx.timing`: 3+6; before: 1+3)
  pass N       one pass over N recorded calls, mean latency per call (`bench/field.py`)

Prints, per style, the median of the per-round speedups and the ratio of the medians.

    PYTHONPATH=. /work/venvs/field-bench/bin/python bench/timing_styles_check.py captcha-crnn \\
        --workdir /tmp/lowbit-field --rounds 40

Needs a finished `bench/field.py` run in --workdir (calibration calls and the tool's written model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import field  # noqa: E402
import field_corpus as corpus  # noqa: E402


def turn(session, feed: dict, untimed: int, timed: int) -> list[float]:
    for _ in range(untimed):
        session.run(None, feed)
    latencies = []
    for _ in range(timed):
        start = time.perf_counter()
        session.run(None, feed)
        latencies.append(time.perf_counter() - start)
    return latencies


def one_pass(session, feeds: list[dict]) -> list[float]:
    start = time.perf_counter()
    for feed in feeds:
        session.run(None, feed)
    return [(time.perf_counter() - start) / len(feeds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=list(corpus.BY_NAME))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--written", help="the written model (default: WORKDIR/MODEL/lowbit.onnx)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    model, workdir = corpus.BY_NAME[args.model], Path(args.workdir)
    fp32 = model.path(workdir)
    written = Path(args.written) if args.written else workdir / model.name / "lowbit.onnx"
    calib = [dict(np.load(f)) for f in sorted((workdir / model.name / "calib").glob("*.npz"))]
    _, evals = corpus.run_pipeline(model, fp32, workdir, model.make_items("eval", model.eval_count))
    bench_eval = field.speed_feeds(fp32, evals)
    sessions = [corpus.open_session(fp32), corpus.open_session(written)]
    styles = {"turn 3+6, calibration call 0": lambda s: turn(s, calib[0], 3, 6),
              "turn 1+3, calibration call 0": lambda s: turn(s, calib[0], 1, 3),
              "turn 3+6, evaluation call 0": lambda s: turn(s, bench_eval[0], 3, 6),
              f"pass {len(bench_eval)} evaluation calls": lambda s: one_pass(s, bench_eval),
              f"pass {len(calib)} calibration calls": lambda s: one_pass(s, calib),
              "pass 30 x calibration call 0": lambda s: one_pass(s, [calib[0]] * 30)}
    for session in sessions:
        for feed in calib[:3]:
            session.run(None, feed)
    latencies = {name: ([], []) for name in styles}
    ratios: dict[str, list[float]] = {name: [] for name in styles}
    for round_ in range(args.rounds):
        for name, style in styles.items():
            got = {}
            for i in (0, 1) if round_ % 2 == 0 else (1, 0):
                got[i] = style(sessions[i])
                latencies[name][i].extend(got[i])
            ratios[name].append(float(np.median(got[0]) / np.median(got[1])))
    print(f"{model.name}, {written.name} vs fp32, {args.rounds} rounds, 1 thread: median of the per-round "
          "speedups, ratio of medians, fp32 / written ms")
    for name in styles:
        first, second = (float(np.median(v)) for v in latencies[name])
        print(f"  {name:<34} {np.median(ratios[name]):.3f}x  {first / second:.3f}x  "
              f"{1000 * first:.2f} / {1000 * second:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
