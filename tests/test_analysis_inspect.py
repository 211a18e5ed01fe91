"""`lowbit inspect`: node precisions read from the graph, plan summary, size breakdown."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import image_calib, small_cnn
from lowbit.analysis.graph_precision import node_precisions
from lowbit.analysis.inspect import inspect_model
from lowbit.cli import main
from lowbit.onnx.quantize import quantize_onnx


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    cnn = small_cnn(root / "cnn.onnx")
    calib = image_calib(root / "calib.npz", n=16)
    static = root / "static.onnx"
    quantize_onnx(cnn, static, calib=calib, batch_size=8, verify=False)
    dynamic = root / "dynamic.onnx"
    quantize_onnx(cnn, dynamic, mode="dynamic", verify=False)
    return {"root": root, "cnn": cnn, "static": static, "dynamic": dynamic}


def _weight_elements(path) -> int:
    """Elements of the Conv/Gemm weights of the float model (BN folding keeps their shapes)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    return sum(int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node if n.op_type in ("Conv", "Gemm"))


def test_static_model_nodes_are_int8_per_channel_and_sizes_add_up(models):
    report = inspect_model(models["static"])
    assert report.quantized_by_lowbit and report.plan.mode == "static"
    assert [n.op_type for n in report.nodes] == ["Conv"] * 4 + ["Gemm"]
    assert {n.precision for n in report.nodes} == {"int8"}
    assert all(n.activation == "uint8" for n in report.nodes)
    convs = [n for n in report.nodes if n.op_type == "Conv"]
    assert all(n.weight.granularity == "channel" and n.weight.axis == 0 and n.weight.dtype == "int8" for n in convs)
    int8 = [r for r in report.sizes if r.category == "quantized weights" and r.dtype == "int8"]
    assert int8[0].nbytes == _weight_elements(models["cnn"])  # one byte per weight
    model = onnx.load(str(models["static"]))
    assert sum(r.nbytes for r in report.sizes) == sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert report.file_bytes == os.path.getsize(models["static"])
    assert report.notes == []
    text = report.text()
    assert "quantized by lowbit" in text and "mode static" in text and "int8 per-channel (axis 0)" in text


def test_float_model_is_reported_as_not_quantized_with_its_sizes(models):
    report = inspect_model(models["cnn"])
    assert not report.quantized_by_lowbit
    assert {n.precision for n in report.nodes} == {"float"}
    model = onnx.load(str(models["cnn"]))
    floats = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert sum(r.nbytes for r in report.sizes if r.category == "float weights") == floats
    assert "not quantized by lowbit" in report.text()


def test_dynamic_model_shows_integer_matmul_and_float_convs(models):
    nodes = inspect_model(models["dynamic"]).nodes
    integer = [n for n in nodes if n.op_type == "MatMulInteger"]
    assert len(integer) == 1 and integer[0].precision == "int8"
    assert integer[0].activation == "dynamic uint8" and integer[0].weight.granularity == "channel"
    assert {n.precision for n in nodes if n.op_type == "Conv"} == {"float"}


def test_graph_not_plan_decides_a_node_edited_after_quantization(models, tmp_path):
    """Put a float weight back into one Conv: inspect must notice, whatever the plan says."""
    model = onnx.load(str(models["static"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    inits = {t.name: t for t in model.graph.initializer}
    shape = inits[conv.input[1].replace("_dequantized", "_quantized")].dims
    model.graph.initializer.append(numpy_helper.from_array(np.ones(shape, np.float32), "float_weight"))
    conv.input[1] = "float_weight"
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    report = inspect_model(edited)
    assert report.nodes[0].precision == "float" and report.nodes[0].weight.dtype == "float"
    assert any("changed after quantization" in note for note in report.notes)


def test_int4_blocked_weights_fp16_storage_and_activation_matmul_are_read_from_the_graph():
    w4 = helper.make_tensor("w4", TensorProto.INT4, [8, 4], np.arange(32) % 8 - 4)
    scale = numpy_helper.from_array(np.full((2, 4), 0.1, np.float32), "w4_scale")
    w16 = numpy_helper.from_array(np.ones((4, 4), np.float16), "w16")
    nodes = [
        helper.make_node("DequantizeLinear", ["w4", "w4_scale"], ["w4_dq"], axis=0, block_size=4, name="dq"),
        helper.make_node("MatMul", ["x", "w4_dq"], ["h"], name="int4_matmul"),
        helper.make_node("Cast", ["w16"], ["w16_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("MatMul", ["h", "w16_f"], ["g"], name="fp16_stored_matmul"),
        helper.make_node("MatMul", ["g", "y"], ["z"], name="activation_matmul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])], [w4, scale, w16])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    found = {n.node: n for n in node_precisions(model)}
    int4 = found["int4_matmul"]
    assert int4.precision == "int4"
    assert (int4.weight.dtype, int4.weight.granularity, int4.weight.block_size, int4.weight.axis) == ("int4", "group", 4, 0)
    assert found["fp16_stored_matmul"].precision == "float" and found["fp16_stored_matmul"].weight.stored == "fp16"
    assert found["activation_matmul"].precision == "float" and found["activation_matmul"].weight is None
    from lowbit.analysis.graph_precision import initializer_sizes

    sizes = {(r.category, r.dtype): r.nbytes for r in initializer_sizes(model)}
    assert sizes[("quantized weights", "int4")] == 16  # 32 values, two per byte
    assert sizes[("float weights", "fp16")] == 32


def test_cli_inspect_json_and_missing_file(models, capsys):
    assert main(["inspect", str(models["static"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantized_by_lowbit"] and data["plan"]["mode"] == "static"
    assert data["precision_counts"] == {"int8": 5}
    assert data["sizes"]["file_bytes"] == os.path.getsize(models["static"])
    assert main(["inspect", str(models["root"] / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
