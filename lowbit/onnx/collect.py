"""Activation statistics streamed through ONNX Runtime, in memory-bounded chunks.

The calibration set runs through the model one batch at a time and each batch's intermediate
tensors go straight into the streaming observers and are dropped. Memory is bounded by a budget
(`memory_budget_mb`, DEFAULT_MEMORY_BUDGET_MB unless told otherwise), not by the model's size:

ONNX Runtime keeps every tensor declared as a graph output alive for the whole run (whether or
not it is fetched), so exposing all calibration tensors at once holds all of them at once (642 MB
per batch of 16 x 128 tokens on MiniLM-L6). Instead the graph is cut, in topological order, into
consecutive segments whose exposed tensors fit the budget; each segment is its own small session
(its own weights only), fed by the graph inputs and by the few boundary tensors earlier segments
hand over (a transformer's hidden state). One batch thus
costs one forward pass in total, however many chunks it is split into. Graphs with control flow
or sequence values cannot be cut safely; their segments are prefixes of the graph instead (one
forward pass per chunk, same bounded memory). All segment sessions allocate from one shared ONNX
Runtime arena: it holds the largest segment's working set, not the sum, reuses it from run to run
instead of faulting in fresh pages (half of calibration's forward-pass time on MiniLM), and gives
its memory back after a stream's last batch.

Chunk sizes are estimated from the inferred shapes (symbolic dims resolved from the fed inputs)
and then replaced by the sizes actually seen: when measurement changes the packing, the segments
are rebuilt for the next batch. The statistics do not depend on the chunking (each tensor sees
every batch once, computed by the same kernels), so budgeted and unbounded ranges are identical.

Besides ranges, collection records which tensors ever held +-inf or mask-sized values (|x| >= 1e4,
e.g. additive attention masks of -10000, -1e9 or float32 min): such tensors cannot share an int8
grid with real activations, so the planner keeps them and their consumers float.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from lowbit.calibration import ObserverSet
from lowbit.errors import LowbitError
from lowbit.memory import trim_heap
from lowbit.onnx.calib_data import Batch, CalibrationData
from lowbit.onnx.session import make_session, session_options, worker_threads
from lowbit.onnx.subgraphs import defined_in, expose, has_subgraphs, node_reads
from lowbit.spec import QuantSpec

# Values this large in an activation are masks or sentinels, not signal.
MASK_MAGNITUDE = 1e4

# Default bound for the activations exposed per chunk. Measured on all-MiniLM-L6-v2 static
# calibration (64 sentences x 128 tokens, batch 16, 642 MB of calibration tensors per batch):
# whole-quantization peak RSS 1.86 GB unbounded, 1.62 GB at 512 MB, 1.28 GB at 256 MB (ONNX
# Runtime's quantizer: 1.52 GB), 1.14 GB at 64 MB; calibration time equal within noise down to
# 256 MB, +1-2 s at 64 MB (more segments). Below this the rest is models and weights.
DEFAULT_MEMORY_BUDGET_MB = 256.0


@dataclass
class ActivationStats:
    """Calibrated ranges plus what collection learned about each tensor."""

    ranges: dict[str, tuple[np.ndarray, np.ndarray]]
    mask_like: set[str] = field(default_factory=set)
    non_float: set[str] = field(default_factory=set)
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    runs_per_batch: int = 1  # chunks each batch was split into
    peak_output_bytes: int = 0  # largest set of exposed activations held at once
    # The streaming statistics themselves, so other range methods come from the same pass.
    observers: ObserverSet | None = field(default=None, repr=False, compare=False)

    def with_method(self, method: str, spec: QuantSpec) -> ActivationStats:
        """The same statistics with ranges chosen by `method` (no second calibration pass)."""
        if self.observers is None:
            raise ValueError("these statistics kept no observers")
        return replace(self, ranges=_ranges(self.observers, list(self.ranges), method, spec))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the given intermediate tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    # ORT accepts outputs without type info and infers them, which also covers tensors that shape
    # inference could not annotate.
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return exposed


def budget_bytes(memory_budget_mb: float | None) -> float:
    """The budget in bytes; None or inf means unbounded (inf). Non-positive budgets are refused."""
    if memory_budget_mb is None or math.isinf(memory_budget_mb):
        return math.inf
    if not memory_budget_mb > 0:
        raise LowbitError(f"calibration memory budget must be positive, got {memory_budget_mb} MB; "
                          "pass a number of MB, or inf for no bound")
    return memory_budget_mb * 2**20


def collect_activation_stats(model: onnx.ModelProto, tensors: list[str], data: CalibrationData, *,
                             method: str = "auto", spec: QuantSpec, batch_size: int = 16,
                             threads: int | None = None, observer_options: dict | None = None,
                             memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
                             also: list | None = None) -> ActivationStats:
    """Run `data` through `model` batch by batch and return calibrated ranges of `tensors`.

    memory_budget_mb: upper bound for the activations exposed at once (None or inf: unbounded).
    also: more `statistics.Reducer`s fed in the same pass (e.g. bias correction's channel means)."""
    from lowbit.onnx.statistics import Ranges, collect

    started = time.perf_counter()
    ranges = Ranges(tensors, **(observer_options or {}))
    batches = []  # samples per batch

    def counted() -> Iterator[Batch]:
        for batch in data.batches(batch_size):
            batches.append(next(iter(batch.values())).shape[0] if batch else 0)
            yield batch

    total = -(-data.num_samples // data.feed_batch_size(batch_size))
    stream = collect(model, counted(), [ranges, *(also or [])], threads=threads, memory_budget_mb=memory_budget_mb,
                     total=total, desc="calibrating")
    if not batches:
        raise LowbitError("calibration produced no batch (the model's fixed batch size is larger than the "
                          "number of samples); provide at least one full batch of samples")
    observers = ranges.observers
    observers.warn_nonfinite()
    wanted = [t for t in tensors if t not in ranges.non_float and t not in ranges.mask_like]
    return ActivationStats(_ranges(observers, wanted, method, spec, threads), ranges.mask_like, ranges.non_float,
                           len(batches), sum(batches), time.perf_counter() - started, stream.runs_per_batch,
                           stream.peak_bytes, observers)


@dataclass
class _Segment:
    """Nodes [start, end) of the graph run as one session, exposing `outputs`."""

    start: int
    end: int
    inputs: list[str]
    outputs: list[str]
    session: ort.InferenceSession | None = None


class ActivationStream:
    """Intermediate tensors of a model, batch by batch, in chunks that fit a memory budget.

    `chunks(batch)` yields dicts {tensor name: array}; together they hold every requested tensor
    once. Graph inputs among the tensors come with the first chunk."""

    def __init__(self, model: onnx.ModelProto, tensors: list[str], *,
                 memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB, threads: int | None = None) -> None:
        # Tensors inside If/Loop/Scan bodies are routed out as extra outputs (see subgraphs.expose);
        # chunks name them as the body does. An untaken branch yields an empty stand-in: dropped.
        self.aliases: dict[str, str] = {}
        if has_subgraphs(model) and not set(tensors) <= defined_in(model.graph):
            model, self.aliases = expose(model, tensors)
            tensors = list(self.aliases)
        self.model = model
        self.threads = threads
        self.budget = budget_bytes(memory_budget_mb)
        graph_inputs = {i.name for i in model.graph.input}
        wanted = list(dict.fromkeys(tensors))
        self.fed = [t for t in wanted if t in graph_inputs]
        position = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
        # Topological order, so that consecutive chunks are consecutive slices of the graph.
        self.produced = sorted((t for t in wanted if t in position), key=position.__getitem__)
        self._position = position
        self._cuttable = _cuttable(model)
        self._measured: dict[str, int] = {}
        self._concrete: dict[str, int] = {}  # sizes inferred for the fed input shapes
        self._groups: list[list[str]] | None = None
        self._segments: list[_Segment] = []
        self._whole: ort.InferenceSession | None = None  # unbounded: one session exposing everything
        self.runs_per_batch = 1
        self.peak_bytes = 0

    def chunks(self, batch: Batch, *, last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """The tensors of `batch`, chunk by chunk. last=True: no batch follows, so the shared
        arena gives its memory back after this batch's last run."""
        if not self.aliases:
            yield from self._chunks(batch, last)
            return
        for found in self._chunks(batch, last):
            yield {self.aliases.get(name, name): value for name, value in found.items()
                   if value.size or name not in self.aliases or name == self.aliases[name]}

    def _chunks(self, batch: Batch, last: bool) -> Iterator[dict[str, np.ndarray]]:
        first = {t: batch[t] for t in self.fed}
        if math.isinf(self.budget):
            yield from self._unbounded(batch, first)
            return
        sizes = estimate_nbytes(self.model, self.produced, batch)
        # A tensor whose size the shapes cannot tell (dims computed from dynamic input dims) runs in
        # a chunk of its own until measured: counting it as tiny put a whole 736x992 detector's
        # activations into one first chunk (8 GB). Not in graphs that cannot be cut: there every
        # chunk reruns the graph from its start (one session each: silero VAD, 2.2 GB, 100 s).
        if self._cuttable:
            unsized = unsized_tensors(self.model, self.produced, batch) - set(self._measured)
            if unsized:
                sizes.update(self._concrete_sizes(batch, unsized))
                sizes.update({n: max(sizes[n], self.budget) for n in unsized - set(self._concrete)})
        sizes.update(self._measured)
        groups = pack_by_size(self.produced, sizes, self.budget)
        if groups != self._groups:  # first batch, or measurement changed the packing
            self._groups, self._segments = groups, self._plan_segments(groups)
        self.runs_per_batch = max(self.runs_per_batch, len(groups))
        live: dict[str, np.ndarray] = {}  # boundary tensors and chunk members, dropped after last use
        last_use = self._last_use()
        if not groups:
            self._note(first, live)
            yield first
        for index, (group, segment) in enumerate(zip(groups, self._segments)):
            if segment.end > segment.start:
                if segment.session is None:
                    segment.session = self._session(segment, batch, live)
                feed = {n: batch[n] if n in batch else live[n] for n in segment.inputs}
                release = release_run_options() if last and index == len(groups) - 1 and shared_arena() else None
                live.update(zip(segment.outputs, segment.session.run(segment.outputs, feed, release)))
                del feed
            found = {**(first if index == 0 else {}), **{t: live[t] for t in group}}
            self._note(found, live)
            self._measured.update({t: live[t].nbytes for t in group})
            for name in [n for n in live if last_use.get(n, -1) <= index]:
                del live[name]
            large = sum(v.nbytes for v in found.values()) >= TRIM_AFTER_BYTES
            yield found
            del found
            if large:
                # glibc raises its mmap threshold after the first big free, so later multi-MB
                # activations land on the heap and freed ones stay resident: measured on MiniLM,
                # 64 MB chunks left +500 MB resident without this, +190 MB with it.
                trim_heap()

    def _concrete_sizes(self, batch: Batch, names: set[str]) -> dict[str, int]:
        """Sizes of `names` from onnx shape inference on the graph with the fed input shapes
        (exact where the ops are standard), so the first batch is packed right without guessing."""
        if not self._concrete:
            fixed = onnx.ModelProto()
            fixed.CopyFrom(self.model)
            del fixed.graph.value_info[:]
            for value in fixed.graph.input:
                if value.name in batch and value.type.tensor_type.HasField("shape"):
                    shape = value.type.tensor_type.shape
                    del shape.dim[:]
                    for size in batch[value.name].shape:
                        shape.dim.add().dim_value = int(size)
            try:
                inferred = onnx.shape_inference.infer_shapes(fixed, check_type=False, strict_mode=False)
            except Exception:  # inference is an estimate only: measurement remains the fallback
                return {}
            unknown = unsized_tensors(inferred, self.produced, batch)
            if unknown and not self.model.graph.value_info:
                # A saved model (lowbit drops the annotations on write): onnx cannot follow shapes
                # computed by Shape -> Gather -> Concat -> Reshape, ONNX Runtime's symbolic
                # inference can. On MiniLM's QDQ model 165 of 258 tensors were left unsized, each
                # then run as a chunk of its own in the first batch (96 segment sessions).
                from lowbit.onnx.preprocess import infer_shapes

                try:
                    inferred = infer_shapes(fixed, symbolic=True)
                    unknown = unsized_tensors(inferred, self.produced, batch)
                except Exception:  # an estimate only, as above
                    pass
            self._concrete = {n: size for n, size in estimate_nbytes(inferred, self.produced, batch).items()
                              if n not in unknown}
        return {n: self._concrete[n] for n in names if n in self._concrete}

    def _unbounded(self, batch: Batch, first: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        if self._whole is None and self.produced:
            self._whole = make_session(with_outputs(self.model, self.produced), threads=self.threads, optimize=False)
        found = dict(zip(self.produced, self._whole.run(self.produced, batch))) if self.produced else {}
        found.update(first)
        self._note(found, {})
        yield found

    def _note(self, found: dict[str, np.ndarray], live: dict[str, np.ndarray]) -> None:
        held = {id(v): v.nbytes for v in (*found.values(), *live.values())}
        self.peak_bytes = max(self.peak_bytes, sum(held.values()))

    def _plan_segments(self, groups: list[list[str]]) -> list[_Segment]:
        """One segment per group: the nodes from the previous cut (or from the start, for graphs
        that cannot be cut) to the producer of the group's last tensor."""
        nodes = self.model.graph.node
        initializers = {t.name for t in self.model.graph.initializer}
        segments: list[_Segment] = []
        start = 0
        for group in groups:
            end = max(self._position[t] for t in group) + 1
            begin = start if self._cuttable else 0
            made = {o for n in nodes[begin:end] for o in n.output}
            read = dict.fromkeys(i for n in nodes[begin:end] for i in node_reads(n) if i not in made)
            segments.append(_Segment(begin, end, [i for i in read if i not in initializers], []))
            start = max(start, end)
        # Each segment exposes its group plus what later segments read from it.
        for index, segment in enumerate(segments):
            made = {o for n in nodes[segment.start:segment.end] for o in n.output}
            later = {i for s in segments[index + 1:] for i in s.inputs} | {t for g in groups[index + 1:] for t in g}
            outputs = [t for t in groups[index] if t in made]
            outputs += [o for n in nodes[segment.start:segment.end] for o in n.output
                        if o in later and o not in outputs]
            segment.outputs = outputs
        return segments

    def _last_use(self) -> dict[str, int]:
        """Index of the last chunk that needs each tensor (as a segment input or as a member)."""
        last: dict[str, int] = {}
        for index, (group, segment) in enumerate(zip(self._groups or [], self._segments)):
            for name in (*segment.inputs, *group):
                last[name] = index
        return last

    def _session(self, segment: _Segment, batch: Batch, live: dict[str, np.ndarray]) -> ort.InferenceSession:
        """A session for the segment's nodes; boundary inputs are typed from the values fed."""
        graph = self.model.graph
        nodes = graph.node[segment.start:segment.end]
        used = {i for n in nodes for i in node_reads(n)} | set(segment.outputs)
        inputs = []
        for name in segment.inputs:
            value = batch[name] if name in batch else live[name]
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                        [None] * value.ndim))
        part = helper.make_graph(list(nodes), f"{graph.name}_segment_{segment.start}", inputs,
                                 [onnx.ValueInfoProto(name=n) for n in segment.outputs],
                                 [t for t in graph.initializer if t.name in used and t.name not in segment.inputs])
        sub = helper.make_model(part, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        sub.functions.extend(self.model.functions)
        payload = sub.SerializeToString()
        del sub, part
        return _lean_session(payload, self.threads)


# Giving freed memory back costs ~25 ms a call; only chunks this large leave enough behind.
TRIM_AFTER_BYTES = 16 * 2**20


def _cuttable(model: onnx.ModelProto) -> bool:
    """True when every value crossing a cut is a plain tensor read by name: no control flow
    (subgraphs read outer names implicitly) and no sequence or optional values."""
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        if "Sequence" in node.op_type or "Optional" in node.op_type:
            return False
    return True


def _lean_session(payload: bytes, threads: int | None) -> ort.InferenceSession:
    """A CPU session (spin-waiting off, no graph optimization) that allocates from the one arena
    all lean sessions share (`shared_arena`): its intermediate tensors reuse the arena's memory
    from run to run instead of being fresh pages each time (page faults were half of calibration's
    forward-pass time on MiniLM), and since the segments of a stream run one after another, the
    arena holds the largest segment's working set, not the sum of all segments'."""
    options = session_options(threads, optimize=False)
    if shared_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    else:  # no shared arena: keep nothing between runs, so segments never add up
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    try:
        return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception:
        # The whole model gets the one-sentence diagnosis; a segment of a valid model always loads.
        return make_session(payload, threads=threads, optimize=False)


_ARENA: list[bool] = []  # [registered?], decided on first use


def shared_arena() -> bool:
    """Register, once per process, the CPU memory arena every segment session shares. False when
    this ONNX Runtime cannot (the sessions then run without an arena)."""
    if not _ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # max memory 0: unlimited; extend strategy 1: by what is requested (no power-of-two slack).
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
            _ARENA.append(True)
        except Exception:  # an ONNX Runtime without the API, or one that refuses it
            _ARENA.append(False)
    return _ARENA[0]


def release_run_options() -> ort.RunOptions:
    """Run options that hand the shared arena's free memory back to the system after the run:
    used for the last run of a stream, so nothing stays reserved for later stages."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


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


def unsized_tensors(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> set[str]:
    """The `names` whose byte size `estimate_nbytes` can only guess (no shape, or a dim that is
    neither a number nor a symbol named on a fed graph input)."""
    symbols = {d.dim_param for v in model.graph.input if v.name in feed and v.type.tensor_type.HasField("shape")
               for d in v.type.tensor_type.shape.dim if d.dim_param}
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    unsized = set()
    for name in names:
        info = infos.get(name)
        if info is None or not info.type.tensor_type.HasField("shape") or any(
                not d.HasField("dim_value") and d.dim_param not in symbols for d in info.type.tensor_type.shape.dim):
            unsized.add(name)
    return unsized


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
    """Mask-sized or non-finite values. Two reductions and no temporaries: on a 736x992
    detector the former abs/isfinite passes took 31 s of a 180 s calibration."""
    return looks_like_mask_range(float(value.min()), float(value.max()))  # NaN and inf propagate


def looks_like_mask_range(lo: float, hi: float) -> bool:
    if math.isfinite(lo) and math.isfinite(hi):
        return max(-lo, hi) >= MASK_MAGNITUDE
    return True


# Values of one tensor per batch that feed the range statistics. Beyond this, a strided sample
# (plus the exact minimum and maximum, so min/max ranges stay exact) stands for the tensor: the
# histogram of 1M values pins percentiles and MSE-optimal clipping as well as 90M do, at 1/90 of
# the cost (a 736x992 text detector's first activations hold 23M values per image).
OBSERVED_VALUES_MAX = 2**20


def observed_sample(value: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """`value`, or for large finite tensors an evenly strided sample with its extremes (`lo`,
    `hi`: the tensor's minimum and maximum when the caller has them)."""
    if value.size <= OBSERVED_VALUES_MAX:
        return value
    flat = value.reshape(-1)
    stride = (flat.size // OBSERVED_VALUES_MAX) | 1  # odd: no aliasing with power-of-two dims
    strided = flat[::stride]
    sample = np.empty(strided.size + 2, np.float32)  # one copy, straight into the result
    sample[:-2] = strided
    sample[-2:] = [flat.min() if lo is None else lo, flat.max() if hi is None else hi]
    return sample


def _ranges(observers: ObserverSet, names: list[str], method: str, spec: QuantSpec,
            threads: int | None = None) -> dict:
    if not len(observers):
        return {}  # nothing quantizable was observed: the planner keeps those nodes float
    all_ranges = observers.ranges(method, spec, threads=worker_threads(threads))
    return {n: all_ranges[n] for n in names if n in all_ranges}
