"""`quantize_onnx`: float ONNX model in, quantized ONNX model plus measured proof out.

    config (what to do, `lowbit.onnx.config`) -> checked before anything is read
    load -> `pipeline.prepare_model` -> the handler of type(config):
        StaticConfig      `StaticPipeline`: rewrite passes, one calibration, build -> QDQ
        DynamicConfig     outlier split (with data) -> plan_dynamic -> write_dynamic
        WeightOnlyConfig  `weight_only.quantize_weight_only`
        Fp16Config        plan_fp16 -> write_fp16
        AutoConfig        `lowbit.search.auto`: candidates from one calibration, the fastest within budget
    -> store the plan in metadata -> save atomically -> verify on ONNX Runtime -> explain what is off

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
from lowbit.onnx.pipeline import (StaticPipeline, activation_channel_spread, prepare_model, run_passes,
                                  weight_channel_spread)
from lowbit.onnx.registry import ops_where
from lowbit.onnx.stored_plan import attach_plan, read_plan
from lowbit.onnx.verify import VerifyReport, compare_models
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
                                speed=measure_speed)
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


# ----------------------------------------------------------------------------- saying what is off

# Per-tensor int8 gives the narrowest channel of a weight about 127 / spread levels; past this
# spread most of that channel rounds to zero (folded BatchNorm after dead units does this to
# depthwise convs: bench/ptq_onnx.py mobilenetv2-highlr reaches 153,761x and per-tensor falls to chance).
PER_TENSOR_SPREAD_WARNING = 100.0
# An explicit run this far off float gets a measured cause and a remedy (issue 11: honest modes).
FAR_OFF_TOP1 = 0.95
FAR_OFF_COSINE = 0.98


def per_tensor_range_warning(model: onnx.ModelProto, plan: QuantPlan) -> list[str]:
    """One warning when some weights' per-channel ranges are too far apart for one scale."""
    spreads = weight_channel_spread(model, plan)
    wide = {name: spread for name, spread in spreads.items() if spread > PER_TENSOR_SPREAD_WARNING}
    if not wide:
        return []
    worst = max(wide, key=wide.get)
    return [f"{len(wide)} weight(s) have per-channel ranges more than {PER_TENSOR_SPREAD_WARNING:g}x apart (worst "
            f"{worst}: {wide[worst]:,.0f}x), so one per-tensor scale rounds most of their narrow channels to zero; "
            "drop --per-tensor (per-channel weights) or add --equalize"]


def nothing_dynamic_warning(model: onnx.ModelProto) -> str:
    static_only = ops_where(lambda r: r.kind == "compute" and r.dynamic is None)
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in static_only})
    what = f" (its compute is {', '.join(ops)})" if ops else ""
    return ("dynamic int8 found nothing to quantize: it covers MatMul, Gemm and embedding Gather with constant "
            f"weights, and this model has none{what}; the output is the pre-processed float model. Use --mode "
            "static --calib CALIB.npz (or --mode auto with --calib) to quantize its convolutions")


def explain_outcome(config, done: Handled, report: VerifyReport, run: RunInputs) -> list[str]:
    """When an explicit run is far off float or slower, name the measured cause and the fix."""
    warnings = []
    speedup, plan = report.speedup, done.plan
    if speedup is not None and speedup < 1.0 and plan.mode != "fp16":
        warnings.append(f"the quantized model is SLOWER than float ({speedup:.2f}x) on this machine"
                        + ("" if isinstance(config, AutoConfig) else f"; {_slow_cause(plan, done.model)}"))
    if isinstance(config, AutoConfig) or not report.outputs:
        return warnings
    worst_cos = min(o.cosine_mean for o in report.outputs)
    top1 = [o.top1_agreement for o in report.outputs if o.top1_agreement is not None]
    if worst_cos >= FAR_OFF_COSINE and (not top1 or min(top1) >= FAR_OFF_TOP1):
        return warnings
    measured = f"cosine {worst_cos:.4f}" + (f", top-1 agreement {100 * min(top1):.1f}%" if top1 else "")
    warnings.append(f"far from float ({measured}): {_accuracy_cause(config, done, run)}")
    return warnings


# Activation channels whose peak is this many times the median channel's get few int8 levels.
ACTIVATION_SPREAD_HINT = 8.0


def _accuracy_cause(config, done: Handled, run: RunInputs) -> str:
    if isinstance(config, StaticConfig) and done.float_model is not None:
        wide = {n: s for n, s in weight_channel_spread(done.float_model, done.plan).items()
                if s > PER_TENSOR_SPREAD_WARNING}
        if not config.per_channel and not config.equalize and wide:
            worst = max(wide, key=wide.get)
            return (f"{len(wide)} weight(s) have channel ranges over {PER_TENSOR_SPREAD_WARNING:g}x apart (worst "
                    f"{worst}: {wide[worst]:,.0f}x), too wide for one per-tensor scale; drop --per-tensor or add "
                    "--equalize, or let --mode auto pick")
        if not config.equalize and run.calib is not None:
            spread = activation_channel_spread(done.float_model, run.calib, batch_size=min(4, run.batch_size),
                                               threads=run.threads)
            wide = {t: s for t, s in spread.items() if s > ACTIVATION_SPREAD_HINT}
            if wide:
                worst = max(wide, key=wide.get)
                return (f"{len(wide)} Conv input(s) have channels peaking far above the rest (worst {worst}: "
                        f"{wide[worst]:,.0f}x its median channel), so one int8 scale leaves the typical channel few "
                        "levels; add --equalize (cross-layer equalization evens the channels out, exact in float), "
                        "or let --mode auto measure it")
        return ("the int8 error adds up over the layers; find the layers responsible with `lowbit analyze`, let "
                "--max-drop fall the most sensitive ones back to float, or let --mode auto compare the alternatives")
    if isinstance(config, WeightOnlyConfig):
        return (f"{config.bits}-bit weights lose too much here; raise --weight-bits, lower --group-size, use "
                "--algo gptq/awq with --calib, or --max-drop to keep the sensitive layers at int8")
    if isinstance(config, DynamicConfig):
        return ("activations quantized at run time lose too much here; try --mode static --calib (calibrated ranges, "
                "SmoothQuant, outlier split) or --mode auto")
    return "half precision overflows or loses precision here; keep the failing nodes float with --exclude"


def _slow_cause(plan: QuantPlan, quantized: onnx.ModelProto) -> str:
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    qdq = counts.get("QuantizeLinear", 0) + counts.get("DequantizeLinear", 0)
    compute = sum(counts.get(op, 0) for op in ops_where(lambda r: r.kind == "compute"))
    if plan.mode == "static" and qdq > 4 * max(1, compute):
        return (f"{qdq} Q/DQ nodes for {compute} compute nodes: the quantize/dequantize work outweighs the int8 "
                "kernels; --mode auto measures the faster alternatives (dynamic MatMuls, fp16, fewer int8 layers)")
    return ("ONNX Runtime's int8 kernels gain little over float on this CPU for these layer shapes; --mode auto "
            "measures the faster alternatives")


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
