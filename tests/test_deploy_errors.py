"""Bad inputs to `lowbit export`: one sentence, exit status 2, the input untouched, nothing written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import image_calib, small_cnn
from lowbit.cli import main
from lowbit.deploy import export as deploy_export
from lowbit.onnx.quantize import quantize_onnx


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("deploy_errors")
    fp32 = small_cnn(root / "fp32.onnx")
    quantize_onnx(fp32, root / "int8.onnx", mode="static", calib=image_calib(root / "calib.npz", n=8),
                  measure_speed=False)
    return fp32, root / "int8.onnx"


def run_export(capsys, *argv: str) -> tuple[int, str]:
    code = main(["export", *argv])
    return code, capsys.readouterr().err


def assert_one_sentence(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def assert_nothing_written(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before  # no output, no staging folder


def test_float_model_is_refused(models, tmp_path, capsys):
    fp32, _ = models
    code, err = run_export(capsys, str(fp32), "-o", str(tmp_path / "out.ort"))
    assert code == 2
    assert_one_sentence(err, "float model", "lowbit quantize")
    assert_nothing_written(tmp_path, set())


def qdq_model_with(op_type: str, path: Path) -> Path:
    """x -> Q -> DQ -> op -> y: lowbit's layout around an op export does not convert."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node(op_type, ["d"], ["y"], name="the_op")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_unsupported_op_is_named(tmp_path, capsys):
    model = qdq_model_with("Erf", tmp_path / "erf.onnx")
    code, err = run_export(capsys, str(model), "-o", str(tmp_path / "out.tflite"))
    if importlib.util.find_spec("litert_torch") is None:
        assert code == 2 and "lowbit[litert]" in err
        return
    assert code == 2
    assert_one_sentence(err, "Erf", "the_op", "supported ops")
    assert_nothing_written(tmp_path, {"erf.onnx"})


@pytest.mark.parametrize("suffix, extra", [(".pte", "executorch"), (".tflite", "litert")])
def test_missing_extra_names_the_pip_extra(models, tmp_path, capsys, monkeypatch, suffix, extra):
    _, int8 = models
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("executorch", "litert_torch") else real(name, *a))
    code, err = run_export(capsys, str(int8), "-o", str(tmp_path / f"out{suffix}"))
    assert code == 2
    assert_one_sentence(err, f"pip install 'lowbit[{extra}]'")
    assert_nothing_written(tmp_path, set())


def test_output_equal_to_input_is_refused(models, tmp_path, capsys):
    _, int8 = models
    same = tmp_path / "model.ort"  # an ONNX file that happens to carry the target's extension
    same.write_bytes(int8.read_bytes())
    code, err = run_export(capsys, str(same), "-o", str(same))
    assert code == 2
    assert_one_sentence(err, "is the input model")
    assert same.read_bytes() == int8.read_bytes()


def test_unknown_extension_is_refused(models, tmp_path, capsys):
    _, int8 = models
    code, err = run_export(capsys, str(int8), "-o", str(tmp_path / "out.tfl"))
    assert code == 2
    assert_one_sentence(err, ".ort", ".pte", ".tflite")
    assert_nothing_written(tmp_path, set())


def test_per_group_weight_only_model_is_refused_by_executorch_with_what_it_runs(tmp_path, capsys):
    if importlib.util.find_spec("executorch") is None:
        pytest.skip("needs lowbit[executorch]")
    # lowbit's default weight-only layout: MatMulNBits, 4 bits, one scale per 16 inputs (2 per row)
    packed = numpy_helper.from_array(np.full((4, 2, 8), 0x98, np.uint8), "w")
    scale = numpy_helper.from_array(np.full(8, 0.1, np.float32), "ws")
    node = helper.make_node("MatMulNBits", ["x", "w", "ws"], ["y"], domain="com.microsoft", K=32, N=4, bits=4,
                            block_size=16)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [packed, scale])
    model = tmp_path / "wo.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), model)
    code, err = run_export(capsys, str(model), "-o", str(tmp_path / "out.pte"))
    assert code == 2
    assert_one_sentence(err, "per-group", "one scale per output channel", "--group-size 0", ".ort")
    assert_nothing_written(tmp_path, {"wo.onnx"})


def test_a_converter_failure_leaves_no_half_written_file(models, tmp_path, capsys, monkeypatch):
    _, int8 = models
    from lowbit.deploy import ort_mobile

    def fail_after_writing(graph, model, example, path, *, as_float=False):
        Path(path).write_bytes(b"half")
        raise RuntimeError("converter crashed mid-way")

    monkeypatch.setattr(ort_mobile, "write", fail_after_writing)
    code, err = run_export(capsys, str(int8), "-o", str(tmp_path / "out.ort"))
    assert code == 2
    assert_one_sentence(err, "converter crashed mid-way", "ORT Mobile")
    assert_nothing_written(tmp_path, set())
    assert deploy_export.TARGETS[".ort"] == "lowbit.deploy.ort_mobile"
