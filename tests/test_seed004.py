"""The worked example of seed 004 (shared/seeds/004_*.txt), reproduced with lowbit's primitives.

The seed quantizes one number, 5.214, with a max-abs int8 scale, then the array
[-0.62, -0.52, 1.62] with a min/max scale but *no* zero point, shows the resulting clipping
error, and names the two fixes: max-abs symmetric scaling and an offset (zero point).

The seed's own arithmetic slips in places, and these tests assert the correct values instead:
- step 2 of the first example divides by 0.0412126, although its scale is 0.0410551;
- the array example uses -0.61 for the minimum, so its scale 2.23/255 = 0.0087109 where the data
  gives 2.24/255 = 0.0087843; with the right scale 1.62 maps to 184.42 (the seed: 185.97);
- it truncates (-59.69 -> -59) where QuantizeLinear rounds half to even (-59.196 -> -59 here,
  but -70.58 -> -71, where the seed's -70.03 -> -70).
Either way the point stands: 1.62 saturates at 127 and comes back as about 1.1.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.numerics import QParams, choose_qparams, dequantize, qparams_for, quantize, tensor_range
from lowbit.spec import QuantSpec

INT8_SYM = QuantSpec("int8", symmetric=True)
INT8_ASYM = QuantSpec("int8", symmetric=False)
ARRAY = np.array([-0.62, -0.52, 1.62], np.float32)


def test_single_value_max_abs_scale_and_round_trip():
    x = np.array([5.214], np.float32)
    qp = qparams_for(x, INT8_SYM)
    assert float(qp.scale) == pytest.approx(5.214 / 127, rel=1e-7)  # seed: 0.0410551
    assert float(qp.scale) == pytest.approx(0.0410551, abs=1e-7)
    assert int(qp.zero_point) == 0
    q = quantize(x, qp)
    assert q.tolist() == [127]  # 0b01111111
    assert np.binary_repr(int(q[0]), width=8) == "01111111"
    assert float(dequantize(q, qp)[0]) == pytest.approx(5.214, abs=1e-6)  # seed: 5.213997


def test_min_max_scale_without_zero_point_clips_the_maximum():
    # The seed's scheme: scale = (max - min) / (127 - (-128)) ... then no zero point.
    lo, hi = tensor_range(ARRAY, INT8_ASYM)
    min_max_scale = choose_qparams(lo, hi, INT8_ASYM).scale
    assert float(min_max_scale) == pytest.approx(2.24 / 255, rel=1e-6)  # 0.0087843, seed: 0.0087109
    seed_scheme = QParams(INT8_ASYM, min_max_scale, np.int32(0))

    np.testing.assert_allclose(ARRAY / min_max_scale, [-70.58036, -59.196426, 184.41965], rtol=1e-6)
    q = quantize(ARRAY, seed_scheme)
    assert q.tolist() == [-71, -59, 127]  # 184 does not fit: clipped to 127
    restored = dequantize(q, seed_scheme)
    np.testing.assert_allclose(restored, [-0.62368625, -0.5182745, 1.1156079], rtol=1e-6)
    # The "clipping error" the seed points at: 1.62 comes back as about 1.1.
    assert restored[2] == pytest.approx(1.1156, abs=1e-4)
    assert ARRAY[2] - restored[2] > 0.5
    # The unclipped values are fine: within half a step.
    assert (np.abs(restored[:2] - ARRAY[:2]) <= float(min_max_scale) / 2).all()


def test_fix_one_max_abs_symmetric():
    qp = qparams_for(ARRAY, INT8_SYM)
    assert float(qp.scale) == pytest.approx(1.62 / 127, rel=1e-7)
    assert int(qp.zero_point) == 0
    q = quantize(ARRAY, qp)
    assert q.tolist() == [-49, -41, 127]
    error = np.abs(dequantize(q, qp) - ARRAY)
    assert (error <= float(qp.scale) / 2).all()
    assert error[2] == 0  # the maximum lands exactly on 127


def test_fix_two_offset_is_asymmetric_with_a_zero_point():
    qp = qparams_for(ARRAY, INT8_ASYM)
    assert float(qp.scale) == pytest.approx(2.24 / 255, rel=1e-6)
    assert int(qp.zero_point) == -57  # round(-128 + 0.62 / scale) = round(-57.42)
    q = quantize(ARRAY, qp)
    assert q.tolist() == [-128, -116, 127]
    restored = dequantize(q, qp)
    np.testing.assert_allclose(restored, [-0.62368625, -0.5182745, 1.6163137], rtol=1e-6)
    assert (np.abs(restored - ARRAY) <= float(qp.scale) / 2).all()
    # Same scale as the seed's scheme, but the zero point uses the whole grid: 3.6e-3 worst error
    # instead of 0.50.
    assert np.abs(restored - ARRAY).max() < 0.004
