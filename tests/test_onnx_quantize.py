"""Post-training quantization of ONNX models: fidelity, graph structure, plan, modes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import export, image_calib, small_cnn, tiny_encoder, token_calib
from lowbit.numerics import dequantize, qparams_for, quantize
from lowbit.onnx.cpu import has_amx_int8
from lowbit.onnx.qdq import QGEMM_MIN_REDUCTION
from lowbit.onnx.io import load_model
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.plan import PLAN_METADATA_KEY, VERSION_METADATA_KEY, QuantPlan
from lowbit.spec import QuantSpec, per_channel


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {
        "root": root,
        "cnn": small_cnn(root / "cnn.onnx"),
        "cnn_calib": image_calib(root / "cnn_calib.npz", n=32),
        "cnn_eval": image_calib(root / "cnn_eval.npz", n=32, seed=7),
        "enc": tiny_encoder(root / "enc.onnx"),
        "enc_calib": token_calib(root / "enc_calib.npz", n=16),
    }


@pytest.fixture(scope="module")
def cnn_static(files):
    out = files["root"] / "cnn_static.onnx"
    result = quantize_onnx(files["cnn"], out, mode="static", calib=files["cnn_calib"], eval_data=files["cnn_eval"],
                           batch_size=8, measure_speed=False)
    return result, onnx.load(str(out))


def run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_static_cnn_is_close_to_float_on_unseen_inputs(files, cnn_static):
    result, _ = cnn_static
    x = np.random.default_rng(11).standard_normal((16, 3, 32, 32)).astype(np.float32)
    reference, quantized = run(files["cnn"], {"image": x}), run(result.output_path, {"image": x})
    assert cosine(reference, quantized) > 0.99
    assert not np.array_equal(reference, quantized)  # it really is quantized
    # The report measures the same thing on the eval set.
    assert result.report.outputs[0].cosine_mean > 0.99
    assert result.report.samples == 32


def test_static_cnn_graph_has_int8_weights_and_qdq_activations(cnn_static):
    _, model = cnn_static
    ops = [n.op_type for n in model.graph.node]
    inits = initializers(model)
    float_weights = [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2]
    assert float_weights == []  # every Conv/Gemm weight is stored as int8
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight_dq = next(n for n in model.graph.node if node.input[1] in n.output)
            assert weight_dq.op_type == "DequantizeLinear"
            assert inits[weight_dq.input[0]].dtype == np.int8
            assert inits[weight_dq.input[1]].ndim == 1  # per-channel
            if len(node.input) > 2:
                bias_dq = next(n for n in model.graph.node if node.input[2] in n.output)
                assert inits[bias_dq.input[0]].dtype == np.int32
            data_dq = next(n for n in model.graph.node if node.input[0] in n.output)
            assert data_dq.op_type == "DequantizeLinear"
            assert inits[data_dq.input[2]].dtype == np.uint8
    assert ops.count("QuantizeLinear") >= 5
    # The graph input is quantized once, for the first Conv.
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "image" for n in model.graph.node)


def test_relu_folds_into_the_producer_and_ort_fuses_int8_kernels(cnn_static, tmp_path):
    result, model = cnn_static
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Relu", "Clip"):
            assert producers[node.input[0]].op_type in ("Conv", "Add")  # no Q/DQ between them
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(result.output_path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 4
    assert "QLinearAdd" in fused and "QGemm" in fused
    assert "Conv" not in fused and "DequantizeLinear" not in fused


def test_per_channel_scales_equal_numerics_qparams_for(files, cnn_static):
    _, model = cnn_static
    reference = preprocess(load_model(files["cnn"]))
    float_weights = initializers(reference)
    inits = initializers(model)
    convs = [n for n in reference.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert depthwise, "the test model must contain a depthwise conv"
    amx_form = has_amx_int8()  # large ungrouped Conv weights are stored with zero point -1 there
    for node in convs:
        w = float_weights[node.input[1]]
        expected = qparams_for(w, QuantSpec("int8", granularity=per_channel(0)))
        np.testing.assert_array_equal(inits[f"{node.input[1]}_scale"], expected.scale)
        large = node not in depthwise and int(np.prod(w.shape[1:])) >= QGEMM_MIN_REDUCTION
        zero_point = -1 if amx_form and large else 0
        np.testing.assert_array_equal(inits[f"{node.input[1]}_zero_point"], np.full(w.shape[0], zero_point, np.int8))
        # Either form dequantizes to exactly the numbers lowbit.numerics gives.
        stored = inits[f"{node.input[1]}_quantized"].astype(np.float32) - zero_point
        np.testing.assert_array_equal(stored * expected.scale.reshape(-1, 1, 1, 1),
                                      dequantize(quantize(w, expected), expected))
    gemm = next(n for n in reference.graph.node if n.op_type == "Gemm")
    w = float_weights[gemm.input[1]]
    axis = 0 if any(a.name == "transB" and a.i for a in gemm.attribute) else 1
    expected = qparams_for(w, QuantSpec("int8", granularity=per_channel(axis)))
    np.testing.assert_array_equal(inits[f"{gemm.input[1]}_scale"], expected.scale)


def test_bias_is_int32_with_input_times_weight_scale(cnn_static):
    _, model = cnn_static
    inits = initializers(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight_scale = inits[conv.input[1].replace("_dequantized", "_scale")]
    act_scale = inits["image_scale"]
    bias_scale = inits[conv.input[2].replace("_dequantized", "_scale")]
    np.testing.assert_array_equal(bias_scale, (act_scale * weight_scale).astype(np.float32))


def test_plan_metadata_round_trips_through_json(cnn_static):
    result, model = cnn_static
    props = {p.key: p.value for p in model.metadata_props}
    assert VERSION_METADATA_KEY in props
    stored = read_plan(model)
    assert QuantPlan.from_json(stored.to_json()).to_dict() == stored.to_dict()
    assert json.loads(props[PLAN_METADATA_KEY]) == result.plan.to_dict()
    weights = stored.quantized("weight")
    assert weights and all(e.qparams is not None and e.nodes for e in weights)
    activations = stored.quantized("activation")
    assert any(e.range is not None for e in activations)
    assert any(e.shares for e in activations)  # MaxPool / Flatten reuse their input's parameters


def test_per_tensor_option_gives_scalar_weight_scales(files, tmp_path):
    out = tmp_path / "pt.onnx"
    quantize_onnx(files["cnn"], out, calib=files["cnn_calib"], per_channel=False, verify=False)
    model = onnx.load(str(out))
    inits = initializers(model)
    scales = [inits[n.input[1]] for n in model.graph.node
              if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).dtype == np.int8]
    assert scales and all(s.ndim == 0 for s in scales)


def test_exclude_keeps_a_node_and_an_op_type_float(files, tmp_path):
    reference = preprocess(load_model(files["cnn"]))
    first_conv = next(n for n in reference.graph.node if n.op_type == "Conv")
    out = tmp_path / "excluded.onnx"
    result = quantize_onnx(files["cnn"], out, calib=files["cnn_calib"], exclude=(first_conv.name, "Gemm"),
                           verify=False)
    model = onnx.load(str(out))
    inits = initializers(model)
    conv = next(n for n in model.graph.node if n.name == first_conv.name)
    assert inits[conv.input[1]].dtype == np.float32  # weight stays float, no DequantizeLinear
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert inits[gemm.input[1]].dtype == np.float32
    assert result.plan.float_nodes[first_conv.name] == "excluded by the user"
    assert result.plan.float_nodes[gemm.name] == "excluded by the user"


def test_encoder_static_survives_minus_inf_mask(files, tmp_path):
    out = tmp_path / "enc_static.onnx"
    result = quantize_onnx(files["enc"], out, calib=files["enc_calib"], batch_size=4, measure_speed=False)
    assert result.report.outputs[0].cosine_mean > 0.99
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert producers[softmax.input[0]].op_type != "DequantizeLinear"  # sensitive op stays float
    assert any("mask" in reason for reason in result.plan.float_nodes.values())
    assert "MatMul" in [n.op_type for n in model.graph.node]
    assert result.plan.quantized("weight")


def test_encoder_dynamic_uses_integer_matmul(files, tmp_path):
    out = tmp_path / "enc_dynamic.onnx"
    result = quantize_onnx(files["enc"], out, mode="dynamic", calib=files["enc_calib"], measure_speed=False)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "DynamicQuantizeLinear" in ops and ops.count("MatMulInteger") == 6
    assert result.report.outputs[0].cosine_mean > 0.995


def test_cnn_dynamic_quantizes_the_gemm_only(files, tmp_path):
    out = tmp_path / "cnn_dynamic.onnx"
    result = quantize_onnx(files["cnn"], out, mode="dynamic", calib=files["cnn_calib"], measure_speed=False)
    assert [e.tensor for e in result.plan.quantized("weight")] == [
        n.input[1] for n in preprocess(load_model(files["cnn"])).graph.node if n.op_type == "Gemm"]
    assert result.report.outputs[0].cosine_mean > 0.99


def test_fp16_halves_weights_and_keeps_float32_io(files, tmp_path):
    out = tmp_path / "cnn_fp16.onnx"
    result = quantize_onnx(files["cnn"], out, mode="fp16", calib=files["cnn_calib"], measure_speed=False)
    model = onnx.load(str(out))
    assert all(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer if t.data_type != TensorProto.INT64)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert result.report.outputs[0].cosine_mean > 0.999
    # Weight bytes halve (on a model this small the stored plan is a visible share of the file).
    source_bytes = sum(a.nbytes for a in initializers(preprocess(load_model(files["cnn"]))).values())
    assert sum(a.nbytes for a in initializers(model).values()) == source_bytes // 2
    assert result.report.size_ratio > 1.2


def test_unknown_op_is_left_float_and_listed(tmp_path):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
             helper.make_node("Celu", ["a"], ["b"], name="celu"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 6, 6])], [w1, w2])
    path = tmp_path / "celu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    result = quantize_onnx(path, tmp_path / "out.onnx", calib=tmp_path / "c.npz", measure_speed=False)
    assert result.plan.unsupported_ops == ["Celu"]
    assert "unsupported op Celu" in result.plan.float_nodes["celu"]
    assert "Celu" in result.summary()
    assert result.report.outputs[0].cosine_mean > 0.99
    assert len(result.plan.quantized("weight")) == 2


def _runtime_op_types(model: onnx.ModelProto, tmp_path) -> set[str]:
    """The op types ONNX Runtime runs after its own (ENABLE_ALL) graph optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "runtime_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_written_transformer_keeps_runtime_off_the_slow_skip_layernorm(tmp_path, mode):
    """Intermediate shapes from pre-processing would let ORT fuse Add + LayerNormalization into
    SkipLayerNormalization (several times slower on CPU), so written models carry none."""
    source = tiny_encoder(tmp_path / "enc.onnx")
    out = tmp_path / "q.onnx"
    quantize_onnx(source, out, mode=mode, calib=token_calib(tmp_path / "c.npz"), verify=False, measure_speed=False)
    written = onnx.load(str(out))
    assert len(written.graph.value_info) == 0
    assert "SkipLayerNormalization" not in _runtime_op_types(written, tmp_path)
    # The check can fail: the same graph with the pre-processing shapes put back does get fused.
    annotated = preprocess(written, optimize=False)
    assert "SkipLayerNormalization" in _runtime_op_types(annotated, tmp_path)


class _Decoder(torch.nn.Module):
    """Segmentation-style decoder: ConvTranspose upsampling, Resize, Concat of a skip path."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.head = torch.nn.Conv2d(9, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.relu(self.down(x))
        skip = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
        return self.head(torch.cat([torch.relu(self.up(low)), skip], dim=1))


def test_conv_transpose_resize_concat_decoder(tmp_path):
    """ConvTranspose gets int8 weights with one scale per *output* channel (its axis 1), and the
    upsampling decoder stays close to float."""
    torch.manual_seed(0)
    source = export(_Decoder(), (torch.randn(1, 3, 16, 16),), tmp_path / "dec.onnx", ["image"],
                    {"image": {0: "batch"}, "out": {0: "batch"}})
    calib = image_calib(tmp_path / "c.npz", n=32, shape=(3, 16, 16))
    out = tmp_path / "q.onnx"
    quantize_onnx(source, out, mode="static", calib=calib, verify=False, measure_speed=False)
    model = onnx.load(str(out))
    assert {"Resize", "Concat", "AveragePool"} <= {n.op_type for n in model.graph.node}
    transpose = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    weight_dq = next(n for n in model.graph.node if n.output[0] == transpose.input[1])
    assert weight_dq.op_type == "DequantizeLinear"
    assert {a.name: a.i for a in weight_dq.attribute}.get("axis") == 1
    assert numpy_helper.to_array(initializers_by_name(model)[weight_dq.input[1]]).shape == (6,)
    x = np.random.default_rng(5).standard_normal((8, 3, 16, 16)).astype(np.float32)
    assert cosine(run(source, {"image": x}), run(out, {"image": x})) > 0.995


def initializers_by_name(model):
    return {t.name: t for t in model.graph.initializer}


def test_dynamic_gemm_with_alpha_keeps_the_plans_weight_scales(tmp_path):
    """Gemm's alpha is applied on the scale vector, so the stored weight scales are exactly the
    plan's (inspect finds them) and the output still matches float."""
    from lowbit.analysis.inspect import inspect_model

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(size=(16,)).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", alpha=0.5, transB=1)],
                              "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [weight, bias])
    source = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(source))
    out = tmp_path / "q.onnx"
    quantize_onnx(source, out, mode="dynamic", verify=False, measure_speed=False)
    x = rng.normal(size=(64, 32)).astype(np.float32)
    assert cosine(run(source, {"x": x}), run(out, {"x": x})) > 0.999
    assert not [n for n in inspect_model(out).notes if "changed after quantization" in n or "no longer" in n]
    stored = read_plan(out).quantized("weight")[0].qparams.scale
    np.testing.assert_array_equal(initializers(onnx.load(str(out)))["fc_W_scale"], stored)


def test_quantizing_an_onnx_model_never_imports_torch(files, tmp_path):
    """Importing torch costs 1.5-2.5 s of every `lowbit quantize`; the ONNX paths need none of it
    (ONNX Runtime's symbolic shape inference is loaded without onnxruntime/tools/__init__.py, which
    imports torch when installed)."""
    import subprocess
    import sys

    script = ("import sys; from lowbit.cli import main; "
              f"rc = main(['quantize', {str(files['cnn'])!r}, '-o', {str(tmp_path / 'q.onnx')!r}, "
              f"'--calib', {str(files['cnn_calib'])!r}, '--no-speed']); "
              "print('exit', rc, 'torch imported:', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "exit 0 torch imported: False" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
