"""The markdown summary, and the table rows the HTML page shares with it."""

from __future__ import annotations

from lowbit.analysis.sensitivity import SensitivityReport
from lowbit.analysis.sweep import SweepReport
from lowbit.onnx.verify import VerifyReport
from lowbit.plan import QuantPlan
from lowbit.report.content import ReportContent

Rows = tuple[list[str], list[list[str]]]


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _opt(value: float | None, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def overview_rows(content: ReportContent) -> list[list[str]]:
    plan, verify = content.plan, content.verify
    rows = [["mode", plan.mode], ["plan", ", ".join(f"{v} {k}" for k, v in plan.summary().items())]]
    if plan.unsupported_ops:
        rows.append(["unsupported ops (float)", ", ".join(plan.unsupported_ops)])
    if verify is not None:
        rows.append(["size", f"{_mb(verify.size_before)} → {_mb(verify.size_after)} ({verify.size_ratio:.2f}x smaller)"])
        worst = min(verify.outputs, key=lambda o: o.cosine_mean, default=None)
        if worst is not None:
            rows.append(["fidelity (worst output)", f"cosine {worst.cosine_mean:.5f} (min {worst.cosine_min:.5f}, "
                         f"{worst.cosine_basis}), relative error {worst.relative_error:.2e}"
                         + ("" if worst.top1_agreement is None else f", top-1 agreement "
                            f"{100 * worst.top1_agreement:.2f}%")])
        labeled = verify.labeled
        if labeled is not None:
            rows.append(["accuracy vs labels", f"float {100 * labeled.accuracy_float:.2f}% → quantized "
                         f"{100 * labeled.accuracy_quant:.2f}% (drop {100 * labeled.accuracy_drop:.2f} pt, "
                         f"{verify.labeled_calls} calls, output {labeled.name})"])
        if verify.speedup is not None:
            rows.append(["speed", f"{verify.speedup:.2f}x vs float ({verify.latency_float_ms:.2f} → "
                         f"{verify.latency_quant_ms:.2f} ms per run of {verify.timed_calls} calls; "
                         f"{verify.timing_method})" + ("" if verify.speedup >= 1 else " — SLOWER than float")])
    if content.budget is not None:
        b = content.budget
        rows.append(["accuracy budget", f"{'met' if b.met else 'NOT met'}: {b.metric} drop {b.drop:.5f} "
                     f"(max {b.max_drop:g}); {100 * b.int8_mac_fraction:.1f}% of MACs {_start(b)}"])
    return rows


def fidelity_rows(verify: VerifyReport) -> Rows:
    rows = []
    for o in verify.outputs:
        frames = "-" if o.frame_cosine_mean is None else f"{o.frame_cosine_mean:.5f} / {o.frame_cosine_min:.5f}"
        accuracy = "-" if o.accuracy_quant is None else \
            f"{100 * o.accuracy_float:.2f} → {100 * o.accuracy_quant:.2f}"
        rows.append([o.name, f"{o.cosine_mean:.5f}", f"{o.cosine_min:.5f}", o.cosine_basis, str(o.values_per_call),
                     f"{o.relative_error:.2e}", f"{o.max_abs_error:.4g}", frames,
                     _opt(None if o.top1_agreement is None else 100 * o.top1_agreement, ".2f"), accuracy])
    rows.append([f"({verify.calls} calls)"] + [""] * 9)
    return ["output", "cosine mean", "cosine min", "cosine basis", "values/call", "rel error", "max abs error",
            "frame cosine mean / min", "top-1 agree %", "label accuracy % (float → quant)"], rows


def plan_rows(plan: QuantPlan) -> Rows:
    rows = []
    for e in plan.entries:
        spec = "-" if e.spec is None else e.spec.dtype + (
            f" {e.spec.granularity.kind}" if e.spec.granularity.kind != "tensor" else "")
        rows.append([e.tensor, e.role, e.status, spec, ", ".join(e.nodes)[:80], e.reason or (
            f"shares {e.shares}" if e.shares else "")])
    rows.extend([[node, "node", "float", "-", node, why] for node, why in plan.float_nodes.items()])
    return ["tensor", "role", "status", "spec", "read by", "why"], rows


def sensitivity_rows(report: SensitivityReport) -> Rows:
    rows = [[t.tensor, _opt(t.sqnr_db, ".1f", "exact"), _opt(t.cosine, ".5f"), _opt(t.local_sqnr_db, ".1f", "exact"),
             _opt(None if t.clipped is None else 100 * t.clipped, ".3f")] for t in report.ranked()]
    return ["tensor (worst first)", "SQNR dB", "cosine", "own dB", "clipped %"], rows


def _start(budget) -> str:
    """The precision every layer starts at: int8 (static) or int4 (weight-only)."""
    return getattr(budget, "start", "int8")


def _precision(budget, node: str) -> str:
    if hasattr(budget, "layer_precision"):
        return budget.layer_precision(node)
    return "float" if node in budget.excluded else "int8"


def budget_rows(budget) -> Rows:
    """The search's layers in its ranking order. `gain`: how much the score of the int8 candidate
    rose when the layer's fallback unit alone went float (the search no longer measures solo drops)."""
    rows = [[layer.node, layer.op_type, f"{layer.macs:,}", _opt(layer.gain, "+.2e", "not measured"),
             _precision(budget, layer.node)] for layer in budget.layers]
    return ["layer (most sensitive first)", "op", "MACs", f"fallback gain ({budget.metric})", "kept as"], rows


def sweep_rows(sweep: SweepReport) -> Rows:
    """One row per measured layer, in the sweep's ranking order."""
    if sweep.kind == "all-but":
        rows = [[r.node, r.op_type, f"{r.recovery:+.5f}",
                 _opt(None if r.top1_recovery is None else 100 * r.top1_recovery, "+.2f"), f"{r.cosine:.5f}",
                 _opt(None if r.top1_agreement is None else 100 * r.top1_agreement, ".2f")] for r in sweep.ranked()]
        return ["layer float, rest int8 (most recovery first)", "op", "cosine recovery", "top-1 recovery (points)",
                "cosine", "top-1 agree %"], rows
    rows = [[r.node, r.op_type, f"{r.cosine:.5f}", f"{r.cosine_min:.5f}",
             _opt(None if r.top1_agreement is None else 100 * r.top1_agreement, ".2f")] for r in sweep.ranked()]
    return ["layer int8, rest float (worst first)", "op", "cosine", "worst sample", "top-1 agree %"], rows


def sweep_summary(sweep: SweepReport) -> str:
    """What the sweep compared against, and what it did not reach, in a sentence or two."""
    if sweep.kind == "all-but":
        base = sweep.baseline
        text = (f"Each weighted layer kept float while every other one stays quantized; recovery = metric with "
                f"the layer float minus the fully quantized model's (cosine {base.cosine:.5f}"
                + ("" if base.top1_agreement is None else f", top-1 agreement {100 * base.top1_agreement:.2f}%")
                + ").")
    else:
        text = "Each weighted layer quantized alone, every other node float; final-output cosine vs the float model."
    if sweep.not_reached:
        text += (f" The time limit of {sweep.time_limit:g} s stopped the sweep before {len(sweep.not_reached)} "
                 f"layer(s): {', '.join(sweep.not_reached)}.")
    return " ".join([text, *sweep.notes])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(value: str) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(clean(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


def render_markdown(content: ReportContent, top: int = 20) -> str:
    out = [f"# {content.title}", "", f"float model `{content.float_path}` → quantized model `{content.quant_path}`", ""]
    out.extend(f"> **warning:** {n}" for n in content.notes)
    out += ["## Summary", "", _md_table(["", ""], overview_rows(content)), ""]
    if content.verify is not None:
        out += ["## Fidelity", "", _md_table(*fidelity_rows(content.verify)), ""]
    if content.budget is not None:
        b = content.budget
        out += ["## Accuracy budget search", "",
                f"{'Met' if b.met else '**NOT met**'}: {b.metric} drop {b.drop:.5f} (max {b.max_drop:g}), "
                f"{len(b.trials)} candidates in {b.seconds:.1f} s; fell back from {_start(b)}: "
                f"{', '.join(f'{n} ({_precision(b, n)})' for n in b.excluded) or 'none'}.", "", _md_table(*budget_rows(b)), ""]
    if content.sensitivity is not None:
        header, rows = sensitivity_rows(content.sensitivity)
        out += [f"## Per-layer sensitivity (worst {min(top, len(rows))} of {len(rows)})", "",
                _md_table(header, rows[:top]), ""]
    for title, sweep in (("Quantize only this layer", content.sweep), ("All but this layer", content.all_but)):
        if sweep is not None:
            out += [f"## {title}", "", sweep_summary(sweep), "", _md_table(*sweep_rows(sweep)), ""]
    if content.histograms:
        worst = sorted(content.histograms, key=lambda h: -h.clipping_mse)[:top]
        out += ["## Clipping error (largest first)", "",
                _md_table(["tensor", "role", "clipped %", "rounding MSE", "clipping MSE"],
                          [[h.tensor, h.role, f"{100 * h.clipped:.3f}", f"{h.rounding_mse:.3g}", f"{h.clipping_mse:.3g}"]
                           for h in worst]), ""]
    out.append("Plots (SQNR bars, histograms with the int8 grid, speed vs fidelity) are in report.html.")
    return "\n".join(out) + "\n"
