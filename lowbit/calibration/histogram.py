"""A histogram with a fixed number of bins that widens its range as data arrives.

Memory is O(bins) whatever the number of batches. When a batch falls outside the current range,
the range grows by an *integer* factor k (bins become k times wider) and shifts by a whole number
j of old bins, so every old bin lies entirely inside one new bin: old bin i merges into new bin
(i + j) // k with no interpolation, and counts stay exact. The price is resolution: k is the
smallest factor that fits the data, so right after a growth the data spans more than half the
new range, and it only spreads further until the next growth. The bins are therefore never
more than twice as wide as `bins` bins over the exact data range would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Values are binned in float64 chunks of this many elements, to bound temporary memory.
_CHUNK = 1 << 18


@dataclass(frozen=True)
class Histogram:
    """An immutable snapshot: `counts[b]` values fell in [lo + b*width, lo + (b+1)*width)
    (the last bin includes `hi`). `data_min`/`data_max` are the exact extremes seen, which can
    lie inside [lo, hi] because growth leaves slack."""

    counts: np.ndarray  # float64, so estimators can weight and normalize freely
    lo: float
    hi: float
    data_min: float
    data_max: float

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    @classmethod
    def from_values(cls, values: np.ndarray, bins: int = 2048) -> Histogram:
        """Histogram of an in-memory array over its own range (tests and one-shot use)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        lo, hi = float(values.min()), float(values.max())
        if lo == hi:
            hi = lo + 1.0 if lo == 0 else lo + abs(lo) * 1e-6
        counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
        return cls(counts.astype(np.float64), lo, hi, float(values.min()), float(values.max()))


class StreamingHistogram:
    """Counts of finite values in `bins` equal bins; the range grows by whole-bin merges.

    Until two distinct values have been seen there is no range to bin over, so a constant
    stream is kept as (value, count) and binned once the range opens up.
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins < 8:
            raise ValueError(f"a histogram needs at least 8 bins, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.lo: float | None = None
        self.hi: float | None = None
        self.constant: float | None = None  # the single value seen while the range is still closed
        self.data_min = math.inf
        self.data_max = -math.inf
        self.regrowths = 0

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    def update(self, values: np.ndarray, vmin: float, vmax: float) -> None:
        """Add finite values whose min and max are `vmin`, `vmax` (the caller has them already)."""
        if values.size == 0:
            return
        self.data_min = min(self.data_min, vmin)
        self.data_max = max(self.data_max, vmax)
        if self.lo is None:
            if self.data_min == self.data_max:
                self.constant = vmin
                self.counts[0] += values.size
                return
            held = int(self.counts[0])
            self.counts[0] = 0
            self.lo, self.hi = self.data_min, self.data_max
            if held:
                self._add(np.array([self.constant]), weight=held)
            self.constant = None
        elif vmin < self.lo or vmax > self.hi:
            self._grow(vmin, vmax)
        self._add(values)

    def snapshot(self) -> Histogram:
        if self.lo is None:
            raise ValueError("the histogram has seen no values or only one distinct value")
        return Histogram(self.counts.astype(np.float64), self.lo, self.hi,
                         self.data_min, self.data_max)

    def nbytes(self) -> int:
        return self.counts.nbytes

    # ----------------------------------------------------------------------- internals

    def _add(self, values: np.ndarray, weight: int = 1) -> None:
        flat = values.reshape(-1)
        scale = self.bins / (self.hi - self.lo)
        size = min(flat.size, _CHUNK)
        buffer, indices = np.empty(size, dtype=np.float64), np.empty(size, dtype=np.intp)  # reused
        for start in range(0, flat.size, _CHUNK):
            part = flat[start:start + _CHUNK]
            chunk, index = buffer[:part.size], indices[:part.size]
            # (x - lo) * scale in float64 is exact enough: ~1e-16 relative error, far below one
            # bin. It is >= 0 (lo <= every value, and float subtraction keeps that order), so
            # truncation is floor (the product is cast to integers as it is written, as astype
            # would); the minimum puts x == hi (and rounding spill-over) into the last bin.
            # np.add.at counts in place (faster than bincount where many values share a bin,
            # e.g. the zeros after a ReLU).
            np.subtract(part, self.lo, out=chunk, dtype=np.float64)
            np.multiply(chunk, scale, out=index, casting="unsafe")
            np.minimum(index, self.bins - 1, out=index)
            np.add.at(self.counts, index, weight)

    def _grow(self, vmin: float, vmax: float) -> None:
        """Widen [lo, hi] to contain [vmin, vmax] by merging k old bins into each new one."""
        width = self.width
        grow_low = vmin < self.lo
        grow_high = vmax > self.hi
        # Everything in units of old bins, counted from the old lo.
        below = math.ceil((self.lo - vmin) / width) if grow_low else 0
        above = max(self.bins, math.ceil((vmax - self.lo) / width)) if grow_high else self.bins
        needed = below + above
        k = max(2, -(-needed // self.bins))  # integer ceil: needed can exceed 2**53
        slack = k * self.bins - needed
        # Put the spare room on the side that grew (where more growth is likely); split it when
        # both did. j = how many old bins the new range starts below the old lo.
        if grow_low and grow_high:
            j = below + slack // 2
        elif grow_low:
            j = below + slack
        else:
            j = below
        self.counts = _merge_bins(self.counts, j, k)
        new_lo = self.lo - j * width
        new_hi = new_lo + k * self.bins * width
        # Guard the float arithmetic above (a jump of many orders of magnitude absorbs the old
        # range in rounding): the new range must contain the old one and the data exactly.
        self.lo = min(new_lo, self.lo, vmin)
        self.hi = max(new_hi, self.hi, vmax)
        self.regrowths += 1


def _merge_bins(counts: np.ndarray, j: int, k: int) -> np.ndarray:
    """Old bin i goes to new bin (i + j) // k. j and k are Python ints and can exceed int64
    when the range jumps by many orders of magnitude (e.g. a -3.4e38 mask value)."""
    bins = counts.size
    base, offset = divmod(j, k)  # (i + j) // k == base + (i + offset) // k, offset < k
    old = np.arange(bins)
    if k <= bins:
        target = base + (old + offset) // k
    else:
        # With k > bins the old bins land in at most two new bins: base and base + 1.
        first_of_next = k - offset  # old bins from here on spill into base + 1
        target = base + (old >= min(first_of_next, bins)).astype(np.int64)
    merged = np.zeros(bins, dtype=np.int64)
    np.add.at(merged, target, counts)
    return merged
