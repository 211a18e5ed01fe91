"""Per-layer sensitivity of the PyTorch fake-quant path, against independent references: NumPy
for SQNR/cosine, independently prepared models for whole-model scores, and a deliberately
fragile layer that every ranking must put first."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from _torch_qat_models import mixed_net, trained_digits
from lowbit.analysis.torch_sensitivity import LayerSensitivity, torch_layer_sensitivity
from lowbit.errors import LowbitError
from lowbit.report.markdown import sensitivity_rows
from lowbit.spec import QuantSpec, Recipe
from lowbit.torch import calibrate, prepare
from lowbit.zoo.digits import evaluate, torch_threads

# int4 weights with ONE scale per tensor: a single huge weight pushes every other one to zero.
PER_TENSOR_W4A8 = Recipe("w4a8-per-tensor", QuantSpec("int4"), QuantSpec("int8", symmetric=False))


def _qdq(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """Textbook QuantizeLinear -> DequantizeLinear (round half to even, saturate)."""
    q = np.clip(np.rint(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(np.float32)


def _sym_int8_rows(w: np.ndarray) -> np.ndarray:
    scale = (np.abs(w).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    return _qdq(w, scale, 0, -128, 127)


def _sqnr_cos(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    sqnr = 10 * math.log10((ref @ ref) / ((ref - got) @ (ref - got)))
    return sqnr, float(ref @ got / math.sqrt((ref @ ref) * (got @ got)))


def _by_name(report) -> dict[str, LayerSensitivity]:
    return {t.tensor: t for t in report.tensors}


def _fragile_digits() -> tuple[nn.Module, list[torch.Tensor], object]:
    model, _, data = trained_digits()
    with torch.no_grad():  # one weight of the second conv, 30x the largest one
        model[3].weight[0, 0, 0, 0] = 30 * model[3].weight.abs().max()
    return model, [data.x_test[i:i + 150] for i in range(0, 450, 150)], data


def test_fragile_layer_ranks_first_locally_solo_and_all_but():
    model, batches, data = _fragile_digits()
    model.train()  # the analysis must neither use nor change the caller's mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch_threads(1):
        report = torch_layer_sensitivity(model, PER_TENSOR_W4A8, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics included
    assert all(m.training for m in model.modules())
    assert {t.tensor for t in report.tensors} == {"0", "3", "7", "11"} and report.samples == 450
    for ranking in ("local", "solo", "all_but"):
        assert report.ranked(ranking)[0].tensor == "3", ranking
    fragile = _by_name(report)["3"]
    assert fragile.local_sqnr_db < 10 and fragile.local_cosine < 0.95
    # The full model's top-1 agreement, checked on an independently prepared fake-quant model.
    with torch_threads(1):
        prepared = prepare(model.eval(), PER_TENSOR_W4A8, batches[0][:2])
        calibrate(prepared, batches)
        with torch.no_grad():
            agree = np.mean([float((prepared(b).argmax(1) == model(b).argmax(1)).float().mean()) for b in batches])
    assert report.metric == "top-1 agreement" and report.full_score == pytest.approx(agree)
    # Quantizing the fragile layer alone costs at least as much as the whole model minus it.
    assert fragile.solo_score < 0.9 and fragile.all_but_recovery == pytest.approx(
        fragile.all_but_score - report.full_score) and fragile.all_but_recovery > 0.05


def test_benign_8bit_layers_are_near_exact():
    model, _, data = trained_digits()
    batches = [data.x_test[:200], data.x_test[200:]]
    with torch_threads(1):
        report = torch_layer_sensitivity(model, "w8a8", batches, sweeps=())
    for layer in report.tensors:
        assert layer.local_sqnr_db > 30 and layer.local_cosine > 0.9995, layer
        assert layer.sqnr_db > 30 and layer.cosine > 0.9995, layer
        assert layer.clipped == 0  # calibrated on the very data analyzed
    assert report.sweeps == () and all(t.solo_score is None for t in report.tensors)
    assert report.ranked()[0].local_sqnr_db == min(t.local_sqnr_db for t in report.tensors)


def test_weight_only_sqnr_matches_numpy_locally_and_accumulated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
    x = torch.randn(70, 6)
    # Uneven batches: the sums must stream correctly. The in-place ReLU rewrites layer 0's output
    # after its hook ran: the float reference kept for the quantized pass must not change with it.
    batches = [x[:32], x[32:45], x[45:]]
    report = torch_layer_sensitivity(model, "w8a16", batches, metric="cosine")
    w1, b1, w2, b2 = (p.detach().numpy() for p in model.parameters())
    xs = x.numpy()
    hidden = xs @ w1.T + b1
    hidden_q = xs @ _sym_int8_rows(w1).T + b1
    relu = np.maximum(hidden, 0)
    out = relu @ w2.T + b2
    local_out = relu @ _sym_int8_rows(w2).T + b2  # float input, own weights quantized
    accumulated_out = np.maximum(hidden_q, 0) @ _sym_int8_rows(w2).T + b2
    layers = _by_name(report)
    for got, (sqnr, cos) in [((layers["0"].local_sqnr_db, layers["0"].local_cosine), _sqnr_cos(hidden, hidden_q)),
                             ((layers["0"].sqnr_db, layers["0"].cosine), _sqnr_cos(hidden, hidden_q)),
                             ((layers["2"].local_sqnr_db, layers["2"].local_cosine), _sqnr_cos(out, local_out)),
                             ((layers["2"].sqnr_db, layers["2"].cosine), _sqnr_cos(out, accumulated_out))]:
        assert got[0] == pytest.approx(sqnr, abs=2e-3) and got[1] == pytest.approx(cos, abs=1e-7)
    assert layers["2"].sqnr_db < layers["2"].local_sqnr_db  # upstream error adds up
    # Solo "0": only the first layer quantized, final output per-sample cosine vs float.
    solo = np.maximum(hidden_q, 0) @ w2.T + b2
    per_sample = (out * solo).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(solo, axis=1))
    assert layers["0"].solo_score == pytest.approx(per_sample.mean(), abs=1e-6)
    assert layers["0"].all_but_cosine == pytest.approx(layers["2"].solo_cosine)  # two layers: same model


def test_int8_activation_sqnr_and_clipping_match_numpy():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(40, 6)
    prepared = prepare(model, "w8a8", x[:1])
    calibrate(prepared, [x])
    wide = 3 * x  # beyond the calibrated range: the input quantizer saturates
    report = torch_layer_sensitivity(None, prepared, [wide[:25], wide[25:]], sweeps=())
    xs, w, b = wide.numpy(), model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    lo, hi = min(x.numpy().min(), 0.0), max(x.numpy().max(), 0.0)
    s_in = np.float32((hi - lo) / 255)
    zp = np.clip(np.rint(-128 - lo / s_in), -128, 127)
    s_w = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    s_b = (s_in * s_w).astype(np.float32)
    expected = _qdq(xs, s_in, zp, -128, 127) @ _sym_int8_rows(w).T + np.rint(b / s_b) * s_b
    sqnr, cos = _sqnr_cos(xs @ w.T + b, expected)
    layer = report.tensors[0]
    assert layer.local_sqnr_db == pytest.approx(sqnr, abs=2e-3) and layer.local_cosine == pytest.approx(cos, abs=1e-7)
    outside = (xs < (-128 - zp - 0.5) * s_in) | (xs > (127 - zp + 0.5) * s_in)
    assert layer.clipped == pytest.approx(outside.mean()) and layer.clipped > 0.1


def test_prepared_model_gives_the_recipe_numbers_and_stays_untouched():
    model, _, data = trained_digits()
    batches = [data.x_test[:225], data.x_test[225:]]
    with torch_threads(1):
        from_recipe = torch_layer_sensitivity(model, "w4a8", batches)
        prepared = prepare(model, "w4a8", batches[0][:2])
        calibrate(prepared, batches)
        prepared.train()
        state = {k: v.clone() for k, v in prepared.state_dict().items()}
        from_prepared = torch_layer_sensitivity(model, prepared, batches)
    assert all(torch.equal(state[k], v) for k, v in prepared.state_dict().items())
    assert prepared.training and all(getattr(m, "enabled", True) and getattr(m, "quantize_weights", True)
                                     for m in prepared.modules())
    a, b = from_recipe.to_dict(), from_prepared.to_dict()
    assert [t["tensor"] for t in a["ranked"]] == [t["tensor"] for t in b["ranked"]]
    for x, y in zip(a["ranked"], b["ranked"]):
        assert x["local_sqnr_db"] == pytest.approx(y["local_sqnr_db"]) and x["solo_score"] == y["solo_score"]
    # Only folded BatchNorm separates the prepared model's float weights from the float model.
    drift = [n for n in from_prepared.notes if "output cosine of the prepared model's float weights" in n]
    assert len(drift) == 1 and float(re.search(r"model: ([0-9.]+)", drift[0]).group(1)) > 0.99999
    assert not any("prepared model's float weights" in n for n in from_recipe.notes)


def test_user_metric_is_called_on_the_fake_quant_model():
    model, float_accuracy, data = trained_digits()
    batches = [data.x_train[:300]]
    with torch_threads(1):
        def accuracy(m: nn.Module) -> float:
            return evaluate(m, data.x_test, data.y_test)

        report = torch_layer_sensitivity(model, "w2a8", batches, metric=accuracy)
        prepared = prepare(model, "w2a8", batches[0][:2])
        calibrate(prepared, batches)
        quantized_accuracy = evaluate(prepared, data.x_test, data.y_test)
    assert report.metric == "accuracy"
    assert report.float_score == pytest.approx(float_accuracy, abs=1 / 450)  # BatchNorm folding rounding
    assert report.full_score == quantized_accuracy
    assert all(t.solo_score is not None and t.solo_cosine is None for t in report.tensors)
    assert max(t.all_but_score for t in report.tensors) >= report.full_score


def test_every_layer_kind_and_the_residual_add_are_units():
    model, ids = mixed_net()
    report = torch_layer_sensitivity(model, "w8a8", [ids[:32], ids[32:]])
    layers = _by_name(report)
    assert set(layers) == {"embed", "conv1d", "grouped", "depthwise", "add", "head"}
    assert layers["add"].kind == "Add" and layers["add"].nodes == ["add.output"]
    assert layers["embed"].nodes == ["embed.weight"] and layers["conv1d"].nodes == [
        "conv1d.weight", "conv1d.input", "conv1d.output"]
    assert not any(t.skipped for t in report.tensors)
    assert all(t.local_cosine > 0.999 for t in report.tensors)
    header, rows = sensitivity_rows(report)  # the ONNX report's table renders it as it is
    assert len(rows) == 6 and rows[0][0] == report.ranked()[0].tensor
    text = report.to_markdown()
    assert "| layer | kind | own dB" in text and text.count("\n| ") == 7


def test_bad_arguments_are_one_sentence_errors():
    model = nn.Sequential(nn.Linear(4, 2))
    x = torch.randn(8, 4)
    with pytest.raises(LowbitError, match="one-shot iterator"):
        torch_layer_sensitivity(model, "w8a8", iter([x]))
    with pytest.raises(LowbitError, match="not prepared by lowbit"):
        torch_layer_sensitivity(model, nn.Sequential(nn.Linear(4, 2)), [x])
    with pytest.raises(LowbitError, match="no range yet"):
        torch_layer_sensitivity(model, prepare(model, "w8a8", x), [x])
    with pytest.raises(LowbitError, match="unknown sweep 'solos'"):
        torch_layer_sensitivity(model, "w8a8", [x], sweeps=("solos",))
    with pytest.raises(LowbitError, match="'top1' needs one"):
        torch_layer_sensitivity(nn.Sequential(nn.Linear(4, 1)), "w8a8", [x], metric="top1")
    with pytest.raises(LowbitError, match=r"input 0 has shape \[8, 5\]"):
        torch_layer_sensitivity(model, "w8a8", [torch.randn(8, 5)], calib=[x])
    # A separate one-shot calibration iterator is fine: its first batch is not lost.
    report = torch_layer_sensitivity(model, "w8a8", [x], calib=iter([x]))
    assert report.tensors[0].clipped == 0
