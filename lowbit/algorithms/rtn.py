"""Round-to-nearest (RTN) weight quantization: the baseline every other algorithm must beat.

Scales come from each scale group's min/max on the full integer grid (`weight_layout.weight_qparams`),
optionally with the range shrunk to the least squared rounding error (`mse=True`); every weight
is rounded to its nearest grid point. No calibration data is used. Layout: see `weight_layout`.
"""

from __future__ import annotations

from lowbit.algorithms.weight_layout import (QuantizedWeight, as_weight_matrix, quantized_from_qparams,
                                             weight_qparams_for)
from lowbit.spec import QuantSpec


def rtn_quantize(weight, spec: QuantSpec, name: str = "weight", *, mse: bool = False) -> QuantizedWeight:
    """Quantize a `[out, in]` weight by rounding to nearest under `spec` (groups along `in`).

    Any data type `numerics` knows works here (int, binary, ternary, fp8...), since RTN needs
    nothing but the range. `mse` searches each integer scale group's clipping range for the
    least squared weight error (`weight_layout.weight_qparams_for`)."""
    matrix = as_weight_matrix(weight, name)
    spec = spec.with_axis(1 if spec.granularity.kind == "group" else 0)
    return quantized_from_qparams(matrix, weight_qparams_for(matrix, spec, name, mse=mse))


def quantize_group(matrices, statistics, spec: QuantSpec, options, names: list[str]) -> list[QuantizedWeight]:
    """The `lowbit.weight_algorithms` hook: each matrix on its own; `statistics` unused."""
    return [rtn_quantize(matrix, spec, name, mse=options.rtn_mse) for matrix, name in zip(matrices, names)]
