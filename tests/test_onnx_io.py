"""lowbit.onnx.io: every broken input gives one LowbitError sentence; saving is atomic and safe."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import LowbitError
from lowbit.onnx.io import load_model, model_size_bytes, save_model


def matmul_model(n: int = 64) -> onnx.ModelProto:
    """y = x @ W with a 64x64 weight (16 KiB, large enough to go to external data)."""
    weight = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n) / (n * n), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [weight])
    # ir_version pinned: onnx 1.23 defaults to IR 14, newer than ONNX Runtime 1.31 accepts (13).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def run(model_or_path, x: np.ndarray) -> np.ndarray:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model(), path)
    return path


def test_roundtrip_preserves_model(model_file, tmp_path):
    model = load_model(model_file)
    out = tmp_path / "copy.onnx"
    save_model(model, out, inputs=[model_file])
    assert out.read_bytes() == model.SerializeToString()
    assert model_size_bytes(out) == out.stat().st_size == model_size_bytes(model)


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"this is a text file, not a model\n" * 20, "ONNX"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "ONNX"),
])
def test_bad_files_raise_one_sentence(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LowbitError, match=fragment) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_truncated_file_is_refused(model_file):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="not a valid ONNX"):
        load_model(model_file)


def test_directory_is_refused(tmp_path):
    with pytest.raises(LowbitError, match="directory"):
        load_model(tmp_path)


def test_checker_failure_is_reported(tmp_path):
    model = matmul_model()
    model.graph.node[0].input[1] = "not_defined"   # dangling input: the checker must object
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(LowbitError, match="not a valid ONNX model"):
        load_model(path)


def test_external_data_loads_and_missing_data_file_is_named(tmp_path):
    path = tmp_path / "ext.onnx"
    save_model(matmul_model(), path, external_data=True)
    data_file = tmp_path / "ext.onnx.data"
    assert data_file.is_file() and path.stat().st_size < 1024 < data_file.stat().st_size
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    loaded = load_model(path)
    np.testing.assert_array_equal(run(loaded, x), run(matmul_model(), x))
    assert model_size_bytes(path) == path.stat().st_size + data_file.stat().st_size

    data_file.unlink()
    with pytest.raises(LowbitError, match=r"ext\.onnx\.data.*missing"):
        load_model(path)


def test_save_refuses_to_overwrite_input(model_file):
    before = (model_file.read_bytes(), os.stat(model_file).st_mtime_ns)
    model = load_model(model_file)
    model.graph.name = "changed"
    for same in (model_file, model_file.parent / "." / model_file.name):
        with pytest.raises(LowbitError, match="input model"):
            save_model(model, same, inputs=[str(model_file)])
    assert (model_file.read_bytes(), os.stat(model_file).st_mtime_ns) == before


def test_save_refuses_hardlink_to_input(model_file):
    link = model_file.parent / "alias.onnx"
    os.link(model_file, link)
    with pytest.raises(LowbitError, match="input model"):
        save_model(load_model(model_file), link, inputs=[model_file])


def test_save_refuses_directory_and_missing_folder(tmp_path):
    with pytest.raises(LowbitError, match="directory"):
        save_model(matmul_model(), tmp_path)
    with pytest.raises(LowbitError, match="does not exist"):
        save_model(matmul_model(), tmp_path / "nope" / "m.onnx")


def test_save_leaves_no_temp_files_and_overwrites_atomically(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    save_model(matmul_model(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert load_model(out).graph.name == "mm"


def test_failed_save_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(matmul_model(), out)
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_external_save_does_not_mutate_caller_model(tmp_path):
    model = matmul_model()
    before = model.SerializeToString()
    save_model(model, tmp_path / "e.onnx", external_data=True)
    assert model.SerializeToString() == before
