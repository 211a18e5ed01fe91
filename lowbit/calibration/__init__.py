"""Calibration: streaming range statistics with bounded memory, and range estimators.

Feed activation batches to an `ObserverSet` (one `RangeObserver` per tensor); ask it for
ranges with one of `CALIBRATION_METHODS`; pass each (min, max) to `numerics.choose_qparams`.

    observers = ObserverSet()
    for outputs in batches:            # dict name -> array, e.g. from ONNX Runtime
        observers.update(outputs)
    observers.warn_nonfinite()
    ranges = observers.ranges("auto", spec)

Memory depends on the number of tensors and bins, never on the number of batches.
"""

from lowbit.calibration.estimators import (
    auto_range,
    entropy_range,
    expected_mse,
    kl_best_bins,
    minmax_range,
    mse_range,
    percentile_range,
    rank_candidates,
)
from lowbit.calibration.histogram import Histogram, StreamingHistogram
from lowbit.calibration.observer import (
    CALIBRATION_METHODS,
    DEFAULT_IGNORE_ABS_ABOVE,
    CalibrationWarning,
    ObserverSet,
    RangeObserver,
)
from lowbit.calibration.stats import MinMaxStats

__all__ = [
    "CALIBRATION_METHODS", "DEFAULT_IGNORE_ABS_ABOVE", "CalibrationWarning", "Histogram",
    "MinMaxStats", "ObserverSet", "RangeObserver", "StreamingHistogram", "auto_range",
    "entropy_range", "expected_mse", "kl_best_bins", "minmax_range", "mse_range",
    "percentile_range", "rank_candidates",
]
