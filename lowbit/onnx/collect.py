"""Activation statistics streamed through ONNX Runtime.

The intermediate tensors to calibrate are exposed as extra graph outputs, the calibration set runs
through the model one batch at a time, and each batch's outputs go straight into the streaming
observers and are dropped: memory is bounded by one batch of activations, never all of them.

With a memory budget (`memory_budget_mb`), the tensors are split into groups whose outputs for
one batch fit the budget, and each batch runs once per group: more runs, bounded memory. Sizes
are estimated from the inferred shapes (symbolic dims resolved from the fed inputs) and then
replaced by the sizes actually seen, so later batches are packed by measurement.

Besides ranges, collection records which tensors ever held +-inf or mask-sized values (|x| >= 1e4,
e.g. additive attention masks of -10000, -1e9 or float32 min): such tensors cannot share an int8
grid with real activations, so the planner keeps them and their consumers float.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from lowbit.calibration import ObserverSet
from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.session import make_session
from lowbit.progress import progress
from lowbit.spec import QuantSpec

# Values this large in an activation are masks or sentinels, not signal.
MASK_MAGNITUDE = 1e4


@dataclass
class ActivationStats:
    """Calibrated ranges plus what collection learned about each tensor."""

    ranges: dict[str, tuple[np.ndarray, np.ndarray]]
    mask_like: set[str] = field(default_factory=set)
    non_float: set[str] = field(default_factory=set)
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    runs_per_batch: int = 1
    peak_output_bytes: int = 0  # largest set of exposed activations held at once


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the given intermediate tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    # ORT accepts outputs without type info and infers them, which also covers tensors that shape
    # inference could not annotate.
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return exposed


def collect_activation_stats(model: onnx.ModelProto, tensors: list[str], data: CalibrationData, *,
                             method: str = "auto", spec: QuantSpec, batch_size: int = 16,
                             threads: int | None = None, observer_options: dict | None = None,
                             memory_budget_mb: float | None = None) -> ActivationStats:
    """Run `data` through `model` batch by batch and return calibrated ranges of `tensors`.

    memory_budget_mb: upper bound for the activations exposed by one run (None: all at once)."""
    started = time.perf_counter()
    graph_inputs = {i.name for i in model.graph.input}
    produced = [t for t in dict.fromkeys(tensors) if t not in graph_inputs]
    session = make_session(with_outputs(model, produced), threads=threads, optimize=False)
    observers = ObserverSet(**(observer_options or {}))
    mask_like: set[str] = set()
    non_float: set[str] = set()
    batches = samples = 0
    total = -(-data.num_samples // data.feed_batch_size(batch_size))
    budget = None if memory_budget_mb is None else memory_budget_mb * 2**20
    measured: dict[str, int] = {}
    runs_per_batch = peak = 0
    with progress(total=total, desc="calibrating", unit="batch") as bar:
        for batch in data.batches(batch_size):
            if budget is None:
                groups = [produced]
            else:
                sizes = {**estimate_nbytes(model, produced, batch), **measured}
                groups = pack_by_size(produced, sizes, budget)
            runs_per_batch = max(runs_per_batch, len(groups))
            inputs_seen = {t: batch[t] for t in tensors if t in graph_inputs}
            for index, group in enumerate(groups or [[]]):
                found = dict(zip(group, session.run(group, batch))) if group else {}
                if index == 0:
                    found.update(inputs_seen)
                held = sum(v.nbytes for v in found.values())
                peak = max(peak, held)
                measured.update({n: v.nbytes for n, v in found.items()})
                float_values = {}
                for name, value in found.items():
                    if value.dtype.kind != "f":
                        non_float.add(name)
                        continue
                    value = value.astype(np.float32, copy=False)
                    if name not in mask_like and value.size and _looks_like_mask(value):
                        mask_like.add(name)
                    float_values[name] = value
                observers.update(float_values)
                del found, float_values  # one group of one batch's activations at a time
            batches += 1
            samples += next(iter(batch.values())).shape[0] if batch else 0
            bar.update(1)
    if batches == 0:
        raise LowbitError("calibration produced no batch (the model's fixed batch size is larger than the "
                          "number of samples); provide at least one full batch of samples")
    observers.warn_nonfinite()
    wanted = [t for t in tensors if t not in non_float and t not in mask_like]
    ranges = _ranges(observers, wanted, method, spec)
    return ActivationStats(ranges, mask_like, non_float, batches, samples, time.perf_counter() - started,
                           max(1, runs_per_batch), peak)


def estimate_nbytes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, int]:
    """Bytes of each tensor for this feed, from the inferred shapes: symbolic dims named on the
    graph inputs take the fed sizes; other unknown dims count as 1 (measurement corrects them)."""
    symbols: dict[str, int] = {}
    for value in model.graph.input:
        if value.name in feed and value.type.tensor_type.HasField("shape"):
            for dim, size in zip(value.type.tensor_type.shape.dim, feed[value.name].shape):
                if dim.dim_param:
                    symbols[dim.dim_param] = int(size)
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    sizes = {}
    for name in names:
        count, itemsize = 1, 4
        info = infos.get(name)
        if info is not None and info.type.tensor_type.HasField("shape"):
            elem = info.type.tensor_type.elem_type
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize if elem else 4
            for dim in info.type.tensor_type.shape.dim:
                count *= dim.dim_value if dim.HasField("dim_value") else symbols.get(dim.dim_param, 1)
        sizes[name] = count * itemsize
    return sizes


def pack_by_size(names: list[str], sizes: dict[str, int], budget: float) -> list[list[str]]:
    """Consecutive groups of `names` whose sizes add up to at most `budget` (a tensor larger than
    the budget gets a run of its own)."""
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        size = sizes.get(name, 0)
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def _looks_like_mask(value: np.ndarray) -> bool:
    finite_max = np.max(np.abs(value), initial=0.0, where=np.isfinite(value))
    return bool(finite_max >= MASK_MAGNITUDE) or not bool(np.isfinite(value).all())


def _ranges(observers: ObserverSet, names: list[str], method: str, spec: QuantSpec) -> dict:
    all_ranges = observers.ranges(method, spec)
    return {n: all_ranges[n] for n in names if n in all_ranges}
