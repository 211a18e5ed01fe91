"""BatchNorm folding beyond nn.Sequential, and exported graphs ONNX Runtime runs as int8 kernels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

from _torch_qat_models import trained_digits
from lowbit.onnx.session import make_session
from lowbit.torch import calibrate, export_onnx, prepare
from lowbit.torch.fold import fold_batchnorm
from lowbit.zoo.mobilenet import MobileNetV2
from lowbit.zoo.resnet import BasicBlock


def _with_batch_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, then eval."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 2.0)
            nn.init.uniform_(module.bias, -0.5, 0.5)
            module.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


class _ResNetStyle(nn.Module):
    """Stem conv + self.bn, then two BasicBlocks (one with a projection shortcut), pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = BasicBlock(8, 8, 1)
        self.block2 = BasicBlock(8, 16, 2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.block2(self.block1(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet_style() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 12, 12)
    return _with_batch_statistics(_ResNetStyle(), x), x


def test_batchnorm_in_resnet_blocks_is_folded_by_tracing():
    model, x = _resnet_style()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is untouched
    # The fold is exact algebra: the eval-mode outputs agree up to float rounding.
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)
    assert isinstance(folded.block1.bn1, nn.Identity) and folded.block1.conv1.bias is not None


def test_batchnorm_in_mobilenet_v2_is_folded():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    model = _with_batch_statistics(MobileNetV2(), x)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-3, atol=1e-3)


def test_untraceable_models_keep_their_unpaired_batchnorm_float_and_listed():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    with pytest.warns(UserWarning, match="BatchNorm"):
        prepared = prepare(Untraceable(), "w8a16", torch.ones(1, 3, 6, 6))
    assert prepared.lowbit.folded_batchnorms == 0 and "bn" in prepared.lowbit.float_modules


def test_resnet_style_qat_export_runs_every_layer_as_int8_kernels(tmp_path):
    model, x = _resnet_style()
    prepared = prepare(model, "w8a8", x[:2])
    assert prepared.lowbit.folded_batchnorms == 6 and prepared.lowbit.float_modules == {}
    assert prepared.lowbit.residual_adds == 2
    calibrate(prepared, [x])
    result = export_onnx(prepared, x[:2], tmp_path / "m.onnx", check_data=x)
    assert result.parity.max_diff_steps <= 4, result.parity.describe()
    assert result.float_ops == [], result.float_ops
    # The optimized graph's int8 kernels: independently of `float_ops`, count them.
    ops = _optimized_ops(result.path, tmp_path)
    assert ops.count("QLinearConv") == 6 and ops.count("QLinearAdd") == 2, ops


def test_input_only_quantization_leaves_convs_in_float(tmp_path):
    """The check can fail: without output quantization, the last conv (Conv -> ReLU -> average
    pooling, no Q after it) stays a float Conv on ONNX Runtime."""
    model, _, data = trained_digits()
    prepared = prepare(model, "w8a8", data.x_train[:2], quantize_outputs=False)
    calibrate(prepared, [data.x_train[:256]])
    result = export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx", check_data=data.x_test)
    assert result.parity.passed and len(result.float_ops) == 1, result.float_ops
    ops = _optimized_ops(result.path, tmp_path)
    assert ops.count("QLinearConv") == 2 and {"Conv", "FusedConv"} & set(ops), ops


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w2a8", "w1a8"])
def test_digits_exports_fuse_fully_with_the_true_packed_size(recipe, tmp_path):
    model, _, data = trained_digits()
    prepared = prepare(model, recipe, data.x_train[:2], keep_int8="none")  # every layer at the recipe's width
    calibrate(prepared, [data.x_train[:256]])
    fast = export_onnx(prepared, data.x_train[:2], tmp_path / "fast.onnx", check_data=data.x_test)
    assert fast.parity.passed and fast.float_ops == [], (fast.parity.describe(), fast.float_ops)
    initializers = onnx.load(fast.path).graph.initializer
    assert not any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in initializers)
    if recipe == "w4a8":
        small = export_onnx(prepared, data.x_train[:2], tmp_path / "small.onnx", native_int4=True)
        assert small.native_int4 and small.onnx_file_bytes < fast.onnx_file_bytes
        assert small.packed_weight_bytes == fast.packed_weight_bytes  # the size reported is the packed one
    # Packed size follows the bit width, not the int8 container: 24,042 weights at `bits` bits
    # plus float32 scales and biases (a few hundred bytes).
    bits = {"w8a8": 8, "w4a8": 4, "w2a8": 2, "w1a8": 1}[recipe]
    assert fast.packed_weight_bytes < 24_042 * bits / 8 + 2_000


def test_uint8_activations_are_the_same_grid(tmp_path):
    model, _, data = trained_digits()
    prepared = prepare(model, "w8a8", data.x_train[:2])
    calibrate(prepared, [data.x_train[:256]])
    paths = {}
    for as_uint8 in (True, False):
        result = export_onnx(prepared, data.x_train[:2], tmp_path / f"{as_uint8}.onnx", uint8_activations=as_uint8)
        paths[as_uint8] = result.path
    u8, i8 = onnx.load(paths[True]), onnx.load(paths[False])
    u8_zero_points, i8_zero_points = _activation_zero_points(u8), _activation_zero_points(i8)
    assert len(u8_zero_points) >= 5 and all(v.dtype == np.uint8 for v in u8_zero_points)
    assert all(v.dtype == np.int8 for v in i8_zero_points)
    assert [int(v) for v in u8_zero_points] == [int(v) + 128 for v in i8_zero_points]
    # Same integers shifted by 128: ONNX Runtime computes identical outputs without fusion.
    outputs = [make_session(m, threads=1, optimize=False).run(None, {"input": data.x_test.numpy()})[0] for m in (u8, i8)]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-5)


def _optimized_ops(path, tmp_path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _activation_zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    """The zero point of every QuantizeLinear, in node order (through exporter Identity nodes)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    points = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            points.append(values[node.input[2]])
    return points
