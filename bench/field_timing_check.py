"""Does lowbit's claimed speedup and the field bench's timing differ because of the method or the
feeds? For one corpus model and a written model, in ONE process, rounds interleaved: the quantize
table's timing (`lowbit.onnx.timing.time_models`, adaptive, up to 3 s per model, on the calls it
times: the first calibration call when all calls have one shape, else up to 8 evenly spaced) on
the calibration calls and on as many evaluation calls, and the bench's timing (`field.time_models`,
3 warm-up passes, SPEED_PASSES passes, median) on its evaluation pass and on the calibration calls.
Same options everywhere (1 intra-op thread, spin-waiting off).

    PYTHONPATH=. /work/venvs/field-bench/bin/python bench/field_timing_check.py nudenet-320n \\
        --workdir /tmp/lowbit-field --rounds 6

Needs a finished `bench/field.py` run in --workdir (calibration calls and the tool's written model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import field  # noqa: E402
import field_corpus as corpus  # noqa: E402

from lowbit.onnx import timing  # noqa: E402
from lowbit.onnx.timing import (TABLE_MAX_SECONDS, TABLE_MIN_SECONDS, TABLE_PRECISION, evenly_spaced,  # noqa: E402
                                representative_feeds, time_models)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=list(corpus.BY_NAME))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tool", default="lowbit", help="whose written model to time against fp32")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--before", action="store_true",
                        help="also time with the methods before session 7 (table: 1+3 turns, 3 s; bench: 7 passes)")
    args = parser.parse_args()
    model, workdir = corpus.BY_NAME[args.model], Path(args.workdir)
    fp32, written = model.path(workdir), workdir / model.name / f"{args.tool}.onnx"
    calib = [dict(np.load(f)) for f in sorted((workdir / model.name / "calib").glob("*.npz"))]
    _, evals = corpus.run_pipeline(model, fp32, workdir, model.make_items("eval", model.eval_count))
    table_calib = representative_feeds(calib)
    table_eval = [evals[i] for i in evenly_spaced(len(evals), len(table_calib))] if len(table_calib) > 1 \
        else [evals[0]]
    bench_eval = field.speed_feeds(fp32, evals)
    sessions = [corpus.open_session(fp32), corpus.open_session(written)]

    def table(feeds):
        return time_models(sessions, feeds, warmup=2, repeats=10, min_seconds=TABLE_MIN_SECONDS,
                           precision=TABLE_PRECISION, max_seconds=TABLE_MAX_SECONDS).speedup

    def table_before(feeds):
        """The quantize table until session 7: turns of 1 untimed + 3 timed runs, 3 s per model (at most 300 runs)."""
        saved = timing.UNTIMED_PER_TURN, timing.RUNS_PER_TURN
        timing.UNTIMED_PER_TURN, timing.RUNS_PER_TURN = 1, 3
        try:
            return time_models(sessions, feeds, warmup=2, repeats=10, min_seconds=3.0).speedup
        finally:
            timing.UNTIMED_PER_TURN, timing.RUNS_PER_TURN = saved

    def bench(feeds, passes=field.SPEED_PASSES):
        seconds = field.time_models({"fp32": fp32, "written": written}, feeds, passes)
        return seconds["fp32"] / seconds["written"]

    cases = {f"quantize table, {len(table_calib)} calibration call(s)": (table, table_calib),
             f"quantize table, {len(table_eval)} evaluation call(s)": (table, table_eval),
             f"bench, {len(bench_eval)} evaluation calls": (bench, bench_eval),
             f"bench, {len(calib)} calibration calls": (bench, calib)}
    if args.before:
        cases.update({f"table before (1+3 turns, 3 s), {len(table_calib)} calib call(s)": (table_before, table_calib),
                      f"bench before (7 passes), {len(bench_eval)} evaluation calls":
                          (lambda feeds: bench(feeds, 7), bench_eval)})
    results: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.rounds):
        for name, (method, feeds) in cases.items():
            results[name].append(method(feeds))
        print(f"round {round_ + 1}: " + ", ".join(f"{v[-1]:.2f}x" for v in results.values()), flush=True)
    print(f"{model.name}, {args.tool} vs fp32, {args.rounds} rounds (median, range, median absolute deviation "
          "of the rounds from their median):")
    for name, values in results.items():
        middle = statistics.median(values)
        spread = statistics.median(abs(v / middle - 1) for v in values)
        print(f"  {name:<58} {middle:.3f}x ({min(values):.2f}-{max(values):.2f}, MAD {100 * spread:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
