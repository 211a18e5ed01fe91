"""What a report shows, measured: plan, fidelity/size/speed, sensitivity, and per-tensor histograms
with the int8 grid and its clipping error (seed 004: a value beyond the grid's last level
saturates, 1.62 comes back as 1.106; here that error is measured for every quantized tensor).

Weights are read from the pre-processed float model and checked against the quantized model's
stored integers, so a weight rescaled before quantization (SmoothQuant, equalization) is listed
as not comparable instead of being drawn against the wrong grid. Activation histograms are
streamed from the float model over the data (re-binning histograms, `lowbit.onnx.statistics`:
memory-bounded chunks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.analysis.sensitivity import SensitivityReport, layer_sensitivity
from lowbit.numerics import QParams, expand_to, fake_quantize
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.graph_index import values_of
from lowbit.onnx.io import load_model
from lowbit.onnx.pipeline import prepare_model
from lowbit.onnx.statistics import Histograms
from lowbit.onnx.statistics import collect as collect_statistics
from lowbit.onnx.stored_plan import read_plan
from lowbit.onnx.verify import VerifyReport, compare_models
from lowbit.plan import PlanEntry, QuantPlan
from lowbit.search.sweep import SweepReport

BINS = 80


@dataclass
class TensorHistogram:
    tensor: str
    role: str
    nodes: list[str]
    edges: np.ndarray
    counts: np.ndarray
    grid: np.ndarray  # representable values, in the histogram's x units
    clip: tuple[float, float]  # lowest and highest representable value
    x_label: str
    clipped: float  # share of values that saturate (error above half a step)
    rounding_mse: float
    clipping_mse: float
    sqnr_db: float | None


@dataclass
class ReportContent:
    title: str
    float_path: str
    quant_path: str
    plan: QuantPlan
    verify: VerifyReport | None
    sensitivity: SensitivityReport | None = None
    histograms: list[TensorHistogram] = field(default_factory=list)
    not_drawn: dict[str, str] = field(default_factory=dict)  # tensor -> why no histogram
    budget: object | None = None  # lowbit.search.budget.BudgetResult
    sweep: SweepReport | None = None  # quantize only this layer
    all_but: SweepReport | None = None  # all but this layer
    notes: list[str] = field(default_factory=list)
    auto: object | None = None  # lowbit.search.auto.AutoReport: the candidates --mode auto measured


def collect(float_path: str | os.PathLike, quant_path: str | os.PathLike, data, *, verify: VerifyReport | None = None,
            sensitivity: SensitivityReport | None = None, budget=None, sweep: SweepReport | None = None,
            all_but: SweepReport | None = None, samples: int | None = None, batch_size: int = 16,
            threads: int | None = None, measure_speed: bool = True, auto=None) -> ReportContent:
    """Measure everything the report shows that the caller did not already measure (the sweeps are
    shown when given, never run here: they cost one evaluation per layer)."""
    plan = read_plan(quant_path)
    inputs = model_inputs(load_model(float_path))  # the float model is loaded again when needed: not held meanwhile
    dataset = CalibrationData(data, inputs, samples=samples, what="report data") if data is not None else None
    if verify is None and dataset is not None:
        verify = compare_models(float_path, quant_path, dataset, batch_size=batch_size, threads=threads,
                                speed=measure_speed)
    content = ReportContent(f"lowbit report: {Path(quant_path).name}", str(float_path), str(quant_path), plan, verify,
                            sensitivity, budget=budget, sweep=sweep, all_but=all_but, auto=auto)
    if plan.mode in ("static", "dynamic") and dataset is not None and content.sensitivity is None:
        content.sensitivity = layer_sensitivity(float_path, quant_path, data, samples=samples, batch_size=batch_size,
                                                threads=threads)
    reference = prepare_model(load_model(float_path), copy=False)
    quant = load_model(quant_path)
    _weight_histograms(content, reference, quant)
    if plan.mode == "static" and dataset is not None:
        skipped = {t.tensor: t.skipped for t in content.sensitivity.tensors if t.skipped}
        _activation_histograms(content, reference, dataset, skipped, batch_size, threads)
    return content


def _weight_histograms(content: ReportContent, reference: onnx.ModelProto, quant: onnx.ModelProto) -> None:
    inits = {t.name: t for t in reference.graph.initializer}
    stored = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    for entry in content.plan.quantized("weight"):
        if entry.qparams is None or entry.qparams.spec.dtype_info.is_float or entry.tensor not in inits:
            continue
        values = numpy_helper.to_array(inits[entry.tensor]).astype(np.float32)
        integers = stored.get(f"{entry.tensor}_quantized")
        if integers is None or integers.shape != values.shape or not _matches(values, integers, entry.qparams, stored,
                                                                            entry.tensor):
            content.not_drawn[entry.tensor] = "rescaled before quantization (SmoothQuant or equalization)"
            continue
        content.histograms.append(_from_values(entry, values))


def _matches(values: np.ndarray, integers: np.ndarray, qp: QParams, stored: dict, name: str) -> bool:
    """The stored integers dequantize to the fake-quantized float weight (any zero-point shift
    applied for ONNX Runtime's kernels cancels out)."""
    scale = expand_to(np.asarray(stored[f"{name}_scale"], np.float32), values.shape, qp.spec)
    zero = expand_to(np.asarray(stored[f"{name}_zero_point"], np.int32), values.shape, qp.spec)
    dequantized = (integers.astype(np.int32) - zero) * scale
    return bool(np.allclose(dequantized, fake_quantize(values, qp), atol=1e-6 * float(np.max(scale)) + 1e-12))


def _from_values(entry: PlanEntry, values: np.ndarray) -> TensorHistogram:
    qp, spec = entry.qparams, entry.qparams.spec
    error = values - np.asarray(fake_quantize(values, qp))
    scale = expand_to(np.asarray(qp.scale, np.float32), values.shape, spec)
    zero = expand_to(np.asarray(qp.zero_point, np.float32), values.shape, spec)
    steps = values / scale + zero  # position on the integer grid
    clipped = (steps < spec.qmin - 0.5) | (steps > spec.qmax + 0.5)
    if np.asarray(qp.scale).size == 1:  # per-tensor: draw real values
        x, s, z = values, float(np.asarray(qp.scale).ravel()[0]), float(np.asarray(qp.zero_point).ravel()[0])
        grid, label = (np.arange(spec.qmin, spec.qmax + 1) - z) * s, "weight value"
        clip = ((spec.qmin - z) * s, (spec.qmax - z) * s)
    else:  # per-channel: every channel has its own grid; draw in grid steps, where all coincide
        x, grid, label = steps, np.arange(spec.qmin, spec.qmax + 1, dtype=np.float64), "weight / channel scale (grid steps)"
        clip = (float(spec.qmin), float(spec.qmax))
    counts, edges = np.histogram(x, bins=BINS)
    signal, noise = float((values.astype(np.float64) ** 2).sum()), float((error.astype(np.float64) ** 2).sum())
    return TensorHistogram(entry.tensor, "weight", list(entry.nodes), edges, counts.astype(np.float64), grid, clip,
                           label, float(clipped.mean()), float((error[~clipped] ** 2).sum() / error.size),
                           float((error[clipped] ** 2).sum() / error.size), _db(signal, noise))


def _activation_histograms(content: ReportContent, reference: onnx.ModelProto, data: CalibrationData,
                           skipped: dict[str, str], batch_size: int, threads: int | None) -> None:
    produced = values_of(reference.graph)
    entries = []
    for entry in content.plan.quantized("activation"):
        if entry.qparams is None or entry.shares is not None:
            continue  # shape ops reuse their input's grid, drawn there
        if entry.tensor in skipped or entry.tensor not in produced:
            content.not_drawn[entry.tensor] = skipped.get(entry.tensor, "no tensor of this name in the float model")
            continue
        entries.append(entry)
    if not entries:
        return
    histograms = Histograms([e.tensor for e in entries], bins=2048)
    collect_statistics(reference, data.batches(batch_size), [histograms], threads=threads)
    observers = histograms.observers
    for entry in entries:
        snapshot = observers[entry.tensor].histogram_snapshot()
        if snapshot is None or snapshot.total == 0:
            content.not_drawn[entry.tensor] = "no finite values seen"
            continue
        content.histograms.append(_from_histogram(entry, snapshot))


def _from_histogram(entry: PlanEntry, snapshot) -> TensorHistogram:
    qp, spec = entry.qparams, entry.qparams.spec
    s, z = float(np.asarray(qp.scale).ravel()[0]), float(np.asarray(qp.zero_point).ravel()[0])
    centers = 0.5 * (snapshot.edges[:-1] + snapshot.edges[1:])
    counts = snapshot.counts
    steps = centers / s + z
    clipped = (steps < spec.qmin - 0.5) | (steps > spec.qmax + 0.5)
    error2 = (centers - (np.clip(np.rint(steps), spec.qmin, spec.qmax) - z) * s) ** 2
    # Inside the grid, the rounding error of values spread over a bin averages step^2 / 12.
    error2 = np.where(clipped, error2, s * s / 12)
    total = counts.sum()
    used = np.flatnonzero(counts)  # growth slack leaves empty bins at the ends: draw the data only
    shown = counts[used[0]:used[-1] + 1]
    group = -(-shown.size // BINS)
    merged = np.concatenate([shown, np.zeros((-shown.size) % group)]).reshape(-1, group).sum(1)
    edges = snapshot.edges[used[0]] + snapshot.width * group * np.arange(merged.size + 1)
    signal = float((counts * centers ** 2).sum())
    noise = float((counts * error2).sum())
    return TensorHistogram(entry.tensor, "activation", list(entry.nodes), edges, merged,
                           (np.arange(spec.qmin, spec.qmax + 1) - z) * s, ((spec.qmin - z) * s, (spec.qmax - z) * s),
                           "activation value", float(counts[clipped].sum() / total),
                           float((counts * error2)[~clipped].sum() / total),
                           float((counts * error2)[clipped].sum() / total), _db(signal, noise))


def _db(signal: float, noise: float) -> float | None:
    if noise <= 0:
        return None
    return 10 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")
