"""Graph patterns of real exporters (PaddlePaddle's PP-LCNetV3 blocks in PP-OCRv4): a Conv followed
by a separate per-channel scale and shift, a ConvTranspose followed by its bias Add and a
BatchNorm, and a HardSwish written out as `x * clip(x + 3, 0, 6) / 6`."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx.fold_affine import fold_conv_affine
from lowbit.onnx.pipeline import prepare_model
from lowbit.onnx.planner import StaticPlanner
from lowbit.onnx.quantize import quantize_onnx


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def lcnet_block(path, *, seed: int = 0):
    """Conv -> Mul(scalar, constant first) -> Add(scalar) -> decomposed HardSwish -> Mul/Add ->
    Conv -> Mul(per-channel) -> ConvTranspose -> Add(bias) -> BatchNorm -> Sigmoid."""
    rng = np.random.default_rng(seed)
    inits = [
        _const("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3), _const("b1", rng.standard_normal(8)),
        _const("s1", [0.7]), _const("d1", [0.4]), _const("three", 3.0), _const("zero", 0.0), _const("six", 6.0),
        _const("s2", [1.3]), _const("d2", [-0.2]),
        _const("w2", rng.standard_normal((8, 8, 1, 1)) * 0.3), _const("c2", rng.uniform(0.5, 2, (1, 8, 1, 1))),
        _const("wt", rng.standard_normal((8, 4, 2, 2)) * 0.3), _const("bt", rng.standard_normal(4)),
        _const("gamma", rng.uniform(0.5, 2, 4)), _const("beta", rng.standard_normal(4)),
        _const("mean", rng.standard_normal(4) * 0.1), _const("var", rng.uniform(0.5, 2, 4)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Mul", ["s1", "c1"], ["m1"], name="scale1"),
        helper.make_node("Add", ["m1", "d1"], ["a1"], name="shift1"),
        helper.make_node("Add", ["a1", "three"], ["h1"], name="hs_add"),
        helper.make_node("Clip", ["h1", "zero", "six"], ["h2"], name="hs_clip"),
        helper.make_node("Mul", ["a1", "h2"], ["h3"], name="hs_mul"),
        helper.make_node("Div", ["h3", "six"], ["h4"], name="hs_div"),
        helper.make_node("Mul", ["s2", "h4"], ["h5"], name="scale2"),
        helper.make_node("Add", ["h5", "d2"], ["h6"], name="shift2"),
        helper.make_node("Conv", ["h6", "w2"], ["c2o"], name="conv2"),
        helper.make_node("Mul", ["c2o", "c2"], ["m2"], name="scale3"),
        helper.make_node("ConvTranspose", ["m2", "wt"], ["t1"], strides=[2, 2], name="up"),
        helper.make_node("Add", ["t1", "bt_b"], ["t2"], name="up_bias"),
        helper.make_node("BatchNormalization", ["t2", "gamma", "beta", "mean", "var"], ["t3"], name="bn"),
        helper.make_node("Sigmoid", ["t3"], ["y"], name="prob"),
    ]
    inits.append(_const("bt_b", rng.standard_normal((4, 1, 1))))
    graph = helper.make_graph(nodes, "lcnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 32, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path)
    return path


def test_conv_scale_shift_and_batchnorm_fold_into_the_conv_exactly(tmp_path):
    path = lcnet_block(tmp_path / "m.onnx")
    model = onnx.load(path)
    removed = fold_conv_affine(model)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    # scale1, shift1 into conv1; scale3 into conv2; up_bias and bn into the ConvTranspose. scale2/shift2
    # sit after the HardSwish (not after a Conv) and stay.
    assert removed == 5 and "BatchNormalization" not in ops and ops.count("Mul") == 2 and ops.count("Add") == 2
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_conv_output_read_twice_or_a_non_channel_constant_is_not_folded(tmp_path):
    rng = np.random.default_rng(0)
    inits = [_const("w", rng.standard_normal((4, 3, 1, 1))), _const("row", rng.standard_normal((1, 1, 1, 8))),
             _const("s", [2.0])]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "row"], ["m"]),  # varies along width, not channels
             helper.make_node("Conv", ["x", "w"], ["c2"]),
             helper.make_node("Mul", ["c2", "s"], ["m2"]),
             helper.make_node("Add", ["m2", "c2"], ["y2"])]  # c2 read twice
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("m", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert fold_conv_affine(model) == 0 and len(model.graph.node) == 5


def test_elementwise_nodes_no_int8_node_reads_stay_float(tmp_path):
    """The HardSwish product feeds only a float Div, the final Sigmoid only the graph output: int8
    there would round once more for no int8 kernel. The Add + Clip feeding the product follow."""
    path = lcnet_block(tmp_path / "m.onnx")
    model = prepare_model(onnx.load(path))
    planner = StaticPlanner(model)
    float_nodes = planner.float_nodes
    assert {"hs_mul", "hs_add", "prob"} <= set(float_nodes)
    assert "no int8 node reads its output" in float_nodes["hs_mul"]
    assert {"conv1", "conv2", "up"} <= set(planner.active)


def test_the_folded_and_pruned_block_quantizes_close_to_float(tmp_path):
    """End to end on ONNX Runtime: the block's int8 model against its float output (probabilities)."""
    path = lcnet_block(tmp_path / "m.onnx")
    rng = np.random.default_rng(2)
    calib = {"x": rng.standard_normal((32, 3, 16, 16)).astype(np.float32)}
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    out = tmp_path / "q.onnx"
    quantize_onnx(path, out, calib=calib, verify=False)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "BatchNormalization" not in ops and "Div" in ops  # the BN folded; the HardSwish's / 6 stays float
    assert np.abs(got - expected).mean() < 0.01 and np.abs(got - expected).max() < 0.1


def test_a_dead_channel_keeps_its_bias_in_int32(tmp_path):
    """A channel whose weights are ~1e-30 but whose bias is 0.9 (a pruned channel: PP-OCRv4 has
    dozens): at scale = input scale x weight scale the bias saturates int32 and dequantizes to ~0
    unless the channel's weight scale is raised. Reference: the float model on ONNX Runtime."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    w[2] = 1e-30  # dead channel
    bias = np.array([0.1, -0.2, 0.9, 0.3], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    inits = [_const("w", w), _const("b", bias), _const("w2", rng.standard_normal((2, 4, 1, 1)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 8, 8])], inits)
    path = tmp_path / "dead.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    calib = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    out = tmp_path / "q.onnx"
    quantize_onnx(path, out, calib=calib, verify=False)
    quantized = onnx.load(out)
    inits_q = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    int32 = [v for v in inits_q.values() if v.dtype == np.int32 and v.size == 4]
    assert int32 and np.abs(int32[0]).max() < 2**31 - 1  # nothing saturated
    x = calib["x"][:4]
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # The dead channel's constant 0.9 reaches the output through w2; lost, the error would be ~0.9 x |w2|.
    assert np.abs(got - expected).max() < 0.1


def test_gemms_sharing_one_weight_get_one_int8_copy_in_dynamic_mode(tmp_path):
    """An unrolled RNN (captcha CRNN: 20 Gemms per direction share one weight) wrote one int8 copy
    per Gemm: the dynamic model came out 3.8x bigger than the float one."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    steps = 6
    nodes, outputs = [], []
    for t in range(steps):
        nodes.append(helper.make_node("Gemm", [f"x{t}", "w", "b"], [f"y{t}"], transB=1, name=f"step{t}"))
    graph = helper.make_graph(
        nodes, "unrolled", [helper.make_tensor_value_info(f"x{t}", TensorProto.FLOAT, [2, 64]) for t in range(steps)],
        [helper.make_tensor_value_info(f"y{t}", TensorProto.FLOAT, [2, 16]) for t in range(steps)],
        [_const("w", w), _const("b", rng.standard_normal(16))])
    path = tmp_path / "unrolled.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    out = tmp_path / "dyn.onnx"
    quantize_onnx(path, out, mode="dynamic", verify=False)
    int8 = [t for t in onnx.load(out).graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 1
    feed = {f"x{t}": rng.standard_normal((2, 64)).astype(np.float32) for t in range(steps)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    for e, g in zip(expected, got):
        assert np.abs(e - g).max() < 0.05 * np.abs(e).max()
