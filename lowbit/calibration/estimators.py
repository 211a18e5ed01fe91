"""Range estimators: from calibration statistics to a clipping range (min, max).

Pure functions on a `Histogram` snapshot (or on min/max), so each can be tested on its own:

- `minmax_range`: the observed extremes;
- `percentile_range`: a percentile of |x| (symmetric specs) or both tails (asymmetric);
- `entropy_range`: the KL-divergence threshold search of TensorRT's entropy calibrator (as in
  ONNX Runtime's HistogramCalibrater "entropy" method);
- `mse_range`: the range minimizing the expected quantize/dequantize squared error, computed
  from the histogram for the spec's exact grid (rounding error inside, clipping error outside);
- `auto_range`: the candidate of the others with the least expected error.

Every result passes through `finalize`: finite, inside the observed data range, containing 0
when the spec's grid must represent 0 exactly (integer kinds), and never zero-width for data
that is not constant. Histogram densities are treated as uniform within each bin.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lowbit.calibration.histogram import Histogram
from lowbit.errors import CalibrationError
from lowbit.numerics import choose_qparams, fake_quantize
from lowbit.spec import QuantSpec

_FLOAT32_MAX = float(np.finfo(np.float32).max)
DEFAULT_SPEC = QuantSpec("int8")  # symmetric int8, the grid assumed when none is given
DEFAULT_PERCENTILE = 99.99
AUTO_PERCENTILES = (99.9, 99.99, 99.999)
_SLICE = 64  # candidate ranges evaluated together by expected_mse


# --------------------------------------------------------------------------- helpers

def _range_matters(spec: QuantSpec) -> bool:
    """fp16/bf16 use scale 1 whatever the range, so only min/max is worth computing."""
    dt = spec.dtype_info
    return not dt.is_float or dt.saturates


def _needs_zero(spec: QuantSpec) -> bool:
    """Integer grids must represent 0 exactly (padding, ReLU zeros); float grids always do."""
    return spec.dtype_info.is_integer_grid


def finalize(lo: float, hi: float, hist: Histogram | None, spec: QuantSpec,
             data_min: float | None = None, data_max: float | None = None) -> tuple[float, float]:
    """Make an estimate a valid range (see the module docstring)."""
    if hist is not None:
        data_min, data_max = hist.data_min, hist.data_max
        resolution = hist.width
    else:
        resolution = 0.0
    lo = min(max(float(lo), data_min), data_max)
    hi = min(max(float(hi), data_min), data_max)
    lo, hi = min(lo, hi), max(lo, hi)
    if data_max > data_min and hi - lo < resolution:
        # Narrower than one histogram bin: the estimate is below what the statistics can
        # resolve (e.g. 99.99% of values are exactly 0). Widen to one bin, inside the data.
        want = min(resolution, data_max - data_min)
        hi = min(data_max, lo + want)
        lo = max(data_min, hi - want)
    if _needs_zero(spec):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return max(lo, -_FLOAT32_MAX), min(hi, _FLOAT32_MAX)


def cumulative_at(hist: Histogram, x: np.ndarray) -> np.ndarray:
    """How many values are <= x, interpolating linearly inside bins."""
    cumulative = np.concatenate([[0.0], np.cumsum(hist.counts)])
    return np.interp(x, hist.edges, cumulative)


def quantile(hist: Histogram, q: float) -> float:
    """The value below which a fraction q of the histogram's mass lies (uniform within bins)."""
    cumulative = np.concatenate([[0.0], np.cumsum(hist.counts)])
    target = q * cumulative[-1]
    # First edge whose cumulative count reaches the target; the value lies in the bin before it.
    edge = int(np.searchsorted(cumulative, target, side="left"))
    if edge == 0:
        return hist.data_min
    b = edge - 1
    fraction = (target - cumulative[b]) / hist.counts[b] if hist.counts[b] > 0 else 1.0
    value = hist.lo + (b + fraction) * hist.width
    return float(min(max(value, hist.data_min), hist.data_max))


def fold_abs(hist: Histogram) -> Histogram:
    """Histogram of |x| on [0, max|x|] with as many bins, re-sampled from the signed one."""
    amax = max(abs(hist.data_min), abs(hist.data_max))
    if amax == 0:
        amax = hist.width  # all mass at 0: any positive width keeps the geometry valid
    edges = np.linspace(0.0, amax, hist.bins + 1)
    inside = cumulative_at(hist, edges) - cumulative_at(hist, -edges)
    counts = np.maximum(np.diff(inside), 0.0)
    crosses_zero = hist.data_min <= 0 <= hist.data_max
    low = 0.0 if crosses_zero else min(abs(hist.data_min), abs(hist.data_max))
    return Histogram(counts, 0.0, amax, low, amax)


# --------------------------------------------------------------------------- minmax / percentile

def minmax_range(data_min: float, data_max: float, spec: QuantSpec = DEFAULT_SPEC) -> tuple[float, float]:
    return finalize(data_min, data_max, None, spec, data_min, data_max)


def percentile_range(hist: Histogram, spec: QuantSpec = DEFAULT_SPEC,
                     percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
    """Symmetric specs: the percentile of |x|. Asymmetric: (100 - percentile) / 2 percent is cut
    from each tail (as ONNX Runtime's percentile calibrator does)."""
    if not 0 < percentile <= 100:
        raise CalibrationError(f"percentile must lie in (0, 100], got {percentile}; use e.g. 99.99")
    if not _range_matters(spec):
        return minmax_range(hist.data_min, hist.data_max, spec)
    if spec.symmetric:
        t = quantile(fold_abs(hist), percentile / 100.0)
        return finalize(-t, t, hist, spec)
    tail = (100.0 - percentile) / 200.0
    return finalize(quantile(hist, tail), quantile(hist, 1.0 - tail), hist, spec)


# --------------------------------------------------------------------------- entropy (KL)

def entropy_levels(hist: Histogram, spec: QuantSpec) -> int | None:
    """Grid steps covering [0, threshold], as TensorRT counts them (128 for int8): 2^(bits-1),
    or 2^bits for an asymmetric spec on one-signed data. None: the spec has no such grid."""
    dt = spec.dtype_info
    if dt.kind != "int":
        return None
    one_signed = hist.data_min >= 0 or hist.data_max <= 0
    return 2 ** dt.bits if (not spec.symmetric and one_signed) else 2 ** (dt.bits - 1)


def kl_best_bins(counts: np.ndarray, levels: int, eps: float = 1e-4) -> int:
    """TensorRT's entropy threshold search on a histogram of |x|; returns the number of bins i
    (threshold = i * bin width) minimizing KL(P || Q), where for each i in [levels, n]:

    - P = counts[:i] with everything beyond bin i-1 added to bin i-1 (clipped values), /sum;
    - Q = counts[:i] merged into `levels` chunks (chunk j covers bins floor(j*i/levels) up to
      floor((j+1)*i/levels)), each chunk's count spread evenly over its non-empty bins, /sum;
    - where P > 0 but Q == 0 (only possible in bin i-1), Q is smoothed to eps.

    Candidates are evaluated from prefix sums, O(levels) each instead of O(n), in blocks of
    256 (bounded temporary memory, no per-candidate Python loop).
    """
    h = np.asarray(counts, dtype=np.float64)
    n = h.size
    if levels > n:
        raise ValueError(f"cannot search {levels} levels in {n} bins")
    prefix = _KLPrefixSums(h)
    candidates = np.arange(levels, n + 1)
    divergence = np.concatenate([_kl_divergences(prefix, block, levels, eps)
                                 for block in np.array_split(candidates, -(-candidates.size // 256))])
    return int(candidates[int(np.argmin(divergence))])


class _KLPrefixSums:
    """prefix[m] = sum of h[:m], and the same for h*log(h) and for the count of non-empty bins."""

    def __init__(self, h: np.ndarray) -> None:
        self.h = h
        self.total = h.sum()
        self.counts = np.concatenate([[0.0], np.cumsum(h)])
        h_log_h = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
        self.h_log_h = np.concatenate([[0.0], np.cumsum(h_log_h)])
        self.nonzero = np.concatenate([[0], np.cumsum(h > 0)])


def _kl_divergences(prefix: _KLPrefixSums, i: np.ndarray, levels: int, eps: float) -> np.ndarray:
    """KL(P || Q) for each candidate bin count in `i` (see kl_best_bins)."""
    total = prefix.total
    kept = prefix.counts[i]  # sum of counts[:i], the mass Q is built from
    last = prefix.h[i - 1]
    p_last = (last + total - kept) / total  # bin i-1 plus all clipped values
    # P log P over the bins before i-1: sum (h/N) log(h/N).
    p_log_p = (prefix.h_log_h[i - 1] - prefix.counts[i - 1] * np.log(total)) / total
    # Chunk boundaries for every candidate: (candidates, levels + 1).
    bounds = (np.arange(levels + 1)[None, :] * i[:, None]) // levels
    chunk_sum = np.diff(prefix.counts[bounds], axis=1)
    chunk_nonzero = np.diff(prefix.nonzero[bounds], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Q value of every non-empty bin in a chunk (normalized by the kept mass).
        q_chunk = chunk_sum / np.where(chunk_nonzero > 0, chunk_nonzero, 1) / kept[:, None]
        log_q = np.where(chunk_sum > 0, np.log(np.where(chunk_sum > 0, q_chunk, 1.0)), 0.0)
        # P mass per chunk, excluding bin i-1 (its P holds the clipped values too): the last
        # chunk always contains it.
        p_mass = chunk_sum
        p_mass[:, -1] -= last
        p_log_q = (p_mass * log_q).sum(axis=1) / total
        q_last = np.where(last > 0, q_chunk[:, -1], eps)
        last_term = np.where(p_last > 0, p_last * np.log(p_last / q_last), 0.0)
        divergence = p_log_p - p_log_q + last_term
    return np.where(kept > 0, divergence, np.inf)


def entropy_range(hist: Histogram, spec: QuantSpec = DEFAULT_SPEC,
                  num_quantized_bins: int | None = None) -> tuple[float, float]:
    """KL threshold t on |x|; the range is [-t, t] intersected with the data (so one-signed
    data keeps a one-signed range). Specs without an integer grid of at least 2 bits (binary,
    ternary, fp8) fall back to `mse_range`."""
    if not _range_matters(spec):
        return minmax_range(hist.data_min, hist.data_max, spec)
    levels = num_quantized_bins or entropy_levels(hist, spec)
    if levels is None:
        return mse_range(hist, spec)
    folded = fold_abs(hist)
    if levels >= folded.bins:
        return minmax_range(hist.data_min, hist.data_max, spec)
    t = kl_best_bins(folded.counts, levels) * folded.width
    return finalize(-t, t, hist, spec)


# --------------------------------------------------------------------------- expected MSE

def expected_mse(hist: Histogram, lo: np.ndarray, hi: np.ndarray,
                 spec: QuantSpec = DEFAULT_SPEC) -> np.ndarray:
    """Expected squared error of fake_quantize(x, choose_qparams(lo, hi, spec)) for x drawn
    from the histogram, for each candidate range (lo[k], hi[k]).

    Integer grids are integrated in closed form: the grid step is the scale; values between the
    lowest and highest grid points carry the rounding error, values beyond them the clipping
    error. Other kinds (binary, ternary, fp8) are evaluated on 16 points per bin.
    """
    lo = np.atleast_1d(np.asarray(lo, dtype=np.float64))
    hi = np.atleast_1d(np.asarray(hi, dtype=np.float64))
    # A range wider than float32 can hold (e.g. +-3e38 kept on purpose) overflows the float32
    # scale: such a candidate is unusable, so it scores +inf instead of NaN.
    with np.errstate(over="ignore", invalid="ignore"):
        # Candidates in slices: the work is (candidates x bins) float64 matrices, kept ~1 MiB.
        errors = np.concatenate([_expected_mse(hist, lo[k:k + _SLICE], hi[k:k + _SLICE], spec)
                                 for k in range(0, lo.size, _SLICE)])
    return np.where(np.isfinite(errors), errors, np.inf)


def _expected_mse(hist: Histogram, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> np.ndarray:
    if spec.dtype_info.kind != "int":
        keep = hist.counts > 0
        return _sampled_mse(hist.counts[keep], hist.edges[:-1][keep], hist.width, lo, hi, spec)
    qp = choose_qparams(lo.astype(np.float32), hi.astype(np.float32), spec)
    step = np.asarray(qp.scale, dtype=np.float64).reshape(-1, 1)
    zero_point = np.asarray(qp.zero_point, dtype=np.float64).reshape(-1, 1)
    grid_lo = (spec.qmin - zero_point) * step
    grid_hi = (spec.qmax - zero_point) * step
    # With density counts[b] / width on bin b, the expected error is
    #   sum_b counts[b] * (E(edge[b+1]) - E(edge[b])) / width,   E = antiderivative of the error,
    # which regroups by edge as sum_e E(edge[e]) * (counts[e-1] - counts[e]): only edges where
    # the count changes matter (runs of empty bins drop out).
    padded = np.concatenate([[0.0], hist.counts, [0.0]])
    weight = padded[:-1] - padded[1:]
    used = weight != 0
    x, w = hist.edges[used], weight[used]
    # E(x) = step^3 * (k/12 + (r^3 + 1/8)/3) inside the grid (u = x/step clipped to it, k = round(u),
    # r = u - k) plus the clipping tails' cubes. Each term is a (candidates x edges) matrix folded
    # into the edge weights right away, in place: this loop is most of a transformer's calibration.
    u = np.clip(x[None, :], grid_lo, grid_hi)
    u /= step
    k = u + 0.5
    np.floor(k, out=k)
    u -= k  # the rounding residual r
    cubes = u * u
    cubes *= u
    inside = (k @ w) / 12.0 + (cubes @ w + 0.125 * w.sum()) / 3.0
    tail = np.subtract(x[None, :], grid_hi, out=u)
    np.maximum(tail, 0.0, out=tail)
    np.multiply(tail, tail, out=cubes)
    cubes *= tail
    above = cubes @ w
    np.subtract(grid_lo, x[None, :], out=tail)
    np.maximum(tail, 0.0, out=tail)
    np.multiply(tail, tail, out=cubes)
    cubes *= tail
    below = cubes @ w
    antiderivative = step[:, 0] ** 3 * inside + (above - below) / 3
    return antiderivative / (hist.width * hist.total)


def _sampled_mse(counts, left, width, lo, hi, spec, samples: int = 16) -> np.ndarray:
    offsets = (np.arange(samples) + 0.5) / samples * width
    points = (left[:, None] + offsets[None, :]).reshape(-1).astype(np.float32)
    weights = np.repeat(counts / samples, samples)
    errors = []
    for low, high in zip(lo, hi):
        qp = choose_qparams(np.float32(low), np.float32(high), spec)
        diff = fake_quantize(points, qp).astype(np.float64) - points
        errors.append(float(weights @ diff**2))
    return np.asarray(errors) / counts.sum()


# --------------------------------------------------------------------------- mse search

def _search_1d(error: Callable[[np.ndarray], np.ndarray], low: float, high: float,
               coarse: int = 64, fine: int = 32) -> float:
    """Minimize error(t) over t in [low, high]: a coarse grid (geometric, to resolve small t
    under far outliers, plus linear), then a fine linear grid between the best one's neighbours."""
    if high <= low:
        return high
    floor = max(low, high * 1e-5)
    grid = np.unique(np.concatenate([np.geomspace(floor, high, coarse),
                                     np.linspace(floor, high, coarse)]))
    errors = error(grid)
    best = int(np.argmin(errors))
    lo_t = grid[max(best - 1, 0)]
    hi_t = grid[min(best + 1, grid.size - 1)]
    fine_grid = np.linspace(lo_t, hi_t, fine)
    fine_errors = error(fine_grid)
    best_fine = int(np.argmin(fine_errors))
    return float(fine_grid[best_fine] if fine_errors[best_fine] <= errors[best] else grid[best])


def mse_range(hist: Histogram, spec: QuantSpec = DEFAULT_SPEC, rounds: int = 3) -> tuple[float, float]:
    """The range with the least expected quantization error (see `expected_mse`).

    Symmetric specs search one threshold t for [-t, t]. Asymmetric specs alternate between the
    upper and the lower end (coordinate descent; the error is nearly separable into the two
    tails plus a rounding term), starting from min/max and keeping 0 inside the range."""
    if not _range_matters(spec):
        return minmax_range(hist.data_min, hist.data_max, spec)
    resolution = hist.width
    if spec.symmetric:
        amax = max(abs(hist.data_min), abs(hist.data_max))
        t = _search_1d(lambda ts: expected_mse(hist, -ts, ts, spec), min(resolution, amax), amax)
        return finalize(-t, t, hist, spec)
    lo, hi = minmax_range(hist.data_min, hist.data_max, spec)
    lo_limit, hi_limit = lo, hi
    for _ in range(rounds):
        previous = (lo, hi)
        if hi_limit > 0:
            hi = _search_1d(lambda hs: expected_mse(hist, np.full_like(hs, lo), hs, spec),
                            min(resolution, hi_limit), hi_limit)
        if lo_limit < 0:
            lo = -_search_1d(lambda ls: expected_mse(hist, -ls, np.full_like(ls, hi), spec),
                             min(resolution, -lo_limit), -lo_limit)
        if (lo, hi) == previous:
            break
    return finalize(lo, hi, hist, spec)


# --------------------------------------------------------------------------- auto

def rank_candidates(hist: Histogram, spec: QuantSpec = DEFAULT_SPEC,
                    num_quantized_bins: int | None = None) -> list[tuple[str, float, float, float]]:
    """Every estimator's range with its expected error, best first: (name, lo, hi, error)."""
    candidates = {"minmax": minmax_range(hist.data_min, hist.data_max, spec)}
    for p in AUTO_PERCENTILES:
        candidates[f"percentile({p})"] = percentile_range(hist, spec, p)
    candidates["entropy"] = entropy_range(hist, spec, num_quantized_bins)
    candidates["mse"] = mse_range(hist, spec)
    names = list(candidates)
    lows = np.array([candidates[n][0] for n in names])
    highs = np.array([candidates[n][1] for n in names])
    errors = expected_mse(hist, lows, highs, spec)
    order = np.argsort(errors, kind="stable")
    return [(names[k], float(lows[k]), float(highs[k]), float(errors[k])) for k in order]


def auto_range(hist: Histogram, spec: QuantSpec = DEFAULT_SPEC,
               num_quantized_bins: int | None = None) -> tuple[float, float]:
    """The candidate range (minmax, percentiles, entropy, mse) with the least expected error."""
    if not _range_matters(spec):
        return minmax_range(hist.data_min, hist.data_max, spec)
    _, lo, hi, _ = rank_candidates(hist, spec, num_quantized_bins)[0]
    return lo, hi
