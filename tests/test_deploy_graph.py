"""The QDQ graph reader and its PyTorch rebuild, on hand-built graphs checked against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit.deploy.qdq_graph import read_qdq_graph
from lowbit.deploy.torch_graph import QDQModule
from lowbit.errors import LowbitError


def make(nodes, inits, out_shape=(2, 6)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def linear_model(cast: bool) -> onnx.ModelProto:
    """x -> Q/DQ (uint8) -> [Cast to float] -> Gemm(int8 per-channel weight, int32 bias) -> Q/DQ -> Relu."""
    rng = np.random.default_rng(0)
    inits = {"xs": np.array(0.02, np.float32), "xz": np.array(131, np.uint8),
             "w": rng.integers(-127, 128, (6, 4)).astype(np.int8), "ws": rng.uniform(0.01, 0.02, 6).astype(np.float32),
             "wz": np.zeros(6, np.int8), "b": rng.integers(-500, 500, 6).astype(np.int32),
             "ys": np.array(0.05, np.float32), "yz": np.array(3, np.int8)}
    inits["bs"] = (inits["xs"] * inits["ws"]).astype(np.float32)
    inits["bz"] = np.zeros(6, np.int32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("Cast" if cast else "Identity", ["xd"], ["xc"], **({"to": TensorProto.FLOAT} if cast else {})),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("Gemm", ["xc", "wd", "bd"], ["h"], transB=1),
             helper.make_node("QuantizeLinear", ["h", "ys", "yz"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "ys", "yz"], ["hd"]),
             helper.make_node("Relu", ["hd"], ["y"])]
    return make(nodes, inits)


@pytest.mark.parametrize("cast", [False, True])
@pytest.mark.parametrize("form", ["int", "float"])
def test_rebuild_computes_what_onnx_runtime_computes(cast, form):
    model = linear_model(cast)
    graph = read_qdq_graph(model)
    assert graph.precision == "static" and graph.activation_points == 2
    assert int(graph.ops[0].grid.zero_point) == 131 - 128 and graph.ops[0].grid.qmin == -128
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the QDQ semantics
    expected = ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = QDQModule(graph, form)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_plain_form_drops_every_quantizer():
    graph = read_qdq_graph(linear_model(False))
    x = torch.randn(2, 4)
    weight = torch.from_numpy(graph.weights["wd"].dequantized())
    expected = torch.relu(x @ weight.T + torch.from_numpy(graph.constants["bd"]))
    torch.testing.assert_close(QDQModule(graph, "plain")(x)[0], expected)


def output_layer_model() -> onnx.ModelProto:
    """The linear model without its output Q/DQ: the Gemm's float output is the graph output."""
    model = linear_model(False)
    nodes = [n for n in model.graph.node if n.output[0] not in ("hq", "hd", "y")]
    nodes[-1].output[0] = "y"
    return make(nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                        if t.name not in ("ys", "yz")})


@pytest.mark.parametrize("form, dtype", [("int", torch.int8), ("float", torch.float32)])
def test_output_layer_runs_float_on_its_exact_weights(form, dtype):
    """No output grid, so no integer kernel: integer form keeps the weight int8 (dequantized in the
    program, a quarter of the bytes), float form the dequantized floats; both compute ONNX Runtime's
    float Gemm on the same weights."""
    model = output_layer_model()
    graph = read_qdq_graph(model)
    module = QDQModule(graph, form)
    weight = getattr(module, module.buffer_of["wd"])
    assert weight.dtype == dtype
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(module(torch.from_numpy(x))[0].numpy(), expected, atol=1e-6)


def test_plain_form_has_no_quantization_buffers():
    """torch.export keeps every registered buffer as a program constant, used or not."""
    names = [name for name, _ in QDQModule(read_qdq_graph(linear_model(False)), "plain").named_buffers()]
    assert names and not any(name.endswith(("_scale", "_zero_point")) for name in names)
    assert any(name.endswith("_scale") for name, _ in QDQModule(read_qdq_graph(linear_model(False)),
                                                                 "int").named_buffers())


def test_a_quantize_without_dequantize_is_refused():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])]
    model = make(nodes, {"s": np.array(0.1, np.float32), "z": np.array(0, np.int8)}, out_shape=(2, 4))
    with pytest.raises(LowbitError, match="without dequantizing"):
        read_qdq_graph(model)


def test_per_channel_activations_are_refused():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)]
    model = make(nodes, {"s": np.full(4, 0.1, np.float32), "z": np.zeros(4, np.int8)}, out_shape=(2, 4))
    with pytest.raises(LowbitError, match="per channel"):
        read_qdq_graph(model)


@pytest.mark.parametrize("block", [4, 2])
def test_one_block_per_row_is_a_per_channel_weight_and_smaller_blocks_are_refused(block):
    rng = np.random.default_rng(1)
    weight, scale = rng.integers(-127, 128, (6, 4)).astype(np.int8), rng.uniform(0.01, 0.02, (6, 4 // block))
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1, block_size=block),
             helper.make_node("Gemm", ["x", "wd"], ["y"], transB=1)]
    model = make(nodes, {"w": weight, "ws": scale.astype(np.float32)})
    model.opset_import[0].version = 21  # blocked DequantizeLinear
    if block < 4:
        with pytest.raises(LowbitError, match="per-group"):
            read_qdq_graph(model)
        return
    grid = read_qdq_graph(model).weights["wd"].grid
    assert grid.axis == 0 and grid.scale.shape == (6,)
    np.testing.assert_array_equal(grid.scale, scale[:, 0].astype(np.float32))
    x = rng.standard_normal((2, 4)).astype(np.float32)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        got = QDQModule(read_qdq_graph(model), "float")(torch.from_numpy(x))[0].numpy()  # weights on the grid
    np.testing.assert_allclose(got, reference[0], rtol=1e-5, atol=1e-6)
