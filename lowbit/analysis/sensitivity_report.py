"""The per-layer sensitivity report types and their running sums, shared by the static
(`sensitivity`) and dynamic (`sensitivity_dynamic`) analyses."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class TensorSensitivity:
    tensor: str
    nodes: list[str]
    sqnr_db: float | None = None  # None: no noise at all, or skipped
    cosine: float | None = None
    local_sqnr_db: float | None = None
    clipped: float | None = None
    skipped: str = ""


@dataclass
class SensitivityReport:
    float_path: str
    quant_path: str
    samples: int
    tensors: list[TensorSensitivity]
    notes: list[str] = field(default_factory=list)
    mode: str = "static"  # dynamic: one row per quantized layer output

    def ranked(self) -> list[TensorSensitivity]:
        """Measured tensors, worst (lowest SQNR vs float) first."""
        measured = [t for t in self.tensors if not t.skipped]
        return sorted(measured, key=lambda t: math.inf if t.sqnr_db is None else t.sqnr_db)

    def to_dict(self) -> dict:
        return {"float_model": self.float_path, "quant_model": self.quant_path, "mode": self.mode,
                "samples": self.samples,
                "ranked": [asdict(t) for t in self.ranked()],
                "skipped": [asdict(t) for t in self.tensors if t.skipped], "notes": self.notes}

    def text(self, top: int = 20) -> str:
        ranked = self.ranked()
        lines = [f"per-layer sensitivity of {Path(self.quant_path).name} vs {Path(self.float_path).name} "
                 f"({self.samples} samples; worst first)"]
        width = min(56, max([len(t.tensor) for t in ranked] + [6]))
        static = self.mode == "static"
        lines.append(f"  {'tensor' if static else 'layer output':<{width}} {'SQNR dB':>8} {'cosine':>9} {'own dB':>8} "
                     f"{'clipped':>8}  {'read by' if static else 'layer'}")
        for t in ranked[:top]:
            lines.append(f"  {t.tensor[-width:]:<{width}} {_db(t.sqnr_db):>8} {_num(t.cosine, '.5f'):>9} "
                         f"{_db(t.local_sqnr_db):>8} {_pct(t.clipped):>8}  {', '.join(t.nodes)[:60]}")
        if len(ranked) > top:
            lines.append(f"  ... {len(ranked) - top} more (use --top or --json)")
        if static:
            lines.append("  SQNR/cosine: quantized vs float model at this tensor (error accumulated so far); "
                         "own dB: the noise this tensor's Q/DQ adds by itself")
        else:
            lines.append("  SQNR/cosine: quantized vs float model at this layer's output (error accumulated so far); "
                         "own dB: this layer quantized alone, fed the float model's input")
        for t in self.tensors:
            if t.skipped:
                lines.append(f"  skipped {t.tensor}: {t.skipped}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


class Sums:
    """Running float64 sums for SQNR and cosine of one tensor, and for its own noise."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.power = 0.0
        self.own_signal = self.own_noise = 0.0
        self.clipped = self.count = self.own_count = 0
        self.steps_known = False

    def add(self, ref: np.ndarray, got: np.ndarray, before: np.ndarray, step: float) -> None:
        """Static: `before`/`got` are the input/output of the tensor's own Q/DQ of grid step `step`."""
        for ref_part, got_part, before_part in _finite_slices(ref, got, before):
            self._error(ref_part, got_part)
            self._own(before_part, got_part)
            self.clipped += int((np.abs(before_part - got_part) > 0.5 * step * (1 + 1e-3) + 1e-12).sum())
        self.steps_known = True

    def add_error(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Quantized model's value `got` vs the float model's `ref`."""
        for ref_part, got_part in _finite_slices(ref, got):
            self._error(ref_part, got_part)

    def add_own(self, ref: np.ndarray, got: np.ndarray) -> None:
        """The tensor quantized alone (`got`) vs float (`ref`)."""
        for ref_part, got_part in _finite_slices(ref, got):
            self._own(ref_part, got_part)

    def _error(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.signal += float(ref @ ref)
        self.noise += float(((ref - got) ** 2).sum())
        self.dot += float(ref @ got)
        self.power += float(got @ got)
        self.count += ref.size

    def _own(self, clean: np.ndarray, noisy: np.ndarray) -> None:
        own = clean - noisy
        self.own_signal += float(clean @ clean)
        self.own_noise += float(own @ own)
        self.own_count += clean.size

    def result(self, entry: TensorSensitivity) -> TensorSensitivity:
        entry.sqnr_db = _sqnr(self.signal, self.noise)
        norms = math.sqrt(self.signal * self.power)
        entry.cosine = self.dot / norms if norms > 0 else (1.0 if self.signal == self.power == 0 else 0.0)
        entry.local_sqnr_db = _sqnr(self.own_signal, self.own_noise)
        entry.clipped = self.clipped / self.count if self.count and self.steps_known else None
        return entry


# Values per float64 slice: the sums' temporaries stay ~20 MB whatever the tensor's size (whole
# float64 copies of a 12.6 MB attention tensor and its partners took ~250 MB at once on MiniLM).
_SLICE = 1 << 18


def _finite_slices(*arrays: np.ndarray) -> Iterator[list[np.ndarray]]:
    """The arrays (same size), flattened, in float64 slices, where all of them are finite."""
    flats = [np.asarray(a).reshape(-1) for a in arrays]
    for start in range(0, flats[0].size, _SLICE):
        parts = [np.asarray(f[start:start + _SLICE], np.float64) for f in flats]
        finite = np.isfinite(parts[0])
        for part in parts[1:]:
            finite &= np.isfinite(part)
        yield parts if finite.all() else [part[finite] for part in parts]


def _sqnr(signal: float, noise: float) -> float | None:
    if noise <= 0:
        return None
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.1f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
