"""Calibrate the activation ranges of a prepared model on a few batches.

The model runs in float (quantizers only observe, weights are not quantized) and each activation
quantizer streams its input into a `calibration.RangeObserver`; the chosen range estimator then
sets the quantizer's scale and zero point through `numerics.choose_qparams`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.calibration import RangeObserver
from lowbit.errors import LowbitError
from lowbit.torch.qat import activation_quantizers, check_inputs, state_of


def calibrate(model: nn.Module, batches: Iterable[Any], method: str = "minmax",
              **options: Any) -> dict[str, tuple[float, float]]:
    """Set every activation range of a prepared model from `batches`; returns name -> (min, max).

    A batch is a tensor or a tuple of tensors; only the first len(example_inputs) tensors are
    fed to the model, so (inputs, labels) pairs from a DataLoader work as they are. `method` and
    `options` are those of `RangeObserver.range` (minmax, percentile, entropy, mse, auto)."""
    state = state_of(model)
    quantizers = activation_quantizers(model)
    if not quantizers:
        return {}  # weight-only recipe: nothing to calibrate
    n_inputs = len(state.input_signature)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for quantizer in quantizers.values():
            quantizer.observer = RangeObserver(quantizer.name)
        with torch.no_grad():
            for batch in batches:
                inputs = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)[:n_inputs]
                check_inputs(state, inputs, f"calibration batch {seen}")
                model(*inputs)
                seen += 1
        if seen == 0:
            raise LowbitError("calibrate received no batches; pass at least one batch of model inputs")
        ranges = {}
        for name, quantizer in quantizers.items():
            low, high = quantizer.observer.range(method, quantizer.spec, **options)
            quantizer.set_range(float(np.asarray(low)), float(np.asarray(high)))
            ranges[quantizer.name] = (float(np.asarray(low)), float(np.asarray(high)))
    finally:
        for quantizer in quantizers.values():
            quantizer.observer = None
        model.train(was_training)
    return ranges
