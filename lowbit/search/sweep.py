"""Per-layer sweeps over the weighted layers of a quantized model, measured on ONNX Runtime.

- "solo" (quantize only this layer): every other node stays float; the layers whose solo
  quantization costs the most output cosine are the ones that cannot take int8 on their own.
- "all-but" (all but this layer): everything the stored plan quantized stays quantized except this
  layer; its *recovery* (metric with the layer float minus metric of the fully quantized model)
  says how much falling it back to float would buy in the model as deployed, interactions with
  the rest of the int8 graph included. Layers that read the same quantized activation (a
  transformer's Q/K/V projections) share its Q/DQ pair, so one of them alone recovers only its
  own weight error; the budget search (`budget.py`) falls such groups back together.

Both sweeps rebuild each variant from the float model with the stored plan's mode, calibration
method and weight granularity (static: the user's --exclude patterns, and a budget search's
fallbacks, stay float too). Cross-layer equalization and SmoothQuant are replayed once, as stored
(exact in float but for the ReLU6 links equalization turns into ReLU, so a layer kept float
computes what it computes in the stored model); bias correction
depends on which layers are int8 and is not replayed (a note says so). Calibration runs once:
activation ranges are per-tensor statistics of the float model, so every variant reuses them, and
a variant equals what `quantize_onnx(..., exclude=...)` writes (apart from smoothing scales, which
that would recompute without the excluded layer). Ranges the stored plan recorded replace the
fresh ones, so the fully quantized variant is the stored model itself (a budget search's per-tensor
range choices included), whatever batch size the sweep calibrates with. A variant then costs one
plan build, one write and one evaluation pass against float outputs computed once. Each sweep
stops starting new layers when the next one would overrun `time_limit`, and lists the layers it
did not reach.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.config import StaticConfig
from lowbit.onnx.io import load_model
from lowbit.onnx.passes.bias_correction import BiasCorrectionRecord
from lowbit.onnx.passes.outlier_split import OutlierSplitRecord
from lowbit.onnx.pipeline import StaticPipeline, prepare_model
from lowbit.onnx.dynamic import plan_dynamic
from lowbit.onnx.session import make_session
from lowbit.onnx.stored_plan import StoredSettings, read_plan
from lowbit.onnx.verify import cosine_per_row, looks_like_class_scores
from lowbit.plan import QuantPlan
from lowbit.progress import progress

KINDS = ("solo", "all-but")


@dataclass
class Fidelity:
    """A model's outputs vs the float model's over the evaluation data."""

    cosine: float  # worst output's mean per-sample cosine
    cosine_min: float  # worst single sample of any output
    top1_agreement: float | None  # first output that looks like (batch, classes) scores


@dataclass
class LayerResult:
    node: str
    op_type: str
    cosine: float  # worst output's mean per-sample cosine vs float, for this layer's variant
    cosine_min: float
    top1_agreement: float | None
    seconds: float
    quantized_weights: int  # weights the variant quantized (solo: 1 unless the node shares a weight)
    recovery: float | None = None  # all-but: cosine gained vs the fully quantized model
    top1_recovery: float | None = None  # all-but: top-1 agreement gained vs the fully quantized model


@dataclass
class SweepReport:
    results: list[LayerResult]
    not_reached: list[str]
    time_limit: float
    full_model_cosine: float | None  # the stored quantized model, as written
    notes: list[str] = field(default_factory=list)
    kind: str = "solo"
    baseline: Fidelity | None = None  # all-but: every layer quantized, rebuilt like the variants

    def ranked(self) -> list[LayerResult]:
        """solo: lowest cosine first; all-but: most recovery first."""
        if self.kind == "all-but":
            return sorted(self.results, key=lambda r: (-r.recovery, -(r.top1_recovery or 0.0)))
        return sorted(self.results, key=lambda r: r.cosine)

    @property
    def title(self) -> str:
        if self.kind == "all-but":
            return "all-but-this-layer sweep (cosine recovered when only this layer stays float; most first)"
        return "quantize-only-this-layer sweep (final-output cosine vs float; worst first)"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ranked": [asdict(r) for r in self.ranked()], "not_reached": self.not_reached,
                "time_limit_s": self.time_limit, "full_model_cosine": self.full_model_cosine,
                "baseline": None if self.baseline is None else asdict(self.baseline), "notes": self.notes}

    def text(self) -> str:
        lines = [self.title]
        if self.full_model_cosine is not None:
            lines.append(f"  whole quantized model: cosine {self.full_model_cosine:.5f}")
        if self.baseline is not None:
            top1 = "" if self.baseline.top1_agreement is None else \
                f", top-1 {100 * self.baseline.top1_agreement:.1f}%"
            lines.append(f"  every layer quantized (as rebuilt by the sweep): cosine {self.baseline.cosine:.5f}{top1}")
        width = min(56, max([len(r.node) for r in self.results] + [5]))
        recovery = self.kind == "all-but"
        lines.append(f"  {'layer':<{width}} {'op':<10} " + (f"{'recovery':>10} {'top-1 rec':>9} " if recovery else "")
                     + f"{'cosine':>9} {'worst':>9} {'top-1':>8} {'s':>6}")
        for r in self.ranked():
            gain = f"{r.recovery:>+10.5f} {_points(r.top1_recovery):>9} " if recovery else ""
            lines.append(f"  {r.node[-width:]:<{width}} {r.op_type:<10} {gain}{r.cosine:>9.5f} {r.cosine_min:>9.5f} "
                         f"{_percent(r.top1_agreement):>8} {r.seconds:>6.1f}")
        if self.not_reached:
            lines.append(f"  time limit {self.time_limit:g} s reached; not measured: {', '.join(self.not_reached)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def quantize_only_sweep(float_path: str | os.PathLike, quant_path: str | os.PathLike, *,
                        calib: str | os.PathLike | dict, eval_data: str | os.PathLike | dict | None = None,
                        samples: int | None = None, batch_size: int = 16, threads: int | None = None,
                        time_limit: float = 300.0) -> SweepReport:
    """Quantize each weighted layer of the plan stored in `quant_path` alone (see module docstring)."""
    return layer_sweeps(float_path, quant_path, ("solo",), calib=calib, eval_data=eval_data, samples=samples,
                        batch_size=batch_size, threads=threads, time_limit=time_limit)["solo"]


def all_but_sweep(float_path: str | os.PathLike, quant_path: str | os.PathLike, *,
                  calib: str | os.PathLike | dict, eval_data: str | os.PathLike | dict | None = None,
                  samples: int | None = None, batch_size: int = 16, threads: int | None = None,
                  time_limit: float = 300.0) -> SweepReport:
    """Quantize everything the plan stored in `quant_path` quantized except one weighted layer at a
    time, and rank the layers by the cosine they recover (see module docstring)."""
    return layer_sweeps(float_path, quant_path, ("all-but",), calib=calib, eval_data=eval_data, samples=samples,
                        batch_size=batch_size, threads=threads, time_limit=time_limit)["all-but"]


def layer_sweeps(float_path: str | os.PathLike, quant_path: str | os.PathLike, kinds: tuple[str, ...] | list[str], *,
                 calib: str | os.PathLike | dict, eval_data: str | os.PathLike | dict | None = None,
                 samples: int | None = None, batch_size: int = 16, threads: int | None = None,
                 time_limit: float = 300.0) -> dict[str, SweepReport]:
    """Run the sweeps named in `kinds` ("solo", "all-but") with one calibration and one set of float
    outputs; `time_limit` applies to each sweep (the first one also pays for calibration)."""
    started = time.perf_counter()
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise LowbitError(f"unknown sweep {', '.join(unknown) or '(none)'}; use solo, all-but or both")
    if not time_limit > 0:
        raise LowbitError(f"--time-limit must be a positive number of seconds, got {time_limit:g}")
    if batch_size < 1:
        raise LowbitError(f"batch size must be at least 1, got {batch_size}")
    if calib is None and eval_data is None:
        raise LowbitError("the sweeps need inputs to run; pass --data X.npz (keyed by input name, samples on axis 0)")
    variants = _Variants(float_path, quant_path, calib, samples, batch_size, threads)
    evaluation = _Evaluator(load_model(float_path), eval_data if eval_data is not None else calib, samples,
                            batch_size, threads)
    stored_cosine = evaluation.measure(load_model(quant_path)).cosine
    reports = {}
    for kind in kinds:
        report = SweepReport([], [], time_limit, stored_cosine, list(variants.notes), kind)
        if kind == "all-but":
            report.baseline = evaluation.measure(variants.build([])[0])
        _run(report, variants, evaluation, started if not reports else time.perf_counter())
        reports[kind] = report
    return reports


def _run(report: SweepReport, variants: _Variants, evaluation: _Evaluator, started: float) -> None:
    """Measure one variant per layer until the time limit, into `report`."""
    layers = variants.layers
    with progress(total=len(layers), desc=f"{report.kind} sweep", unit="layer") as bar:
        for i, layer in enumerate(layers):
            elapsed = time.perf_counter() - started
            average = sum(r.seconds for r in report.results) / max(1, len(report.results))
            if report.results and elapsed + average > report.time_limit or elapsed > report.time_limit:
                report.not_reached = layers[i:]
                break
            t0 = time.perf_counter()
            solo = report.kind == "solo"
            model, plan = variants.build([n for n in variants.op_types if n != layer] if solo else [layer])
            weights = len(plan.quantized("weight"))
            if solo and not weights:
                report.notes.append(f"{layer}: nothing was quantized when it was the only layer allowed")
            got = evaluation.measure(model)
            result = LayerResult(layer, variants.op_types[layer], got.cosine, got.cosine_min, got.top1_agreement,
                                 0.0, weights)
            if report.baseline is not None:
                result.recovery = got.cosine - report.baseline.cosine
                if got.top1_agreement is not None and report.baseline.top1_agreement is not None:
                    result.top1_recovery = got.top1_agreement - report.baseline.top1_agreement
            result.seconds = time.perf_counter() - t0
            report.results.append(result)
            bar.update(1)


class _Variants:
    """Builds the stored plan's model with some nodes kept float, from one calibration."""

    def __init__(self, float_path, quant_path, calib, samples: int | None, batch_size: int,
                 threads: int | None) -> None:
        plan = read_plan(load_model(quant_path))
        if plan.mode not in ("static", "dynamic"):
            raise LowbitError(f"{quant_path} was quantized in {plan.mode} mode; the sweeps re-quantize layers in "
                              "static or dynamic int8 mode only")
        original = load_model(float_path)
        model = prepare_model(original)  # node names as quantize_onnx gives them, so exclusions match
        self.op_types = {n.name: n.op_type for n in model.graph.node}
        self.layers = [n for n in dict.fromkeys(node for e in plan.quantized("weight") for node in e.nodes)
                       if n in self.op_types]
        if not self.layers:
            raise LowbitError(f"no quantized weight of {quant_path} belongs to a node of {float_path}; pass the "
                              "float model it was quantized from")
        stored = StoredSettings.of(plan)
        self.mode = stored.mode
        self.per_channel = stored.per_channel
        known = set(self.op_types.values()) | set(self.op_types) | {o for n in model.graph.node for o in n.output}
        # The user's exclusions (and a budget search's fallbacks) stay float in every variant; the
        # rewrites are replayed with the exclusions they ran with.
        self.exclude = [p for p in stored.exclude if p in known]
        user_exclude = [p for p in stored.user_exclude if p in known]
        self.added = [p for p in self.exclude if p not in user_exclude]
        self.notes: list[str] = []
        if self.mode == "dynamic":
            records = [r for r in stored.records if isinstance(r, OutlierSplitRecord)]
            config = StaticConfig(exclude=tuple(user_exclude), per_channel=self.per_channel)
            self.pipeline = StaticPipeline.replay(model, config, records, None, calibrate=False)
            if self.pipeline.mismatched:
                self.notes.append(_SPLIT_DIFFERS)
            return
        if calib is None:
            raise LowbitError("the sweeps re-calibrate static int8; pass --calib CALIB.npz (or --data)")
        data = CalibrationData(calib, model_inputs(original), samples=samples)
        config = StaticConfig(exclude=tuple(user_exclude), per_channel=self.per_channel,
                              calib_method=stored.calib_method)
        self.pipeline = StaticPipeline.replay(model, config, stored.records, data, batch_size=batch_size,
                                              threads=threads)
        mismatched = self.pipeline.mismatched
        if any(isinstance(r, OutlierSplitRecord) for r in mismatched):
            self.notes.append(_SPLIT_DIFFERS)
        rewrites_differ = any(not isinstance(r, OutlierSplitRecord) for r in mismatched)
        if stored.record(BiasCorrectionRecord) is not None:
            self.notes.append("the stored model's bias correction is not replayed (it depends on which layers are "
                              "int8); compare layers with each other rather than with the stored model")
        elif rewrites_differ:
            self.notes.append("equalization or SmoothQuant of the calibration data given here differs from the "
                              "stored model's; compare layers with each other rather than with the stored model")
        if not rewrites_differ:  # the stored ranges (a budget search's choices included) fit the replayed model
            self.ranges = {**self.pipeline.stats.ranges, **_stored_ranges(plan)}

    ranges: dict | None = None

    def build(self, float_nodes: list[str]) -> tuple[onnx.ModelProto, QuantPlan]:
        """The quantized model with `float_nodes` (and the stored exclusions) kept float."""
        exclude = [*self.added, *float_nodes]
        if self.mode == "dynamic":
            from lowbit.onnx.dynamic import write_dynamic

            model = self.pipeline.model
            plan = plan_dynamic(model, per_channel_weights=self.per_channel, exclude=[*self.pipeline.exclude,
                                                                                        *exclude])
            return write_dynamic(model, plan), plan
        candidate = self.pipeline.build(exclude=exclude, ranges=self.ranges, bias_correction=False)
        return candidate.model, candidate.plan


_SPLIT_DIFFERS = ("the stored model split FFN outlier channels this float model does not have; compare layers with "
                  "each other rather than with the stored model")


class _Evaluator:
    """Scores models against the float model's outputs, computed once."""

    def __init__(self, reference: onnx.ModelProto, data, samples: int | None, batch_size: int,
                 threads: int | None) -> None:
        self.threads = threads
        dataset = CalibrationData(data, reference, samples=samples, what="evaluation data")
        session = make_session(reference, threads=threads)
        self.names = [o.name for o in session.get_outputs()]
        self.batches = list(dataset.batches(batch_size))
        self.expected = [session.run(self.names, b) for b in self.batches]

    def measure(self, model: onnx.ModelProto) -> Fidelity:
        session = make_session(model, threads=self.threads)
        cosines: dict[int, list[np.ndarray]] = {}
        agree: dict[int, list[np.ndarray]] = {}
        for batch, expected in zip(self.batches, self.expected):
            for i, (ref, got) in enumerate(zip(expected, session.run(self.names, batch))):
                ref, got = np.asarray(ref), np.asarray(got)
                if ref.dtype.kind != "f" or ref.size == 0:
                    continue
                ref, got = ref.astype(np.float64), got.astype(np.float64)
                cosines.setdefault(i, []).append(cosine_per_row(ref, got))
                if looks_like_class_scores(ref):
                    agree.setdefault(i, []).append(ref.argmax(-1) == got.argmax(-1))
        if not cosines:
            raise LowbitError("the model has no float output to compare; the sweeps measure output cosine")
        per_output = [np.concatenate(v) for v in cosines.values()]
        top1 = next((float(np.concatenate(v).mean()) for v in agree.values()), None)
        return Fidelity(min(float(v.mean()) for v in per_output), min(float(v.min()) for v in per_output), top1)


def _stored_ranges(plan: QuantPlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {e.tensor: (np.asarray(e.range[0], np.float32), np.asarray(e.range[1], np.float32))
            for e in plan.quantized("activation") if e.range is not None}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}pt"
