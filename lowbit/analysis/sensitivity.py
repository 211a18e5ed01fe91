"""Per-layer sensitivity: how far each quantized activation of a QDQ model is from the float one.

(Dynamic int8 models have no stored activation quantizers: they are measured layer output by layer
output, see `lowbit.analysis.sensitivity_dynamic`; `layer_sensitivity` dispatches on the stored mode.)

Both models run on ONNX Runtime over the same data, batch by batch. In the QDQ model the tensors
read are the DequantizeLinear outputs of the activations recorded in the stored plan (and the
QuantizeLinear inputs just before them); in the float model, the same tensor names after the same
pre-processing `quantize_onnx` applies (constant folding and Conv+BN fusion rename tensors, so the
raw float graph would not match). Only running sums are kept (signal, noise, cross products in
float64), so memory is one batch of activations whatever the data size.

Per tensor:
- `sqnr_db` and `cosine`: quantized model vs float model, i.e. the error accumulated up to and
  including this tensor;
- `local_sqnr_db`: the noise of this tensor's own Q/DQ pair (its input vs its output in the QDQ
  model), i.e. what quantizing this tensor alone adds;
- `clipped`: share of values outside the int8 grid (error larger than half a step).

Tensors rescaled by SmoothQuant or cross-layer equalization no longer match the float tensor
channel for channel; they are listed as skipped, with the reason, rather than reported as bad.
Both sessions run unoptimized, so ONNX Runtime evaluates exactly the QuantizeLinear ->
DequantizeLinear arithmetic the ONNX spec defines (fused int8 kernels agree up to requantization
rounding).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import with_outputs
from lowbit.onnx.io import load_model
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import ensure_opset
from lowbit.onnx.quantize import read_plan
from lowbit.onnx.session import make_session
from lowbit.plan import QuantPlan
from lowbit.progress import progress


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


class _Sums:
    """Running float64 sums for SQNR and cosine of one tensor, and for its own noise."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.power = 0.0
        self.own_signal = self.own_noise = 0.0
        self.clipped = self.count = self.own_count = 0
        self.steps_known = False

    def add(self, ref: np.ndarray, got: np.ndarray, before: np.ndarray, step: float) -> None:
        """Static: `before`/`got` are the input/output of the tensor's own Q/DQ of grid step `step`."""
        ref, got, before = (np.asarray(a, np.float64).ravel() for a in (ref, got, before))
        finite = np.isfinite(ref) & np.isfinite(got) & np.isfinite(before)
        ref, got, before = ref[finite], got[finite], before[finite]
        self._error(ref, got)
        self._own(before, got)
        self.clipped += int((np.abs(before - got) > 0.5 * step * (1 + 1e-3) + 1e-12).sum())
        self.steps_known = True

    def add_error(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Quantized model's value `got` vs the float model's `ref`."""
        self._error(*_finite(ref, got))

    def add_own(self, ref: np.ndarray, got: np.ndarray) -> None:
        """The tensor quantized alone (`got`) vs float (`ref`)."""
        self._own(*_finite(ref, got))

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


def _finite(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, got = (np.asarray(a, np.float64).ravel() for a in (ref, got))
    finite = np.isfinite(ref) & np.isfinite(got)
    return ref[finite], got[finite]


@dataclass
class _Probe:
    """Where one planned activation is read: in the float model, and before/after its Q/DQ."""

    entry: TensorSensitivity
    reference: str
    quantized: str
    before: str
    step: float


def layer_sensitivity(float_path: str | os.PathLike, quant_path: str | os.PathLike,
                      data: str | os.PathLike | dict, *, samples: int | None = None, batch_size: int = 16,
                      threads: int | None = None, memory_budget_mb: float | None = None) -> SensitivityReport:
    """SQNR and cosine of every quantized activation of the QDQ model at `quant_path` vs the float
    model at `float_path`, over `data` (see the module docstring). For a dynamic int8 model: of
    every quantized layer's output, see `lowbit.analysis.sensitivity_dynamic` (whose streams keep
    the exposed activations within `memory_budget_mb`; None: the calibration default)."""
    if batch_size < 1:
        raise LowbitError(f"batch size must be at least 1, got {batch_size}")
    quant = load_model(quant_path)
    plan = _analyzable_plan(quant, quant_path)
    if plan.mode == "dynamic":
        from lowbit.analysis.sensitivity_dynamic import dynamic_sensitivity
        from lowbit.onnx.collect import DEFAULT_MEMORY_BUDGET_MB

        return dynamic_sensitivity(float_path, quant_path, quant, plan, data, samples=samples, batch_size=batch_size,
                                   threads=threads, memory_budget_mb=memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB)
    original = load_model(float_path)
    reference = preprocess(ensure_opset(original))
    dataset = CalibrationData(data, original, samples=samples, what="analysis data")
    probes, tensors = _probes(plan, reference, quant)
    if not probes:
        raise LowbitError(f"{quant_path} has no quantized activation that matches a tensor of {float_path}; "
                          "pass the float model it was quantized from")
    inputs = {i.name for i in reference.graph.input}
    ref_names = [p.reference for p in probes if p.reference not in inputs]
    quant_names = list(dict.fromkeys(n for p in probes for n in (p.quantized, p.before) if n not in inputs))
    ref_session = make_session(with_outputs(reference, ref_names), threads=threads, optimize=False)
    quant_session = make_session(with_outputs(quant, quant_names), threads=threads, optimize=False)
    sums = {p.entry.tensor: _Sums() for p in probes}
    seen = 0
    total = -(-dataset.num_samples // dataset.feed_batch_size(batch_size))
    with progress(total=total, desc="analyzing", unit="batch") as bar:
        for batch in dataset.batches(batch_size):
            ref = {**batch, **dict(zip(ref_names, ref_session.run(ref_names, batch)))}
            got = {**batch, **dict(zip(quant_names, quant_session.run(quant_names, batch)))}
            for p in probes:
                if ref[p.reference].dtype.kind == "f" and got[p.quantized].dtype.kind == "f":
                    sums[p.entry.tensor].add(ref[p.reference], got[p.quantized], got[p.before], p.step)
            del ref, got  # one batch of activations at a time
            seen += next(iter(batch.values())).shape[0] if batch else 0
            bar.update(1)
    for p in probes:
        sums[p.entry.tensor].result(p.entry)
    return SensitivityReport(str(float_path), str(quant_path), seen, tensors)


def _analyzable_plan(quant: onnx.ModelProto, path) -> QuantPlan:
    plan = read_plan(quant)
    if plan.mode not in ("static", "dynamic"):
        raise LowbitError(f"{path} was quantized in {plan.mode} mode, which per-layer sensitivity does not cover; "
                          "analyze a model written by lowbit quantize --mode static or --mode dynamic")
    return plan


def _probes(plan: QuantPlan, reference: onnx.ModelProto, quant: onnx.ModelProto
            ) -> tuple[list[_Probe], list[TensorSensitivity]]:
    """Match every quantized activation of the plan to its float tensor and its Q/DQ pair."""
    in_float = {i.name for i in reference.graph.input} | {o for n in reference.graph.node for o in n.output}
    rescaled = _rescaled_tensors(plan, reference)
    producer = {o: n for n in quant.graph.node for o in n.output}
    inits = {t.name: t for t in quant.graph.initializer}
    probes, tensors = [], []
    for entry in plan.quantized("activation"):
        item = TensorSensitivity(entry.tensor, list(entry.nodes))
        tensors.append(item)
        dq = next((producer[n] for n in (entry.tensor, f"{entry.tensor}_dequantized")
                   if n in producer and producer[n].op_type == "DequantizeLinear"), None)
        q = producer.get(dq.input[0]) if dq is not None else None
        if q is None or q.op_type != "QuantizeLinear":
            item.skipped = "no QuantizeLinear -> DequantizeLinear pair for it in the quantized graph"
        elif entry.tensor not in in_float:
            item.skipped = "no tensor of this name in the float model (added by SmoothQuant or another rewrite)"
        elif entry.tensor in rescaled:
            item.skipped = rescaled[entry.tensor]
        else:
            scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else np.ones(1)
            probes.append(_Probe(item, entry.tensor, dq.output[0], q.input[0], float(np.max(scale))))
    return probes, tensors


def _rescaled_tensors(plan: QuantPlan, reference: onnx.ModelProto) -> dict[str, str]:
    """Tensors whose channels were rescaled on purpose (their consumers undo it): name -> reason."""
    algorithms = plan.settings.get("algorithms") or {}
    rescaled = {}
    for group in algorithms.get("smoothquant", []):
        if group.get("folded_into"):
            rescaled[group["activation"]] = "rescaled per channel by SmoothQuant (its readers undo the scaling)"
    nodes = {n.name: n for n in reference.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in reference.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for chain in algorithms.get("equalized_chains", []):
        for conv in chain[:-1]:  # every link but the last conv's output is scaled
            if conv not in nodes:
                continue
            for out in nodes[conv].output:
                rescaled[out] = "rescaled per channel by cross-layer equalization"
                for reader in readers.get(out, []):
                    if reader.op_type in ("Relu", "Clip"):
                        rescaled[reader.output[0]] = "rescaled per channel by cross-layer equalization"
    return rescaled


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
