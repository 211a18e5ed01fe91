"""Per-layer sensitivity: how far each quantized activation of a QDQ model is from the float one.

(Dynamic int8 models have no stored activation quantizers: they are measured layer output by layer
output, see `lowbit.analysis.sensitivity_dynamic`; `layer_sensitivity` dispatches on the stored mode.)

Both models run on ONNX Runtime over the same data, batch by batch. In the QDQ model the tensors
read are the DequantizeLinear outputs of the activations recorded in the stored plan (and the
QuantizeLinear inputs just before them); in the float model, the same tensor names after the same
pre-processing `quantize_onnx` applies (constant folding and Conv+BN fusion rename tensors, so the
raw float graph would not match). Both models stream through `collect.ActivationStream` in
memory-bounded chunks and a float value waits only until its quantized partner arrives
(`statistics.Partners`); only running sums are kept (signal, noise, cross products in float64).

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

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.analysis.sensitivity_report import SensitivityReport, Sums, TensorSensitivity
from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.collect import ActivationStream
from lowbit.onnx.graph_index import GraphIndex, values_of
from lowbit.onnx.io import load_model
from lowbit.onnx.pipeline import reference_model
from lowbit.onnx.statistics import Partners, paired_stream_budget, with_last
from lowbit.onnx.stored_plan import StoredSettings, read_plan
from lowbit.plan import QuantPlan
from lowbit.progress import progress

__all__ = ["SensitivityReport", "TensorSensitivity", "layer_sensitivity"]


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
    model at `float_path`, over `data` (see the module docstring); for a dynamic int8 model, of
    every quantized layer's output (`lowbit.analysis.sensitivity_dynamic`). Both models stream
    through `collect.ActivationStream`, each within a quarter of `memory_budget_mb` (None: the
    calibration default; `statistics.paired_stream_budget`), so the analysis, which holds two
    models, peaks within what calibration with the same budget does."""
    if batch_size < 1:
        raise LowbitError(f"batch size must be at least 1, got {batch_size}")
    quant = load_model(quant_path)
    plan = _analyzable_plan(quant, quant_path)
    if plan.mode == "dynamic":
        from lowbit.analysis.sensitivity_dynamic import dynamic_sensitivity

        return dynamic_sensitivity(float_path, quant_path, quant, plan, data, samples=samples, batch_size=batch_size,
                                   threads=threads, memory_budget_mb=memory_budget_mb)
    original = load_model(float_path)
    inputs = model_inputs(original)
    reference = reference_model(original, StoredSettings.of(plan).records, copy=False)
    del original  # the prepared reference is what runs: the raw float model would only hold memory
    dataset = CalibrationData(data, inputs, samples=samples, what="analysis data")
    probes, tensors = _probes(plan, reference, quant)
    if not probes:
        raise LowbitError(f"{quant_path} has no quantized activation that matches a tensor of {float_path}; "
                          "pass the float model it was quantized from")
    budget = paired_stream_budget(memory_budget_mb)
    ref_stream = ActivationStream(reference, list(dict.fromkeys(p.reference for p in probes)),
                                  memory_budget_mb=budget, threads=threads)
    quant_stream = ActivationStream(quant, list(dict.fromkeys(n for p in probes for n in (p.before, p.quantized))),
                                    memory_budget_mb=budget, threads=threads)
    by_output: dict[str, list[_Probe]] = {}
    for p in probes:
        by_output.setdefault(p.quantized, []).append(p)
    ref_uses = Counter(p.reference for p in probes)
    before_uses = Counter(p.before for p in probes)
    sums = {p.entry.tensor: Sums() for p in probes}
    seen = 0
    total = -(-dataset.num_samples // dataset.feed_batch_size(batch_size))
    with progress(total=total, desc="analyzing", unit="batch") as bar:
        for batch, last in with_last(dataset.batches(batch_size)):
            partners = Partners(ref_stream.chunks(batch, last=last), ref_uses)
            befores = Partners(iter(()), before_uses)  # a Q input waits for its DQ output (just after it)
            for found in quant_stream.chunks(batch, last=last):
                befores.held.update((n, v) for n, v in found.items() if n in before_uses)
                for name, got in found.items():
                    for p in by_output.get(name, ()):
                        ref, before = partners.take(p.reference), befores.take(p.before)
                        if ref.dtype.kind == "f" and got.dtype.kind == "f":
                            sums[p.entry.tensor].add(ref, got, before, p.step)
                del found  # one chunk of activations at a time
            partners.finish()
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
    in_float = values_of(reference.graph)
    rescaled = _rescaled_tensors(StoredSettings.of(plan), reference)
    index = GraphIndex.of(quant)
    producer, inits = index.producer, index.initializers
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


def _rescaled_tensors(settings: StoredSettings, reference: onnx.ModelProto) -> dict[str, str]:
    """Tensors whose channels were rescaled on purpose (their consumers undo it): name -> reason."""
    rescaled: dict[str, str] = {}
    for record in settings.records:
        rescaled.update(record.rescaled(reference))
    return rescaled
