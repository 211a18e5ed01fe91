"""Bad input to ONNX quantization, calibration data handling, and the `lowbit quantize` CLI."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _onnx_quant_models import image_calib, small_cnn
from lowbit.cli import main
from lowbit.errors import CalibrationError, LowbitError
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.quantize import quantize_onnx, read_plan


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return small_cnn(root / "cnn.onnx")


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_fails_cleanly(cnn, tmp_path, match, **kwargs):
    before = digest(cnn)
    out = tmp_path / "out.onnx"
    with pytest.raises(LowbitError, match=match) as info:
        quantize_onnx(cnn, out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))  # nothing half-written
    assert digest(cnn) == before
    return info.value


def test_truncated_model(cnn, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(cnn.read_bytes()[:1000])
    np.savez(tmp_path / "c.npz", image=np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(LowbitError, match="not a valid ONNX file"):
        quantize_onnx(broken, tmp_path / "out.onnx", calib=tmp_path / "c.npz")
    assert not (tmp_path / "out.onnx").exists()


def test_non_onnx_file(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 50)
    with pytest.raises(LowbitError, match="ONNX"):
        quantize_onnx(text, tmp_path / "out.onnx", mode="dynamic")


def test_missing_and_extra_keys(cnn, tmp_path):
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 3, 32, 32), np.float32))
    error = assert_fails_cleanly(cnn, tmp_path, "missing key", calib=tmp_path / "c.npz")
    assert "'image'" in str(error) and "unexpected key(s) ['images']" in str(error)
    np.savez(tmp_path / "d.npz", image=np.zeros((2, 3, 32, 32), np.float32), extra=np.zeros(2))
    assert_fails_cleanly(cnn, tmp_path, r"unexpected key\(s\) \['extra'\]", calib=tmp_path / "d.npz")


def test_wrong_shape_names_the_expected_shape(cnn, tmp_path):
    np.savez(tmp_path / "c.npz", image=np.zeros((2, 3, 28, 28), np.float32))
    error = assert_fails_cleanly(cnn, tmp_path, "shape", calib=tmp_path / "c.npz")
    assert "(3, 28, 28)" in str(error) and "(3, 32, 32)" in str(error)


def test_wrong_dtype(cnn, tmp_path):
    np.savez(tmp_path / "c.npz", image=np.zeros((2, 3, 32, 32), np.int64))
    assert_fails_cleanly(cnn, tmp_path, "dtype int64", calib=tmp_path / "c.npz")


def test_nan_in_calibration_data(cnn, tmp_path):
    data = np.zeros((4, 3, 32, 32), np.float32)
    data[2, 1, 5, 5] = np.nan
    np.savez(tmp_path / "c.npz", image=data)
    error = assert_fails_cleanly(cnn, tmp_path, "NaN", calib=tmp_path / "c.npz")
    assert isinstance(error, CalibrationError) and "'image'" in str(error)


def test_empty_calibration_set_and_empty_folder(cnn, tmp_path):
    np.savez(tmp_path / "c.npz", image=np.zeros((0, 3, 32, 32), np.float32))
    assert_fails_cleanly(cnn, tmp_path, "no samples", calib=tmp_path / "c.npz")
    (tmp_path / "empty").mkdir()
    assert_fails_cleanly(cnn, tmp_path, "no .npz files", calib=tmp_path / "empty")


def test_output_equal_to_input_is_refused(cnn, tmp_path):
    before = digest(cnn)
    with pytest.raises(LowbitError, match="input model"):
        quantize_onnx(cnn, cnn, mode="dynamic")
    assert digest(cnn) == before


def test_static_without_calibration_and_unknown_exclude(cnn, tmp_path):
    assert_fails_cleanly(cnn, tmp_path, "--calib", mode="static")
    calib = image_calib(tmp_path / "c.npz", n=4)
    assert_fails_cleanly(cnn, tmp_path, "match no node", calib=calib, exclude=("NoSuchNode",))


def test_folder_of_npz_files_and_samples_limit(cnn, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    image_calib(folder / "a.npz", n=5)
    image_calib(folder / "b.npz", n=7, seed=3)
    model = onnx.load(str(cnn))
    data = CalibrationData(folder, model)
    assert data.num_samples == 12
    sizes = [b["image"].shape[0] for b in data.batches(4)]
    assert sizes == [4, 1, 4, 3]  # batches never cross files
    limited = CalibrationData(folder, model, samples=6)
    assert sum(b["image"].shape[0] for b in limited.batches(4)) == 6


def test_fixed_batch_model_gets_single_samples_and_casts_float64(tmp_path):
    w = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph)
    data = CalibrationData({"x": np.arange(10, dtype=np.float64).reshape(5, 2)}, model)
    batches = list(data.batches(16))
    assert len(batches) == 5 and all(b["x"].shape == (1, 2) and b["x"].dtype == np.float32 for b in batches)


def test_cli_end_to_end(cnn, tmp_path, capsys):
    calib = image_calib(tmp_path / "c.npz", n=16)
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(cnn), "-o", str(out), "--mode", "static", "--calib", str(calib),
                 "--calib-method", "minmax", "--exclude", "Gemm", "--samples", "8", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "cosine" in printed and "latency" in printed and "smaller" in printed
    plan = read_plan(out)
    assert plan.settings["samples"] == 8 and plan.settings["calib_method"] == "minmax"
    assert any(reason == "excluded by the user" for reason in plan.float_nodes.values())


def test_cli_user_error_is_one_line_and_nonzero(cnn, tmp_path, capsys):
    np.savez(tmp_path / "c.npz", wrong=np.zeros((2, 3, 32, 32), np.float32))
    code = main(["quantize", str(cnn), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "c.npz")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lowbit: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "q.onnx").exists()


def test_batch_dimension_declared_as_minus_one_is_free(tmp_path):
    # PaddlePaddle exports write -1 for a free dimension instead of a name.
    w = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])], [w])
    data = CalibrationData({"x": np.arange(10, dtype=np.float32).reshape(5, 2)}, helper.make_model(graph))
    assert [b["x"].shape for b in data.batches(4)] == [(4, 2), (1, 2)]
