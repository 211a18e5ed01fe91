"""QDQ ONNX export of prepared models, run on ONNX Runtime, against the fake-quantized model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from _torch_qat_models import mixed_net, trained_digits
from lowbit.errors import LowbitError
from lowbit.numerics import qparams_for, quantize
from lowbit.onnx.session import make_session
from lowbit.plan import PLAN_METADATA_KEY, QuantPlan
from lowbit.torch import calibrate, export_onnx, prepare
from lowbit.torch.parity import check_parity
from lowbit.zoo.digits import evaluate

DIGITS_RECIPES = ["w8a8", "w4a8", "w2a8", "w1a8", "ternary"]


def _prepared_digits(recipe: str):
    model, _, data = trained_digits()
    prepared = prepare(model, recipe, data.x_train[:2], keep_int8="none")  # every layer at the recipe's width
    calibrate(prepared, [data.x_train[:512]])
    return prepared, data


@pytest.mark.parametrize("recipe", DIGITS_RECIPES)
def test_digits_export_matches_the_fake_quantized_model(recipe, tmp_path):
    prepared, data = _prepared_digits(recipe)
    result = export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx", check_data=data.x_test)
    assert result.parity.passed and result.parity.top1_agreement >= 0.995, result.parity.describe()
    # Independently: ONNX Runtime's accuracy on the test set equals the PyTorch model's.
    session = make_session(onnx.load(result.path), threads=1)
    logits = session.run(None, {"input": data.x_test.numpy()})[0]
    ort_accuracy = float((logits.argmax(1) == data.y_test.numpy()).mean())
    assert abs(ort_accuracy - evaluate(prepared, data.x_test, data.y_test)) <= 0.005
    assert result.packed_weight_bytes < result.float_weight_bytes


def test_weights_are_stored_as_integers_with_the_expected_values(tmp_path):
    prepared, data = _prepared_digits("w4a8")
    result = export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx", native_int4=True)
    model = onnx.load(result.path)
    initializers = {t.name: t for t in model.graph.initializer}
    assert result.native_int4 == ["0.export_weight", "11.export_weight", "3.export_weight", "7.export_weight"]
    stored = initializers["3.export_weight"]
    assert stored.data_type == TensorProto.INT4
    # Reference: symmetric int4 per output channel of the (trained, folded) weight.
    weight = prepared[3].weight.detach().numpy()
    spec = prepared[3].weight_quantizer.spec
    matrix = weight.reshape(weight.shape[0], -1)
    expected = quantize(matrix, qparams_for(matrix, spec)).reshape(weight.shape)
    np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int8), expected)
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"}
    assert not any(t.data_type == TensorProto.FLOAT and t.name.endswith("weight") for t in model.graph.initializer)


def test_binary_weights_are_plus_minus_one(tmp_path):
    prepared, data = _prepared_digits("w1a8")
    result = export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx")
    model = onnx.load(result.path)
    for name in ("0.export_weight", "3.export_weight", "7.export_weight", "11.export_weight"):
        values = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        assert values.dtype == np.int8 and set(np.unique(values)) <= {-1, 1}
    # 24,042 weights at 1 bit + per-channel scales, biases float: far below the 8-bit size.
    assert result.packed_weight_bytes < 0.2 * result.float_weight_bytes


def test_plan_and_recipe_are_stored_in_the_model(tmp_path):
    prepared, data = _prepared_digits("w8a8")
    result = export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx")
    metadata = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    plan = QuantPlan.from_json(metadata[PLAN_METADATA_KEY])
    # Activations: the input, three conv outputs, the head's input (after average pooling).
    assert plan.mode == "qat" and len(plan.quantized("weight")) == 4 and len(plan.quantized("activation")) == 5
    entry = plan.get("3.output", "activation")
    assert float(entry.qparams.scale) == pytest.approx(float(prepared[3].output_quantizer.scale))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w1a8", "w4a16-g32"])
def test_conv1d_grouped_depthwise_embedding_and_residual_add_export(recipe, tmp_path):
    model, ids = mixed_net()
    prepared = prepare(model, recipe, ids[:2])
    calibrate(prepared, [ids])
    result = export_onnx(prepared, ids[:2], tmp_path / "m.onnx", check_data=ids)
    assert result.parity.passed, result.parity.describe()
    ops = [n.op_type for n in onnx.load(result.path).graph.node]
    assert "Gather" in ops and ops.count("Conv") == 3
    if recipe != "w4a16-g32":
        # 5 quantization points (model input, 3 conv outputs, the add's output), and the 5
        # consumers reading them re-apply their grid (ONNX Runtime drops those as no-ops)...
        assert ops.count("QuantizeLinear") == 10
        # ...so every conv and the head run as int8 kernels on ONNX Runtime.
        assert result.float_ops == [], result.float_ops


def test_parity_check_catches_a_wrong_scale(tmp_path):
    prepared, data = _prepared_digits("w8a8")
    result = export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx")
    model = onnx.load(result.path)
    for tensor in model.graph.initializer:
        if tensor.name == "7.export_weight_scale":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.5, tensor.name))
    report = check_parity(prepared, model, (data.x_test,))
    assert not report.passed and report.max_diff_steps > 4


def test_export_refuses_train_mode_and_uncalibrated_models(tmp_path):
    model, _, data = trained_digits()
    prepared = prepare(model, "w8a8", data.x_train[:2])
    with pytest.raises(LowbitError, match="no range"):
        export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx")
    calibrate(prepared, [data.x_train[:64]])
    prepared.train()
    with pytest.raises(LowbitError, match=r"training mode; call model.eval\(\)"):
        export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx")
    prepared.eval()
    with pytest.raises(LowbitError, match=r"input 0 has shape \[2, 1, 9, 9\]"):
        export_onnx(prepared, torch.zeros(2, 1, 9, 9), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_does_not_change_the_model(tmp_path):
    prepared, data = _prepared_digits("w4a8")
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    out_before = prepared(data.x_test)
    export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx")
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())
    assert torch.equal(prepared(data.x_test), out_before)


class _ResidualNet(torch.nn.Module):
    """A residual block written with a plain `+`, and a shape computation torch.fx also sees as
    an add (of Python ints): only the tensor add may become a QuantAdd."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.conv_a(x))
        y = self.conv_b(y) + x
        batch = x.shape[0] + 0
        return self.head(y.mean((2, 3))).reshape(batch, -1)


def test_functional_residual_adds_are_quantized_and_exported(tmp_path):
    torch.manual_seed(0)
    model, x = _ResidualNet().eval(), torch.randn(32, 4, 6, 6)
    prepared = prepare(model, "w8a8", x[:2])
    assert prepared.lowbit.residual_adds == 1 and prepared.lowbit.notes == []
    calibrate(prepared, [x])
    add = prepared.residual_add_0
    assert add.operand_source("lhs") is prepared.conv_b.output_quantizer  # conv_b's output grid
    assert bool(add.operand_source("lhs").calibrated) and bool(add.rhs_quantizer.calibrated)
    result = export_onnx(prepared, x[:2], tmp_path / "m.onnx", check_data=x)
    assert result.parity.passed, result.parity.describe()
    add = next(n for n in onnx.load(result.path).graph.node if n.op_type == "Add")
    producers = {o: n.op_type for n in onnx.load(result.path).graph.node for o in n.output}
    assert [producers[i] for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]


def test_untraceable_models_keep_adds_float_with_a_note():
    class Untraceable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.linear(x) + x
            return x

    prepared = prepare(Untraceable(), "w8a8", torch.ones(1, 4))
    assert prepared.lowbit.residual_adds == 0 and "torch.fx cannot trace" in prepared.lowbit.notes[0]
    assert type(prepared).__name__ == "Untraceable"


UINT8_PER_TENSOR = ('{"name": "u8", "weights": {"dtype": "int8", "granularity": {"kind": "tensor"}}, '
                    '"activations": {"dtype": "uint8", "symmetric": false}}')


@pytest.mark.parametrize("recipe", [UINT8_PER_TENSOR, "w4a8"])
def test_learnable_scales_train_and_export_with_parity(recipe, tmp_path):
    from lowbit.torch import load_packed, save_packed
    from lowbit.zoo.digits import torch_threads, train_classifier

    model, _, data = trained_digits()
    prepared = prepare(model, recipe, data.x_train[:2], learnable_scales=True)
    calibrate(prepared, [data.x_train[:256]])
    before = float(prepared[0].output_quantizer.scale.detach())  # the grid conv 3 reads
    with torch_threads(1):
        train_classifier(prepared, data.x_train[:512], data.y_train[:512], epochs=1, lr=3e-3)
    assert float(prepared[0].output_quantizer.scale.detach()) != before  # the step size was trained
    result = export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx", check_data=data.x_test)
    assert result.parity.passed, result.parity.describe()
    loaded = load_packed(save_packed(prepared, tmp_path / "m.safetensors"), model)
    assert torch.equal(loaded(data.x_test), prepared(data.x_test))
