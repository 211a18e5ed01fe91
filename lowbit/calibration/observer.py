"""Observers: feed activation batches in, get clipping ranges out, with bounded memory.

A `RangeObserver` watches one tensor; an `ObserverSet` holds one per tensor name and is what a
backend feeds with each calibration batch's outputs. Nothing keeps the batches themselves.

Non-finite values are never silent:
- NaN is an error naming the tensor (a NaN activation means the model or data is broken);
- +-inf is excluded from every statistic and counted (`inf_count`); `ObserverSet.warn_nonfinite`
  reports it. Attention masks legitimately add -inf before Softmax.
- Finite values with |x| > `ignore_abs_above` (default 1e30) are treated like inf: excluded and
  counted (`ignored_count`). Masks often use the float32 minimum (-3.4e38) instead of -inf;
  kept in the range, one such value would stretch the histogram so far that every real value
  lands in a single bin, and a scale computed from it would round every real value to 0. With
  the sentinel excluded, quantization saturates it to the range's minimum, which still masks
  after Softmax. No working float network produces 1e30 otherwise. Pass None to keep them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from lowbit.calibration import estimators
from lowbit.calibration.histogram import Histogram, StreamingHistogram
from lowbit.calibration.stats import MinMaxStats
from lowbit.errors import CalibrationError
from lowbit.spec import QuantSpec

CALIBRATION_METHODS = ("auto", "minmax", "percentile", "entropy", "mse")
DEFAULT_IGNORE_ABS_ABOVE = 1e30
_OPTIONS = ("percentile", "use_moving_average", "num_quantized_bins")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class CalibrationWarning(UserWarning):
    """Calibration data had values that were excluded from the ranges (inf, mask sentinels)."""


class RangeObserver:
    """Streaming statistics for one tensor.

    axis=None keeps per-tensor running min/max and a re-binning histogram (all methods);
    axis=k keeps per-channel running min/max along axis k (method 'minmax', and 'auto' which
    then means minmax). momentum, if set, also keeps moving-average min/max
    (`range('minmax', use_moving_average=True)`), with momentum the weight of each new batch.
    """

    def __init__(self, name: str, *, axis: int | None = None, bins: int = 2048,
                 histogram: bool = True, momentum: float | None = None,
                 ignore_abs_above: float | None = DEFAULT_IGNORE_ABS_ABOVE) -> None:
        self.name = name
        self.axis = axis
        self.momentum = momentum
        self.ignore_abs_above = ignore_abs_above
        self.stats = MinMaxStats(momentum)
        self.histogram = StreamingHistogram(bins) if (histogram and axis is None) else None
        self.count = 0          # finite values included in the statistics
        self.inf_count = 0      # +-inf values excluded
        self.ignored_count = 0  # finite values excluded by ignore_abs_above
        self.batches = 0
        self._channels: int | None = None

    # ----------------------------------------------------------------------- feeding

    def update(self, batch: Any, bounds: tuple[float, float] | None = None) -> None:
        """Fold in one batch (any float or integer array; NumPy or a CPU torch tensor). `bounds`:
        the batch's (min, max) when the caller has computed them already (per-tensor observers)."""
        x = _as_float_array(batch, self.name)
        if x.size == 0:
            return
        if self.axis is None:
            self._update_tensor(x, bounds)
        else:
            self._update_channels(x)
        self.batches += 1

    def _update_tensor(self, x: np.ndarray, bounds: tuple[float, float] | None = None) -> None:
        vmin, vmax = bounds if bounds is not None else (float(x.min()), float(x.max()))  # NaN propagates
        if np.isnan(vmin) or np.isnan(vmax):
            self._raise_nan(x)
        if self._all_usable(vmin, vmax):
            values = x
        else:
            values = x[self._keep_mask(x)]
            if values.size:
                vmin, vmax = float(values.min()), float(values.max())
        self.count += values.size
        if values.size:
            self.stats.update(np.float64(vmin), np.float64(vmax))
            if self.histogram is not None:
                self.histogram.update(values, vmin, vmax)

    def _update_channels(self, x: np.ndarray) -> None:
        if x.ndim == 0 or not -x.ndim <= self.axis < x.ndim:
            raise CalibrationError(
                f"calibration tensor {self.name!r} has shape {x.shape}, which has no axis {self.axis}; "
                "create its observer with a valid channel axis or axis=None")
        channels = x.shape[self.axis]
        if self._channels is not None and channels != self._channels:
            raise CalibrationError(
                f"calibration tensor {self.name!r} has {channels} channels along axis {self.axis}, "
                f"earlier batches had {self._channels}; feed batches with a consistent layout")
        self._channels = channels
        rows = np.moveaxis(x, self.axis, 0).reshape(channels, -1)
        mins, maxs = rows.min(axis=1), rows.max(axis=1)
        if np.isnan(mins).any() or np.isnan(maxs).any():
            self._raise_nan(x)
        if self._all_usable(float(mins.min()), float(maxs.max())):
            self.count += rows.size
        else:
            keep = self._keep_mask(rows)
            self.count += int(np.count_nonzero(keep))
            mins = np.where(keep, rows, np.inf).min(axis=1)
            maxs = np.where(keep, rows, -np.inf).max(axis=1)
            empty = ~keep.any(axis=1)
            mins[empty] = np.nan  # NaN = "nothing seen for this channel" in MinMaxStats
            maxs[empty] = np.nan
        self.stats.update(mins.astype(np.float64), maxs.astype(np.float64))

    def _all_usable(self, vmin: float, vmax: float) -> bool:
        """Fast path: no inf and nothing above the ignore threshold, so no mask is needed."""
        if not (np.isfinite(vmin) and np.isfinite(vmax)):
            return False
        return self.ignore_abs_above is None or max(-vmin, vmax) <= self.ignore_abs_above

    def _keep_mask(self, x: np.ndarray) -> np.ndarray:
        finite = np.isfinite(x)
        n_finite = int(np.count_nonzero(finite))
        self.inf_count += x.size - n_finite
        if self.ignore_abs_above is None:
            return finite
        # float64 threshold: the same comparison as the fast path, whatever the data dtype.
        keep = finite & (np.abs(x) <= np.float64(self.ignore_abs_above))
        self.ignored_count += n_finite - int(np.count_nonzero(keep))
        return keep

    def _raise_nan(self, x: np.ndarray) -> None:
        n_nan = int(np.count_nonzero(np.isnan(x)))
        raise CalibrationError(
            f"calibration tensor {self.name!r} contains NaN ({n_nan} of {x.size} values in batch "
            f"{self.batches + 1}); fix the model or the calibration data (NaN usually comes from an "
            "overflow, a division by zero or an uninitialized input)")

    # ----------------------------------------------------------------------- ranges

    def range(self, method: str = "minmax", spec: QuantSpec | None = None,
              **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) as float32 arrays: shape () per-tensor, (C,) per-channel.

        Options: percentile=99.99 ('percentile'), use_moving_average=False ('minmax' only),
        num_quantized_bins ('entropy'/'auto'; default from the spec's bits). `spec` (default
        symmetric int8) gives entropy/mse/auto the grid; every method widens the range to
        contain 0 for integer grids. A channel that never saw a finite value gets (0, 0).
        """
        spec = spec if spec is not None else estimators.DEFAULT_SPEC
        _check_request(method, options)
        use_moving_average = bool(options.get("use_moving_average"))
        if use_moving_average:
            self._check_moving_average(method)
        if self.count == 0:
            raise CalibrationError(
                f"calibration tensor {self.name!r} received no finite values "
                f"({self.batches} batches, {self.inf_count} infinite values); feed calibration data "
                "that reaches this tensor, or leave it unquantized")
        if use_moving_average:
            lo, hi = self.stats.average_min, self.stats.average_max
            return _to_float32(*_contain_zero(lo, hi, spec))
        hist = self.histogram_snapshot()
        if hist is None or method == "minmax":
            # A histogram that never opened saw one distinct value: every method gives min/max.
            constant = self.histogram is not None
            if method not in ("minmax", "auto") and not constant:
                raise CalibrationError(
                    f"calibration method {method!r} needs a per-tensor histogram, which observer "
                    f"{self.name!r} does not keep; use method='minmax' or an observer with axis=None")
            lo, hi = self.stats.min, self.stats.max
            return _to_float32(*_contain_zero(lo, hi, spec))
        lo, hi = _ESTIMATORS[method](hist, spec, options)
        return _to_float32(np.float64(lo), np.float64(hi))

    def _check_moving_average(self, method: str) -> None:
        if self.momentum is None:
            raise CalibrationError(
                f"observer {self.name!r} keeps no moving average; create it with momentum=0.01 "
                "(or another weight for new batches) to use use_moving_average=True")
        if method != "minmax":
            raise CalibrationError(
                f"use_moving_average=True applies to method 'minmax' only, not {method!r}")

    def histogram_snapshot(self) -> Histogram | None:
        """The histogram, or None without one (per-channel, histogram=False, constant data)."""
        if self.histogram is None or self.histogram.lo is None:
            return None
        return self.histogram.snapshot()

    def nbytes(self) -> int:
        """Bytes held by the statistics (fixed after the first batch)."""
        held = self.stats.nbytes()
        return held + (self.histogram.nbytes() if self.histogram is not None else 0)

    def __repr__(self) -> str:
        where = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return (f"RangeObserver({self.name!r}, {where}, batches={self.batches}, count={self.count}, "
                f"inf_count={self.inf_count})")


class ObserverSet:
    """name -> RangeObserver, created on first sight with the given keyword arguments."""

    def __init__(self, **observer_kwargs: Any) -> None:
        self.observer_kwargs = observer_kwargs
        self._observers: dict[str, RangeObserver] = {}

    def add(self, name: str, **overrides: Any) -> RangeObserver:
        """Create (or replace) the observer of `name` with different settings, e.g. axis=0."""
        self._observers[name] = RangeObserver(name, **{**self.observer_kwargs, **overrides})
        return self._observers[name]

    def include(self, other: ObserverSet, names: Iterable[str]) -> None:
        """Take `other`'s observers of `names` as they are (shared, not copied): statistics of
        tensors measured in another pass over the same data."""
        for name in names:
            self._observers[name] = other[name]

    def update(self, outputs: Mapping[str, Any], bounds: Mapping[str, tuple[float, float]] | None = None) -> None:
        """Fold in one batch of each named tensor; `bounds`: (min, max) of those already known."""
        for name, batch in outputs.items():
            observer = self._observers.get(name) or self.add(name)
            observer.update(batch, bounds.get(name) if bounds else None)

    def __getitem__(self, name: str) -> RangeObserver:
        return self._observers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._observers

    def __iter__(self) -> Iterator[str]:
        return iter(self._observers)

    def __len__(self) -> int:
        return len(self._observers)

    def ranges(self, method: str = "auto", spec: QuantSpec | Mapping[str, QuantSpec] | None = None,
               *, names: Iterable[str] | None = None, threads: int = 1,
               **options: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Range of every observed tensor, or of `names` only (skipping others avoids errors
        for tensors that will not be quantized, e.g. all-inf masks). `spec` may map tensor
        names to specs (missing names get the default symmetric int8). `threads`: tensors
        estimated at once (each range is computed as on one thread; NumPy releases the GIL)."""
        _check_request(method, options)
        if not self._observers:
            raise CalibrationError(
                "no calibration data was observed; feed at least one batch to update() before "
                "asking for ranges")
        wanted = list(self._observers) if names is None else list(names)
        missing = [n for n in wanted if n not in self._observers]
        if missing:
            raise CalibrationError(
                f"no calibration data was observed for {missing[:5]}; check the tensor names or "
                "that the calibration run produces these tensors")
        def estimate(name: str) -> tuple[np.ndarray, np.ndarray]:
            tensor_spec = spec.get(name) if isinstance(spec, Mapping) else spec
            return self._observers[name].range(method, tensor_spec, **options)

        if threads > 1 and len(wanted) > 1 and method != "minmax":
            with ThreadPoolExecutor(min(threads, len(wanted))) as pool:
                return dict(zip(wanted, pool.map(estimate, wanted)))
        return {name: estimate(name) for name in wanted}

    def warn_nonfinite(self) -> list[str]:
        """One CalibrationWarning per tensor that had values excluded; returns the messages."""
        messages = []
        for name, obs in self._observers.items():
            if not (obs.inf_count or obs.ignored_count):
                continue
            seen = obs.count + obs.inf_count + obs.ignored_count
            parts = []
            if obs.inf_count:
                parts.append(f"{obs.inf_count} infinite")
            if obs.ignored_count:
                parts.append(f"{obs.ignored_count} with |x| > {obs.ignore_abs_above:g}")
            messages.append(
                f"calibration tensor {name!r}: {' and '.join(parts)} of {seen} values were excluded "
                "from its range (expected for attention masks; otherwise look for an overflow)")
        for message in messages:
            warnings.warn(message, CalibrationWarning, stacklevel=2)
        return messages

    def nbytes(self) -> int:
        return sum(obs.nbytes() for obs in self._observers.values())


# --------------------------------------------------------------------------- helpers

def _estimate_auto(hist: Histogram, spec: QuantSpec, options: dict) -> tuple[float, float]:
    return estimators.auto_range(hist, spec, options.get("num_quantized_bins"))


_ESTIMATORS = {
    "auto": _estimate_auto,
    "percentile": lambda h, s, o: estimators.percentile_range(
        h, s, o.get("percentile", estimators.DEFAULT_PERCENTILE)),
    "entropy": lambda h, s, o: estimators.entropy_range(h, s, o.get("num_quantized_bins")),
    "mse": lambda h, s, o: estimators.mse_range(h, s),
}


def _check_request(method: str, options: dict) -> None:
    if method not in CALIBRATION_METHODS:
        raise CalibrationError(
            f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise CalibrationError(
            f"unknown calibration option(s) {unknown}; allowed: {', '.join(_OPTIONS)}")


def _as_float_array(batch: Any, name: str) -> np.ndarray:
    """float16 and integers become float32/float64; float32/float64 stay as they are."""
    if hasattr(batch, "detach") and hasattr(batch, "cpu"):  # torch tensor, without importing torch
        batch = batch.detach().cpu()
        if "bfloat16" in str(batch.dtype):
            batch = batch.float()
        batch = batch.numpy()
    x = np.asarray(batch)
    kind = x.dtype.kind
    if kind == "f":
        return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32 if x.itemsize < 4 else np.float64)
    if kind in "iub":
        return x.astype(np.float64)
    if "float" in x.dtype.name:  # ml_dtypes bfloat16 / float8 arrays
        return x.astype(np.float32)
    raise CalibrationError(
        f"calibration tensor {name!r} has dtype {x.dtype}, not a number type; pass float or integer arrays")


def _contain_zero(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Min/max as a range: unseen channels (NaN) become 0, integer grids get 0 inside."""
    lo = np.nan_to_num(np.asarray(lo, dtype=np.float64), nan=0.0)
    hi = np.nan_to_num(np.asarray(hi, dtype=np.float64), nan=0.0)
    if spec.dtype_info.is_integer_grid:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    return lo, hi


def _to_float32(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 -> float32 rounding outwards, so the float32 range still contains the data;
    clamped to float32's finite range (float64 data can exceed it)."""
    lo = np.clip(np.asarray(lo, dtype=np.float64), -_FLOAT32_MAX, _FLOAT32_MAX)
    hi = np.clip(np.asarray(hi, dtype=np.float64), -_FLOAT32_MAX, _FLOAT32_MAX)
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    # Step one float32 outwards where rounding went inwards (never past the finite range).
    lo32 = np.where(lo32 > lo, np.nextafter(lo32, np.float32(-_FLOAT32_MAX)), lo32).astype(np.float32)
    hi32 = np.where(hi32 < hi, np.nextafter(hi32, np.float32(_FLOAT32_MAX)), hi32).astype(np.float32)
    return lo32.reshape(lo.shape), hi32.reshape(hi.shape)
