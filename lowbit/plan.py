"""The QuantPlan: what was (or will be) done to every tensor of a model.

A plan is a list of entries "tensor -> role, spec, quantization parameters, the node(s) it feeds,
status". Backends build it from a graph and an op registry, calibration fills the ranges,
algorithms and the accuracy-budget search edit entries, and writers consume it. The plan used is
stored in the output model (ONNX `metadata_props` under `lowbit.plan`) so anyone can ask "what was
done to this model?" later.

Stored compactly (format 2): a per-tensor entry keeps its scale and zero point as numbers, but a
per-channel or per-group one keeps only a summary (shape, scale min/max/mean, how many zero points
are nonzero) and a fingerprint of the exact values. Those values already sit in the model's
initializers (the Q/DQ scale tensors, the dynamic-mode weight scales); writing them out again as
JSON made the metadata 165 kB on ResNet-18 and 1.4 MB on MiniLM, eating the size win. The
fingerprint finds them again whatever the writer named or reshaped them (`restore_qparams`), and a
model edited after quantization shows up as a fingerprint that no longer matches. Format 1 plans
(every value as JSON) are still read.

Plain data only: no graph, runtime or framework code here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lowbit.errors import LowbitError
from lowbit.numerics import QParams
from lowbit.spec import QuantSpec

PLAN_METADATA_KEY = "lowbit.plan"
VERSION_METADATA_KEY = "lowbit.version"
PLAN_FORMAT = 2
_READABLE_FORMATS = (1, 2)

Role = Literal["weight", "activation", "bias"]
_PLURALS = {"weight": "weights", "activation": "activations", "bias": "biases"}
Status = Literal["quantized", "float"]


@dataclass(frozen=True)
class QParamsSummary:
    """What the stored plan keeps of parameters with more than one value: enough to read at a
    glance, plus fingerprints that find the exact values among the model's arrays.

    A fingerprint is the 8-byte BLAKE2b digest of the values raveled in C order, scales as
    little-endian float32 and zero points as little-endian int64, so it does not depend on the
    name, shape or integer type the writer stored them with."""

    spec: QuantSpec
    shape: tuple[int, ...]
    scale_min: float
    scale_max: float
    scale_mean: float
    scale_digest: str
    nonzero_zero_points: int
    zero_point_digest: str | None = None  # only when some zero point is nonzero

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, qparams: QParams) -> QParamsSummary:
        scale = _as_numpy(qparams.scale).astype(np.float32)
        zero_point = _as_numpy(qparams.zero_point).astype(np.int64)
        nonzero = int(np.count_nonzero(zero_point))
        return cls(qparams.spec, tuple(int(d) for d in scale.shape), float(scale.min()), float(scale.max()),
                   float(scale.mean(dtype=np.float64)), scale_digest(scale), nonzero,
                   zero_point_digest(zero_point) if nonzero else None)

    def restore(self, by_digest: dict[str, np.ndarray]) -> QParams | None:
        """The exact parameters, if `by_digest` (fingerprint -> values) holds them."""
        scale = by_digest.get(self.scale_digest)
        if scale is None or scale.size != self.count:
            return None
        if self.zero_point_digest is None:
            zero_point = np.zeros(self.shape, np.int32)
        else:
            found = by_digest.get(self.zero_point_digest)
            if found is None or found.size != self.count:
                return None
            zero_point = found.astype(np.int32).reshape(self.shape)
        return QParams(self.spec, scale.astype(np.float32).reshape(self.shape), zero_point)

    def to_dict(self, entry_spec: QuantSpec | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "shape": list(self.shape),
            "scale": {"min": self.scale_min, "max": self.scale_max, "mean": self.scale_mean,
                      "digest": self.scale_digest},
            "zero_point": {"nonzero": self.nonzero_zero_points},
        }
        if self.zero_point_digest is not None:
            data["zero_point"]["digest"] = self.zero_point_digest
        if self.spec != entry_spec:
            data["spec"] = self.spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], spec: QuantSpec) -> QParamsSummary:
        scale, zero_point = data["scale"], data["zero_point"]
        return cls(spec, tuple(int(d) for d in data["shape"]), float(scale["min"]), float(scale["max"]),
                   float(scale["mean"]), str(scale["digest"]), int(zero_point["nonzero"]),
                   zero_point.get("digest"))


def scale_digest(values: Any) -> str:
    """Fingerprint of scale values (see `QParamsSummary`)."""
    return _digest(np.ascontiguousarray(_as_numpy(values), dtype="<f4"))


def zero_point_digest(values: Any) -> str:
    """Fingerprint of zero-point values (see `QParamsSummary`)."""
    return _digest(np.ascontiguousarray(_as_numpy(values), dtype="<i8"))


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
    # Read from a stored plan: the summary of per-channel/per-group parameters. `qparams` stays
    # None until `restore_qparams` finds the exact values in the model.
    qparams_summary: QParamsSummary | None = None

    @property
    def quantized(self) -> bool:
        return self.status == "quantized"

    def summarize_qparams(self) -> QParamsSummary | None:
        """Summary of this entry's parameters (from the exact values when known), None for none
        or for a single scale."""
        if self.qparams is not None:
            return None if np.size(_as_numpy(self.qparams.scale)) == 1 else QParamsSummary.of(self.qparams)
        return self.qparams_summary

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, compact: fields at their default are left out, and parameters with more
        than one value are summarized (see the module docstring)."""
        data: dict[str, Any] = {"tensor": self.tensor, "role": self.role}
        if self.status != "quantized":
            data["status"] = self.status
        if self.spec is not None:
            data["spec"] = self.spec.to_dict()
        summary = self.summarize_qparams()
        if summary is not None:
            data["qparams"] = summary.to_dict(self.spec)
        elif self.qparams is not None:
            data["qparams"] = {"scale": _plain(_as_numpy(self.qparams.scale)),
                               "zero_point": _plain(_as_numpy(self.qparams.zero_point))}
            if self.qparams.spec != self.spec:
                data["qparams"]["spec"] = self.qparams.spec.to_dict()
        optional = {"range": None if self.range is None else [_plain(v) for v in self.range],
                    "nodes": list(self.nodes), "reason": self.reason, "shares": self.shares,
                    "scale_of": list(self.scale_of)}
        data.update({k: v for k, v in optional.items() if v not in (None, "", [])})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanEntry:
        spec = None if data.get("spec") is None else QuantSpec.from_dict(data["spec"])
        qparams, summary = _qparams_from_dict(data.get("qparams"), spec)
        return cls(
            tensor=data["tensor"],
            role=data["role"],
            status=data.get("status", "quantized"),
            spec=spec,
            qparams=qparams,
            range=None if data.get("range") is None else tuple(data["range"]),
            nodes=list(data.get("nodes", [])),
            reason=data.get("reason", ""),
            shares=data.get("shares"),
            scale_of=list(data.get("scale_of", [])),
            qparams_summary=summary,
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

    def summarized(self) -> list[PlanEntry]:
        """Entries read from a stored plan whose exact parameters are not restored yet."""
        return [e for e in self.entries if e.qparams is None and e.qparams_summary is not None]

    def restore_qparams(self, arrays: Iterable[Any]) -> list[PlanEntry]:
        """Fill in the exact per-channel/per-group parameters of summarized entries from `arrays`
        (the model's initializers, in any order, name or shape: they are matched by fingerprint).
        Returns the entries still without them (the model was changed after quantization)."""
        waiting = self.summarized()
        if not waiting:
            return []
        sizes = {e.qparams_summary.count for e in waiting}
        by_digest: dict[str, np.ndarray] = {}
        for array in arrays:
            array = _as_numpy(array)
            if array.size not in sizes:
                continue
            # A 2-D scale may be stored transposed (blocked weights in [in, out] layout).
            for layout in (array, array.T) if array.ndim == 2 else (array,):
                if array.dtype.kind == "f":
                    by_digest.setdefault(scale_digest(layout), layout)
                elif array.dtype.kind in "iu" or array.dtype.name.startswith(("int", "uint")):  # int4: kind "V"
                    by_digest.setdefault(zero_point_digest(layout), layout)
        missing = []
        for entry in waiting:
            entry.qparams = entry.qparams_summary.restore(by_digest)
            if entry.qparams is None:
                missing.append(entry)
        return missing

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            key = f"{_PLURALS[entry.role]} {'quantized' if entry.quantized else 'float'}"
            counts[key] = counts.get(key, 0) + 1
        counts["float nodes"] = len(self.float_nodes)
        return counts

    def to_dict(self) -> dict[str, Any]:
        # Entries name their spec by index into one table: a model has a handful of distinct specs.
        specs: list[dict[str, Any]] = []
        entries = [_spec_refs(e.to_dict(), specs) for e in self.entries]
        return {
            "format": PLAN_FORMAT,
            "mode": self.mode,
            "settings": self.settings,
            "specs": specs,
            "entries": entries,
            "float_nodes": dict(self.float_nodes),
            "unsupported_ops": list(self.unsupported_ops),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        if not isinstance(data, dict) or data.get("format") not in _READABLE_FORMATS:
            raise LowbitError(
                f"quantization plan has format {data.get('format') if isinstance(data, dict) else None!r}, "
                f"this lowbit reads formats {', '.join(map(str, _READABLE_FORMATS))}; "
                "re-quantize the model with this version"
            )
        specs = data.get("specs", [])  # format 2; format 1 writes each spec in full
        return cls(
            mode=data["mode"],
            entries=[PlanEntry.from_dict(_spec_values(e, specs)) for e in data.get("entries", [])],
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


def _qparams_from_dict(data: dict[str, Any] | None, entry_spec: QuantSpec | None
                       ) -> tuple[QParams | None, QParamsSummary | None]:
    """Exact parameters (format 1, or a single scale), or the summary of many."""
    if data is None:
        return None, None
    spec = QuantSpec.from_dict(data["spec"]) if data.get("spec") is not None else entry_spec
    if spec is None:
        raise LowbitError("a stored plan entry has quantization parameters but no spec; re-quantize the model")
    if isinstance(data.get("scale"), dict):
        return None, QParamsSummary.from_dict(data, spec)
    return QParams(spec, np.asarray(data["scale"], np.float32), np.asarray(data["zero_point"], np.int32)), None


def _spec_refs(entry: dict[str, Any], specs: list[dict[str, Any]]) -> dict[str, Any]:
    """`entry` with its spec dicts replaced by their index in `specs` (added there if new)."""
    for holder in (entry, entry.get("qparams") or {}):
        if isinstance(holder.get("spec"), dict):
            if holder["spec"] not in specs:
                specs.append(holder["spec"])
            holder["spec"] = specs.index(holder["spec"])
    return entry


def _spec_values(entry: dict[str, Any], specs: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of `_spec_refs` (format 1 entries have no indices and pass through)."""
    entry = dict(entry)
    if isinstance(entry.get("qparams"), dict):
        entry["qparams"] = dict(entry["qparams"])
    for holder in (entry, entry.get("qparams") or {}):
        index = holder.get("spec")
        if isinstance(index, int) and not isinstance(index, bool):
            if not 0 <= index < len(specs):
                raise LowbitError(f"a stored plan entry names spec {index}, but the plan has {len(specs)}; "
                                  "re-quantize the model")
            holder["spec"] = specs[index]
    return entry


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(values.tobytes(), digest_size=8).hexdigest()


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _plain(value: Any) -> Any:
    """NumPy scalars/arrays to JSON-friendly lists and floats."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
