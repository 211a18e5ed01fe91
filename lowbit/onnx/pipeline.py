"""The static int8 pipeline, once: prepare the model, run the rewrite passes, calibrate once, then
build as many candidate models as wanted from that one calibration, and write any of them.

    prepare_model (opset >= 13, pre-process, node names)          every entry point, once
    StaticPipeline(model, config, data).calibrate(built=, reuse=)
        channel peaks every pass will read, one statistics pass
        graph passes (outlier split, equalization)   -> typed records
        planner -> planned passes (SmoothQuant) -> planner of the rewritten model
        one calibration pass (observers kept: every range method comes from it), which also
          measures the statistics of the `built` passes named (bias correction's channel means);
          with `reuse` (a calibrated pipeline of the same float model whose rewrites differ only by
          a per-channel rescaling, e.g. equalization without ReLU6 links), only the tensors the
          rescaling changes are measured and the others' statistics are taken from `reuse`
        statistics of the other "built" passes, when a candidate first needs them
    .build(exclude=, precision=, per_channel=, calib_method=, ranges=, bias_correction=)
        plan -> built passes on a copy -> QDQ model               per candidate, no model run
    .write(candidate, path)                                       plan in metadata, atomic save

`quantize_onnx`, the accuracy-budget search, the automatic strategy (`lowbit.search`) and the
sweeps all use it; `StaticPipeline.replay(model, settings, data)` rebuilds a stored model's
rewrites from the plan's typed records instead of re-deciding them (analysis and sweeps).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from lowbit.memory import release_freed_memory
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import DEFAULT_MEMORY_BUDGET_MB, ActivationStats, collect_activation_stats
from lowbit.onnx.config import StaticConfig
from lowbit.onnx.control_flow import BodyPlanners
from lowbit.onnx.cpu import has_amx_int8
from lowbit.onnx.io import drop_shape_annotations, save_model
from lowbit.onnx.passes import PASSES, PassContext
from lowbit.onnx.planner import ACTIVATION_SPEC, StaticPlanner, node_names, widen_to_int16
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import MIN_OPSET, ensure_opset, write_qdq
from lowbit.plan import QuantPlan


def prepare_model(model: onnx.ModelProto, *, copy: bool = True, opset: int | None = None) -> onnx.ModelProto:
    """The float model every path quantizes: opset >= 13, pre-processed (shapes, constant folding,
    Conv+BN fusion), then at `opset` if given, and every node named (plans and --exclude refer to
    names). copy=False: `model` is handed over and may be consumed."""
    prepared = preprocess(ensure_opset(model, MIN_OPSET), copy=copy)
    if opset is not None:
        prepared = ensure_opset(prepared, opset)
    node_names(prepared)
    # Symbolic shape inference leaves reference cycles holding model copies (~300 MB resident on
    # MiniLM until the next collection, then kept by the heap): gone before any activation runs.
    release_freed_memory()
    return prepared


def run_passes(ctx: PassContext, config, stage: str) -> tuple[list, float]:
    """Apply the passes of `stage` that `config` enables to `ctx.model`: their records and the
    seconds they took (static mode runs every stage; dynamic mode the "graph" one)."""
    started, records = time.perf_counter(), []
    for rewrite in PASSES:
        if rewrite.stage == stage and rewrite.enabled(config, ctx):
            record = rewrite.apply(ctx)
            if record is not None:
                records.append(record)
    return records, time.perf_counter() - started


@dataclass
class Candidate:
    """One quantized model built from the pipeline's calibration, and its plan."""

    model: onnx.ModelProto
    plan: QuantPlan
    exclude: list[str] = field(default_factory=list)


class StaticPipeline:
    """See the module docstring. `model` must come from `prepare_model`; it is not modified."""

    def __init__(self, model: onnx.ModelProto, config: StaticConfig, data: CalibrationData, *,
                 batch_size: int = 16, threads: int | None = None, source: str = "") -> None:
        self.config = config
        self.data = data
        self.source = source
        self.ctx = PassContext(model, data, list(config.exclude), batch_size, threads, config.per_channel,
                               options=config, memory_budget_mb=config.calib_memory_mb)
        self.records: list = []  # typed records of the passes that changed the model, in order
        self.mismatched: list = []  # replay(): the stored records that did not come out as stored
        self.stats: ActivationStats | None = None
        self._stats_by_method: dict[str, ActivationStats] = {}
        self._built_stats: dict[str, object] = {}
        self.seconds = 0.0  # measuring and calibrating passes over the data
        self.planner: StaticPlanner | None = None
        self.conv_for_qgemm = has_amx_int8()  # on AMX CPUs ORT's GEMM kernels beat its symmetric-conv ones

    @property
    def model(self) -> onnx.ModelProto:
        """The float model after the rewrite passes: what every candidate quantizes."""
        return self.ctx.model

    @property
    def exclude(self) -> list[str]:
        """The user's exclusions plus the nodes a pass must keep float (outlier branches)."""
        return self.ctx.exclude

    # ------------------------------------------------------------------ passes and calibration

    def run_passes(self, stage: str) -> None:
        records, seconds = run_passes(self.ctx, self.config, stage)
        self.records += records
        self.seconds += seconds

    def calibrate(self, *, built: tuple[str, ...] = (), reuse: StaticPipeline | None = None,
                  also: tuple = ()) -> StaticPipeline:
        """Rewrite passes, planning, one calibration pass (see the module docstring for `built`
        and `reuse`; `also`: more `statistics.Reducer`s fed along that pass)."""
        self._prefetch([p for p in PASSES if p.stage in ("graph", "planned") and p.enabled(self.config, self.ctx)])
        self.run_passes("graph")
        self._plan_and_calibrate(run_planned=True, built=built, reuse=reuse, also=also)
        return self

    @classmethod
    def replay(cls, model: onnx.ModelProto, config: StaticConfig, records: list, data: CalibrationData | None, *,
               batch_size: int = 16, threads: int | None = None, calibrate: bool = True) -> StaticPipeline:
        """A pipeline whose rewrites are the stored `records` replayed on `model` (no new
        decisions); `mismatched` lists those that did not come out as stored. calibrate=False: only
        the rewritten float model (for analysis references)."""
        pipeline = cls(model, config, data, batch_size=batch_size, threads=threads)
        pipeline._prefetch([p for p in PASSES if any(isinstance(r, p.Record) for r in records)])
        for stage in ("graph", "planned"):
            for record in records:
                rewrite = next(p for p in PASSES if isinstance(record, p.Record))
                if rewrite.stage == stage:
                    pipeline.ctx.model, same = record.replay(pipeline.ctx.model, pipeline.ctx)
                    if not same:
                        pipeline.mismatched.append(record)
                    pipeline.records.append(record)
        if calibrate:
            pipeline._plan_and_calibrate(run_planned=False)
        return pipeline

    def _prefetch(self, passes: list) -> None:
        """The channel peaks `passes` read, in one pass over the data before any rewrite."""
        started = time.perf_counter()
        self.ctx.prefetch(passes)
        self.seconds += time.perf_counter() - started

    def _plan_and_calibrate(self, *, run_planned: bool, built: tuple[str, ...] = (),
                            reuse: StaticPipeline | None = None, also: tuple = ()) -> None:
        self.planner = self._planner(self.exclude, self.config.per_channel)
        if run_planned:
            self.ctx.planner = self.planner
            before = self.ctx.model
            self.run_passes("planned")
            if self.ctx.model is not before:
                self.planner = self._planner(self.exclude, self.config.per_channel)
        bodies = BodyPlanners(self.model, per_channel_weights=self.config.per_channel, exclude=self.exclude)
        tensors = self.planner.candidates() + bodies.candidates()
        changed = self.changed_tensors(reuse) if reuse is not None else None
        measured = tensors if changed is None else [t for t in tensors if t in changed or t not in reuse.stats.observers]
        passes = [p for p in PASSES if p.stage == "built" and p.name in built and hasattr(p, "reducer")]
        reducers = {}
        for rewrite in passes:
            reused = reuse._built_stats.get(rewrite.name) if changed is not None else None
            reducers[rewrite.name] = (rewrite.reducer(self.ctx, only=None if reused is None else changed), reused)
        stats = collect_activation_stats(
            self.model, measured, self.data, method=self.config.calib_method, spec=ACTIVATION_SPEC,
            batch_size=self.ctx.batch_size, threads=self.ctx.threads,
            memory_budget_mb=self.config.calib_memory_mb or DEFAULT_MEMORY_BUDGET_MB,
            also=[*(reducer for reducer, _ in reducers.values()), *also])
        if changed is not None:
            stats = _merged(stats, reuse.stats, tensors)
        self.stats = stats
        self.seconds += self.stats.seconds
        self._stats_by_method[self.config.calib_method] = self.stats
        for name, (reducer, reused) in reducers.items():
            self._built_stats[name] = {**(reused or {}), **reducer.result()}

    def changed_tensors(self, other: StaticPipeline) -> set[str] | None:
        """The tensors whose float values differ between this pipeline's model and `other`'s when
        the two differ only by exact per-channel rescalings (this one's extra records all say which
        tensors they rescale, `rescaled_exactly`); None when they differ otherwise or `other`
        calibrated differently (then everything is measured)."""
        mine = [r.to_settings() for r in self.records]
        theirs = [r.to_settings() for r in other.records]
        extra = [r for r, settings in zip(self.records, mine) if settings not in theirs]
        if (other.stats is None or other.stats.observers is None or other.data is not self.data
                or other.ctx.batch_size != self.ctx.batch_size
                or other.config.calib_method != self.config.calib_method or any(s not in mine for s in theirs)
                or not all(hasattr(r, "rescaled_exactly") for r in extra)
                or [n.output[:] for n in self.model.graph.node] != [n.output[:] for n in other.model.graph.node]):
            return None
        changed: set[str] = set()
        for record in extra:
            rescaled = record.rescaled_exactly(self.model)
            if rescaled is None:
                return None
            changed |= rescaled
        return changed

    def _planner(self, exclude, per_channel: bool) -> StaticPlanner:
        return StaticPlanner(self.model, per_channel_weights=per_channel, exclude=exclude)

    def stats_for(self, method: str) -> ActivationStats:
        """The calibration's ranges under another range method, from the same observers."""
        if method not in self._stats_by_method:
            self._stats_by_method[method] = self.stats.with_method(method, ACTIVATION_SPEC)
        return self._stats_by_method[method]

    def _built_statistics(self, rewrite) -> object:
        if rewrite.name not in self._built_stats:
            started = time.perf_counter()
            self._built_stats[rewrite.name] = rewrite.measure(self.ctx)
            self.seconds += time.perf_counter() - started
        return self._built_stats[rewrite.name]

    # ------------------------------------------------------------------ candidates

    def build(self, *, exclude: list[str] | tuple[str, ...] = (), precision: dict[str, str] | None = None,
              per_channel: bool | None = None, calib_method: str | None = None,
              ranges: dict | None = None, bias_correction: bool | None = None,
              float_reason: str = "fell back to float by the accuracy-budget search") -> Candidate:
        """A quantized model from the one calibration: `exclude` (more nodes kept float),
        `precision` (layer -> "float" / "int16"), weight granularity, range method, explicit
        `ranges` (tensor -> (lo, hi)) and whether to correct biases (None: as configured)."""
        precision = precision or {}
        to_float = [n for n, level in precision.items() if level == "float"]
        chosen = self.stats_for(calib_method or self.config.calib_method)
        if ranges is not None:
            chosen = replace(chosen, ranges=ranges)
        per_channel = self.config.per_channel if per_channel is None else per_channel
        excluded = [*self.exclude, *exclude, *to_float]
        plan = self._planner(excluded, per_channel).build(chosen)
        for node in to_float:
            plan.float_nodes[node] = float_reason
        widen_to_int16(plan, self.model, {n for n, level in precision.items() if level == "int16"})
        model, records = self.model, list(self.records)
        correct = self.config.bias_correction if bias_correction is None else bias_correction
        for rewrite in PASSES:
            if rewrite.stage == "built" and (correct if rewrite.name == "bias_correction" else
                                             rewrite.enabled(self.config, self.ctx)):
                if model is self.model:
                    model = _copy(self.model)
                record = rewrite.apply_built(model, plan, self._built_statistics(rewrite))
                if record is not None:
                    records.append(record)
        quantized = write_qdq(model, plan, conv_weights_for_qgemm=self.conv_for_qgemm)
        bodies = BodyPlanners(model, per_channel_weights=per_channel, exclude=excluded)  # If/Loop/Scan bodies
        quantized = bodies.write(quantized, plan, chosen, conv_weights_for_qgemm=self.conv_for_qgemm)
        plan.settings = self.settings(records, per_channel=per_channel, calib_method=calib_method)
        return Candidate(quantized, plan, excluded)

    def settings(self, records: list | None = None, *, per_channel: bool | None = None,
                 calib_method: str | None = None) -> dict:
        """The plan settings of a candidate: what was asked and what each pass did."""
        algorithms: dict = {}
        for record in self.records if records is None else records:
            algorithms.update(record.to_settings())
        algorithms["conv_weights"] = ("zero point -1 (ONNX Runtime GEMM/AMX kernels)" if self.conv_for_qgemm
                                      else "symmetric (ONNX Runtime symmetric-conv kernels)")
        return {"calib_method": calib_method or self.config.calib_method,
                "per_channel": self.config.per_channel if per_channel is None else per_channel,
                "exclude": list(self.config.exclude), "samples": self.data.num_samples, "source": self.source,
                "algorithms": algorithms,
                "calibration_runs_per_batch": self.stats.runs_per_batch if self.stats is not None else 1}


def _merged(measured: ActivationStats, reused: ActivationStats, tensors: list[str]) -> ActivationStats:
    """`measured` (the changed tensors) completed with `reused`'s statistics of the other `tensors`
    (same range method: their ranges are taken as they are)."""
    from lowbit.calibration import ObserverSet

    observers = ObserverSet(**measured.observers.observer_kwargs)
    own = [t for t in tensors if t in measured.observers]
    observers.include(measured.observers, own)
    observers.include(reused.observers, [t for t in tensors if t not in measured.observers and t in reused.observers])
    mask_like = measured.mask_like | (reused.mask_like - set(own))
    non_float = measured.non_float | (reused.non_float - set(own))
    ranges = {t: (measured.ranges if t in measured.observers else reused.ranges)[t] for t in tensors
              if t in measured.ranges or t not in measured.observers and t in reused.ranges}
    return replace(measured, ranges=ranges, mask_like=mask_like, non_float=non_float, observers=observers)


def reference_model(original: onnx.ModelProto, records: list, *, copy: bool = True) -> onnx.ModelProto:
    """The float model as the quantizer saw it just before writing, for analysis: prepared, and the
    stored outlier split replayed (exact in float, and it renames nothing). Rescaling passes
    (equalization, SmoothQuant) are not replayed: analysis compares against the float tensors and
    skips the rescaled ones (`record.rescaled`). copy=False: `original` is handed over (as in
    `prepare_model`)."""
    from lowbit.onnx.passes.outlier_split import OutlierSplitRecord

    model = prepare_model(original, copy=copy)
    for record in records:
        if isinstance(record, OutlierSplitRecord):
            model, _ = record.replay(model)
    return model


def weight_channel_spread(model: onnx.ModelProto, plan: QuantPlan) -> dict[str, float]:
    """Node -> max / min of its quantized weight's live per-output-channel |w| peaks: how far one
    per-tensor scale is from fitting the weight's narrowest channel."""
    from onnx import numpy_helper

    from lowbit.onnx.registry import rule_for, weight_axis

    initializers = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    spreads = {}
    for entry in plan.quantized("weight"):
        node = nodes.get(entry.nodes[0]) if entry.nodes else None
        if node is None or entry.tensor not in initializers:
            continue
        rule = rule_for(node)
        if rule is None or rule.kind not in ("compute", "weights"):  # a constant operand of Add/Mul, a table
            continue
        values = numpy_helper.to_array(initializers[entry.tensor])
        if values.ndim < 2:
            continue
        axis = weight_axis(node, values.ndim)
        peaks = np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)).max(axis=1)
        live = peaks[peaks > 0]
        if live.size > 1:
            spreads[node.name] = float(live.max() / live.min())
    return spreads


def activation_channel_spread(model: onnx.ModelProto, data: CalibrationData, *, batch_size: int = 16,
                              threads: int | None = None, ops: tuple[str, ...] = ("Conv",)) -> dict[str, float]:
    """Tensor -> max / median of the per-channel |x| peaks (axis 1) of every activation read by an
    `ops` node, on one batch of `data`: how much of one int8 scale the typical channel gets. A
    per-channel rescaling between layers (folded BatchNorm, dead units) shows up here, and
    cross-layer equalization is what evens it out."""
    from lowbit.onnx.statistics import collect

    peaks = input_channel_peaks(model, ops=ops)
    if not peaks.tensors:
        return {}
    collect(model, [data.first_batch(batch_size)], [peaks], threads=threads)
    return channel_spreads(peaks)


class FirstRows:
    """A `statistics.Reducer` fed only the first `rows` samples (axis 0; None: all) of the first
    batch it sees: one batch's statistics measured along a calibration pass, not in a pass of their own."""

    def __init__(self, reducer, rows: int | None) -> None:
        self.reducer, self.rows = reducer, rows
        self.tensors = reducer.tensors
        self.per_tensor = reducer.per_tensor  # its first batch is folded in on the calling thread
        self._first = None

    def update(self, name: str, value: np.ndarray, batch) -> None:
        if self._first is None:
            self._first = batch
        if batch is self._first:
            self.reducer.update(name, value[:self.rows] if self.rows and value.ndim else value, batch)


def input_channel_peaks(model: onnx.ModelProto, *, ops: tuple[str, ...] = ("Conv",)):
    """A `statistics.ChannelAbsMax` (axis 1) of every activation an `ops` node reads."""
    from lowbit.onnx.statistics import ChannelAbsMax

    initializers = {t.name for t in model.graph.initializer}
    tensors = list(dict.fromkeys(n.input[0] for n in model.graph.node
                                 if n.op_type in ops and n.input and n.input[0] not in initializers))
    return ChannelAbsMax(tensors, axis=1)


def channel_spreads(absmax) -> dict[str, float]:
    """Tensor -> max / median of its channel peaks (`activation_channel_spread`), from a
    `ChannelAbsMax` that has seen the data."""
    spreads = {}
    for name, peaks in absmax.result().items():
        if name in absmax.non_float or len(absmax.shapes[name]) < 3 or peaks.size < 2:
            continue
        median = float(np.median(peaks))
        if median > 0:
            spreads[name] = float(peaks.max() / median)
    return spreads


def write_candidate(candidate: Candidate, path: str | os.PathLike, *, inputs: list[Path] = ()) -> None:
    """Store the plan in the model's metadata and save it atomically."""
    from lowbit.onnx.stored_plan import attach_plan

    drop_shape_annotations(candidate.model)
    attach_plan(candidate.model, candidate.plan)
    save_model(candidate.model, Path(path), inputs=list(inputs))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
