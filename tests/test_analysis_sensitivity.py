"""Per-layer sensitivity (SQNR/cosine through ONNX Runtime) and the quantize-only-this-layer sweep."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _onnx_quant_models import image_calib, outlier_cnn, small_cnn, tiny_encoder, token_calib
from lowbit.analysis.sensitivity import layer_sensitivity
from lowbit.search.sweep import quantize_only_sweep
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.onnx.quantize import quantize_onnx


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity")
    float_path = small_cnn(root / "cnn.onnx")
    calib = image_calib(root / "calib.npz", n=24)
    quant = root / "cnn_int8.onnx"
    quantize_onnx(float_path, quant, calib=calib, batch_size=8, verify=False)
    return {"root": root, "float": float_path, "calib": calib, "quant": quant}


def test_input_tensor_sqnr_matches_numpy_fake_quantization(cnn):
    """The graph input's error is its Q/DQ alone: recompute it with NumPy from the stored scale."""
    report = layer_sensitivity(cnn["float"], cnn["quant"], cnn["calib"], batch_size=8)
    image = next(t for t in report.tensors if t.tensor == "image")
    model = onnx.load(str(cnn["quant"]))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale, zp = float(inits["image_scale"]), int(inits["image_zero_point"])
    x = np.load(cnn["calib"])["image"].astype(np.float64)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)  # uint8, round half to even like QuantizeLinear
    dq = (q - zp) * scale
    expected = 10 * math.log10((x ** 2).sum() / ((x - dq) ** 2).sum())
    assert image.sqnr_db == pytest.approx(expected, abs=0.01)
    assert image.local_sqnr_db == pytest.approx(expected, abs=0.01)
    cosine = (x * dq).sum() / math.sqrt((x ** 2).sum() * (dq ** 2).sum())
    assert image.cosine == pytest.approx(cosine, abs=1e-6)
    assert image.clipped == pytest.approx(np.mean((x < -zp * scale - scale / 2) | (x > (255 - zp) * scale + scale / 2)),
                                          abs=1e-9)
    assert report.samples == 24 and len(report.ranked()) == 9 and not any(t.skipped for t in report.tensors)


def test_streaming_sums_do_not_depend_on_batch_size(cnn):
    a = layer_sensitivity(cnn["float"], cnn["quant"], cnn["calib"], batch_size=5)
    b = layer_sensitivity(cnn["float"], cnn["quant"], cnn["calib"], batch_size=24)
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor == y.tensor
        assert x.sqnr_db == pytest.approx(y.sqnr_db, rel=1e-4) if x.sqnr_db is not None else y.sqnr_db is None
        assert x.cosine == pytest.approx(y.cosine, abs=1e-9)


def test_a_badly_scaled_activation_ranks_worst_and_shows_clipping(cnn, tmp_path):
    """Shrink one activation's scale 20x: most of its values clip, and the ranking must say so."""
    model = onnx.load(str(cnn["quant"]))
    target = "/depthwise/depthwise.2/Relu_output_0"
    for tensor in model.graph.initializer:
        if tensor.name == f"{target}_scale":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) / 20, tensor.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    report = layer_sensitivity(cnn["float"], broken, cnn["calib"], batch_size=8)
    worst = report.ranked()[0]
    assert worst.tensor == target
    assert worst.clipped > 0.2 and worst.local_sqnr_db < 15 and worst.cosine < 0.99
    good = {t.tensor: t for t in layer_sensitivity(cnn["float"], cnn["quant"], cnn["calib"]).tensors}
    assert good[target].sqnr_db > worst.sqnr_db + 20
    assert "clipped" in report.text()


def test_smoothquant_rescaled_tensor_is_skipped_with_reason(tmp_path):
    float_path = tiny_encoder(tmp_path / "enc.onnx")
    calib = token_calib(tmp_path / "tok.npz", n=8)
    quant = tmp_path / "enc_int8.onnx"
    with pytest.warns(Warning):  # -inf attention-mask values are reported by calibration
        quantize_onnx(float_path, quant, calib=calib, batch_size=8, verify=False, smooth=True)
    report = layer_sensitivity(float_path, quant, calib, batch_size=4)
    skipped = [t for t in report.tensors if t.skipped]
    assert skipped and all("SmoothQuant" in t.skipped for t in skipped)
    assert report.ranked() and all(0.9 < t.cosine <= 1.0 + 1e-9 for t in report.ranked())


def test_user_errors(cnn, tmp_path):
    with pytest.raises(LowbitError, match="not written by lowbit"):
        layer_sensitivity(cnn["float"], cnn["float"], cnn["calib"])
    half = tmp_path / "fp16.onnx"
    quantize_onnx(cnn["float"], half, mode="fp16", verify=False)
    with pytest.raises(LowbitError, match="fp16 mode"):
        layer_sensitivity(cnn["float"], half, cnn["calib"])
    dynamic = tmp_path / "dyn.onnx"  # only the Gemm head is int8 in dynamic mode
    quantize_onnx(cnn["float"], dynamic, mode="dynamic", verify=False)
    assert [t.nodes for t in layer_sensitivity(cnn["float"], dynamic, cnn["calib"]).tensors] == [["/head/Gemm"]]
    with pytest.raises(LowbitError, match="pass the float model it was quantized from"):
        layer_sensitivity(tiny_encoder(tmp_path / "enc.onnx"), dynamic, cnn["calib"])
    with pytest.raises(LowbitError, match="does not exist"):
        layer_sensitivity(cnn["float"], cnn["quant"], tmp_path / "missing.npz")


def test_sweep_finds_the_layer_with_an_outlier_weight(cnn, tmp_path):
    """Per-tensor int8 on a Conv with one huge weight zeroes its other weights: that layer must rank worst."""
    outlier = outlier_cnn(tmp_path / "outlier.onnx")
    quant = tmp_path / "outlier_int8.onnx"
    quantize_onnx(outlier, quant, calib=cnn["calib"], per_channel=False, batch_size=8, verify=False)
    sweep = quantize_only_sweep(outlier, quant, calib=cnn["calib"], batch_size=8, time_limit=120)
    assert len(sweep.results) == 5 and not sweep.not_reached
    assert all(r.quantized_weights == 1 for r in sweep.results) and not sweep.notes  # only that layer
    ranked = sweep.ranked()
    assert ranked[0].node == "/conv/conv.0/Conv"
    assert ranked[0].cosine < ranked[1].cosine - 0.01
    assert sweep.full_model_cosine is not None and sweep.full_model_cosine <= ranked[-1].cosine + 1e-6

    limited = quantize_only_sweep(outlier, quant, calib=cnn["calib"], batch_size=8, time_limit=1e-3)
    assert limited.results == [] and len(limited.not_reached) == 5
    assert "time limit" in limited.text()


def test_cli_analyze_json_and_missing_data(cnn, capsys):
    assert main(["analyze", str(cnn["float"]), str(cnn["quant"]), "--data", str(cnn["calib"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ranked = data["sensitivity"]["ranked"]
    assert len(ranked) == 9 and ranked[0]["sqnr_db"] <= ranked[-1]["sqnr_db"] and data["sweep"] is None
    assert main(["analyze", str(cnn["float"]), str(cnn["quant"])]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "Traceback" not in err
