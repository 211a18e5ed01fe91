"""AWQ (scale search + clipping search) against RTN and against direct output computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _synthetic_layers import single_thread  # noqa: F401 (autouse fixture)
from _synthetic_layers import activations, relative_output_error, weight
from lowbit import numerics
from lowbit.algorithms import HessianAccumulator, awq_quantize, clip_search, output_error, rtn_quantize
from lowbit.errors import LowbitError, SpecError
from lowbit.spec import QuantSpec, per_channel, per_group


@pytest.fixture(scope="module")
def layer():
    x = activations(n=1024, d=256, n_salient=8, outlier=30.0, seed=2)
    accumulator = HessianAccumulator(256)
    accumulator.add(x)
    return x, weight(192, 256, seed=4), accumulator


SPECS = [QuantSpec("int4", granularity=per_group(128)), QuantSpec("int4", granularity=per_group(32)),
         QuantSpec("int4", granularity=per_channel()), QuantSpec("int3", symmetric=False, granularity=per_group(128)),
         QuantSpec("int3", granularity=per_group(64))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_output_error_is_lower_than_rtn(layer, spec):
    x, w, stats = layer
    result = awq_quantize(w, stats.gram, stats.abs_mean, spec)
    awq = relative_output_error(x, w, result.weights[0].weight, result.scales)
    rtn = relative_output_error(x, w, rtn_quantize(w, spec).weight)
    assert awq < 0.8 * rtn, (awq, rtn)
    assert result.alpha > 0 and result.scales.shape == (256,)
    assert result.weights[0].check_on_grid()


def test_salient_channels_get_the_largest_scales(layer):
    x, w, stats = layer
    result = awq_quantize(w, stats.gram, stats.abs_mean, QuantSpec("int4", granularity=per_group(128)))
    top_activations = set(torch.topk(x.abs().mean(0), 8).indices.tolist())
    assert set(torch.topk(result.scales, 8).indices.tolist()) == top_activations


def test_scaling_alone_leaves_the_float_layer_unchanged(layer):
    x, w, stats = layer
    result = awq_quantize(w, stats.gram, stats.abs_mean, QuantSpec("int4", granularity=per_group(128)))
    s = result.scales
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_shared_scale_for_layers_reading_one_input(layer):
    x, w, stats = layer
    other = weight(64, 256, seed=7)
    spec = QuantSpec("int4", granularity=per_group(64))
    result = awq_quantize([w, other], stats.gram, stats.abs_mean, spec)
    assert len(result.weights) == 2 and result.weights[1].weight.shape == (64, 256)
    for original, quantized in zip((w, other), result.weights):
        assert relative_output_error(x, original, quantized.weight, result.scales) < \
            relative_output_error(x, original, rtn_quantize(original, spec).weight)


def test_output_error_matches_the_direct_computation(layer):
    x, w, stats = layer
    delta = rtn_quantize(w, QuantSpec("int4", granularity=per_group(32))).weight - w
    direct = float(((x.double() @ delta.double().T) ** 2).sum(1).mean())
    assert output_error(delta, stats.gram.float()) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("spec", [QuantSpec("int3", symmetric=False, granularity=per_group(32)),
                                  QuantSpec("int4", granularity=per_channel())], ids=lambda s: s.describe())
def test_clip_search_beats_full_range_in_every_scale_group(layer, spec):
    x, w, stats = layer
    gram = stats.gram.float()
    clipped = clip_search(w, gram, spec)
    full = rtn_quantize(w, spec)
    axis_spec = clipped.qparams.spec
    # Error of each scale group, computed directly from the activations of its own inputs.
    if axis_spec.granularity.kind == "group":
        size = axis_spec.granularity.group_size
        for g in range(256 // size):
            cols = slice(g * size, (g + 1) * size)
            def group_error(q):
                return ((x[:, cols].double() @ (q[:, cols] - w[:, cols]).double().T) ** 2).mean(0)
            assert torch.all(group_error(clipped.weight) <= group_error(full.weight) * (1 + 1e-4) + 1e-9)
    else:
        def row_error(q):
            return ((x.double() @ (q - w).double().T) ** 2).mean(0)
        assert torch.all(row_error(clipped.weight) <= row_error(full.weight) * (1 + 1e-4) + 1e-9)
    assert clipped.check_on_grid()
    # Clipping only ever shrinks ranges.
    assert torch.all(clipped.qparams.scale <= full.qparams.scale * (1 + 1e-6))
    assert relative_output_error(x, w, clipped.weight) < relative_output_error(x, w, full.weight)


def test_uniform_activations_keep_unit_scales():
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    x = x / x.abs().mean(0)  # identical mean |x| in every channel: scales are 1 at every alpha
    stats = HessianAccumulator(64)
    stats.add(x)
    result = awq_quantize(weight(16, 64), stats.gram, stats.abs_mean, QuantSpec("int4", granularity=per_group(32)))
    torch.testing.assert_close(result.scales, torch.ones(64), rtol=1e-5, atol=1e-5)


def test_without_scale_search_and_without_clipping_it_is_rtn(layer):
    _, w, stats = layer
    spec = QuantSpec("int4", granularity=per_group(32))
    result = awq_quantize(w, stats.gram, stats.abs_mean, spec, search_scales=False, clip=False)
    np.testing.assert_array_equal(result.weights[0].values.numpy(), rtn_quantize(w, spec).values.numpy())
    assert result.alpha == 0.0 and torch.all(result.scales == 1)
    # The full int4 grid: max|w| / 7.5 per group (the -8 level is used).
    reference = w.abs().reshape(w.shape[0], -1, 32).amax(dim=2) / 7.5
    torch.testing.assert_close(result.weights[0].qparams.scale, reference)


def test_bad_arguments(layer):
    _, w, stats = layer
    spec = QuantSpec("int4", granularity=per_group(32))
    with pytest.raises(LowbitError, match="shape"):
        awq_quantize(w, stats.gram[:10, :10], stats.abs_mean, spec)
    with pytest.raises(LowbitError, match="same number of input features"):
        awq_quantize([w, w[:, :128]], stats.gram, stats.abs_mean, spec)
    with pytest.raises(SpecError, match="integer grids"):
        awq_quantize(w, stats.gram, stats.abs_mean, QuantSpec("binary"))
    with pytest.raises(LowbitError, match="max_shrink"):
        clip_search(w, stats.gram.float(), spec.with_axis(1), max_shrink=1.5)
