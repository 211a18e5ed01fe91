"""The QuantPlan: what was (or will be) done to every tensor of a model.

A plan is a list of entries "tensor -> role, spec, quantization parameters, the node(s) it feeds,
status". Backends build it from a graph and an op registry, calibration fills the ranges,
algorithms and the accuracy-budget search edit entries, and writers consume it. The plan used is
stored in the output model (ONNX `metadata_props` under `lowbit.plan`) so anyone can ask "what was
done to this model?" later.

Plain data only: no graph, runtime or framework code here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from lowbit.errors import LowbitError
from lowbit.numerics import QParams
from lowbit.spec import QuantSpec

PLAN_METADATA_KEY = "lowbit.plan"
VERSION_METADATA_KEY = "lowbit.version"
PLAN_FORMAT = 1

Role = Literal["weight", "activation", "bias"]
_PLURALS = {"weight": "weights", "activation": "activations", "bias": "biases"}
Status = Literal["quantized", "float"]


@dataclass
class PlanEntry:
    """One tensor: its role, how it is quantized (or why it stays float), and where it goes."""

    tensor: str
    role: Role
    status: Status = "quantized"
    spec: QuantSpec | None = None
    qparams: QParams | None = None
    # Calibrated (min, max) for activations, as plain lists in compact layout.
    range: tuple[Any, Any] | None = None
    nodes: list[str] = field(default_factory=list)
    reason: str = ""
    # Name of the tensor whose parameters this one shares (shape ops pass quantization through).
    shares: str | None = None
    # Biases: the scale is the product of these tensors' scales (input activation x weight).
    scale_of: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.status == "quantized"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "role": self.role,
            "status": self.status,
            "spec": None if self.spec is None else self.spec.to_dict(),
            "qparams": None if self.qparams is None else self.qparams.to_dict(),
            "range": None if self.range is None else [_plain(v) for v in self.range],
            "nodes": list(self.nodes),
            "reason": self.reason,
            "shares": self.shares,
            "scale_of": list(self.scale_of),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanEntry:
        return cls(
            tensor=data["tensor"],
            role=data["role"],
            status=data.get("status", "quantized"),
            spec=None if data.get("spec") is None else QuantSpec.from_dict(data["spec"]),
            qparams=None if data.get("qparams") is None else QParams.from_dict(data["qparams"]),
            range=None if data.get("range") is None else tuple(data["range"]),
            nodes=list(data.get("nodes", [])),
            reason=data.get("reason", ""),
            shares=data.get("shares"),
            scale_of=list(data.get("scale_of", [])),
        )


@dataclass
class QuantPlan:
    """All entries for one model, plus what the backend could not handle."""

    mode: str
    entries: list[PlanEntry] = field(default_factory=list)
    # Nodes kept float, name -> reason (excluded by the user, sensitive op, mask input, ...).
    float_nodes: dict[str, str] = field(default_factory=dict)
    # Op types the backend has no rule for; their nodes run in float.
    unsupported_ops: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, entry: PlanEntry) -> PlanEntry:
        self.entries.append(entry)
        return entry

    def get(self, tensor: str, role: Role | None = None) -> PlanEntry | None:
        for entry in self.entries:
            if entry.tensor == tensor and (role is None or entry.role == role):
                return entry
        return None

    def quantized(self, role: Role | None = None) -> list[PlanEntry]:
        return [e for e in self.entries if e.quantized and (role is None or e.role == role)]

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            key = f"{_PLURALS[entry.role]} {'quantized' if entry.quantized else 'float'}"
            counts[key] = counts.get(key, 0) + 1
        counts["float nodes"] = len(self.float_nodes)
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "mode": self.mode,
            "settings": self.settings,
            "entries": [e.to_dict() for e in self.entries],
            "float_nodes": dict(self.float_nodes),
            "unsupported_ops": list(self.unsupported_ops),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise LowbitError(
                f"quantization plan has format {data.get('format') if isinstance(data, dict) else None!r}, "
                f"this lowbit reads format {PLAN_FORMAT}; re-quantize the model with this version"
            )
        return cls(
            mode=data["mode"],
            entries=[PlanEntry.from_dict(e) for e in data.get("entries", [])],
            float_nodes=dict(data.get("float_nodes", {})),
            unsupported_ops=list(data.get("unsupported_ops", [])),
            settings=dict(data.get("settings", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LowbitError(f"stored quantization plan is not valid JSON ({exc.msg}); re-quantize the model") from None
        return cls.from_dict(data)


def _plain(value: Any) -> Any:
    """NumPy scalars/arrays to JSON-friendly lists and floats."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
