"""`lowbit export` to ORT Mobile, ExecuTorch and LiteRT: each file, loaded in its own runtime, computes
what ONNX Runtime computes on lowbit's QDQ model, with lowbit's scales (never re-quantized).

References are independent of lowbit.deploy: ONNX Runtime on the QDQ model, and each runtime's own
loader (InferenceSession, executorch.runtime, ai_edge_litert's Interpreter) on the written file.
The ExecuTorch and LiteRT routes need the extras (CI installs them with `lowbit[test]`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from _onnx_quant_models import image_calib, small_cnn
from lowbit.cli import main
from lowbit.deploy.export import MAX_STEPS, export_model
from lowbit.deploy.qdq_graph import read_qdq_graph
from lowbit.onnx.quantize import quantize_onnx


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[Path, Path]:
    """SmallCNN (depthwise conv, residual add, ReLU6, max pool, Gemm) static int8 by lowbit, and test data."""
    root = tmp_path_factory.mktemp("deploy")
    calib = image_calib(root / "calib.npz", n=32)
    quantize_onnx(small_cnn(root / "fp32.onnx"), root / "int8.onnx", mode="static", calib=calib,
                  measure_speed=False)
    return root / "int8.onnx", image_calib(root / "test.npz", n=24, seed=7)


def ort_reference(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def step_of(reference: np.ndarray) -> float:
    return float(reference.max() - reference.min()) / 255


def test_reader_keeps_lowbits_grids(quantized):
    model_path, _ = quantized
    model = onnx.load(model_path)
    graph = read_qdq_graph(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and inits[n.input[0]].dtype == np.int8]
    assert len(graph.weights) == len(weight_dqs) > 0
    for node in weight_dqs:
        weight = graph.weights[node.output[0]]
        np.testing.assert_array_equal(weight.values, inits[node.input[0]])
        np.testing.assert_array_equal(weight.grid.scale, inits[node.input[1]])
    # uint8 activation grids come back as the identical int8 grid
    activation_qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert graph.activation_points == len(activation_qs)
    first = next(op for op in graph.ops if op.op_type == "FakeQuant")
    zero_point = inits[activation_qs[0].input[2]]
    assert zero_point.dtype == np.uint8 and int(first.grid.zero_point) == int(zero_point) - 128
    assert graph.precision == "static"


def test_ort_mobile_file_is_bit_identical(quantized, tmp_path):
    model_path, data = quantized
    out = tmp_path / "model.ort"
    report = export_model(model_path, out, data=data, repeats=3)
    assert report.passed and report.max_abs_error == 0.0 and report.top1_agreement == 1.0
    x = np.load(data)["image"][:5]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"image": x})[0], ort_reference(model_path, x))
    assert report.file_bytes == out.stat().st_size and report.float_file_bytes > report.file_bytes


@pytest.mark.slow
def test_executorch_file_runs_in_one_xnnpack_delegate(quantized, tmp_path):
    pytest.importorskip("executorch", reason="needs lowbit[executorch]")
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.runtime import Runtime

    model_path, data = quantized
    out = tmp_path / "model.pte"
    report = export_model(model_path, out, data=data, repeats=3)
    assert report.passed, report.describe()
    content = out.read_bytes()
    assert b"XnnpackBackend" in content
    assert re.search(rb"[0-9a-f]{64}", content) is None  # constants keyed "0", "1", ..., not by SHA-256
    x = np.load(data)["image"][:1] * 0.5  # an input the export never saw
    method = Runtime.get().load_program(out).load_method("forward")
    got = method.execute([torch.from_numpy(x)])[0].numpy()
    reference = ort_reference(model_path, x)
    assert np.abs(got - reference).max() <= MAX_STEPS * step_of(reference)


@pytest.mark.slow
def test_litert_file_is_int8_with_lowbits_scales(quantized, tmp_path):
    pytest.importorskip("litert_torch", reason="needs lowbit[litert]")
    from ai_edge_litert.interpreter import Interpreter

    model_path, data = quantized
    out = tmp_path / "model.tflite"
    report = export_model(model_path, out, data=data, repeats=3)
    assert report.passed, report.describe()
    interpreter = Interpreter(model_path=str(out))
    interpreter.allocate_tensors()
    tensors = interpreter.get_tensor_details()
    # every 4-D conv weight is int8 and carries exactly lowbit's per-channel scales
    model = onnx.load(model_path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    lowbit_scales = sorted(tuple(inits[n.input[1]].tolist()) for n in model.graph.node
                           if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).ndim == 4)
    litert_scales = sorted(tuple(t["quantization_parameters"]["scales"].tolist()) for t in tensors
                           if len(t["shape"]) == 4 and t["dtype"] == np.int8
                           and len(t["quantization_parameters"]["scales"]) > 1)
    assert len(litert_scales) == len(lowbit_scales) == 4
    for ours, theirs in zip(lowbit_scales, litert_scales):
        np.testing.assert_allclose(theirs, ours, rtol=1e-6)
    # an input the export never saw, through the runtime's own API (int8 input on lowbit's input grid)
    x = np.load(data)["image"][:1] * 0.5
    detail = interpreter.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    q = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8) if detail["dtype"] == np.int8 else x
    interpreter.set_tensor(detail["index"], q)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    reference = ort_reference(model_path, x)
    assert np.abs(got - reference).max() <= MAX_STEPS * step_of(reference)


def test_ort_file_stores_only_the_tensors_its_nodes_use(quantized, tmp_path):
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    model_path, data = quantized
    export_model(model_path, tmp_path / "model.ort", data=data, measure_speed=False)
    graph = InferenceSession.GetRootAsInferenceSession((tmp_path / "model.ort").read_bytes(), 0).Model().Graph()
    nodes = [graph.Nodes(i) for i in range(graph.NodesLength())]
    used = {n.Inputs(j) for n in nodes for j in range(n.InputsLength())}
    used |= {n.Outputs(j) for n in nodes for j in range(n.OutputsLength())}
    stored = {graph.NodeArgs(i).Name() for i in range(graph.NodeArgsLength())}
    assert not any(n.OpType() == b"DequantizeLinear" for n in nodes)  # fused into QLinear* kernels
    assert stored <= used | {b""}  # no typed entries left over from the fused Q/DQ nodes
    original = {v.name.encode() for v in onnx.load(model_path).graph.value_info} | {
        o.encode() for n in onnx.load(model_path).graph.node for o in n.output}
    assert not (stored & original) - {b"image", b"out"}  # inner names shortened; inputs/outputs kept


def _ort_contents(data: bytes) -> dict:
    """What an .ort file says, read with ONNX Runtime's own generated FlatBuffers reader."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import TensorTypeAndShape
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    session = InferenceSession.GetRootAsInferenceSession(data, 0)
    graph = session.Model().Graph()
    tensors = {}
    for i in range(graph.InitializersLength()):
        t = graph.Initializers(i)
        tensors[t.Name()] = (t.DataType(), [t.Dims(j) for j in range(t.DimsLength())], t.RawDataAsNumpy().tobytes())
    values = {}
    for i in range(graph.NodeArgsLength()):
        arg = graph.NodeArgs(i)
        if arg.Type() is None:
            values[arg.Name()] = None
            continue
        shaped = TensorTypeAndShape.TensorTypeAndShape()
        table = arg.Type().Value()
        shaped.Init(table.Bytes, table.Pos)
        shape = shaped.Shape()
        dims = None if shape is None else [(shape.Dim(j).Value().DimValue(), shape.Dim(j).Value().DimParam())
                                           for j in range(shape.DimLength())]
        values[arg.Name()] = (shaped.ElemType(), dims)
    nodes = []
    for i in range(graph.NodesLength()):
        n = graph.Nodes(i)
        attributes = sorted((a.Name(), a.Type(), a.I(), a.F(), a.S(), a.IntsAsNumpy().tolist() if a.IntsLength() else [])
                            for a in (n.Attributes(j) for j in range(n.AttributesLength())))
        nodes.append((n.Index(), n.OpType(), n.Domain(), n.SinceVersion(), n.ExecutionProviderType(),
                      [n.Inputs(j) for j in range(n.InputsLength())], [n.Outputs(j) for j in range(n.OutputsLength())],
                      attributes))
    resolver = session.KernelTypeStrResolver()
    return {"tensors": tensors, "values": values, "nodes": nodes, "version": session.OrtVersion(),
            "resolver": resolver.OpKernelTypeStrArgsLength(),
            "edges": [(graph.NodeEdges(i).NodeIndex(), graph.NodeEdges(i).InputEdgesLength())
                      for i in range(graph.NodeEdgesLength())]}


def test_ort_repack_stores_identical_objects_once_and_keeps_every_value(quantized, tmp_path):
    import contextlib
    import io

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from lowbit.deploy.flatbuffer_repack import repack
    from lowbit.deploy.ort_mobile import ORT_SCHEMA

    model_path, data = quantized
    with contextlib.redirect_stdout(io.StringIO()):  # ONNX Runtime's own converter, lowbit not involved
        convert_onnx_models_to_ort(model_path, tmp_path, optimization_styles=[OptimizationStyle.Fixed],
                                   target_platform="arm")
    raw = (tmp_path / "int8.ort").read_bytes()
    packed = repack(raw, ORT_SCHEMA, "InferenceSession", b"ORTM")
    assert packed is not None and len(packed) < 0.97 * len(raw)
    assert packed[4:8] == b"ORTM"
    assert _ort_contents(packed) == _ort_contents(raw)
    (tmp_path / "packed.ort").write_bytes(packed)
    x = np.load(data)["image"]
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (tmp_path / "int8.ort", tmp_path / "packed.ort")]
    np.testing.assert_array_equal(*[s.run(None, {"image": x})[0] for s in sessions])
    # a field the schema does not describe: the file is not rewritten
    partial = {**ORT_SCHEMA, "Node": {k: v for k, v in ORT_SCHEMA["Node"].items() if k != 5}}
    assert repack(raw, partial, "InferenceSession", b"ORTM") is None


def test_share_initializers_keeps_one_copy_of_each_constant():
    from onnx import TensorProto, helper

    from lowbit.deploy.ort_mobile import share_initializers

    half = [numpy_helper.from_array(np.array(0.5, np.float32), name) for name in ("a", "b")]
    other = numpy_helper.from_array(np.array(0.25, np.float32), "c")
    nodes = [helper.make_node("Mul", ["x", "a"], ["y1"]), helper.make_node("Mul", ["y1", "b"], ["y2"]),
             helper.make_node("Mul", ["y2", "c"], ["y"])]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [3])], [value("y", TensorProto.FLOAT, [3])],
                              [*half, other])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([1.0, -2.0, 4.0], np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    share_initializers(model)
    assert sorted(t.name for t in model.graph.initializer) == ["a", "c"]
    assert [list(n.input) for n in model.graph.node] == [["x", "a"], ["y1", "a"], ["y2", "c"]]
    np.testing.assert_array_equal(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], before)
    np.testing.assert_array_equal(before, x * 0.0625)


@pytest.mark.slow
def test_litert_compaction_keeps_every_number_and_shares_zero_points(quantized, tmp_path):
    pytest.importorskip("litert_torch", reason="needs lowbit[litert]")
    from ai_edge_litert.interpreter import Interpreter

    from lowbit.deploy import litert

    model_path, data = quantized
    graph = read_qdq_graph(onnx.load(model_path))
    x = np.load(data)["image"]
    raw = litert.convert(graph, {"image": x[:1]})
    packed = litert.compact(raw)
    interpreters = [Interpreter(model_content=content) for content in (raw, packed)]
    details = []
    for interpreter in interpreters:
        interpreter.allocate_tensors()
        details.append(interpreter.get_tensor_details())
    zero_point_bytes, distinct = 0, set()
    for a, b in zip(*details):  # same tensors, same types, same quantization numbers
        assert (a["index"], a["dtype"], tuple(a["shape"])) == (b["index"], b["dtype"], tuple(b["shape"]))
        qa, qb = a["quantization_parameters"], b["quantization_parameters"]
        np.testing.assert_array_equal(qa["scales"], qb["scales"])
        np.testing.assert_array_equal(qa["zero_points"], qb["zero_points"])
        if len(qa["zero_points"]):
            zero_point_bytes += 8 * len(qa["zero_points"])  # int64 in the schema
            distinct.add(qa["zero_points"].tobytes())
    shared = zero_point_bytes - 8 * sum(len(z) // 8 for z in distinct)
    assert shared > 0 and len(raw) - len(packed) >= shared
    outputs = []
    for interpreter in interpreters:  # bit-identical results in the runtime
        detail = interpreter.get_input_details()[0]
        results = []
        for sample in x[:8]:
            scale, zero_point = detail["quantization"]
            value = sample[None]
            if detail["dtype"] == np.int8:
                value = np.clip(np.round(value / scale) + zero_point, -128, 127).astype(np.int8)
            interpreter.set_tensor(detail["index"], value)
            interpreter.invoke()
            results.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy())
        outputs.append(np.stack(results))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_cli_export_prints_parity_size_and_latency(quantized, tmp_path, capsys):
    model_path, data = quantized
    out, float_out = tmp_path / "cli.ort", tmp_path / "cli_float.ort"
    assert main(["export", str(model_path), "-o", str(out), "--data", str(data), "--repeats", "3",
                 "--float-output", str(float_out)]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in text and "smaller" in text and "latency" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.ort", "cli_float.ort"]  # no staging left behind
    # the float export is the same network without quantization: close to, not equal to, the int8 file
    x = np.load(data)["image"][:8]
    float_logits = ort.InferenceSession(str(float_out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    reference = ort_reference(model_path, x)
    assert (float_logits.argmax(1) == reference.argmax(1)).mean() >= 0.75
    assert not np.array_equal(float_logits, reference)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_goes_to_ort_and_its_float_export_matches_matmulnbits(tmp_path, bits):
    import torch

    from _onnx_quant_models import export
    from lowbit.deploy.ort_mobile import float_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    fp32 = export(net, (torch.randn(1, 64),), tmp_path / "mlp.onnx", ["x"], {"x": {0: "batch"}, "out": {0: "batch"}})
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    packed = tmp_path / f"w{bits}.onnx"
    assert main(["quantize", str(fp32), "-o", str(packed), "--mode", "weight-only", "--weight-bits", str(bits),
                 "--algo", "rtn", "--group-size", "16", "--calib", str(tmp_path / "calib.npz"), "--no-speed"]) == 0
    model = onnx.load(packed)
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)
    # the float export unpacks MatMulNBits to the very weights ONNX Runtime's kernel multiplies with
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    unpacked = ort.InferenceSession(float_onnx(model, read_qdq_graph(model)).SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(unpacked, ort_reference_named(packed, "x", x), rtol=1e-4, atol=1e-5)
    report = export_model(packed, tmp_path / "w.ort", repeats=2)
    assert report.passed and report.precision == "weight-only" and report.max_abs_error == 0.0


def ort_reference_named(model: Path, name: str, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


@pytest.mark.slow
def test_int8_weight_only_goes_to_litert_dynamic_range(tmp_path):
    pytest.importorskip("litert_torch", reason="needs lowbit[litert]")
    from ai_edge_litert.interpreter import Interpreter
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.integers(-127, 128, (32, 64)).astype(np.int8),
               "w2": rng.integers(-127, 128, (10, 32)).astype(np.int8)}
    nodes = [helper.make_node("DequantizeLinear", ["w1", "s1"], ["d1"], axis=0),
             helper.make_node("Gemm", ["x", "d1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("DequantizeLinear", ["w2", "s2"], ["d2"], axis=0),
             helper.make_node("Gemm", ["r", "d2"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits += [numpy_helper.from_array(np.full(32, 0.01, np.float32), "s1"),
              numpy_helper.from_array(np.full(10, 0.02, np.float32), "s2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "wo.onnx")
    report = export_model(tmp_path / "wo.onnx", tmp_path / "wo.tflite", repeats=2)
    assert report.precision == "weight-only" and report.passed, report.describe()
    interpreter = Interpreter(model_path=str(tmp_path / "wo.tflite"))
    stored = sorted(tuple(t["shape"]) for t in interpreter.get_tensor_details() if t["dtype"] == np.int8)
    assert stored == [(10, 32), (32, 64)]  # both weights stay int8: LiteRT's dynamic-range kernels


@pytest.mark.slow
def test_int4_weight_only_goes_to_executorch_dynamic_quant_kernels(tmp_path):
    pytest.importorskip("executorch", reason="needs lowbit[executorch]")
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.runtime import Runtime

    from _onnx_quant_models import export
    from lowbit.zoo.digits import load_digits_split, train_classifier

    torch.manual_seed(0)
    digits = load_digits_split()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    train_classifier(net, digits.x_train, digits.y_train, epochs=3)
    fp32 = export(net, (digits.x_train[:1],), tmp_path / "mlp.onnx", ["x"], {"x": {0: "batch"}, "out": {0: "batch"}})
    packed = tmp_path / "w4.onnx"
    assert main(["quantize", str(fp32), "-o", str(packed), "--mode", "weight-only", "--weight-bits", "4",
                 "--algo", "rtn", "--group-size", "0", "--no-speed"]) == 0
    report = export_model(packed, tmp_path / "w4.pte", data={"x": digits.x_test[:200].numpy()}, repeats=2)
    assert report.passed and report.precision == "weight-only", report.describe()
    assert report.size_ratio > 4.5  # int8 storage cannot pass 4x: the 4-bit weights are stored packed
    x = digits.x_test[200:201].numpy()  # an input the export never saw
    method = Runtime.get().load_program(tmp_path / "w4.pte").load_method("forward")
    got = method.execute([torch.from_numpy(x)])[0].numpy()
    reference = ort_reference_named(packed, "x", x)  # float activations, lowbit's int4 weights
    assert np.abs(got - reference).max() <= MAX_STEPS * step_of(reference)
    assert not np.array_equal(got, reference)  # activations quantized per row at run time: not bit-exact


def test_qat_model_goes_to_mobile_through_export_onnx(tmp_path):
    import torch

    from lowbit.torch import calibrate, export_mobile, prepare
    from lowbit.zoo.digits import DigitsCNN

    torch.manual_seed(0)
    x = torch.rand(32, 1, 8, 8)
    model = prepare(DigitsCNN().eval(), "w4a8", x[:2])
    calibrate(model, [x])
    model.eval()
    report = export_mobile(model, x[:2], tmp_path / "qat.ort", check_data=x, repeats=2)
    assert report.passed and report.samples == 32 and report.max_abs_error == 0.0
    session = ort.InferenceSession(str(tmp_path / "qat.ort"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        fake_quant = model(x[:4]).numpy()
    got = session.run(None, {"input": x[:4].numpy()})[0]
    assert (got.argmax(1) == fake_quant.argmax(1)).all()  # the file computes the QAT model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat.ort"]  # the intermediate ONNX is gone



def run_in_target(path: Path, x: np.ndarray) -> np.ndarray:
    """Each sample of `x` through the file's own runtime (batch 1, as exported), float logits out."""
    import torch

    if path.suffix == ".ort":
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    if path.suffix == ".pte":
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(path).load_method("forward")
        return np.concatenate([method.execute([torch.from_numpy(x[i:i + 1])])[0].numpy() for i in range(len(x))])
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    detail, outputs = interpreter.get_input_details()[0], []
    for i in range(len(x)):
        scale, zero_point = detail["quantization"]
        sample = x[i:i + 1]
        if detail["dtype"] == np.int8:
            sample = np.clip(np.round(sample / scale) + zero_point, -128, 127).astype(np.int8)
        interpreter.set_tensor(detail["index"], sample)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy())
    return np.concatenate(outputs)


@pytest.mark.parametrize("suffix", [".ort", pytest.param(".pte", marks=pytest.mark.slow),
                                    pytest.param(".tflite", marks=pytest.mark.slow)])
def test_per_tensor_qat_model_goes_to_each_target_with_one_weight_scale(tmp_path, suffix):
    """prepare(per_channel=False): every weight of the QDQ model has one scale, and the file each
    target writes computes what ONNX Runtime computes on that model, on inputs the export never saw."""
    import torch

    from lowbit.deploy.export import missing_extra, target_for
    from lowbit.torch import calibrate, export_onnx, prepare
    from lowbit.zoo.digits import DigitsCNN

    if missing_extra(target_for(f"x{suffix}")):
        pytest.skip(missing_extra(target_for(f"x{suffix}")))
    torch.manual_seed(0)
    x = torch.rand(40, 1, 8, 8)
    model = prepare(DigitsCNN().eval(), "w8a8", x[:2], per_channel=False)
    assert model.lowbit.recipe.name == "w8a8-per-tensor"
    calibrate(model, [x[:32]])
    model.eval()
    export_onnx(model, x[:2], tmp_path / "qdq.onnx", check_data=x[:32], check_fusion=False)
    graph = onnx.load(tmp_path / "qdq.onnx").graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight_scales = [initializers[node.input[1]] for node in graph.node if node.op_type == "DequantizeLinear"
                     and initializers.get(node.input[0], np.zeros(0, np.float32)).dtype == np.int8]
    assert len(weight_scales) == len(model.lowbit.quantized) == 4 and all(s.size == 1 for s in weight_scales)
    np.savez(tmp_path / "x.npz", input=x[:32].numpy())
    report = export_model(tmp_path / "qdq.onnx", tmp_path / f"qat{suffix}", data=tmp_path / "x.npz", repeats=2)
    assert report.passed and report.samples == 32, report.describe()
    unseen = x[32:].numpy()
    reference = ort_reference_named(tmp_path / "qdq.onnx", "input", unseen)
    got = run_in_target(tmp_path / f"qat{suffix}", unseen)
    assert np.abs(got - reference).max() <= MAX_STEPS * step_of(reference) + 1e-6
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.875
