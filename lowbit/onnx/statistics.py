"""One statistics pass: every activation statistic lowbit measures on an ONNX model streams here.

    collect(model, data.batches(16), [ChannelMeans(...), InputGram(...), Histograms(...)])

runs the batches through `collect.ActivationStream` once and hands each chunk's tensors to the
reducers that asked for them; a reducer folds a tensor into running sums and drops it. So every
user (calibration ranges, bias correction's channel means, SmoothQuant's and the outlier split's
channel abs-max, GPTQ/AWQ input Gram matrices, the report's histograms, the sensitivity sums)
has the same memory bound:

    peak ~ model + ONNX Runtime's working set for one batch
           + `memory_budget_mb` of exposed activations (DEFAULT_MEMORY_BUDGET_MB: 256 MB)
           + what the reducers hold (fixed: O(channels) per tensor, 2048-bin histograms,
             one [in, in] float64 Gram matrix per distinct GPTQ/AWQ input)

whatever the number of batches or tensors. With more than one thread (`threads`, default: the
cores this process may use), the work is spread without changing a single statistic:
  - the next chunk's forward pass runs on a background thread while this chunk is folded in
    (ONNX Runtime releases the GIL), each within half the budget, so the bound above holds;
  - the large tensors of a chunk are folded in on worker threads, one task per tensor (NumPy's
    loops release the GIL), so each tensor's statistics still see its batches in order; a tensor's
    first batch is folded in on the calling thread, in order (reducers create their per-tensor
    state then, in a repeatable order).
Two-model analyses (sensitivity) stream both models
the same way, each within a quarter of the budget (`PAIRED_STREAM_SHARE`: the rest pays for the
second model and the values waiting for their partner), and pair the values with `Partners` (a
reference value waits only until its partner in the other model arrives); their peak stays
within the calibration's (measured on MiniLM in bench/statistics_memory.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import onnx

from lowbit.calibration import ObserverSet
from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import Batch
from lowbit.onnx.collect import DEFAULT_MEMORY_BUDGET_MB, ActivationStream, looks_like_mask_range, observed_sample
from lowbit.onnx.session import worker_threads
from lowbit.progress import progress


class Reducer:
    """Running statistics of some tensors. `tensors`: the names it reads; `update` folds one
    tensor of one batch in (`batch`: that batch's graph inputs, e.g. an attention mask).
    `per_tensor`: True when an update touches only that tensor's statistics once they exist, so
    updates of different tensors may run on different threads."""

    tensors: list[str] = []
    per_tensor = False

    def update(self, name: str, value: np.ndarray, batch: Batch) -> None:
        raise NotImplementedError


def collect(model: onnx.ModelProto, batches: Iterable[Batch], reducers: list[Reducer], *,
            threads: int | None = None, memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
            total: int | None = None,
            desc: str | None = None) -> ActivationStream:
    """Stream `batches` through `model` once, feeding every reducer its tensors (see the module
    docstring for the memory bound; memory_budget_mb None or inf: unbounded). Returns the stream (its
    `peak_bytes` and `runs_per_batch` say how the activations were chunked)."""
    wanted: dict[str, list[Reducer]] = {}
    for reducer in reducers:
        for name in reducer.tensors:
            wanted.setdefault(name, []).append(reducer)
    workers = worker_threads(threads)
    ahead = READ_AHEAD and workers > 1
    if ahead and memory_budget_mb is not None and not math.isinf(memory_budget_mb):
        memory_budget_mb /= 2  # two chunks are held at once: the one folded in and the next
    stream = ActivationStream(model, list(wanted), memory_budget_mb=memory_budget_mb, threads=threads)

    def chunks() -> Iterator[tuple[Batch, dict[str, np.ndarray] | None]]:
        for batch, last in with_last(batches):
            for found in stream.chunks(batch, last=last):
                yield batch, found
                del found
            yield batch, None  # the batch is done

    with progress(total=total, desc=desc or "measuring", unit="batch", disable=True if desc is None else None) as bar, \
            ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        seen: set[str] = set()
        for batch, found in (read_ahead(chunks()) if ahead else chunks()):
            if found is None:
                bar.update(1)
                continue
            _fold_in(found, batch, wanted, pool, seen)
            del found  # one chunk of one batch's activations at a time (two when reading ahead)
    return stream


READ_AHEAD = True


def read_ahead(items: Iterator) -> Iterator:
    """`items`, each next one computed on a background thread while the caller handles the
    current one (ONNX Runtime releases the GIL while it runs)."""
    with ThreadPoolExecutor(1) as worker:
        pending = worker.submit(next, items, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = worker.submit(next, items, _END)
            yield item
            del item


# Tensors smaller than this are folded in on the calling thread: a task costs more than their update.
PARALLEL_MIN_BYTES = 2**18


def _fold_in(found: dict[str, np.ndarray], batch: Batch, wanted: dict[str, list[Reducer]],
             pool: ThreadPoolExecutor | None, seen: set[str]) -> None:
    """Every reducer's update with each tensor of one chunk: large tensors already seen by
    `per_tensor` reducers in `pool`'s threads, the others here, in order."""
    def update(name: str) -> None:
        for reducer in wanted.get(name, ()):
            reducer.update(name, found[name], batch)

    parallel = {name for name, value in found.items() if pool is not None and name in seen
                and value.nbytes >= PARALLEL_MIN_BYTES and all(r.per_tensor for r in wanted.get(name, ()))}
    tasks = [pool.submit(update, name) for name in found if name in parallel]
    try:
        for name in found:
            if name not in parallel:
                update(name)
    finally:
        wait(tasks)  # the chunk is dropped only when every update is done
    for task in tasks:
        task.result()  # the first failure, if any
    seen.update(found)


def with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, whether it is the last one), reading one item ahead."""
    items = iter(items)
    pending = next(items, _END)
    while pending is not _END:
        item, pending = pending, next(items, _END)
        yield item, pending is _END


_END = object()


def _channel_rows(value: np.ndarray, axis: int) -> np.ndarray:
    """`value` as (channels, everything else)."""
    return np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)


class ChannelMeans(Reducer):
    """Mean of each channel along `axis` (NCHW / (N, C): axis 1), summed in float64."""

    per_tensor = True

    def __init__(self, tensors: list[str], axis: int = 1) -> None:
        self.tensors = list(dict.fromkeys(tensors))
        self.axis = axis
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def update(self, name: str, value: np.ndarray, batch: Batch) -> None:
        value = np.asarray(value)
        axis = self.axis % value.ndim
        # Summed in float64 without a float64 copy of the tensor (the copy was 2 s of a 736x1088
        # text detector's calibration).
        sums = value.sum(axis=tuple(i for i in range(value.ndim) if i != axis), dtype=np.float64)
        self.sums[name] = self.sums.get(name, 0.0) + sums
        self.counts[name] = self.counts.get(name, 0) + value.size // value.shape[axis]

    def result(self) -> dict[str, np.ndarray]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


class ChannelAbsMax(Reducer):
    """max |x| of each channel along `axis` (default: the last, a transformer's features), non-finite
    values ignored."""

    per_tensor = True

    def __init__(self, tensors: list[str], axis: int = -1) -> None:
        self.tensors = list(dict.fromkeys(tensors))
        self.axis = axis
        self.peaks: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # last seen; callers skip layouts they cannot use
        self.non_float: set[str] = set()

    def update(self, name: str, value: np.ndarray, batch: Batch) -> None:
        self.shapes[name] = value.shape
        if value.dtype.kind != "f":
            self.non_float.add(name)
        if not -value.ndim <= self.axis < value.ndim:
            return  # no such channel axis (a scalar, or a vector read as NCHW)
        value = np.asarray(value, np.float32)
        last = self.axis in (-1, value.ndim - 1)
        rows = value.reshape(-1, value.shape[-1]) if last else _channel_rows(value, self.axis)
        reduce = 0 if last else 1
        # max |x| = max(max x, -min x), exactly, from two reductions without temporaries (the
        # abs/isfinite copies were 0.5 s of a 736x1088 text detector's calibration); non-finite
        # values take the slow path, which leaves them out.
        peak = np.maximum(rows.max(axis=reduce), -rows.min(axis=reduce))
        if not np.isfinite(peak).all():
            finite = np.abs(rows)
            peak = np.where(np.isfinite(finite), finite, 0.0).max(axis=reduce)
        self.peaks[name] = peak if name not in self.peaks else np.maximum(self.peaks[name], peak)

    def result(self) -> dict[str, np.ndarray]:
        return self.peaks


# Names under which exporters call the padding mask; padded tokens are left out of input statistics.
MASK_INPUTS = ("attention_mask", "input_mask")


# Rows of one input wait until there are this many (at most: the input's width) before they
# update its Gram matrix: each update pays a fixed pass over the [in, in] float64 sums, which
# a few rows per call (an RNN step at batch 1) would otherwise pay every time. Waiting rows take
# at most 256 x in x 4 bytes, less than the Gram matrix itself.
GRAM_MIN_ROWS = 256


class InputGram(Reducer):
    """GPTQ/AWQ input statistics: one `HessianAccumulator` (Gram matrix, mean |x|) per tensor of
    the given width, or per pool where `pooled` maps tensors to a shared accumulator's name (the
    inputs of one shared weight). Rows where the batch's attention mask is 0 (padding) are left
    out when the tensor's leading shape matches the mask."""

    def __init__(self, widths: dict[str, int], mask_input: str | None = None,
                 pooled: dict[str, str] | None = None) -> None:
        from lowbit.algorithms import HessianAccumulator

        self.tensors = list(widths)
        self.mask_input = mask_input
        self.pool = {name: (pooled or {}).get(name, name) for name in widths}
        self._accumulators = {}
        for name, width in widths.items():
            self._accumulators.setdefault(self.pool[name], HessianAccumulator(width))
        self._pending: dict[str, list] = {}  # pool -> rows waiting (GRAM_MIN_ROWS)

    @property
    def accumulators(self) -> dict:
        for pool in list(self._pending):
            self._flush(pool)
        return self._accumulators

    def update(self, name: str, value: np.ndarray, batch: Batch) -> None:
        import torch

        if value.dtype.kind != "f":
            raise LowbitError(f"the input {name!r} of a quantized MatMul is not float; exclude that node")
        rows = torch.from_numpy(np.asarray(value, np.float32))
        mask = batch.get(self.mask_input) if self.mask_input else None
        if mask is not None and tuple(mask.shape) == tuple(rows.shape[:-1]):
            rows = rows[torch.from_numpy(np.asarray(mask) != 0)]
        pool = self.pool[name]
        width = self._accumulators[pool].in_features
        if rows.shape[-1] != width:
            self._accumulators[pool].add(rows)  # says which layer and width
        pending = self._pending.setdefault(pool, [])
        pending.append(rows.reshape(-1, width))
        if sum(len(r) for r in pending) >= min(GRAM_MIN_ROWS, width):
            self._flush(pool)

    def _flush(self, pool: str) -> None:
        import torch

        pending = self._pending.pop(pool, [])
        if pending:
            self._accumulators[pool].add(torch.cat(pending))


class Histograms(Reducer):
    """Streaming min/max and re-binning histograms (an `ObserverSet`, one observer per tensor
    even if it is never float) of the float tensors."""

    per_tensor = True

    def __init__(self, tensors: list[str], **observer_options) -> None:
        self.tensors = list(dict.fromkeys(tensors))
        self.observers = ObserverSet(**observer_options)
        for name in self.tensors:
            self.observers.add(name)

    def update(self, name: str, value: np.ndarray, batch: Batch) -> None:
        if np.asarray(value).dtype.kind == "f":
            self.observers.update({name: value})


class Ranges(Reducer):
    """Calibration: the `Histograms` of float tensors, plus which tensors are not float or ever
    held mask-sized values (|x| >= MASK_MAGNITUDE or +-inf; kept whole, the planner keeps them
    float). Large tensors are observed through `observed_sample` (exact min/max)."""

    per_tensor = True

    def __init__(self, tensors: list[str], **observer_options) -> None:
        self.tensors = list(dict.fromkeys(tensors))
        self.observers = ObserverSet(**observer_options)
        self.mask_like: set[str] = set()
        self.non_float: set[str] = set()

    def update(self, name: str, value: np.ndarray, batch: Batch) -> None:
        if value.dtype.kind != "f":
            self.non_float.add(name)
            return
        value = value.astype(np.float32, copy=False)
        bounds = None
        if name not in self.mask_like and value.size:
            lo, hi = float(value.min()), float(value.max())  # NaN and inf propagate here
            if looks_like_mask_range(lo, hi):
                self.mask_like.add(name)
            else:
                value = observed_sample(value, lo, hi)  # a sample keeps the extremes
                bounds = {name: (lo, hi)}
        self.observers.update({name: value}, bounds)


class Shapes(Reducer):
    """The shape each tensor had (for one feed: what MAC counts need)."""

    per_tensor = True

    def __init__(self, tensors: list[str]) -> None:
        self.tensors = list(dict.fromkeys(tensors))
        self.shapes: dict[str, tuple[int, ...]] = {}

    def update(self, name: str, value: np.ndarray, batch: Batch) -> None:
        self.shapes[name] = tuple(value.shape)


# Share of the memory budget each stream of a two-model analysis (`Partners`) exposes. A quarter,
# not a half: besides its own chunk and ONNX Runtime's working set for it, the analysis holds the
# partner's waiting values and a second model's weights and sessions. Measured on MiniLM dynamic
# sensitivity (bench/statistics_memory.py): peak RSS 1371 MB at half each, 1310 MB at a quarter,
# static calibration 1346 MB in the same conditions.
PAIRED_STREAM_SHARE = 0.25


def paired_stream_budget(memory_budget_mb: float | None) -> float:
    """The budget of each stream of a two-model analysis (None: the calibration default)."""
    return (memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB) * PAIRED_STREAM_SHARE


class Partners:
    """One side (the reference model) of a two-model comparison, for one batch: its values are
    held until the other side has read them `uses[name]` times, then dropped. The reference
    stream is advanced only as far as the other side needs, so few values wait at a time.
    `on_extra(name, value, take)`: values of chunks not asked for by name (e.g. a layer's
    shadow copy), called as they arrive."""

    def __init__(self, chunks: Iterator[dict[str, np.ndarray]], uses: dict[str, int],
                 on_extra: Callable[[str, np.ndarray, Callable[[str], np.ndarray]], None] | None = None) -> None:
        self.chunks = chunks
        self.uses = dict(uses)
        self.on_extra = on_extra
        self.held: dict[str, np.ndarray] = {}

    def take(self, name: str) -> np.ndarray:
        """The reference value of `name`, running the reference model further if needed."""
        while name not in self.held:
            self._receive(next(self.chunks))
        return self._use(name)

    def finish(self) -> None:
        """Run the rest of the reference model (extras after the last taken value)."""
        for chunk in self.chunks:
            self._receive(chunk)
        self.held.clear()

    def _use(self, name: str) -> np.ndarray:
        value = self.held[name]
        self.uses[name] -= 1
        if not self.uses[name]:
            del self.held[name]
        return value

    def _receive(self, chunk: dict[str, np.ndarray]) -> None:
        self.held.update((n, v) for n, v in chunk.items() if n in self.uses)
        if self.on_extra is not None:
            for name in [n for n in chunk if n not in self.uses]:
                self.on_extra(name, chunk[name], self._use)


__all__ = ["ChannelAbsMax", "ChannelMeans", "Histograms", "InputGram", "MASK_INPUTS", "PAIRED_STREAM_SHARE", "Partners",
           "Ranges", "Reducer", "Shapes", "collect", "paired_stream_budget", "with_last"]
