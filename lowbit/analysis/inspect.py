"""`lowbit inspect`: what was done to a model, what precision each compute node runs in, and where
its bytes are.

The stored plan (metadata `lowbit.plan`) answers "what did lowbit intend"; the node precisions are
read from the graph itself (`graph_precision`), so a model edited after quantization, or quantized
by another tool, is still described truthfully. Where the two disagree, a note says so.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.analysis.graph_precision import NodePrecision, SizeRow, initializer_sizes, node_precisions
from lowbit.errors import LowbitError
from lowbit.onnx.io import load_model, model_size_bytes
from lowbit.onnx.stored_plan import StoredSettings, restore_plan_qparams
from lowbit.plan import PLAN_METADATA_KEY, VERSION_METADATA_KEY, QuantPlan

_FLOATS = ("float", "fp16", "bf16")


@dataclass
class InspectReport:
    path: str
    file_bytes: int
    nodes: list[NodePrecision]
    sizes: list[SizeRow]
    metadata_bytes: int
    plan: QuantPlan | None = None
    lowbit_version: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def quantized_by_lowbit(self) -> bool:
        return self.plan is not None

    @property
    def precision_counts(self) -> dict[str, int]:
        return dict(Counter(n.precision for n in self.nodes).most_common())

    def to_dict(self) -> dict[str, Any]:
        plan = None
        if self.plan is not None:
            plan = {"mode": self.plan.mode, "settings": self.plan.settings, "summary": self.plan.summary(),
                    "float_nodes": self.plan.float_nodes, "unsupported_ops": self.plan.unsupported_ops}
        return {"path": self.path, "quantized_by_lowbit": self.quantized_by_lowbit,
                "lowbit_version": self.lowbit_version, "plan": plan, "precision_counts": self.precision_counts,
                "nodes": [n.to_dict() for n in self.nodes],
                "sizes": {"initializers": [vars(r) for r in self.sizes],
                          "initializer_bytes": sum(r.nbytes for r in self.sizes),
                          "metadata_bytes": self.metadata_bytes, "file_bytes": self.file_bytes},
                "notes": self.notes}

    def text(self, max_nodes: int = 200) -> str:
        lines = [f"model: {self.path} ({_size(self.file_bytes)})"]
        lines += self._plan_lines()
        counts = ", ".join(f"{v} {k}" for k, v in self.precision_counts.items()) or "none"
        lines.append(f"compute nodes: {counts}")
        if self.nodes:
            width = min(48, max(len(n.node) for n in self.nodes))
            lines.append(f"  {'node':<{width}} {'op':<14} {'precision':<9} {'weight':<34} activation")
            for n in self.nodes[:max_nodes]:
                lines.append(f"  {n.node[-width:]:<{width}} {n.op_type:<14} {n.precision:<9} "
                             f"{_weight_text(n):<34} {n.activation}")
            if len(self.nodes) > max_nodes:
                lines.append(f"  ... {len(self.nodes) - max_nodes} more (use --json for all)")
        lines.append("size:")
        for row in self.sizes:
            lines.append(f"  {row.category:<24} {row.dtype:<7} {row.count:>5} tensors {_size(row.nbytes):>10}")
        lines.append(f"  {'metadata (plan, ...)':<24} {'':<7} {'':>13} {_size(self.metadata_bytes):>10}")
        lines.append(f"  {'total file':<24} {'':<7} {'':>13} {_size(self.file_bytes):>10}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _plan_lines(self) -> list[str]:
        if self.plan is None:
            quantized = sum(1 for n in self.nodes if n.precision not in _FLOATS)
            line = "not quantized by lowbit (no lowbit.plan in the metadata)"
            if quantized:
                line += f"; its graph does hold {quantized} quantized compute node(s), quantized by another tool"
            return [line]
        plan = self.plan
        lines = [f"quantized by lowbit {self.lowbit_version or '?'}: mode {plan.mode}"]
        stored = StoredSettings.of(plan)
        settings = {k: v for k, v in stored.other.items() if v not in (None, [], {})}
        if settings:
            lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        algorithms = {k: v for k, v in stored.algorithms.items() if v}
        lines.append("algorithms: " + (", ".join(f"{k} ({len(v) if isinstance(v, list) else v})"
                                                 for k, v in algorithms.items()) or "none"))
        lines.append("plan: " + ", ".join(f"{v} {k}" for k, v in plan.summary().items()))
        if plan.unsupported_ops:
            lines.append(f"unsupported ops left float: {', '.join(plan.unsupported_ops)}")
        return lines


def inspect_model(path: str | os.PathLike) -> InspectReport:
    """Describe the ONNX model at `path` (never modified)."""
    path = Path(path)
    model = load_model(path)
    report = InspectReport(str(path), model_size_bytes(path), node_precisions(model), initializer_sizes(model),
                           sum(len(p.key) + len(p.value) for p in model.metadata_props))
    props = {p.key: p.value for p in model.metadata_props}
    report.lowbit_version = props.get(VERSION_METADATA_KEY)
    if PLAN_METADATA_KEY in props:
        try:
            report.plan = QuantPlan.from_json(props[PLAN_METADATA_KEY])
        except LowbitError as exc:
            report.notes.append(f"the stored plan cannot be read ({exc})")
    if report.plan is not None:
        report.notes += _disagreements(report.plan, report.nodes)
        missing = restore_plan_qparams(report.plan, model)
        if missing:
            report.notes.append(f"{len(missing)} per-channel scale set(s) recorded in the plan are no longer among the "
                                f"model's initializers (first: {missing[0].tensor}); the model was changed after "
                                "quantization")
    return report


def _disagreements(plan: QuantPlan, nodes: list[NodePrecision]) -> list[str]:
    """Plan vs graph: quantized weights the plan promises but the graph does not show."""
    if plan.mode not in ("static", "dynamic", "qat"):
        return []
    promised = sum(len(e.nodes) or 1 for e in plan.quantized("weight"))
    found = sum(1 for n in nodes if n.weight is not None and n.precision not in _FLOATS)
    if found < promised:
        return [f"the plan lists {promised} quantized weight use(s) but the graph shows only {found} compute "
                "node(s) with quantized weights; the model was changed after quantization"]
    return []


def _weight_text(node: NodePrecision) -> str:
    w = node.weight
    if w is None:
        return "-"
    if w.granularity == "group":
        return f"{w.dtype} group {w.block_size} (axis {w.axis})"
    if w.granularity == "channel":
        return f"{w.dtype} per-channel" + ("" if w.axis is None else f" (axis {w.axis})")
    if w.dtype in _FLOATS:
        return w.dtype + (f" (stored {w.stored})" if w.stored else "")
    return f"{w.dtype} per-tensor"


def _size(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"
