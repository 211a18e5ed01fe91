"""Where the time of one `lowbit quantize` goes: wall, CPU and page faults per phase, from wrappers
around the phase functions (no profiler, so C-heavy and Python-heavy phases are not skewed).

    cd /tmp/scratch && PYTHONPATH=/path/to/lowbit python /path/to/lowbit/bench/quantize_phases.py \\
        quantize MODEL.onnx -o OUT.onnx --calib CALIB --threads 1 --json > /dev/null

Takes the `lowbit` command line; prints the phases (nested ones indented, summed over calls) to
stderr, then whether torch was imported. Phases that a version lacks are left out.
"""

from __future__ import annotations

import functools
import importlib
import resource
import sys
import time

STARTED = time.perf_counter()
PHASES = [  # (module, attribute path): the ONNX quantize path, coarse to fine
    ("lowbit.onnx.quantize", "load_model"), ("lowbit.onnx.preprocess", "infer_shapes"),
    ("lowbit.onnx.preprocess", "optimize_basic"), ("lowbit.onnx.quantize", "CalibrationData"),
    ("lowbit.onnx.pipeline", "StaticPipeline.calibrate"), ("lowbit.onnx.pipeline", "collect_activation_stats"),
    ("lowbit.onnx.statistics", "Ranges.update"), ("lowbit.onnx.statistics", "ChannelMeans.update"),
    ("lowbit.onnx.collect", "_ranges"), ("lowbit.search.auto", "_Scorer.__init__"),
    ("lowbit.search.auto", "_Search.add"), ("lowbit.onnx.pipeline", "StaticPipeline.build"),
    ("lowbit.search.auto", "_Scorer.fidelity"), ("lowbit.search.auto", "_equalization_worth"),
    ("lowbit.search.auto", "_Search.retime_close_calls"), ("lowbit.onnx.quantize", "_check_runs"),
    ("lowbit.onnx.quantize", "save_model"), ("lowbit.onnx.quantize", "compare_models"),
    ("lowbit.onnx.verify", "time_models"),
]
records: list[tuple[int, str, float, float, float, int]] = []
depth = [0]


def wrap(module_name: str, path: str) -> None:
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        depth[0] += 1
        wall, cpu = time.perf_counter(), time.process_time()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            records.append((depth[0], f"{module_name.rsplit('.', 1)[-1]}.{path}", wall - STARTED,
                            time.perf_counter() - wall, time.process_time() - cpu,
                            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))

    setattr(owner, name, timed)


def main() -> int:
    import lowbit.onnx.quantize  # noqa: F401

    imported = time.perf_counter() - STARTED
    for module_name, path in PHASES:
        try:
            wrap(module_name, path)
        except (AttributeError, ImportError):
            pass
    from lowbit.cli import main as lowbit_main

    code = lowbit_main(sys.argv[1:])
    total = time.perf_counter() - STARTED
    print(f"imports {imported:.2f} s; total {total:.2f} s wall, {time.process_time():.2f} s CPU; "
          f"torch imported: {'torch' in sys.modules}", file=sys.stderr)
    summed: dict[tuple[int, str], list] = {}
    for level, name, start, wall, cpu, faults in records:
        entry = summed.setdefault((level, name), [0, 0.0, 0.0, 0, start])
        entry[0] += 1
        entry[1] += wall
        entry[2] += cpu
        entry[3] += faults
    for (level, name), (calls, wall, cpu, faults, start) in sorted(summed.items(), key=lambda kv: kv[1][4]):
        print(f"{'  ' * level}{name:<44} x{calls:<4} wall {wall:6.2f} s  CPU {cpu:6.2f} s  "
              f"faults {faults / 1000:5.0f}k  (first at {start:6.2f} s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
