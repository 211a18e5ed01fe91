"""Round-to-nearest against the textbook formula and the numerics grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _synthetic_layers import single_thread  # noqa: F401 (autouse fixture)
from _synthetic_layers import weight
from lowbit.algorithms import rtn_quantize
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec, per_channel, per_group


def test_int4_groups_against_the_textbook_formula():
    w = weight(6, 40, seed=3).numpy()  # 40 features in groups of 16: the last group has 8
    result = rtn_quantize(w, QuantSpec("int4", granularity=per_group(16)))
    expected = np.empty_like(w)
    for start in range(0, 40, 16):
        block = w[:, start:start + 16]
        scale = np.abs(block).max(axis=1, keepdims=True) / np.float32(7)
        expected[:, start:start + 16] = np.clip(np.rint(block / scale), -8, 7) * scale
    np.testing.assert_allclose(result.weight.numpy(), expected, rtol=1e-6, atol=0)
    assert result.qparams.scale.shape == (6, 3)


@pytest.mark.parametrize("spec", [QuantSpec("int2", symmetric=False, granularity=per_group(8)),
                                  QuantSpec("int8", granularity=per_channel()), QuantSpec("int4"),
                                  QuantSpec("ternary", granularity=per_channel()),
                                  QuantSpec("fp8_e4m3", granularity=per_channel())],
                         ids=lambda s: s.describe())
def test_results_lie_on_the_grid(spec):
    result = rtn_quantize(weight(8, 24), spec)
    assert result.check_on_grid()
    assert result.weight.dtype == torch.float32 and result.weight.shape == (8, 24)


def test_rejects_non_matrices_and_non_finite_weights():
    with pytest.raises(LowbitError, match="2-d"):
        rtn_quantize(torch.zeros(3), QuantSpec("int8"))
    with pytest.raises(LowbitError, match="NaN"):
        rtn_quantize(torch.tensor([[1.0, float("inf")]]), QuantSpec("int8"))
