"""Packed safetensors checkpoints, pruning and distillation of prepared models."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from _torch_qat_models import mixed_net, trained_digits
from lowbit.errors import LowbitError
from lowbit.torch import calibrate, distillation_loss, export_onnx, load_packed, prepare, prune, save_packed, sparsity_of
from lowbit.zoo.digits import torch_threads, train_classifier


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8:8 + length])


@pytest.mark.parametrize("recipe, bits", [("w8a8", 8), ("w4a8", 4), ("w2a8", 2), ("w1a8", 1), ("ternary", 2)])
def test_checkpoint_size_follows_the_bit_width_and_loads_back_exactly(recipe, bits, tmp_path):
    model, _, data = trained_digits()
    prepared = prepare(model, recipe, data.x_train[:2], keep_int8="none")  # every layer at `bits`
    calibrate(prepared, [data.x_train[:256]])
    path = save_packed(prepared, tmp_path / "m.safetensors")
    length, header = _header(path)
    # Every quantized weight occupies exactly ceil(count * bits / 8) bytes in the file.
    for name, layer in (("0", prepared[0]), ("11", prepared[11])):
        start, end = header[f"{name}.weight.packed"]["data_offsets"]
        assert end - start == math.ceil(layer.weight.numel() * bits / 8)
    # Nothing else of size: biases, scales and activation parameters are all that remain.
    data_bytes = path.stat().st_size - 8 - length
    weights = sum(p.weight.numel() for p in (prepared[0], prepared[3], prepared[7], prepared[11]))
    assert data_bytes < weights * bits / 8 + 2500
    loaded = load_packed(path, model)
    assert torch.equal(loaded(data.x_test), prepared(data.x_test))


def test_checkpoint_of_mixed_layers_and_bad_files(tmp_path):
    model, ids = mixed_net()
    prepared = prepare(model, "w4a16-g32", ids[:2])
    path = save_packed(prepared, tmp_path / "m.safetensors")
    assert torch.equal(load_packed(path, model)(ids), prepared(ids))
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(LowbitError, match="not a readable safetensors file"):
        load_packed(tmp_path / "bad.safetensors", model)
    with pytest.raises(LowbitError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors", model)
    with pytest.raises(LowbitError, match="saved architecture"):
        load_packed(path, torch.nn.Sequential(torch.nn.Embedding(20, 8)))


def test_unstructured_pruning_survives_qat_export_and_checkpoint(tmp_path):
    model, _, data = trained_digits()
    prepared = prepare(model, "w4a8", data.x_train[:2])
    calibrate(prepared, [data.x_train[:256]])
    reached = prune(prepared, 0.6)
    assert all(abs(v - 0.6) < 0.01 for v in reached.values())
    # The pruned weights are the smallest ones of each layer.
    w = prepared[7].weight.detach().abs().flatten()
    mask = prepared[7].weight_mask.flatten()
    assert w[mask == 0].max() <= w[mask == 1].min()
    with torch_threads(1):
        train_classifier(prepared, data.x_train[:512], data.y_train[:512], epochs=1, lr=3e-3)
    assert all(abs(v - 0.6) < 0.01 for v in sparsity_of(prepared).values())
    result = export_onnx(prepared, data.x_train[:2], tmp_path / "m.onnx", check_data=data.x_test)
    assert result.parity.passed
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(result.path).graph.initializer}
    assert (stored["7.export_weight"] == 0).mean() >= 0.59
    loaded = load_packed(save_packed(prepared, tmp_path / "m.safetensors"), model)
    assert sparsity_of(loaded) == sparsity_of(prepared)


def test_two_of_four_pruning_pattern():
    model, _, data = trained_digits()
    prepared = prepare(model, "w8a16", data.x_train[:2])
    reached = prune(prepared, pattern="2:4")
    assert "not a multiple of 4" in reached["0"]  # 1 x 3 x 3 = 9 weights per row
    for name in ("3", "7", "11"):
        assert reached[name] == 0.5
        weight, _ = getattr(prepared, name).quantized_weight()
        blocks = weight.detach().reshape(weight.shape[0], -1, 4)
        assert ((blocks == 0).sum(-1) >= 2).all()
    with pytest.raises(LowbitError, match="unknown pruning pattern"):
        prune(prepared, pattern="4:8")


def test_distillation_loss_against_the_formula():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    t = 3.0
    p = np.exp(teacher.numpy() / t)
    p /= p.sum(1, keepdims=True)
    q = np.exp(student.numpy() / t)
    q /= q.sum(1, keepdims=True)
    expected = (p * np.log(p / q)).sum(1).mean() * t * t
    assert float(distillation_loss(student, teacher, t)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)
    ce = float(torch.nn.functional.cross_entropy(student, labels))
    assert float(distillation_loss(student, teacher, t, labels, alpha=0.25)) == pytest.approx(
        0.25 * expected + 0.75 * ce, rel=1e-5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(student, teacher, t).backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(LowbitError, match="temperature"):
        distillation_loss(student, teacher, 0.0)
