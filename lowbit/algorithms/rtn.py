"""Round-to-nearest (RTN) weight quantization: the baseline every other algorithm must beat.

Scales come from each scale group's min/max (`numerics.qparams_for`), every weight is rounded to
its nearest grid point. No calibration data is used. Layout: see `weight_layout`.
"""

from __future__ import annotations

from lowbit.algorithms.weight_layout import QuantizedWeight, as_weight_matrix, quantized_from_qparams
from lowbit.numerics import qparams_for
from lowbit.spec import QuantSpec


def rtn_quantize(weight, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    """Quantize a `[out, in]` weight by rounding to nearest under `spec` (groups along `in`).

    Any data type `numerics` knows works here (int, binary, ternary, fp8...), since RTN needs
    nothing but the range."""
    matrix = as_weight_matrix(weight, name)
    spec = spec.with_axis(1 if spec.granularity.kind == "group" else 0)
    return quantized_from_qparams(matrix, qparams_for(matrix, spec, name))
