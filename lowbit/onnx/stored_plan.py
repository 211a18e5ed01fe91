"""Read back the exact per-channel / per-group parameters of a stored plan from the model itself.

The plan in the metadata keeps only a summary and a fingerprint of parameters with more than one
value (see `lowbit.plan`); the values are the model's own initializers (Q/DQ scales, dynamic-mode
weight scales). This finds them by fingerprint, so it works for every writer whatever it named
the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.plan import PlanEntry, QuantPlan


def restore_plan_qparams(plan: QuantPlan, model: onnx.ModelProto) -> list[PlanEntry]:
    """Fill in `plan`'s summarized parameters from `model`'s initializers; returns the entries
    whose values are no longer in the model (it was edited after quantization)."""
    sizes = {e.qparams_summary.count for e in plan.summarized()}
    return plan.restore_qparams(_arrays_of_size(model, sizes)) if sizes else []


def _arrays_of_size(model: onnx.ModelProto, sizes: set[int]) -> Iterator[np.ndarray]:
    # Only tensors of a wanted element count are converted: the weights themselves never are.
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) in sizes:
            yield numpy_helper.to_array(tensor)
