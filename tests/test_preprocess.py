"""lowbit.onnx.preprocess: same outputs as the float model, BN folded, shapes on intermediates."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lowbit.onnx.preprocess import preprocess
from _tiny_models import conv_bn_relu_onnx, tiny_attention_onnx


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # reference = graph as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def shapes(model: onnx.ModelProto) -> dict[str, list]:
    return {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in model.graph.value_info}


@pytest.fixture(scope="module")
def conv_model():
    return conv_bn_relu_onnx()


@pytest.fixture(scope="module")
def attention_model():
    return tiny_attention_onnx()


def test_conv_bn_relu_folds_bn_and_keeps_outputs(conv_model):
    original = conv_model.SerializeToString()
    processed = preprocess(conv_model)
    assert conv_model.SerializeToString() == original, "input model must be untouched"
    assert "BatchNormalization" in {n.op_type for n in conv_model.graph.node}
    ops = [n.op_type for n in processed.graph.node]
    assert ops == ["Conv", "Relu", "Conv", "Relu"], ops   # BN folded, Identity nodes removed
    onnx.checker.check_model(processed)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = {"x": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}
        np.testing.assert_allclose(run(processed, x)[0], run(conv_model, x)[0], rtol=1e-4, atol=1e-5)
    # Every intermediate has a shape, with the symbolic batch axis carried through.
    inferred = shapes(processed)
    for node in processed.graph.node[:-1]:
        assert inferred[node.output[0]][0] == "batch"


def test_attention_graph_keeps_outputs_and_gets_symbolic_shapes(attention_model):
    processed = preprocess(attention_model)
    assert all(n.domain in ("", "ai.onnx") for n in processed.graph.node), "BASIC level must keep standard ops"
    assert {o.domain for o in processed.opset_import} <= {"", "ai.onnx", "ai.onnx.ml"}
    assert len(processed.graph.node) < len(attention_model.graph.node)   # constants folded away
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 5), (3, 11)):
        mask = np.ones((batch, seq), np.int64)
        mask[0, seq - 2:] = 0      # padding: the -inf-like mask path must match too
        feeds = {"input_ids": rng.integers(0, 50, (batch, seq)).astype(np.int64), "attention_mask": mask}
        np.testing.assert_allclose(run(processed, feeds)[0], run(attention_model, feeds)[0], rtol=1e-4, atol=1e-4)

    inferred = shapes(processed)
    matmuls = [n.output[0] for n in processed.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(out in inferred for out in matmuls)
    softmax = next(n.output[0] for n in processed.graph.node if n.op_type == "Softmax")
    assert inferred[softmax] == ["batch", 2, "sequence", "sequence"]
    produced = {out for n in processed.graph.node for out in n.output} - {o.name for o in processed.graph.output}
    assert produced <= set(inferred), f"intermediates without shapes: {produced - set(inferred)}"


def test_fallback_and_no_optimize_options(attention_model):
    processed = preprocess(attention_model, symbolic_shapes=False, optimize=False)
    assert len(processed.graph.node) == len(attention_model.graph.node)
    assert shapes(processed)   # onnx.shape_inference still annotated intermediates


def test_initializers_listed_as_inputs_are_folded(conv_model):
    legacy = onnx.ModelProto()
    legacy.CopyFrom(conv_model)
    known = {i.name for i in legacy.graph.input}
    legacy.graph.input.extend(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                              for init in legacy.graph.initializer if init.name not in known)
    processed = preprocess(legacy)
    assert [i.name for i in processed.graph.input] == ["x"]
    assert "BatchNormalization" not in {n.op_type for n in processed.graph.node}


def test_failed_symbolic_inference_leaves_no_files_in_working_dir(conv_model, tmp_path, monkeypatch):
    # ORT's symbolic shape inference dumps 'sym_shape_infer_temp.onnx' (+ external data) into the
    # current directory when it gives up; lowbit must not litter the user's folder with it.
    from onnxruntime.tools import symbolic_shape_infer

    def give_up(model, **kwargs):
        onnx.save_model(model, "sym_shape_infer_temp.onnx")
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(symbolic_shape_infer.SymbolicShapeInference, "infer_shapes", staticmethod(give_up))
    monkeypatch.chdir(tmp_path)
    result = preprocess(conv_model)
    assert list(tmp_path.iterdir()) == []
    assert not any(n.op_type == "BatchNormalization" for n in result.graph.node)


def _gelu_mlp(domain_ops: bool) -> onnx.ModelProto:
    """x @ W1 -> Gelu -> @ W2; with `domain_ops`, the Gelu is ONNX Runtime's com.microsoft op (as
    in models fused by onnxruntime.transformers.optimizer)."""
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2")
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             onnx.helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft" if domain_ops else ""),
             onnx.helper.make_node("MatMul", ["g", "w2"], ["y"], name="down")]
    graph = onnx.helper.make_graph(nodes, "mlp", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])], [w1, w2])
    opsets = [onnx.helper.make_opsetid("", 20)] + ([onnx.helper.make_opsetid("com.microsoft", 1)] if domain_ops else [])
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_models_already_holding_runtime_fused_ops_are_accepted():
    """An input that was fused by ORT's transformer optimizer keeps its com.microsoft ops."""
    model = _gelu_mlp(domain_ops=True)
    processed = preprocess(model)
    assert [n.op_type for n in processed.graph.node] == ["MatMul", "Gelu", "MatMul"]
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(processed), run(model), rtol=1e-5, atol=1e-5)


def test_symbolic_dims_through_resizes_are_the_same_with_each_expression_printed_once(monkeypatch):
    """An FPN-like graph with dynamic height and width (strided Convs, then Resizes back up and Adds):
    the inference names its computed dims by their printed expressions; printed once each (memoized)
    or every time, the annotated model is the same, and sympy's printing is restored after."""
    import contextlib

    import sympy
    from onnx import TensorProto, helper, numpy_helper

    import lowbit.onnx.preprocess as module

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c2", "", "scales"], ["up1"], mode="nearest"),
             helper.make_node("Add", ["up1", "c1"], ["s1"]),
             helper.make_node("Resize", ["s1", "", "scales"], ["up2"], mode="nearest"),
             helper.make_node("Conv", ["up2", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "fpn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    memoized = module.infer_shapes(model)
    assert "__str__" not in sympy.Basic.__dict__
    assert any(d.dim_param and "floor" in d.dim_param for v in memoized.graph.value_info
               for d in v.type.tensor_type.shape.dim)  # computed dims named by their expressions
    monkeypatch.setattr(module, "_memoized_sympy_str", contextlib.nullcontext)
    assert memoized.SerializeToString() == module.infer_shapes(model).SerializeToString()
