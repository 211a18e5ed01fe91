"""Weight quantization of nn.Modules against NumPy references and hand-computed sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowbit import numerics
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec, per_channel, per_group
from lowbit.torch.fold import fold_batchnorm
from lowbit.torch.weights import quantize_module_weights, quantize_weight

SPECS = [
    QuantSpec("int8"),
    QuantSpec("int8", granularity=per_channel()),
    QuantSpec("int4", granularity=per_channel()),
    QuantSpec("int4", granularity=per_group(4)),
    QuantSpec("int2", symmetric=False, granularity=per_channel()),
    QuantSpec("uint8", symmetric=False),
    QuantSpec("ternary", granularity=per_channel()),
    QuantSpec("binary", granularity=per_channel()),
    QuantSpec("fp16"),
    QuantSpec("fp8_e4m3", granularity=per_channel()),
]


def _conv_weight(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Channels with very different ranges, as after BatchNorm folding.
    return torch.randn(8, 3, 3, 3, generator=generator) * torch.logspace(-2, 0, 8).view(8, 1, 1, 1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_matches_numerics_on_the_weight_matrix(spec):
    weight = _conv_weight()
    restored, _ = quantize_weight(weight, spec)
    matrix = weight.numpy().reshape(8, -1)
    numpy_spec = spec.with_axis(1 if spec.granularity.kind == "group" else 0)
    qparams = numerics.qparams_for(matrix, numpy_spec)
    expected = numerics.dequantize(numerics.quantize(matrix, qparams), qparams).reshape(weight.shape)
    assert restored.shape == weight.shape and restored.dtype == weight.dtype
    np.testing.assert_array_equal(restored.numpy(), expected)


def test_int8_per_channel_against_the_textbook_formula():
    weight = _conv_weight(1)
    restored, _ = quantize_weight(weight, QuantSpec("int8", granularity=per_channel()))
    rows = weight.numpy().reshape(8, -1)
    scale = np.abs(rows).max(axis=1, keepdims=True) / np.float32(127)
    expected = np.clip(np.rint(rows / scale), -128, 127) * scale
    np.testing.assert_allclose(restored.numpy().reshape(8, -1), expected, rtol=1e-6, atol=0)


def test_groups_run_along_input_features():
    weight = _conv_weight(2)  # rows of 27 input features -> groups of 4: 7 groups, the last of 3
    restored, _ = quantize_weight(weight, QuantSpec("int4", granularity=per_group(4)))
    rows, got = weight.numpy().reshape(8, -1), restored.numpy().reshape(8, -1)
    for start in range(0, 27, 4):
        block = rows[:, start:start + 4]
        scale = np.abs(block).max(axis=1, keepdims=True) / np.float32(7)
        expected = np.clip(np.rint(block / scale), -8, 7) * scale
        np.testing.assert_allclose(got[:, start:start + 4], expected, rtol=1e-6, atol=0)


def test_binary_is_sign_times_mean_magnitude_per_channel():
    weight = _conv_weight(3)
    restored, _ = quantize_weight(weight, QuantSpec("binary", granularity=per_channel()))
    rows = weight.numpy().reshape(8, -1)
    expected = np.where(rows >= 0, 1.0, -1.0) * np.abs(rows).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(restored.numpy().reshape(8, -1), expected, rtol=1e-6)


def test_low_bit_rows_use_at_most_two_to_the_bits_levels():
    weight = _conv_weight(4)
    restored, _ = quantize_weight(weight, QuantSpec("int2", symmetric=False, granularity=per_channel()))
    for row in restored.reshape(8, -1):
        assert len(torch.unique(row)) <= 4


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(10, 6)  # 60 weights, 6 biases


# Sizes worked out by hand: packed weight bits / 8 (rounded up) + 4 bytes per float32 scale
# + zero points (asymmetric only, packed like the weights) + 6 float32 biases (24 bytes).
@pytest.mark.parametrize("spec, expected", [
    (QuantSpec("int8"), 60 + 4 + 24),
    (QuantSpec("int8", granularity=per_channel()), 60 + 24 + 24),
    (QuantSpec("int4", granularity=per_channel()), 30 + 24 + 24),
    (QuantSpec("int4", granularity=per_group(4)), 30 + 6 * 3 * 4 + 24),  # ceil(10 / 4) = 3 groups per row
    (QuantSpec("int2", symmetric=False, granularity=per_channel()), 15 + 24 + 2 + 24),  # 6 zero points: 12 bits
    (QuantSpec("uint8", symmetric=False), 60 + 4 + 1 + 24),
    (QuantSpec("ternary", granularity=per_channel()), 15 + 24 + 24),
    (QuantSpec("binary", granularity=per_channel()), 8 + 24 + 24),  # 60 bits -> 8 bytes
    (QuantSpec("fp16"), 120 + 24),  # no scale: fp16 casts directly
    (QuantSpec("fp8_e4m3", granularity=per_channel()), 60 + 24 + 24),
])
def test_packed_size_equals_the_formula(spec, expected):
    _, nbytes = quantize_module_weights(_linear(), spec)
    assert nbytes == expected


def test_model_is_copied_and_only_weights_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, nbytes = quantize_module_weights(model, QuantSpec("int4", granularity=per_channel()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"input model changed at {key}"
    after = quantized.state_dict()
    for key in before:
        changed = not torch.equal(after[key], before[key])
        assert changed == (key.endswith("weight") and key != "1.weight"), key  # 1 is the BatchNorm
    # Conv 108 weights + Linear 320 weights at 4 bits, 4 + 5 scales, and 4 + 4 + 4 + 5 float params.
    assert nbytes == (108 + 320) // 2 + 4 * (4 + 5) + 4 * (4 + 4 + 4 + 5)


def test_tied_weights_are_quantized_and_counted_once():
    shared = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantized, nbytes = quantize_module_weights(model, QuantSpec("int8"))
    assert quantized[0].weight is quantized[2].weight
    assert nbytes == 16 + 4


def test_non_finite_weights_are_a_user_error_naming_the_layer():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(LowbitError, match=r"0\.weight contains NaN"):
        quantize_module_weights(model, QuantSpec("int8"))


def test_fold_batchnorm_keeps_outputs_and_leaves_the_input_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 3), nn.BatchNorm1d(3))
    with torch.no_grad():  # non-trivial statistics, so folding has something to fold
        for norm in (model[1], model[5]):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(5, 2, 5, 5)
    folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[5], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
