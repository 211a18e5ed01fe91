"""Running and moving-average min/max: the cheapest range statistics.

Both keep one value per scale (a scalar per tensor, or one per channel), so their memory is fixed
once the first batch has been seen, however many batches follow.
"""

from __future__ import annotations

import numpy as np


class MinMaxStats:
    """Running min/max, and optionally an exponential moving average of per-batch min/max.

    `momentum` follows the PyTorch BatchNorm convention: the weight of the *new* batch, so
    `average = (1 - momentum) * average + momentum * batch_value` (PyTorch's
    MovingAverageMinMaxObserver calls it `averaging_constant`, TensorFlow uses `1 - decay`).
    The first batch initializes the average. NaN marks "no finite value seen yet" for a slot
    (a channel can stay empty if all its values were infinite).
    """

    def __init__(self, momentum: float | None = None) -> None:
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum}")
        self.momentum = momentum
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self.average_min: np.ndarray | None = None
        self.average_max: np.ndarray | None = None

    def update(self, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        """Fold in one batch's min/max (float64, same shape every call; NaN = slot not seen)."""
        batch_min = np.asarray(batch_min, dtype=np.float64)
        batch_max = np.asarray(batch_max, dtype=np.float64)
        if self.min is None:
            self.min, self.max = batch_min.copy(), batch_max.copy()
            if self.momentum is not None:
                self.average_min, self.average_max = batch_min.copy(), batch_max.copy()
            return
        # fmin/fmax ignore NaN on either side: an unseen slot takes the first real value.
        self.min = np.fmin(self.min, batch_min)
        self.max = np.fmax(self.max, batch_max)
        if self.momentum is not None:
            self.average_min = _ema(self.average_min, batch_min, self.momentum)
            self.average_max = _ema(self.average_max, batch_max, self.momentum)

    def nbytes(self) -> int:
        arrays = (self.min, self.max, self.average_min, self.average_max)
        return sum(a.nbytes for a in arrays if a is not None)


def _ema(average: np.ndarray, value: np.ndarray, momentum: float) -> np.ndarray:
    blended = (1.0 - momentum) * average + momentum * value
    # Slots missing on one side keep the other side's value instead of becoming NaN.
    blended = np.where(np.isnan(average), value, blended)
    return np.where(np.isnan(value), average, blended)
