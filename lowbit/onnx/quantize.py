"""`quantize_onnx`: float ONNX model in, quantized ONNX model plus measured proof out.

    config (what to do, `lowbit.onnx.config`) -> checked before anything is read
    load -> `pipeline.prepare_model` -> the handler of type(config):
        StaticConfig      `StaticPipeline`: rewrite passes, one calibration, build -> QDQ
        DynamicConfig     outlier split (with data) -> plan_dynamic -> write_dynamic
        WeightOnlyConfig  `weight_only.quantize_weight_only`
        Fp16Config        plan_fp16 -> write_fp16
        AutoConfig        `lowbit.search.auto`: candidates from one calibration, the fastest within budget
    -> store the plan in metadata -> save atomically -> verify on ONNX Runtime -> explain what is off
       (`lowbit.onnx.explain`)

Every user error is raised before the output file is written, and the output is written
atomically, so a failure never leaves half a model behind and never touches the input.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.config import (CONFIGS, AutoConfig, DynamicConfig, Fp16Config, QuantConfig, StaticConfig,
                                WeightOnlyConfig, config_for_mode)
from lowbit.onnx.control_flow import BodyPlanners
from lowbit.onnx.dynamic import plan_dynamic, write_dynamic
from lowbit.onnx.io import drop_shape_annotations, load_model, save_model, size_growth_warning
from lowbit.onnx.explain import explain_outcome, nothing_dynamic_warning, per_tensor_range_warning
from lowbit.onnx.pipeline import StaticPipeline, prepare_model, run_passes
from lowbit.onnx.stored_plan import attach_plan, read_plan
from lowbit.onnx.verify import FloatReference, VerifyReport, compare_models
from lowbit.plan import QuantPlan



@dataclass
class QuantizeResult:
    output_path: Path
    plan: QuantPlan
    report: VerifyReport | None
    calibration_seconds: float = 0.0
    total_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    auto: Any = None  # --mode auto: the candidates measured (`lowbit.search.auto.AutoReport`)
    config: Any = None

    def summary(self) -> str:
        lines = [f"wrote {self.output_path} ({self.plan.mode})"]
        if self.auto is not None:
            lines.append(self.auto.table())
        counts = ", ".join(f"{v} {k}" for k, v in self.plan.summary().items())
        lines.append(f"plan: {counts}")
        if self.plan.unsupported_ops:
            lines.append(f"unsupported ops left float: {', '.join(self.plan.unsupported_ops)}")
        if self.calibration_seconds:
            lines.append(f"calibration: {self.calibration_seconds:.1f} s")
        if self.report is not None:
            lines.append(self.report.table())
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


@dataclass
class RunInputs:
    """What a mode handler gets besides its config: the data and how to run the model."""

    model_path: Path
    calib: CalibrationData | None
    eval_set: CalibrationData | None
    batch_size: int = 16
    threads: int | None = None
    measure_speed: bool = True


@dataclass
class Handled:
    """What a mode handler returns: the quantized model, its plan (settings filled in), the seconds
    spent on passes over the data, warnings, and anything mode-specific for the result."""

    model: onnx.ModelProto
    plan: QuantPlan
    calibration_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    auto: Any = None
    float_model: onnx.ModelProto | None = None  # the float model it quantized (for explaining a bad result)
    reference: FloatReference | None = None  # the float session and outputs it computed (reused by the verification)


def quantize_onnx(model_path: str | os.PathLike, output_path: str | os.PathLike, config: QuantConfig | None = None,
                  *, calib: str | os.PathLike | dict | None = None, eval_data: str | os.PathLike | dict | None = None,
                  samples: int | None = None, batch_size: int = 16, verify: bool = True, measure_speed: bool = True,
                  threads: int | None = None, **flags: Any) -> QuantizeResult:
    """Quantize the ONNX model at `model_path` as `config` says and write it to `output_path`.

    `config`: a `StaticConfig` (default), `DynamicConfig`, `WeightOnlyConfig`, `Fp16Config` or
    `AutoConfig` (see `lowbit.onnx.config`). `calib` / `eval_data`: an .npz keyed by input name
    (samples on axis 0), a folder of them, or a dict of arrays; `samples` keeps the first N
    calibration samples; `eval_data` defaults to the calibration data. `verify` compares the
    written model with the float one on ONNX Runtime (fidelity, size and, with `measure_speed`,
    latency in the same run). `flags`: the keyword form of earlier versions (mode="dynamic",
    per_channel=False, ...), turned into the config of that mode; prefer passing a config."""
    started = time.perf_counter()
    if flags or config is None:
        config = config_from_flags(config, flags)
    model_path, output_path = Path(model_path), Path(output_path)
    _check_paths(model_path, output_path, batch_size)
    config.validate(has_calibration=calib is not None)
    original = load_model(model_path)
    inputs = model_inputs(original)  # all the data checks need; the loaded model is not kept
    # The loaded model is ours (read from disk): preprocess may consume it instead of copying it.
    model = prepare_model(original, copy=False)
    del original
    calib_data = CalibrationData(calib, inputs, samples=samples) if calib is not None else None
    eval_set = (CalibrationData(eval_data, inputs, what="evaluation data") if eval_data is not None
                else calib_data)
    run = RunInputs(model_path, calib_data, eval_set, batch_size, threads, measure_speed)
    done = HANDLERS[type(config)](model, config, run)
    plan = done.plan
    warnings = list(done.warnings)
    if not plan.quantized() and plan.mode != "dynamic":  # the dynamic handler says what it could not do
        warnings.append("nothing was quantized (no supported op found, or all excluded); the output is the "
                        "pre-processed float model")
    attach_plan(done.model, plan)
    drop_shape_annotations(done.model)
    _check_runs(done.model)
    save_model(done.model, output_path, inputs=[model_path])
    warnings += size_growth_warning(model_path, output_path)
    report = None
    if verify and eval_set is not None:
        report = compare_models(model_path, output_path, eval_set, batch_size=batch_size, threads=threads,
                                speed=measure_speed, reference=done.reference)
        warnings += explain_outcome(config, done, report, run)
    return QuantizeResult(output_path, plan, report, done.calibration_seconds, time.perf_counter() - started,
                          warnings, done.auto, config)


def config_from_flags(config: QuantConfig | None, flags: dict[str, Any]) -> QuantConfig:
    """The keyword form (`mode=...` plus that mode's options) as a config."""
    if config is not None:
        raise LowbitError(f"pass either a config or keyword options, not both (got {', '.join(sorted(flags))})")
    flags = dict(flags)
    mode = flags.pop("mode", "static")
    renamed = {"weight_bits": "bits"}
    options = {renamed.get(k, k): v for k, v in flags.items()}
    known = {f for cls in CONFIGS.values() for f in cls.__dataclass_fields__}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"quantize_onnx() got unexpected keyword argument(s) {', '.join(unknown)}")
    return config_for_mode(mode, **options)


# ----------------------------------------------------------------------------- the mode handlers

def run_static(model: onnx.ModelProto, config: StaticConfig, run: RunInputs) -> Handled:
    pipeline = StaticPipeline(model, config, run.calib, batch_size=run.batch_size, threads=run.threads,
                              source=run.model_path.name).calibrate()
    candidate = pipeline.build()
    warnings = []
    if not config.per_channel and not config.equalize:
        warnings += per_tensor_range_warning(pipeline.model, candidate.plan)
    return Handled(candidate.model, candidate.plan, pipeline.seconds, warnings, float_model=pipeline.model)


def run_dynamic(model: onnx.ModelProto, config: DynamicConfig, run: RunInputs) -> Handled:
    from lowbit.onnx.passes import PassContext

    ctx = PassContext(model, run.calib, list(config.exclude), run.batch_size, run.threads, config.per_channel,
                      options=config)
    records, seconds = run_passes(ctx, config, "graph")
    plan = plan_dynamic(ctx.model, per_channel_weights=config.per_channel, exclude=ctx.exclude)
    quantized = write_dynamic(ctx.model, plan)
    quantized = BodyPlanners(ctx.model, per_channel_weights=config.per_channel, exclude=ctx.exclude,
                             mode="dynamic").write(quantized, plan)  # If/Loop/Scan bodies
    algorithms: dict = {}
    for record in records:
        algorithms.update(record.to_settings())
    plan.settings = {**plan.settings, **_common_settings(config, run), "calib_method": None,
                     "algorithms": algorithms}
    warnings = [] if plan.quantized("weight") else [nothing_dynamic_warning(ctx.model)]
    return Handled(quantized, plan, seconds, warnings)


def run_weight_only(model: onnx.ModelProto, config: WeightOnlyConfig, run: RunInputs) -> Handled:
    from lowbit.onnx.weight_only import quantize_weight_only

    done = quantize_weight_only(model, run.calib, bits=config.bits, group_size=config.group_size, algo=config.algo,
                                symmetric=config.symmetric, act_order=config.act_order,
                                weight_format=config.weight_format, accuracy_level=config.accuracy_level,
                                exclude=config.exclude, batch_size=run.batch_size, threads=run.threads,
                                embedding_bits=config.embedding_bits)
    done.plan.settings = {**done.plan.settings, **_common_settings(config, run), "calib_method": None,
                          "per_channel": True}
    return Handled(done.model, done.plan, done.calibration_seconds, list(done.warnings))


def run_fp16(model: onnx.ModelProto, config: Fp16Config, run: RunInputs) -> Handled:
    from lowbit.onnx.fp16 import plan_fp16, write_fp16

    plan = plan_fp16(model, set(config.exclude))
    quantized = write_fp16(model, plan)
    plan.settings = {**plan.settings, **_common_settings(config, run), "calib_method": None, "per_channel": True}
    return Handled(quantized, plan)


def run_auto(model: onnx.ModelProto, config: AutoConfig, run: RunInputs) -> Handled:
    # The search layer sits above this module; it is imported only when auto mode runs.
    from lowbit.search.auto import search_strategy

    return search_strategy(model, config, run)


HANDLERS: dict[type, Callable[[onnx.ModelProto, Any, RunInputs], Handled]] = {
    StaticConfig: run_static, DynamicConfig: run_dynamic, WeightOnlyConfig: run_weight_only, Fp16Config: run_fp16,
    AutoConfig: run_auto,
}


def _common_settings(config, run: RunInputs) -> dict:
    return {"per_channel": getattr(config, "per_channel", True), "exclude": list(config.exclude),
            "samples": None if run.calib is None else run.calib.num_samples, "source": run.model_path.name}


def _check_paths(model_path: Path, output_path: Path, batch_size: int) -> None:
    if batch_size < 1:
        raise LowbitError(f"batch size must be at least 1, got {batch_size}")
    if output_path.exists() and model_path.exists() and os.path.samefile(output_path, model_path) \
            or output_path.resolve() == model_path.resolve():
        raise LowbitError(f"output {output_path} is the input model; choose a different output path "
                          "(lowbit never overwrites its input)")


def _check_runs(model: onnx.ModelProto) -> None:
    """The written graph must load in ONNX Runtime; failing here is a lowbit bug, not user error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


__all__ = ["HANDLERS", "QuantizeResult", "attach_plan", "config_from_flags", "quantize_onnx", "read_plan"]
