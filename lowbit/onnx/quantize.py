"""`quantize_onnx`: float ONNX model in, quantized ONNX model plus measured proof out.

    load -> opset >= 13 -> preprocess (shapes, constant folding, Conv+BN fusion)
         -> plan (registry) -> calibrate (static) -> write (QDQ / dynamic / fp16)
         -> store the plan in metadata -> save atomically -> verify on ONNX Runtime

Every user error is raised before the output file is written, and the output is written
atomically, so a failure never leaves half a model behind and never touches the input.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.control_flow import BodyPlanners
from lowbit.onnx.cpu import has_amx_int8
from lowbit.onnx.io import drop_shape_annotations, load_model, save_model, size_growth_warning
from lowbit.onnx.planner import ACTIVATION_SPEC, StaticPlanner, node_names, plan_dynamic
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import ensure_opset, write_qdq
from lowbit.onnx.stored_plan import restore_plan_qparams
from lowbit.onnx.verify import VerifyReport, compare_models
from lowbit.plan import PLAN_METADATA_KEY, VERSION_METADATA_KEY, QuantPlan

MODES = ("static", "dynamic", "fp16", "weight-only")
CALIB_METHODS = ("auto", "minmax", "percentile", "entropy", "mse")


@dataclass
class QuantizeResult:
    output_path: Path
    plan: QuantPlan
    report: VerifyReport | None
    calibration_seconds: float = 0.0
    total_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.output_path} ({self.plan.mode})"]
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


def quantize_onnx(model_path: str | os.PathLike, output_path: str | os.PathLike, *, mode: str = "static",
                  calib: str | os.PathLike | dict | None = None, calib_method: str = "auto",
                  per_channel: bool = True, exclude: tuple[str, ...] | list[str] = (), samples: int | None = None,
                  batch_size: int = 16, eval_data: str | os.PathLike | dict | None = None,
                  verify: bool = True, measure_speed: bool = True, threads: int | None = None,
                  smooth: bool | None = None, smooth_alpha: float | dict[str, float] = 0.5,
                  equalize: bool = False, bias_correction: bool = False,
                  calib_memory_mb: float | None = None, weight_bits: int = 4, group_size: int = 32,
                  algo: str = "rtn", act_order: bool = False, symmetric: bool = True,
                  weight_format: str = "matmulnbits", accuracy_level: int = 0, embedding_bits: int = 8,
                  outlier_split: bool | None = None) -> QuantizeResult:
    """Quantize the ONNX model at `model_path` and write it to `output_path`.

    mode: "static" (int8 weights and calibrated uint8 activations; needs `calib`), "dynamic"
    (int8 weights, activations quantized at run time) or "fp16". `calib` / `eval_data`: an .npz
    keyed by input name (samples on axis 0), a folder of them, or a dict of arrays. `exclude`:
    node names, op types or output tensor names kept float.

    Static-mode algorithms: `smooth` (SmoothQuant scale migration into the MatMuls fed by
    LayerNorm; None = on when the model has such MatMuls) with `smooth_alpha` (a number, or a dict
    activation/node name -> alpha with an optional "default"); `equalize` (cross-layer
    equalization of Conv chains, ReLU6 -> ReLU on equalized links); `bias_correction` (Conv
    biases absorb the mean shift caused by weight rounding). `calib_memory_mb` bounds the
    activations held at once during calibration (None: `collect.DEFAULT_MEMORY_BUDGET_MB`;
    math.inf: unbounded): the graph is cut into segments whose tensors fit, see `lowbit.onnx.collect`.

    `outlier_split` (static and dynamic; None = on whenever calibration data is given): the few
    hidden channels of a transformer FFN that peak far above the rest move to a thin float branch
    (exact in float, see `lowbit.onnx.outlier_split`), so the int8 activation range fits the rest.

    mode "weight-only": MatMul/Gemm weights to `weight_bits` (2-8) with one scale per `group_size`
    input features, activations float; `algo` "rtn", "gptq" (with `act_order`) or "awq" (both
    need `calib`); `weight_format` "matmulnbits" (ONNX Runtime's fused kernel) or "dq" (standard
    blocked DequantizeLinear, opset 21); `accuracy_level` 4 lets MatMulNBits quantize activations
    to int8 inside the kernel; `embedding_bits` 8 or 4 also rounds the embedding tables (Gather;
    0 keeps them float). See `lowbit.onnx.weight_only`."""
    started = time.perf_counter()
    model_path, output_path = Path(model_path), Path(output_path)
    _check_arguments(model_path, output_path, mode, calib, calib_method, batch_size)
    if mode == "weight-only":
        from lowbit.onnx.weight_only import check_options

        check_options(bits=weight_bits, group_size=group_size, algo=algo, has_calibration=calib is not None,
                      symmetric=symmetric, act_order=act_order, weight_format=weight_format,
                      accuracy_level=accuracy_level, embedding_bits=embedding_bits)
    if mode != "static" and (equalize or bias_correction or smooth):
        raise LowbitError("--smooth, --equalize and --bias-correction need calibration; use them with --mode static")
    if calib_memory_mb is not None and calib_memory_mb <= 0:
        raise LowbitError(f"calibration memory budget must be positive, got {calib_memory_mb} MB")
    original = load_model(model_path)
    inputs = model_inputs(original)  # all the data checks need; the loaded model is not kept
    # The loaded model is ours (read from disk): preprocess may consume it instead of copying it.
    model = preprocess(ensure_opset(original), copy=False)
    del original
    node_names(model)
    calib_data = CalibrationData(calib, inputs, samples=samples) if calib is not None else None
    eval_set = (CalibrationData(eval_data, inputs, what="evaluation data") if eval_data is not None
                else calib_data)
    calibration_seconds = 0.0
    warnings: list[str] = []
    algorithms: dict = {}
    requested_exclude = list(exclude)
    if mode in ("static", "dynamic") and calib_data is not None and outlier_split is not False:
        model, split, seconds = split_ffn_outliers(model, exclude, calib_data, batch_size, threads)
        calibration_seconds += seconds
        if split:
            algorithms["outlier_split"] = split
            exclude = (*exclude, *(name for site in split for name in site["float_branch"]))
    if mode == "static":
        from lowbit.onnx.collect import DEFAULT_MEMORY_BUDGET_MB, collect_activation_stats

        if equalize:
            from lowbit.onnx.equalize import equalize_model

            model, eq = equalize_model(model, skip=set(exclude))
            algorithms["equalized_chains"] = eq.chains
            algorithms["relu6_to_relu"] = eq.relu6_replaced
        planner = StaticPlanner(model, per_channel_weights=per_channel, exclude=exclude)
        if smooth is None or smooth:
            model, smoothed, seconds = smooth_layernorm_matmuls(model, planner, calib_data, smooth_alpha,
                                                                batch_size, threads)
            calibration_seconds += seconds
            if smoothed:
                algorithms["smoothquant"] = smoothed
                planner = StaticPlanner(model, per_channel_weights=per_channel, exclude=exclude)
        bodies = BodyPlanners(model, per_channel_weights=per_channel, exclude=exclude)  # If/Loop/Scan
        stats = collect_activation_stats(model, planner.candidates() + bodies.candidates(), calib_data,
                                         method=calib_method,
                                         spec=ACTIVATION_SPEC, batch_size=batch_size, threads=threads,
                                         memory_budget_mb=calib_memory_mb or DEFAULT_MEMORY_BUDGET_MB)
        calibration_seconds += stats.seconds
        plan = planner.build(stats)
        if not per_channel and not equalize:
            warnings += _per_tensor_range_warning(model, plan)
        if bias_correction:
            from lowbit.onnx.equalize import correct_biases

            started_bc = time.perf_counter()
            algorithms["bias_corrected"] = correct_biases(model, plan, calib_data, batch_size=batch_size,
                                                          threads=threads)
            calibration_seconds += time.perf_counter() - started_bc
        # On AMX CPUs ORT's GEMM kernels beat its symmetric-conv ones: pick the weight form for them.
        conv_for_qgemm = has_amx_int8()
        algorithms["conv_weights"] = ("zero point -1 (ONNX Runtime GEMM/AMX kernels)" if conv_for_qgemm
                                      else "symmetric (ONNX Runtime symmetric-conv kernels)")
        quantized = write_qdq(model, plan, conv_weights_for_qgemm=conv_for_qgemm)
        quantized = bodies.write(quantized, plan, stats, conv_weights_for_qgemm=conv_for_qgemm)
    elif mode == "dynamic":
        from lowbit.onnx.dynamic import write_dynamic

        plan = plan_dynamic(model, per_channel_weights=per_channel, exclude=exclude)
        quantized = write_dynamic(model, plan)
        quantized = BodyPlanners(model, per_channel_weights=per_channel, exclude=exclude,
                                 mode="dynamic").write(quantized, plan)
    elif mode == "weight-only":
        from lowbit.onnx.weight_only import quantize_weight_only

        done = quantize_weight_only(model, calib_data, bits=weight_bits, group_size=group_size, algo=algo,
                                    symmetric=symmetric, act_order=act_order, weight_format=weight_format,
                                    accuracy_level=accuracy_level, exclude=exclude, batch_size=batch_size,
                                    threads=threads, embedding_bits=embedding_bits)
        plan, quantized, calibration_seconds = done.plan, done.model, done.calibration_seconds
        warnings += done.warnings
    else:
        from lowbit.onnx.fp16 import plan_fp16, write_fp16

        plan = plan_fp16(model, set(exclude))
        quantized = write_fp16(model, plan)
    plan.settings = {**plan.settings, "calib_method": calib_method if mode == "static" else None,
                     "per_channel": per_channel, "exclude": requested_exclude,
                     "samples": None if calib_data is None else calib_data.num_samples, "source": model_path.name}
    if mode in ("static", "dynamic"):
        plan.settings["algorithms"] = algorithms
    if mode == "static":
        plan.settings["calibration_runs_per_batch"] = stats.runs_per_batch
    if not plan.quantized():
        warnings.append("nothing was quantized (no supported op found, or all excluded); the output is the "
                        "pre-processed float model")
    attach_plan(quantized, plan)
    drop_shape_annotations(quantized)
    _check_runs(quantized)
    save_model(quantized, output_path, inputs=[model_path])
    warnings += size_growth_warning(model_path, output_path)
    report = None
    if verify and eval_set is not None:
        report = compare_models(model_path, output_path, eval_set, batch_size=batch_size, threads=threads,
                                speed=measure_speed)
        if report.speedup is not None and report.speedup < 1.0 and mode != "fp16":
            warnings.append(f"the quantized model is SLOWER than float ({report.speedup:.2f}x) on this machine")
    return QuantizeResult(output_path, plan, report, calibration_seconds, time.perf_counter() - started, warnings)


def split_ffn_outliers(model: onnx.ModelProto, exclude, calib_data: CalibrationData, batch_size: int,
                       threads: int | None) -> tuple[onnx.ModelProto, list[dict], float]:
    """Outlier-channel splitting of the FFNs whose down projection will be int8: the split model,
    what was split (for the plan), and the seconds the measuring pass took."""
    from lowbit.onnx.outlier_split import apply_split, outlier_channels, split_sites
    from lowbit.onnx.smooth import channel_absmax

    skipped = set(exclude)
    candidates = {n.name for n in model.graph.node
                  if n.op_type == "MatMul" and not ({n.name, n.op_type, *n.output} & skipped)}
    sites = split_sites(model, candidates)
    if not sites:
        return model, [], 0.0
    started = time.perf_counter()
    absmax = channel_absmax(model, [s.activation for s in sites], calib_data, batch_size=batch_size, threads=threads)
    for site in sites:
        site.channels = outlier_channels(absmax[site.activation])
    split = apply_split(model, sites)
    summary = [{"node": s.down, "channels": s.channels, "float_branch": s.float_branch} for s in sites if s.channels]
    return split, summary, time.perf_counter() - started


# Per-tensor int8 gives the narrowest channel of a weight about 127 / spread levels; past this
# spread most of that channel rounds to zero (folded BatchNorm after dead units does this to
# depthwise convs: bench/ptq_onnx.py mobilenetv2-highlr reaches 153,761x and per-tensor falls to chance).
PER_TENSOR_SPREAD_WARNING = 100.0


def _per_tensor_range_warning(model: onnx.ModelProto, plan: QuantPlan) -> list[str]:
    """One warning when some weights' per-channel ranges are too far apart for one scale."""
    import numpy as np
    from onnx import numpy_helper

    from lowbit.onnx.registry import weight_axis

    initializers = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    spreads = {}
    for entry in plan.quantized("weight"):
        node = nodes.get(entry.nodes[0]) if entry.nodes else None
        if node is None or entry.tensor not in initializers:
            continue
        values = numpy_helper.to_array(initializers[entry.tensor])
        if values.ndim < 2:
            continue
        axis = weight_axis(node, values.ndim)
        peaks = np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)).max(axis=1)
        live = peaks[peaks > 0]
        if live.size > 1:
            spreads[node.name] = float(live.max() / live.min())
    wide = {name: spread for name, spread in spreads.items() if spread > PER_TENSOR_SPREAD_WARNING}
    if not wide:
        return []
    worst = max(wide, key=wide.get)
    return [f"{len(wide)} weight(s) have per-channel ranges more than {PER_TENSOR_SPREAD_WARNING:g}x apart (worst "
            f"{worst}: {wide[worst]:,.0f}x), so one per-tensor scale rounds most of their narrow channels to zero; "
            "drop --per-tensor (per-channel weights) or add --equalize"]


def smooth_layernorm_matmuls(model: onnx.ModelProto, planner, calib_data: CalibrationData, alpha,
                             batch_size: int, threads: int | None) -> tuple[onnx.ModelProto, list[dict], float]:
    """SmoothQuant on the LayerNorm-fed int8 MatMuls: one measuring pass, then the rewrite. Returns
    the smoothed model, what was smoothed (for the plan) and the seconds it took."""
    from lowbit.onnx.smooth import apply_smoothing, channel_absmax, smoothing_groups

    groups = smoothing_groups(model, set(planner.active), alpha=alpha)
    if not groups:
        return model, [], 0.0
    started = time.perf_counter()
    absmax = channel_absmax(model, [g.activation for g in groups], calib_data, batch_size=batch_size, threads=threads)
    smoothed = apply_smoothing(model, groups, absmax)
    summary = [{"activation": g.activation, "nodes": g.nodes, "alpha": g.alpha, "folded_into": g.folded_into}
               for g in groups if g.scales is not None]
    return smoothed, summary, time.perf_counter() - started


def attach_plan(model: onnx.ModelProto, plan: QuantPlan) -> None:
    """Store the plan and lowbit's version in the model's metadata (replacing earlier ones)."""
    from lowbit import __version__

    kept = [p for p in model.metadata_props if p.key not in (PLAN_METADATA_KEY, VERSION_METADATA_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept}, PLAN_METADATA_KEY: plan.to_json(),
                                        VERSION_METADATA_KEY: __version__})


def read_plan(model_or_path: onnx.ModelProto | str | os.PathLike) -> QuantPlan:
    """The plan stored in a model written by lowbit, its per-channel parameters read back from the
    model's initializers (entries whose values are no longer there keep only their summary)."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    for prop in model.metadata_props:
        if prop.key == PLAN_METADATA_KEY:
            plan = QuantPlan.from_json(prop.value)
            restore_plan_qparams(plan, model)
            return plan
    raise LowbitError("this model has no lowbit plan in its metadata; it was not written by lowbit quantize")


def _check_arguments(model_path: Path, output_path: Path, mode: str, calib, calib_method: str,
                     batch_size: int) -> None:
    if mode not in MODES:
        raise LowbitError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if calib_method not in CALIB_METHODS:
        raise LowbitError(f"unknown calibration method {calib_method!r}; use one of {', '.join(CALIB_METHODS)}")
    if mode == "static" and calib is None:
        raise LowbitError("static quantization needs calibration data; pass --calib CALIB.npz (or use --mode dynamic)")
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
