"""GPTQ against an independent step-by-step reference, RTN, and its own promises
(streaming Hessian, act-order, damping escalation, results on the numerics grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _synthetic_layers import single_thread  # noqa: F401 (autouse fixture)
from _synthetic_layers import activations, relative_output_error, weight
from lowbit import numerics
from lowbit.algorithms import HessianAccumulator, gptq_quantize, rtn_quantize
from lowbit.errors import CalibrationError, LowbitError, SpecError
from lowbit.spec import QuantSpec, per_channel, per_group


@pytest.fixture(scope="module")
def layer():
    x = activations(n=1024, d=256)
    accumulator = HessianAccumulator(256)
    for chunk in x.split(300):  # uneven chunks: the running mean must not depend on them
        accumulator.add(chunk)
    return x, weight(192, 256), accumulator.hessian


# --------------------------------------------------------------------------- Hessian accumulator

def test_streaming_hessian_equals_the_batch_computation():
    x = activations(n=700, d=48, seed=3).double()
    accumulator = HessianAccumulator(48)
    for chunk in torch.split(x.reshape(7, 100, 48), [2, 1, 4]):  # [batch, tokens, features] chunks
        accumulator.add(chunk)
    np.testing.assert_allclose(accumulator.hessian.numpy(), (2 * x.T @ x / 700).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(accumulator.abs_mean.numpy(), x.abs().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(accumulator.abs_max.numpy(), x.abs().amax(0).numpy())
    assert accumulator.count == 700


def test_masked_rows_are_left_out():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    accumulator = HessianAccumulator(8)
    accumulator.add(x, mask)
    kept = x[mask]
    np.testing.assert_allclose(accumulator.gram.numpy(), (kept.T @ kept / 9).numpy(), rtol=1e-12)
    assert accumulator.count == 9


def test_accumulator_memory_does_not_grow_with_samples():
    accumulator = HessianAccumulator(16)
    before = [t.data_ptr() for t in (accumulator._gram, accumulator._abs_sum)]
    for _ in range(5):
        accumulator.add(torch.randn(1000, 16))
    assert [t.data_ptr() for t in (accumulator._gram, accumulator._abs_sum)] == before
    assert accumulator._gram.shape == (16, 16)


def test_accumulator_rejects_bad_rows():
    accumulator = HessianAccumulator(4)
    with pytest.raises(CalibrationError, match="features"):
        accumulator.add(torch.zeros(2, 5))
    with pytest.raises(CalibrationError, match="NaN"):
        accumulator.add(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(CalibrationError, match="no calibration rows"):
        _ = accumulator.hessian


# --------------------------------------------------------------------------- against a reference

def _reference_gptq(w: np.ndarray, h: np.ndarray, spec: QuantSpec, percdamp: float) -> np.ndarray:
    """Textbook GPTQ/OBQ in float64, one column at a time, re-inverting the Hessian of the
    remaining columns at every step (no Cholesky trick, no lazy batches)."""
    w = w.astype(np.float64).copy()
    h = h + percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    assert spec.symmetric and spec.granularity.kind == "channel"
    # The full signed grid: max|w| / ((qmax - qmin) / 2) per row, zero point 0.
    scale = np.abs(w).max(axis=1).astype(np.float32).astype(np.float64) / ((spec.qmax - spec.qmin) / 2)
    zero = np.zeros_like(scale)
    q = np.zeros_like(w)
    for j in range(w.shape[1]):
        inverse = np.linalg.inv(h[j:, j:])  # inverse Hessian of the columns not yet quantized
        q[:, j] = (np.clip(np.rint(w[:, j] / scale) + zero, spec.qmin, spec.qmax) - zero) * scale
        err = (w[:, j] - q[:, j]) / inverse[0, 0]
        w[:, j:] -= np.outer(err, inverse[0, :])
    return q


@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_matches_the_textbook_algorithm(block_size):
    x = activations(n=200, d=24, rank=6, n_salient=2, seed=5)
    w = weight(10, 24, seed=6)
    spec = QuantSpec("int3", granularity=per_channel())
    hessian = (2 * x.double().T @ x.double() / 200)
    result = gptq_quantize(w, hessian, spec, block_size=block_size, percdamp=0.01)
    expected = _reference_gptq(w.numpy(), hessian.numpy(), spec.with_axis(0), 0.01)
    # float32 vs float64 arithmetic: an occasional weight may round to the neighbouring step.
    scale = result.qparams.scale.numpy()[:, None]
    steps = np.abs(result.weight.numpy() - expected) / scale
    assert np.mean(steps < 1e-3) > 0.97 and steps.max() < 1.01


def _reference_static_group_gptq(w: np.ndarray, h: np.ndarray, group: int, bits: int, percdamp: float,
                                 act_order: bool) -> np.ndarray:
    """Textbook GPTQ with symmetric per-group scales fixed up front from the original weights
    (max|w| / (2^bits - 1) * 2 per row and group, the full signed grid) and, with act-order,
    columns visited in decreasing order of diag(H); each column keeps its own group's scale."""
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    n_out, n_in = w.shape
    amax = np.abs(w.reshape(n_out, n_in // group, group)).max(axis=2).astype(np.float32).astype(np.float64)
    scale = np.repeat(amax / ((qmax - qmin) / 2), group, axis=1)  # [out, in]: each column's scale
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n_in)
    w, h, scale = w.astype(np.float64)[:, order], h[np.ix_(order, order)], scale[:, order]
    h = h + percdamp * np.mean(np.diag(h)) * np.eye(n_in)
    q = np.zeros_like(w)
    for j in range(n_in):
        inverse = np.linalg.inv(h[j:, j:])
        q[:, j] = np.clip(np.rint(w[:, j] / scale[:, j]), qmin, qmax) * scale[:, j]
        w[:, j:] -= np.outer((w[:, j] - q[:, j]) / inverse[0, 0], inverse[0, :])
    return q[:, np.argsort(order)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("hessian_dtype", [torch.float64, torch.float32])  # float32: factorized in float32
def test_static_groups_match_the_textbook_algorithm(act_order, hessian_dtype):
    x = activations(n=300, d=32, rank=8, n_salient=3, seed=12)
    w = weight(12, 32, seed=14)  # no weight lands on a rounding tie (-7.5 steps) in float64 but not float32
    hessian = (2 * x.double().T @ x.double() / 300).to(hessian_dtype)
    spec = QuantSpec("int4", granularity=per_group(8))
    original = hessian.clone()
    result = gptq_quantize(w, hessian, spec, block_size=5, act_order=act_order, static_groups=True)
    assert torch.equal(hessian, original)  # the caller's Hessian is untouched (linears of a group share it)
    expected = _reference_static_group_gptq(w.numpy(), hessian.double().numpy(), 8, 4, 0.01, act_order)
    np.testing.assert_allclose(result.qparams.scale.numpy(),
                               np.abs(w.numpy().reshape(12, 4, 8)).max(axis=2) / 7.5, rtol=1e-6)
    steps = np.abs(result.weight.numpy() - expected) / np.repeat(result.qparams.scale.numpy(), 8, axis=1)
    assert np.mean(steps < 1e-3) > 0.99 and steps.max() < 1.01


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("hessian_dtype", [torch.float64, torch.float32])
def test_an_input_that_never_fired_gets_zero_weights_and_leaves_the_others_alone(act_order, hessian_dtype):
    """Column 4's input is always 0: its weights become 0, and the other columns come out as GPTQ
    on the layer without that input (textbook GPTQ without act-order; no damping, so the two
    problems are the same)."""
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:, 4] = 0
    w = weight(6, 12, seed=9)
    w[:, 4] *= 0.1  # below each row's max: the per-channel scales are those of the layer without it
    alive = [j for j in range(12) if j != 4]
    hessian = (2 * x.T @ x / 200).to(hessian_dtype)
    spec = QuantSpec("int4", granularity=per_channel())
    result = gptq_quantize(w, hessian, spec, percdamp=0.0, act_order=act_order)
    assert torch.equal(result.weight[:, 4], torch.zeros(6))
    if act_order:
        expected = gptq_quantize(w[:, alive], hessian[alive][:, alive], spec, percdamp=0.0, act_order=True).weight
        steps = (result.weight[:, alive] - expected).abs() / result.qparams.scale[:, None]
    else:
        expected = _reference_gptq(w[:, alive].numpy(), hessian[alive][:, alive].double().numpy(),
                                   spec.with_axis(0), 0.0)
        steps = np.abs(result.weight[:, alive].numpy() - expected) / result.qparams.scale.numpy()[:, None]
    assert float((steps < 1e-3).float().mean() if act_order else np.mean(steps < 1e-3)) > 0.95
    assert float(steps.max()) < 1.01


def test_lazy_block_updates_do_not_change_the_result(layer):
    x, w, hessian = layer
    spec = QuantSpec("int4", granularity=per_group(32))
    one_by_one = gptq_quantize(w, hessian, spec, block_size=1)
    blocked = gptq_quantize(w, hessian, spec, block_size=64)
    assert torch.mean((one_by_one.values == blocked.values).float()) > 0.998


# --------------------------------------------------------------------------- accuracy vs RTN

CASES = [
    ("int4", True, per_group(128)), ("int4", True, per_group(64)), ("int4", True, per_group(32)),
    ("int4", True, per_channel()), ("int4", False, per_group(128)),
    ("int3", False, per_group(128)), ("int3", True, per_group(32)),
    ("int2", False, per_group(64)), ("int2", False, per_group(32)),
]


@pytest.mark.parametrize("dtype,symmetric,granularity", CASES,
                         ids=lambda v: v.describe() if hasattr(v, "describe") else str(v))
def test_output_error_is_lower_than_rtn(layer, dtype, symmetric, granularity):
    x, w, hessian = layer
    spec = QuantSpec(dtype, symmetric=symmetric, granularity=granularity)
    rtn = relative_output_error(x, w, rtn_quantize(w, spec).weight)
    result = gptq_quantize(w, hessian, spec)
    gptq = relative_output_error(x, w, result.weight)
    assert gptq < 0.7 * rtn, (gptq, rtn)
    assert result.check_on_grid()


@pytest.mark.parametrize("granularity", [per_group(32), per_channel()], ids=lambda g: g.describe())
def test_act_order_keeps_contiguous_groups_and_helps(layer, granularity):
    x, w, hessian = layer
    spec = QuantSpec("int3", symmetric=False, granularity=granularity)
    plain = gptq_quantize(w, hessian, spec)
    ordered = gptq_quantize(w, hessian, spec, act_order=True)
    assert ordered.qparams.spec == plain.qparams.spec
    assert tuple(ordered.qparams.scale.shape) == numerics.compact_shape(tuple(w.shape), plain.qparams.spec)
    assert ordered.check_on_grid()
    assert not torch.equal(ordered.values, plain.values)  # the order really changed
    assert relative_output_error(x, w, ordered.weight) < 1.05 * relative_output_error(x, w, plain.weight)


def test_eight_bits_is_close_to_rtn(layer):
    x, w, hessian = layer
    spec = QuantSpec("int8", granularity=per_channel())
    rtn = rtn_quantize(w, spec)
    gptq = gptq_quantize(w, hessian, spec)
    # Per-channel scales come from the original weight, so both share one grid; GPTQ moves
    # weights by a step or so and cannot do worse than RTN at the output.
    torch.testing.assert_close(gptq.qparams.scale, rtn.qparams.scale)
    steps = (gptq.values.int() - rtn.values.int()).abs()
    assert steps.float().mean() < 1.0
    rtn_error, gptq_error = relative_output_error(x, w, rtn.weight), relative_output_error(x, w, gptq.weight)
    assert gptq_error <= rtn_error and rtn_error < 0.01


# --------------------------------------------------------------------------- damping and odd inputs

def test_damping_rises_on_a_singular_hessian():
    x = activations(n=8, d=64, rank=4, n_salient=2, seed=9)  # 8 samples: rank 8 of 64
    hessian = 2 * x.double().T @ x.double() / 8
    w = weight(16, 64, seed=10)
    result = gptq_quantize(w, hessian, QuantSpec("int4", granularity=per_group(32)), percdamp=0.0)
    assert result.percdamp > 0.0
    assert torch.isfinite(result.weight).all() and result.check_on_grid()


def test_indefinite_hessian_gets_enough_damping():
    hessian = torch.eye(32, dtype=torch.float64)
    hessian[0, 0] = -0.5  # not a Gram matrix at all: needs damping above 0.5 / mean(diag)
    result = gptq_quantize(weight(8, 32), hessian, QuantSpec("int4", granularity=per_channel()), percdamp=0.01)
    assert result.percdamp >= 1.0 and torch.isfinite(result.weight).all()


def test_inputs_that_never_fire_get_zero_weights():
    x = activations(n=300, d=32, rank=8, n_salient=0, seed=11)
    x[:, [3, 17]] = 0.0
    hessian = 2 * x.double().T @ x.double() / 300
    result = gptq_quantize(weight(8, 32), hessian, QuantSpec("int4", symmetric=False, granularity=per_group(16)))
    assert torch.all(result.weight[:, [3, 17]] == 0)


def test_numpy_inputs_and_bad_arguments():
    w, hessian = weight(8, 32).numpy(), np.eye(32)
    result = gptq_quantize(w, hessian, QuantSpec("int4", granularity=per_group(16)))
    assert result.weight.shape == (8, 32)
    with pytest.raises(LowbitError, match=r"shape \(16, 16\)"):
        gptq_quantize(w, np.eye(16), QuantSpec("int4"))
    with pytest.raises(LowbitError, match="NaN"):
        gptq_quantize(w, np.full((32, 32), np.nan), QuantSpec("int4"))
    with pytest.raises(SpecError, match="integer grids"):
        gptq_quantize(w, hessian, QuantSpec("fp8_e4m3"))
    with pytest.raises(LowbitError, match="2-d"):
        gptq_quantize(w.reshape(8, 4, 8), hessian, QuantSpec("int4"))
    with pytest.raises(LowbitError, match="percdamp"):
        gptq_quantize(w, hessian, QuantSpec("int4"), percdamp=-1)
