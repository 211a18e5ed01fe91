"""The public on/off switches of lowbit.torch's quantizers (`ActivationQuantizer.enabled`,
`QuantizedLayer.quantize_weights`): off is exactly the float computation, on is unchanged, the
switches survive deepcopy, and export refuses a model with a switch off."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _torch_qat_models import mixed_net
from lowbit.analysis.torch_sensitivity import torch_layer_sensitivity
from lowbit.errors import LowbitError
from lowbit.torch import calibrate, export_onnx, prepare
from lowbit.torch.modules import QuantizedLayer, check_switches_on
from lowbit.torch.quantizers import ActivationQuantizer


def _conv_net() -> tuple[nn.Module, torch.Tensor]:
    """Conv -> ReLU -> MaxPool -> Conv -> ReLU -> Linear: output quantizers and shared grids."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 10)).eval()
    return model, torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _prepared(model: nn.Module, x: torch.Tensor, recipe: str = "w8a8") -> nn.Module:
    prepared = prepare(model, recipe, x[:2])
    calibrate(prepared, [x])
    return prepared


def _switch_all(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            module.enabled = on
        if isinstance(module, QuantizedLayer):
            module.quantize_weights = on


def _qdq(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """Textbook QuantizeLinear -> DequantizeLinear (round half to even, saturate), float32."""
    q = np.clip(np.rint(x / np.float32(scale)) + zero_point, qmin, qmax).astype(np.float32)
    return ((q - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


@pytest.mark.parametrize("build", [_conv_net, mixed_net], ids=["conv", "mixed"])
@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_everything_off_is_the_float_model_bit_for_bit(build, recipe):
    model, x = build()
    prepared = _prepared(model, x, recipe)
    with torch.no_grad():
        quantized, expected = prepared(x), model(x)
        assert not torch.equal(quantized, expected)  # the switches have something to undo
        _switch_all(prepared, False)
        assert torch.equal(prepared(x), expected)
        _switch_all(prepared, True)
        assert torch.equal(prepared(x), quantized)


def test_each_switch_against_an_independent_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 6)).eval()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2)) * 3
    prepared = _prepared(model, x)
    layer = prepared[0]
    quantizer = layer.input_quantizer
    w, b, xs = model[0].weight.detach().numpy(), model[0].bias.detach().numpy(), x.numpy()
    s_in, zp = float(quantizer.scale), int(quantizer.zero_point)
    s_w = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)  # symmetric int8 per output row
    x_q, w_q = _qdq(xs, s_in, zp, -128, 127), _qdq(w, s_w, 0, -128, 127)
    bias_scale = (np.float32(s_in) * s_w[:, 0]).astype(np.float32)
    b_q = (np.rint(b / bias_scale) * bias_scale).astype(np.float32)  # the int32 bias grid

    def linear(inputs, weight, bias):
        return F.linear(torch.from_numpy(inputs), torch.from_numpy(weight), torch.from_numpy(bias))

    with torch.no_grad():
        cases = [(True, True, (x_q, w_q, b_q)), (False, True, (xs, w_q, b_q)),
                 (True, False, (x_q, w, b)), (False, False, (xs, w, b))]
        for enabled, weights_on, operands in cases:
            quantizer.enabled, layer.quantize_weights = enabled, weights_on
            assert torch.equal(prepared(x), linear(*operands)), f"enabled={enabled}, quantize_weights={weights_on}"
        # off is not merely close but the very float module's computation
        assert torch.equal(prepared(x), model(x))


def test_switches_survive_deepcopy_and_belong_to_each_copy():
    model, x = _conv_net()
    prepared = _prepared(model, x)
    prepared[0].quantize_weights = False
    prepared[0].output_quantizer.enabled = False
    twin = copy.deepcopy(prepared)
    assert not twin[0].quantize_weights and not twin[0].output_quantizer.enabled
    assert twin[3].quantize_weights and twin[3].output_quantizer.enabled
    assert ", off" in repr(twin[0].output_quantizer)
    with torch.no_grad():
        assert torch.equal(twin(x), prepared(x))
        _switch_all(twin, False)
        assert prepared[3].quantize_weights  # switching the copy leaves the original alone
        assert torch.equal(twin(x), model(x)) and not torch.equal(prepared(x), model(x))


def test_a_quantizer_that_is_off_needs_no_range_and_still_calibrates():
    model, x = _conv_net()
    prepared = prepare(model, "w8a8", x[:2])
    _switch_all(prepared, False)
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # uncalibrated, yet nothing asks for a range
    prepared[0].quantize_weights = True
    prepared[0].output_quantizer.enabled = True
    with pytest.raises(LowbitError, match="has no quantization range yet"):
        prepared(x)
    _switch_all(prepared, False)
    calibrate(prepared, [x])
    reference = _prepared(model, x)  # calibrated with every switch on
    assert all(bool(q.calibrated) for q in prepared.modules() if isinstance(q, ActivationQuantizer))
    assert torch.equal(prepared.state_dict()["0.output_quantizer.scale"],
                       reference.state_dict()["0.output_quantizer.scale"])
    _switch_all(prepared, True)
    with torch.no_grad():
        assert torch.equal(prepared(x), reference(x))


@pytest.mark.parametrize("switch", ["weights", "output", "shared input"])
def test_export_refuses_a_switch_that_is_off(switch, tmp_path):
    model, x = _conv_net()
    prepared = _prepared(model, x)
    if switch == "weights":
        prepared[3].quantize_weights = False
        name = "layer '3'"
    elif switch == "output":
        prepared[3].output_quantizer.enabled = False
        name = "'3.output'"
    else:  # conv 3 reads conv 0's grid (through ReLU + MaxPool): switching it off must be caught too
        assert prepared[3].input_quantizer is None and prepared[3].input_source() is prepared[0].output_quantizer
        prepared[0].output_quantizer.enabled = False
        name = "'0.output'"
    state = {k: v.clone() for k, v in prepared.state_dict().items()}
    with pytest.raises(LowbitError, match=f"{name}.*switched off.*before exporting"):
        export_onnx(prepared, x[:2], tmp_path / "m.onnx", check_fusion=False)
    assert not (tmp_path / "m.onnx").exists()
    assert all(torch.equal(state[k], v) for k, v in prepared.state_dict().items())
    with pytest.raises(LowbitError, match=r"switched off for .*3|switched off for .*0\.output"):
        check_switches_on(prepared, "saving")
    _switch_all(prepared, True)  # back on: the same model exports and matches
    check_switches_on(prepared, "saving")
    result = export_onnx(prepared, x[:2], tmp_path / "m.onnx", check_data=x, check_fusion=False)
    assert result.parity.passed, result.parity.describe()


def test_sensitivity_analysis_leaves_the_callers_switches_alone():
    model, x = _conv_net()
    prepared = _prepared(model, x)
    prepared[6].quantize_weights = False  # the caller's own what-if: analysis works on a copy
    report = torch_layer_sensitivity(model, prepared, [x], sweeps=("solo",))
    assert {t.tensor for t in report.tensors} == {"0", "3", "6"}
    assert not prepared[6].quantize_weights
    assert all(q.enabled for q in prepared.modules() if isinstance(q, ActivationQuantizer))
    assert all(m.quantize_weights for name, m in prepared.named_modules()
               if isinstance(m, QuantizedLayer) and name != "6")
