"""Calibration and evaluation inputs for an ONNX model, validated up front, batched lazily.

Format: an `.npz` whose keys are the model's input names, each array holding the samples on its
first axis (or a folder of such files, read in name order). Evaluation data may also hold
`labels`: one integer class id per sample (shape (N,)), used for accuracy; a model input that is
itself named `labels` keeps that key as its input. Every problem is found before any
work starts and named in one sentence: missing or extra keys, wrong shapes or dtypes, NaN, no
samples. Arrays are memory-mapped where NumPy allows and batches are sliced on demand, so a large
calibration set is never all in memory at once.

Inputs that cannot be batched on axis 0 (RNN state [layers, batch, hidden], a scalar sample
rate) come as a *sequence of calls*, told apart by comparing each array's rank with the model's
declared input rank (see `part_layout`):
- call axis: an array with one axis more than the model input holds one complete input per call
  on its first axis ((calls, *input shape)); a 0-d array for a 0-d input is the same in every call,
  and an array of the model's own rank contributes one sample (batch of 1) per call;
- one call: a file whose arrays all have the model's ranks but disagree on axis 0, or hold a 0-d
  input, is a single call (a folder of per-call .npz files is a call sequence).
Each call is fed as one batch, and counts as one sample.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from lowbit.errors import CalibrationError, LowbitError

Batch = dict[str, np.ndarray]
LABELS = "labels"  # the evaluation key for class ids (unless the model has an input of that name)


@dataclass(frozen=True)
class InputSignature:
    """A model input: name, NumPy dtype and declared shape (None for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @property
    def batched(self) -> bool:
        """True when the first axis is a batch axis the caller may size freely."""
        return bool(self.shape) and self.shape[0] is None


def model_inputs(model: onnx.ModelProto) -> list[InputSignature]:
    """The graph inputs that must be fed (initializers listed as inputs excluded)."""
    weights = {init.name for init in model.graph.initializer}
    signatures = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        signatures.append(InputSignature(value.name, dtype, shape))
    return signatures


class CalibrationData:
    """Validated samples for a model, iterable in batches.

    `model`: the model, or just its `model_inputs` (all that is kept, so a caller can free the
    model). `samples` limits how many samples are used (the first N)."""

    def __init__(self, source: str | os.PathLike | dict[str, np.ndarray],
                 model: onnx.ModelProto | list[InputSignature], *, samples: int | None = None,
                 what: str = "calibration data") -> None:
        self.what = what
        self.signatures = model_inputs(model) if isinstance(model, onnx.ModelProto) else list(model)
        parts = [self._validated(arrays, label) for label, arrays in _read_sources(source, what)]
        parts = [(p, calls) for p, calls in parts if _count(p)]
        self._parts = [p for p, _ in parts]
        self._calls = [calls for _, calls in parts]  # per part: one call per entry on axis 0
        inputs = {s.name for s in self.signatures}
        self._labels = [part.pop(LABELS) for part in self._parts if LABELS in part and LABELS not in inputs]
        total = sum(_count(p) for p in self._parts)
        if samples is not None:
            if samples < 1:
                raise CalibrationError(f"--samples must be at least 1, got {samples}")
            total = min(total, samples)
        if total == 0:
            raise CalibrationError(f"{what} holds no samples (every array has 0 entries on axis 0); "
                                   "provide at least one sample per input")
        self.num_samples = total

    def _validated(self, arrays: dict[str, np.ndarray], label: str) -> tuple[Batch, bool]:
        """The part's arrays checked and laid out, and whether axis 0 counts calls (not samples)."""
        expected = {s.name for s in self.signatures}
        labels = None
        if LABELS in arrays and LABELS not in expected:
            arrays = dict(arrays)
            labels = arrays.pop(LABELS)
        missing = sorted(expected - set(arrays))
        extra = sorted(set(arrays) - expected)
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"missing key(s) {missing}")
            if extra:
                problems.append(f"unexpected key(s) {extra}")
            raise CalibrationError(f"{label} has {' and '.join(problems)}; its keys must be exactly the "
                                   f"model's input names {sorted(expected)}")
        layout = part_layout(self.signatures, arrays)
        if layout == "one call":
            arrays = {name: arr[None] for name, arr in arrays.items()}
        elif layout == "calls":
            arrays = _with_call_axis(self.signatures, arrays)
        counts = {name: (arr.shape[0] if arr.ndim else None) for name, arr in arrays.items()}
        if len(set(counts.values())) != 1 or None in counts.values():
            raise CalibrationError(
                f"{label} arrays disagree on the number of samples (axis 0: {counts}); give every input the "
                "same number of samples on the first axis, or, for inputs not batched on axis 0 (RNN state, "
                "scalars), one complete model input per call with a leading call axis (shape (calls, "
                "*input shape)) or one .npz per call in a folder")
        checked = {}
        for sig in self.signatures:
            checked[sig.name] = self._checked_array(sig, arrays[sig.name], label)
        if labels is not None:
            checked[LABELS] = _checked_labels(labels, next(iter(counts.values())), label)
        return checked, layout != "samples"

    @property
    def labels(self) -> np.ndarray | None:
        """Class ids of the samples in order (the first `num_samples`), or None when the data has none
        (every file of a folder must then carry them)."""
        if not self._labels:
            return None
        if len(self._labels) != len(self._parts):
            raise CalibrationError(f"only some of the {self.what} files hold a 'labels' array; give labels in "
                                   "every file or in none")
        return np.concatenate([np.asarray(part, np.int64) for part in self._labels])[:self.num_samples]

    def _checked_array(self, sig: InputSignature, array: np.ndarray, label: str) -> np.ndarray:
        if array.dtype.kind != sig.dtype.kind and not (array.dtype.kind in "iu" and sig.dtype.kind in "iu"):
            raise CalibrationError(f"{label} key {sig.name!r} has dtype {array.dtype} but the model expects "
                                   f"{sig.dtype}; convert the array with .astype(np.{sig.dtype.name})")
        sample_shape = tuple(array.shape[1:])
        if sig.shape is not None:
            declared = sig.shape
            # Either the model takes a batch axis (samples are declared[1:]) or it takes one sample.
            per_sample = declared[1:] if len(declared) == len(sample_shape) + 1 else declared
            fits = len(per_sample) == len(sample_shape) and all(
                d is None or d == s for d, s in zip(per_sample, sample_shape))
            if not fits:
                shown = tuple("?" if d is None else d for d in per_sample)
                raise CalibrationError(
                    f"{label} key {sig.name!r} holds samples of shape {sample_shape} but the model expects "
                    f"{shown} per sample; samples go on axis 0, so the array should have shape (N, "
                    f"{', '.join(map(str, shown))})")
        if array.dtype.kind == "f" and array.size and np.isnan(array).any():
            raise CalibrationError(f"{label} key {sig.name!r} contains NaN values; remove or replace those "
                                   "samples before calibrating")
        return array

    def feed_batch_size(self, requested: int) -> int:
        """The batch size the model accepts: the request, or a fixed batch dim the model declares
        (1 for call sequences: each call is one run)."""
        return 1 if any(self._calls) else self._batch_layout(requested)[0]

    def _batch_layout(self, requested: int) -> tuple[int, bool]:
        """(batch size, whether the model fixes it) for the parts with samples on axis 0."""
        for part, calls in zip(self._parts, self._calls):
            if calls:
                continue
            for sig in self.signatures:
                if not sig.shape:
                    continue
                sample_rank = part[sig.name].ndim - 1
                if len(sig.shape) == sample_rank:  # no batch axis: one sample per run
                    return 1, True
                if sig.shape[0] is not None:
                    return sig.shape[0], True
            break
        return max(1, requested), False

    def batches(self, batch_size: int = 32) -> Iterator[Batch]:
        """Batches in model-ready form (dtype cast, batch axis as the model declares it); a call
        sequence yields one batch per call."""
        size, fixed = self._batch_layout(batch_size)
        left = self.num_samples
        for part, calls in zip(self._parts, self._calls):
            n = min(_count(part), left)
            if calls:
                for call in range(n):
                    yield {sig.name: np.array(part[sig.name][call], dtype=sig.dtype, order="C")
                           for sig in self.signatures}
            else:
                for start in range(0, n, size):
                    stop = min(start + size, n)
                    if fixed and stop - start != size:
                        break  # a fixed batch dim cannot take a short last batch
                    yield {sig.name: self._as_model_input(sig, part[sig.name][start:stop])
                           for sig in self.signatures}
            left -= n
            if left <= 0:
                return

    def _as_model_input(self, sig: InputSignature, chunk: np.ndarray) -> np.ndarray:
        chunk = np.ascontiguousarray(chunk, dtype=sig.dtype)
        if sig.shape is not None and len(sig.shape) == chunk.ndim - 1:
            return chunk[0]  # the model takes a single sample without batch axis
        return chunk

    def first_batch(self, batch_size: int) -> Batch:
        return next(self.batches(batch_size))


def part_layout(signatures: list[InputSignature], arrays: dict[str, np.ndarray]) -> str:
    """How one file's arrays map to model calls, from array ranks against declared input ranks:
    "calls" (some array has one axis more than its input: a leading call axis), "one call" (all
    arrays have their input's rank, yet they disagree on axis 0 or hold a 0-d input: the file is
    one call), or "samples" (samples on axis 0, the plain format). Inputs of unknown rank follow
    the others."""
    extra_axis = same_rank = 0
    scalar_input = False
    for sig in signatures:
        if sig.shape is None or sig.name not in arrays:
            continue
        rank = np.ndim(arrays[sig.name])
        extra_axis += rank == len(sig.shape) + 1
        same_rank += rank == len(sig.shape)
        scalar_input |= rank == 0 and len(sig.shape) == 0
    if extra_axis:
        return "calls"
    counts = {np.shape(a)[0] if np.ndim(a) else None for a in arrays.values()}
    if same_rank and same_rank == sum(s.shape is not None for s in signatures) and (scalar_input or len(counts) > 1):
        return "one call"
    return "samples"


def _with_call_axis(signatures: list[InputSignature], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays of a call sequence, each with a leading call axis: an array of its input's rank is
    one sample per call (batch of 1), a 0-d array is repeated in every call (views, no copies)."""
    ranks = {s.name: len(s.shape) for s in signatures if s.shape is not None}
    calls = max((a.shape[0] for n, a in arrays.items() if n in ranks and a.ndim == ranks[n] + 1), default=1)
    laid_out = {}
    for name, array in arrays.items():
        if name in ranks and array.ndim == ranks[name] == 0:
            array = np.broadcast_to(array, (calls,))
        elif name in ranks and array.ndim == ranks[name]:
            array = array[:, None]
        laid_out[name] = array
    return laid_out


def _checked_labels(labels: np.ndarray, samples: int, label: str) -> np.ndarray:
    if labels.dtype.kind not in "iu" or labels.shape != (samples,):
        raise CalibrationError(f"{label} key 'labels' has shape {labels.shape} and dtype {labels.dtype}; it must "
                               f"hold one integer class id per sample, shape ({samples},), e.g. "
                               "labels=y.astype(np.int64)")
    if labels.size and labels.min() < 0:
        raise CalibrationError(f"{label} key 'labels' holds negative class ids; class ids start at 0")
    return labels


def _count(part: Batch) -> int:
    return next(iter(part.values())).shape[0] if part else 0


def _read_sources(source, what: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    if isinstance(source, dict):
        return [(what, {k: np.asarray(v) for k, v in source.items()})]
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise CalibrationError(f"{what} folder {path} contains no .npz files; put one or more .npz files "
                                   "keyed by input name there")
        return [(f"{what} file {f}", _load_npz(f)) for f in files]
    if not path.exists():
        raise LowbitError(f"{what} file {path} does not exist; check the path")
    return [(f"{what} file {path}", _load_npz(path))]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, mmap_mode="r", allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise CalibrationError(f"{path} is a single .npy array, not an .npz keyed by input name; "
                                       "save it with np.savez(path, input_name=array)")
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CalibrationError(f"{path} is not a readable .npz file ({exc}); save it with "
                               "np.savez(path, input_name=array)") from None
