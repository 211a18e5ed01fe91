"""Say what is off in a quantized model: a warning when per-tensor scales cannot fit the weights,
when dynamic mode found nothing to do, and, for an explicit mode that came out far from float or
slower than it, the measured cause and the fix (issue 11: honest modes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from lowbit.onnx.config import AutoConfig, DynamicConfig, StaticConfig, WeightOnlyConfig
from lowbit.onnx.pipeline import activation_channel_spread, weight_channel_spread
from lowbit.onnx.registry import ops_where
from lowbit.onnx.verify import VerifyReport
from lowbit.plan import QuantPlan
from lowbit.weight_algorithms import ALGORITHMS

if TYPE_CHECKING:
    from lowbit.onnx.quantize import Handled, RunInputs

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
        with_data = "/".join(a.name for a in ALGORITHMS.values() if a.needs_statistics)
        return (f"{config.bits}-bit weights lose too much here; raise --weight-bits, lower --group-size, use "
                f"--algo {with_data} with --calib, or --max-drop to keep the sensitive layers at int8")
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


__all__ = ["explain_outcome", "nothing_dynamic_warning", "per_tensor_range_warning"]
