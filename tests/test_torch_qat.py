"""QAT preparation, fake quantization, calibration and training, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _torch_qat_models import mixed_net, trained_digits
from lowbit.errors import LowbitError, SpecError
from lowbit.torch import FloatModuleWarning, calibrate, prepare
from lowbit.torch.fold import fold_batchnorm
from lowbit.torch.modules import QuantConv2d, QuantEmbedding, QuantLinear
from lowbit.torch.qat import activation_quantizers
from lowbit.zoo.digits import evaluate, torch_threads


def _qdq(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Textbook ONNX QuantizeLinear -> DequantizeLinear, written out in NumPy."""
    q = np.clip(np.rint(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(np.float32)


def test_prepare_swaps_layers_folds_batchnorm_and_leaves_the_input_alone():
    model, _, data = trained_digits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare(model, "w4a8", data.x_train[:2])
    assert [type(m) for m in prepared if isinstance(m, (QuantConv2d, QuantLinear))] == [QuantConv2d] * 3 + [QuantLinear]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert prepared.lowbit.folded_batchnorms == 2 and prepared.lowbit.float_modules == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_linear_forward_matches_a_numpy_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(32, 6)
    prepared = prepare(model, "w8a8", x[:1])
    calibrate(prepared, [x])
    got = prepared(x).detach().numpy()
    # Independent reference: asymmetric int8 input from min/max, symmetric per-row int8 weights,
    # int32 bias on scale s_in * s_w.
    xs = x.numpy()
    lo, hi = min(xs.min(), 0.0), max(xs.max(), 0.0)
    s_in = np.float32((hi - lo) / 255)
    zp = np.clip(np.rint(-128 - lo / s_in), -128, 127)
    w = model[0].weight.detach().numpy()
    s_w = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    b = model[0].bias.detach().numpy()
    s_b = (s_in * s_w).astype(np.float32)
    expected = (_qdq(xs, s_in, zp, -128, 127) @ _qdq(w, s_w[:, None], 0, -128, 127).T
                + np.rint(b / s_b) * s_b)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_binary_weights_are_sign_times_mean_magnitude_per_channel():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3))
    prepared = prepare(model, "w1", torch.zeros(1, 3, 8, 8), keep_int8="none")  # a lone layer is first and last
    layer = prepared[0]
    weight, _ = layer.quantized_weight()
    w = model[0].weight.detach().numpy().reshape(5, -1)
    expected = np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(weight.detach().numpy().reshape(5, -1), expected, rtol=1e-6)


def test_calibration_ranges_are_the_quantization_point_ranges():
    model, _, data = trained_digits()
    prepared = prepare(model, "w8a8", data.x_train[:2])
    batches = [data.x_train[i:i + 200] for i in range(0, 600, 200)]
    ranges = calibrate(prepared, [(b, torch.zeros(len(b))) for b in batches])  # (x, y) pairs work
    # Reference: hooks on the float folded model. Quantization points: the model input (layer 0),
    # each conv's output after its ReLU (modules 2, 5, 8; conv 3 and 7 reuse those grids), and
    # the head's input after global average pooling (not a grid-preserving op).
    folded = fold_batchnorm(model)
    points = {"0.input": (folded[0], "in"), "0.output": (folded[2], "out"), "3.output": (folded[5], "out"),
              "7.output": (folded[8], "out"), "11.input": (folded[11], "in")}
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in points}

    def record(name, tensor):
        seen[name].append((float(tensor.min()), float(tensor.max())))

    hooks = [module.register_forward_pre_hook(lambda m, args, n=n: record(n, args[0])) if where == "in"
             else module.register_forward_hook(lambda m, args, out, n=n: record(n, out))
             for n, (module, where) in points.items()]
    with torch.no_grad():
        for b in batches:
            folded(b)
    for hook in hooks:
        hook.remove()
    assert set(ranges) == set(points)
    for name, values in seen.items():
        low, high = min(v[0] for v in values), max(v[1] for v in values)
        got = ranges[name]
        assert got[0] == pytest.approx(min(low, 0.0), abs=1e-6) and got[1] == pytest.approx(max(high, 0.0), abs=1e-6)


def test_straight_through_gradients_and_learnable_scales():
    model, _, data = trained_digits()
    prepared = prepare(model, "w4a8", data.x_train[:2], learnable_scales=True)
    calibrate(prepared, [data.x_train[:256]])
    prepared.train()
    loss = nn.functional.cross_entropy(prepared(data.x_train[:64]), data.y_train[:64])
    loss.backward()
    for layer in (prepared[0], prepared[11]):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert layer.weight_quantizer.scale.grad is not None and layer.weight_quantizer.scale.grad.abs().sum() > 0
        assert layer.input_quantizer.scale.grad is not None and torch.isfinite(layer.input_quantizer.scale.grad).all()


def test_qat_recovers_accuracy_lost_by_post_training_quantization():
    model, float_accuracy, data = trained_digits()
    prepared = prepare(model, "w2a8", data.x_train[:2], keep_int8="none")  # every layer at 2 bits
    calibrate(prepared, [data.x_train[:512]])
    ptq = evaluate(prepared, data.x_test, data.y_test)
    with torch_threads(1):
        from lowbit.zoo.digits import train_classifier

        train_classifier(prepared, data.x_train, data.y_train, epochs=4, lr=3e-3, seed=0)
    qat = evaluate(prepared, data.x_test, data.y_test)
    assert ptq < float_accuracy - 0.05  # 2-bit weights really cost accuracy here...
    assert qat > ptq + 0.05 and qat > float_accuracy - 0.05  # ...and QAT wins most of it back


def test_unsupported_modules_stay_float_and_are_listed():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.warns(FloatModuleWarning, match="LayerNorm"):
        prepared = prepare(model, "w8a16", torch.zeros(1, 4))
    assert list(prepared.lowbit.float_modules) == ["1"]
    assert prepared.lowbit.quantized == ["0", "2"]
    with pytest.raises(LowbitError, match="LayerNorm"):
        prepare(model, "w8a16", torch.zeros(1, 4), strict=True)


def test_children_of_unsupported_modules_are_not_swapped():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = model[0]

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.warns(FloatModuleWarning) as record:
        prepared = prepare(Wrapper(), "w8a16", torch.zeros(1, 3, 8))
    assert "attn.out_proj" in prepared.lowbit.float_modules and "attn" in prepared.lowbit.float_modules
    assert type(prepared.attn.out_proj) is not QuantLinear and record


def test_embedding_gets_no_input_quantizer():
    model, ids = mixed_net()
    prepared = prepare(model, "w8a8", ids[:2])
    assert isinstance(prepared.embed, QuantEmbedding) and prepared.embed.input_quantizer is None
    # One quantizer per tensor, where it is produced: the first conv's input, each conv's output
    # after its ReLU, and the add's output (read by the head through flatten).
    assert set(activation_quantizers(prepared)) == {"conv1d.input_quantizer", "conv1d.output_quantizer",
                                                     "grouped.output_quantizer", "depthwise.output_quantizer",
                                                     "add.output_quantizer"}
    # Consumers reuse their producer's grid (through the reshape and the flatten).
    assert prepared.grouped.input_source() is prepared.conv1d.output_quantizer
    assert prepared.depthwise.input_source() is prepared.grouped.output_quantizer
    assert prepared.add.operand_source("lhs") is prepared.depthwise.output_quantizer
    assert prepared.add.operand_source("rhs") is prepared.grouped.output_quantizer
    assert prepared.head.input_source() is prepared.add.output_quantizer
    assert [prepared.conv1d.output_activation, prepared.add.output_activation] == ["relu", None]


@pytest.mark.parametrize("recipe, match", [
    ("w3z9", "unknown recipe"),
    ('{"name": "x", "weights": {"dtype": "int4", "granularity": {"kind": "bogus"}}}', "unknown granularity"),
    ("w8a8-dynamic", "static per-tensor"),
    ("fp16", "no integer"),
])
def test_bad_recipes_are_one_sentence_errors(recipe, match):
    with pytest.raises(SpecError, match=match):
        prepare(nn.Sequential(nn.Linear(4, 2)), recipe, torch.zeros(1, 4))



def test_per_tensor_weights_have_one_scale_and_survive_a_checkpoint(tmp_path):
    """per_channel=False: one symmetric scale max|W| / 127 per weight (layers kept at int8 too), the
    recipe renamed, and a packed checkpoint rebuilds the same model."""
    from lowbit.torch import load_packed, save_packed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    x = torch.rand(16, 3, 6, 6)
    prepared = prepare(model, "w8a8", x[:2], per_channel=False)
    assert prepared.lowbit.recipe.name == "w8a8-per-tensor"
    calibrate(prepared, [x])
    for index in (0, 3):
        weight = model[index].weight.detach().numpy()
        scale = prepared[index].weight_quantizer.qparams(prepared[index].weight).scale
        np.testing.assert_allclose(np.asarray(scale).reshape(-1), [np.abs(weight).max() / 127], rtol=1e-6)
    save_packed(prepared, tmp_path / "pt.safetensors")
    loaded = load_packed(tmp_path / "pt.safetensors", model)
    assert loaded.lowbit.recipe.name == "w8a8-per-tensor"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), prepared(x), rtol=0, atol=0)
    # a 2-bit recipe keeps its first and last layers at int8, also with one scale each
    from lowbit.torch import Int8LayersWarning

    with pytest.warns(Int8LayersWarning):
        kept = prepare(model, "w2a8", x[:2], per_channel=False)
    assert set(kept.lowbit.int8_layers) == {"0", "3"}
    assert kept[0].weight_quantizer.spec.granularity.kind == "tensor" and kept[0].weight_quantizer.spec.bits == 8
    with pytest.raises(SpecError, match="per_channel=False applies to per-channel weights.*per-group"):
        prepare(model, "w4a16-g32", x[:2], per_channel=False)


def test_shape_mismatches_are_named():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(LowbitError, match=r"cannot run on the example inputs of shape \[1, 5\]"):
        prepare(model, "w8a8", torch.zeros(1, 5))
    prepared = prepare(model, "w8a8", torch.zeros(1, 4))
    with pytest.raises(LowbitError, match=r"calibration batch 0 input 0 has shape \[3, 5\].*\[batch, 4\]"):
        calibrate(prepared, [torch.zeros(3, 5)])
    with pytest.raises(LowbitError, match="no batches"):
        calibrate(prepared, [])
    with pytest.raises(LowbitError, match="call lowbit.torch.calibrate"):
        prepared(torch.zeros(2, 4))


def test_distill_finetune_moves_a_student_to_its_teacher():
    from lowbit.torch import distill_finetune, distillation_loss

    torch.manual_seed(0)
    teacher = torch.nn.Linear(8, 4)
    student = torch.nn.Linear(8, 4)
    x = torch.randn(256, 8)
    y = teacher(x).argmax(dim=1).detach()

    def loss() -> float:
        with torch.no_grad():
            return float(distillation_loss(student(x), teacher(x), 4.0, y, 0.5))

    before = loss()
    distill_finetune(student, teacher, x, y, epochs=20, seed=0, lr=5e-2, batch_size=32)
    assert loss() < 0.5 * before
    assert not student.training
    assert (student(x).argmax(dim=1) == y).float().mean() > 0.9
