"""Export a lowbit QDQ model to a mobile runtime and prove the file there is the same model.

    report = export_model("model_int8.onnx", "model.pte", data="test.npz")
    print(report.describe())

One pipeline for every target (chosen by the output's extension, `TARGETS`): read the QDQ graph
(`qdq_graph`), let the target refuse what it cannot run natively, write the quantized file and
the target's float export of the same network into a staging folder next to the output, load
both in the target's real runtime, then compare with ONNX Runtime running the QDQ model: top-1
agreement, max abs error in output quantization steps, file sizes, and latency of the quantized
file against the float one (same runtime, same threads, interleaved, median). Only then is the
file renamed into place, so a failed export never leaves a half-written output.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

TARGETS = {".ort": "lowbit.deploy.ort_mobile", ".pte": "lowbit.deploy.executorch", ".tflite": "lowbit.deploy.litert"}
MIN_AGREEMENT = 0.995  # top-1 agreement with ONNX Runtime on the QDQ model
MAX_STEPS = 1.0  # max abs error in output quantization steps
SYNTHETIC_SAMPLES = 64
WARMUP = 5


@dataclass
class DeployReport:
    target: str
    path: str
    precision: str  # "static" or "weight-only"
    samples: int
    top1_agreement: float | None  # None when no output has a class axis
    max_abs_error: float
    output_step: float
    max_error_steps: float
    file_bytes: int
    float_file_bytes: int
    latency_ms: float | None
    float_latency_ms: float | None
    threads: int
    batch: int
    repeats: int
    data: str  # where the parity inputs came from

    @property
    def size_ratio(self) -> float:
        return self.float_file_bytes / max(1, self.file_bytes)

    @property
    def speedup(self) -> float | None:
        if not self.latency_ms or not self.float_latency_ms:
            return None
        return self.float_latency_ms / self.latency_ms

    @property
    def passed(self) -> bool:
        agreement_ok = self.top1_agreement is None or self.top1_agreement >= MIN_AGREEMENT
        return agreement_ok and self.max_error_steps <= MAX_STEPS

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.size_ratio, "speedup": self.speedup, "passed": self.passed}

    def describe(self) -> str:
        agreement = "n/a" if self.top1_agreement is None else f"{100 * self.top1_agreement:.2f}%"
        lines = [
            f"Wrote {self.path} ({self.target}, {self.precision} quantization, lowbit's scales)",
            f"  parity with ONNX Runtime (QDQ model): {'PASS' if self.passed else 'FAIL'}: top-1 agreement "
            f"{agreement} on {self.samples} samples ({self.data}), max |error| {self.max_abs_error:.3g} = "
            f"{self.max_error_steps:.2f} output steps (limits {100 * MIN_AGREEMENT:g}%, {MAX_STEPS:g} step)",
            f"  file: {self.file_bytes:,} B vs {self.float_file_bytes:,} B for the float export "
            f"({self.size_ratio:.2f}x smaller)",
        ]
        if self.speedup is not None:
            lines.append(f"  latency, batch {self.batch}: {self.latency_ms:.3f} ms vs float {self.float_latency_ms:.3f} ms "
                         f"-> {self.speedup:.2f}x ({self.threads} thread(s), median of {self.repeats} interleaved "
                         "runs in the same runtime)")
        return "\n".join(lines)


def target_for(path: str | Path) -> ModuleType:
    """The target module for an output path, by extension; unknown extensions are user errors."""
    suffix = Path(path).suffix.lower()
    if suffix not in TARGETS:
        raise LowbitError(f"cannot tell the target runtime from {str(path)!r}; name the output "
                          f"{' / '.join('OUT' + s for s in TARGETS)} (ORT Mobile, ExecuTorch, LiteRT)")
    return importlib.import_module(TARGETS[suffix])


def missing_extra(target: ModuleType) -> str | None:
    """One sentence naming the extra to install when the target's packages are absent, else None."""
    if target.EXTRA is None or importlib.util.find_spec(target.MODULE) is not None:
        return None
    return f"exporting to {target.SUFFIX} needs {target.NAME}; install it with pip install 'lowbit[{target.EXTRA}]'"


def export_model(model_path: str | Path, output: str | Path, *, data: Any = None, samples: int = 256,
                 batch: int = 1, threads: int = 1, repeats: int = 20, measure_speed: bool = True,
                 float_output: str | Path | None = None) -> DeployReport:
    """Convert the lowbit QDQ model at `model_path` to `output` (.ort / .pte / .tflite) and verify it.

    data: parity inputs, an .npz (or a dict of arrays) keyed by input name, samples on axis 0; by
    default `SYNTHETIC_SAMPLES` standard-normal samples. The output has a fixed batch of `batch`.
    float_output: also keep the target's float export there (the reference for on-device ratios)."""
    from lowbit.deploy.qdq_graph import read_qdq_graph
    from lowbit.onnx.io import load_model
    from lowbit.onnx.timing import time_models

    model_path, output = Path(model_path), Path(output)
    target = target_for(output)
    sentence = missing_extra(target)
    if sentence:
        raise LowbitError(sentence)
    _check_output(model_path, output)
    if float_output is not None:
        float_output = Path(float_output)
        _check_output(model_path, float_output)
        if float_output.resolve() == output.resolve() or target_for(float_output) is not target:
            raise LowbitError(f"--float-output {float_output} must be another {target.SUFFIX} file than the output")
    if batch < 1 or threads < 1 or repeats < 1:
        raise LowbitError("--batch, --threads and --repeats must be at least 1")
    model = load_model(model_path)
    graph = read_qdq_graph(model, str(model_path))
    target.check(graph)
    feeds, data_label = parity_batches(model, data, samples, batch)
    names = list(graph.inputs)

    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        staged, float_path = staging / output.name, staging / f"float{target.SUFFIX}"
        _convert(target, graph, model, feeds[0], staged, as_float=False)
        _convert(target, graph, model, feeds[0], float_path, as_float=True)
        if hasattr(target, "set_threads"):
            target.set_threads(threads)
        runner = target.load(staged, threads, names)
        float_runner = target.load(float_path, threads, names)
        parity = compare_outputs(model, graph, runner, feeds, threads)
        latency = float_latency = None
        if measure_speed:
            float_latency, latency = time_models([float_runner, runner], feeds[0], threads=threads, warmup=WARMUP,
                                                 repeats=repeats).medians_ms
        report = DeployReport(target=target.NAME, path=str(output), precision=graph.precision, **parity,
                              file_bytes=staged.stat().st_size, float_file_bytes=float_path.stat().st_size,
                              latency_ms=latency, float_latency_ms=float_latency, threads=threads, batch=batch,
                              repeats=repeats, data=data_label)
        staged.replace(output)
        if float_output is not None:
            float_path.replace(float_output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _check_output(model_path: Path, output: Path) -> None:
    if output.is_dir():
        raise LowbitError(f"output {output} is a directory; give a file name such as {output / 'model.pte'}")
    if not output.parent.is_dir():
        raise LowbitError(f"the folder for output {output} does not exist; create {output.parent} first")
    if output.resolve() == model_path.resolve() or (output.exists() and model_path.exists()
                                                    and output.samefile(model_path)):
        raise LowbitError(f"output {output} is the input model; choose a different output path "
                          "(lowbit never overwrites its input)")


def _convert(target: ModuleType, graph: Any, model: Any, example: dict[str, np.ndarray], path: Path, *,
             as_float: bool) -> None:
    try:
        target.write(graph, model, example, path, as_float=as_float)
    except LowbitError:
        raise
    except Exception as exc:  # the target's converter refused the graph: a limit of that target
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LowbitError(f"the {target.NAME} converter cannot convert this model ({type(exc).__name__}: "
                          f"{first}); it supports {target.PRECISIONS}") from None


def parity_batches(model: Any, data: Any, samples: int, batch: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """Input batches of exactly `batch` samples, from `data` or generated; and where they came from."""
    from lowbit.onnx.calib_data import CalibrationData, model_inputs

    if data is None:
        from lowbit.analysis.feeds import synthetic_feed

        shapes = {sig.name: (batch, *[d or 1 for d in (sig.shape or ())[1:]]) for sig in model_inputs(model)}
        count = max(1, min(samples, SYNTHETIC_SAMPLES) // batch)
        return [synthetic_feed(model, shapes, seed=i) for i in range(count)], "synthetic normal inputs"
    source = CalibrationData(data, model, samples=samples, what="parity data")
    feeds = [b for b in source.batches(batch) if next(iter(b.values())).shape[0] == batch]
    if not feeds:
        raise LowbitError(f"the parity data has fewer than --batch {batch} samples; give more samples or a "
                          "smaller --batch")
    label = str(data) if isinstance(data, (str, Path)) else "given inputs"
    return feeds, label


def compare_outputs(model: Any, graph: Any, runner: Any, feeds: list[dict[str, np.ndarray]],
                    threads: int) -> dict[str, Any]:
    """Parity of `runner` with ONNX Runtime on the QDQ model, over all batches and every output.

    The error is counted in output quantization steps: the scale of the output's own grid when
    the model quantizes it, else its range over the data / 255 (the step an 8-bit grid would have)."""
    from lowbit.onnx.session import make_session

    session = make_session(model, threads=threads)
    expected: list[list[np.ndarray]] = []
    got: list[list[np.ndarray]] = []
    for feed in feeds:
        expected.append(session.run(None, feed))
        got.append([np.asarray(g, dtype=np.float32) for g in runner.run(None, feed)])
    grids = {op.outputs[0]: op.grid for op in graph.ops if op.op_type == "FakeQuant"}
    agreements, worst, worst_steps, step_used = [], 0.0, -1.0, 0.0
    for index, name in enumerate(graph.outputs):
        reference = np.concatenate([np.asarray(e[index], dtype=np.float32) for e in expected])
        result = np.concatenate([g[index].reshape(e[index].shape) for g, e in zip(got, expected)])
        error = float(np.abs(reference - result).max()) if reference.size else 0.0
        step = float(grids[name].scale) if name in grids else float(reference.max() - reference.min()) / 255
        steps = error / step if step > 0 else (0.0 if error == 0 else float("inf"))
        if steps > worst_steps:
            worst, worst_steps, step_used = error, steps, step
        if reference.ndim >= 2 and reference.shape[-1] > 1:
            agreements.append(float((reference.argmax(-1) == result.argmax(-1)).mean()))
    samples = sum(next(iter(f.values())).shape[0] for f in feeds)
    return {"samples": samples, "top1_agreement": min(agreements) if agreements else None,
            "max_abs_error": worst, "output_step": step_used, "max_error_steps": max(worst_steps, 0.0)}


def export_mobile(model: Any, example_inputs: Any, path: str | Path, *, check_data: Any = None,
                  batch: int = 1, threads: int = 1, repeats: int = 20, measure_speed: bool = True) -> DeployReport:
    """QAT path: a prepared, calibrated PyTorch model (eval mode) -> .ort / .pte / .tflite.

    The model goes through `lowbit.torch.export_onnx` (QDQ ONNX with its parity check against
    PyTorch), then through `export_model`, so the mobile file carries the QAT model's own scales.
    `check_data` (tensor or tuple of tensors, samples on axis 0) feeds both parity checks."""
    import torch

    from lowbit.torch.export import export_onnx
    from lowbit.torch.qat import as_input_tuple

    target = target_for(path)
    sentence = missing_extra(target)
    if sentence:  # before the ONNX export: fail in a second, not after it
        raise LowbitError(sentence)
    with tempfile.TemporaryDirectory(prefix="lowbit-export-") as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        export_onnx(model, example_inputs, onnx_path, check_data=check_data, check_fusion=False)
        data = None
        if check_data is not None:
            tensors = as_input_tuple(check_data, "parity check inputs")
            names = ["input"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
            data = {name: torch.as_tensor(t).detach().numpy() for name, t in zip(names, tensors)}
        return export_model(onnx_path, path, data=data, samples=len(next(iter(data.values()))) if data else 256,
                            batch=batch, threads=threads, repeats=repeats, measure_speed=measure_speed)
