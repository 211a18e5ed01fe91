""""Quantize only this layer": each weighted layer of a quantized model, quantized alone.

For every node whose weight the stored plan quantized, the float model is quantized again with
`quantize_onnx(..., exclude=every other node)`, with the plan's mode, calibration method and
weight granularity, and the final outputs are compared with the float model on ONNX Runtime. The
layers whose solo quantization costs the most output cosine are the ones to keep in higher
precision. Each layer costs one calibration and one evaluation pass, so the sweep stops starting
new layers when the next one would overrun `time_limit`, and lists the layers it did not reach.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.io import load_model
from lowbit.onnx.planner import node_names
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import ensure_opset
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.onnx.verify import compare_models


@dataclass
class LayerResult:
    node: str
    op_type: str
    cosine: float  # worst output's mean per-sample cosine vs float, this layer alone quantized
    cosine_min: float
    top1_agreement: float | None
    seconds: float
    quantized_weights: int  # weights the solo run quantized (1 unless the node shares a weight)


@dataclass
class SweepReport:
    results: list[LayerResult]
    not_reached: list[str]
    time_limit: float
    full_model_cosine: float | None
    notes: list[str] = field(default_factory=list)

    def ranked(self) -> list[LayerResult]:
        return sorted(self.results, key=lambda r: r.cosine)

    def to_dict(self) -> dict:
        return {"ranked": [asdict(r) for r in self.ranked()], "not_reached": self.not_reached,
                "time_limit_s": self.time_limit, "full_model_cosine": self.full_model_cosine, "notes": self.notes}

    def text(self) -> str:
        lines = ["quantize-only-this-layer sweep (final-output cosine vs float; worst first)"]
        if self.full_model_cosine is not None:
            lines.append(f"  whole quantized model: cosine {self.full_model_cosine:.5f}")
        width = min(56, max([len(r.node) for r in self.results] + [5]))
        lines.append(f"  {'layer':<{width}} {'op':<10} {'cosine':>9} {'worst':>9} {'top-1':>8} {'s':>6}")
        for r in self.ranked():
            top1 = "-" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f}%"
            lines.append(f"  {r.node[-width:]:<{width}} {r.op_type:<10} {r.cosine:>9.5f} {r.cosine_min:>9.5f} "
                         f"{top1:>8} {r.seconds:>6.1f}")
        if self.not_reached:
            lines.append(f"  time limit {self.time_limit:g} s reached; not measured: {', '.join(self.not_reached)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def quantize_only_sweep(float_path: str | os.PathLike, quant_path: str | os.PathLike, *,
                        calib: str | os.PathLike | dict, eval_data: str | os.PathLike | dict | None = None,
                        samples: int | None = None, batch_size: int = 16, threads: int | None = None,
                        time_limit: float = 300.0) -> SweepReport:
    """Quantize each weighted layer of the plan stored in `quant_path` alone (see module docstring)."""
    if time_limit <= 0:
        raise LowbitError(f"--time-limit must be a positive number of seconds, got {time_limit:g}")
    started = time.perf_counter()
    plan = read_plan(load_model(quant_path))
    if plan.mode not in ("static", "dynamic"):
        raise LowbitError(f"{quant_path} was quantized in {plan.mode} mode; the sweep re-quantizes layers in "
                          "static or dynamic int8 mode only")
    reference = preprocess(ensure_opset(load_model(float_path)))
    node_names(reference)  # the names quantize_onnx gives unnamed nodes, so exclusions match
    op_types = {n.name: n.op_type for n in reference.graph.node}
    layers = [n for n in dict.fromkeys(node for e in plan.quantized("weight") for node in e.nodes) if n in op_types]
    if not layers:
        raise LowbitError(f"no quantized weight of {quant_path} belongs to a node of {float_path}; pass the float "
                          "model it was quantized from")
    eval_data = calib if eval_data is None else eval_data
    evaluation = CalibrationData(eval_data, load_model(float_path), samples=samples, what="evaluation data")
    full = compare_models(float_path, quant_path, evaluation, batch_size=batch_size, threads=threads, speed=False)
    report = SweepReport([], [], time_limit, min((o.cosine_mean for o in full.outputs), default=None))
    settings = {"mode": plan.mode, "calib_method": plan.settings.get("calib_method") or "auto",
                "per_channel": bool(plan.settings.get("per_channel", True))}
    with tempfile.TemporaryDirectory(prefix="lowbit-sweep-") as tmp:
        for i, layer in enumerate(layers):
            elapsed = time.perf_counter() - started
            average = sum(r.seconds for r in report.results) / max(1, len(report.results))
            if report.results and elapsed + average > time_limit or elapsed > time_limit:
                report.not_reached = layers[i:]
                break
            report.results.append(_solo(float_path, Path(tmp) / f"layer{i}.onnx", layer, op_types, settings,
                                        calib, eval_data, samples, batch_size, threads, report.notes))
    return report


def _solo(float_path, output: Path, layer: str, op_types: dict[str, str], settings: dict, calib, eval_data,
          samples, batch_size, threads, notes: list[str]) -> LayerResult:
    started = time.perf_counter()
    exclude = [name for name in op_types if name != layer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibration warnings were shown when the full model was quantized
        result = quantize_onnx(float_path, output, mode=settings["mode"],
                               calib=calib if settings["mode"] == "static" else None,
                               calib_method=settings["calib_method"], per_channel=settings["per_channel"],
                               exclude=exclude, samples=samples, batch_size=batch_size, eval_data=eval_data,
                               measure_speed=False, threads=threads, smooth=False)
    if not result.plan.quantized("weight"):
        notes.append(f"{layer}: nothing was quantized when it was the only layer allowed")
    outputs = result.report.outputs
    worst = min(outputs, key=lambda o: o.cosine_mean)
    top1 = next((o.top1_agreement for o in outputs if o.top1_agreement is not None), None)
    output.unlink(missing_ok=True)
    return LayerResult(layer, op_types[layer], worst.cosine_mean, min(o.cosine_min for o in outputs), top1,
                       time.perf_counter() - started, len(result.plan.quantized("weight")))
