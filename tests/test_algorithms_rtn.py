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
    """Symmetric int4 uses the whole grid [-8, 7]: scale max|w| / 7.5, as compressed-tensors does."""
    w = weight(6, 40, seed=3).numpy()  # 40 features in groups of 16: the last group has 8
    result = rtn_quantize(w, QuantSpec("int4", granularity=per_group(16)))
    assert result.values.min() == -8
    expected = np.empty_like(w)
    for start in range(0, 40, 16):
        block = w[:, start:start + 16]
        scale = np.abs(block).max(axis=1, keepdims=True) / np.float32(7.5)
        expected[:, start:start + 16] = np.clip(np.rint(block / scale), -8, 7) * scale
    np.testing.assert_allclose(result.weight.numpy(), expected, rtol=1e-6, atol=0)
    assert result.qparams.scale.shape == (6, 3)


def test_int8_keeps_the_symmetric_range():
    """int8 weights stay in [-127, 127] (max|w| / 127), the range int8 kernels expect."""
    w = weight(6, 40, seed=3)
    result = rtn_quantize(w, QuantSpec("int8", granularity=per_channel()))
    torch.testing.assert_close(result.qparams.scale, w.abs().amax(dim=1) / 127)
    assert result.values.min() >= -127


@pytest.mark.parametrize("spec", [QuantSpec("int4", granularity=per_group(16)),
                                  QuantSpec("int3", symmetric=False, granularity=per_channel())],
                         ids=lambda s: s.describe())
def test_mse_clip_never_raises_the_weight_error(spec):
    """The MSE search tries the full range too, so each group's squared error can only drop;
    with a few outlier weights it drops a lot."""
    w = weight(32, 64, seed=4)
    w[::5, 3] *= 6.0  # outliers stretch some groups' ranges
    plain, searched = rtn_quantize(w, spec), rtn_quantize(w, spec, mse=True)
    assert searched.check_on_grid()
    plain_error = (plain.weight - w).pow(2).sum(dim=1)
    searched_error = (searched.weight - w).pow(2).sum(dim=1)
    assert torch.all(searched_error <= plain_error * (1 + 1e-5))
    assert searched_error.sum() < 0.9 * plain_error.sum()


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
