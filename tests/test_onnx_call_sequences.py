"""Calibration / evaluation data given as a sequence of calls (inputs not batched on axis 0)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from _control_flow_models import vad_calls, vad_like
from lowbit.errors import CalibrationError
from lowbit.onnx.calib_data import CalibrationData, InputSignature, model_inputs
from lowbit.onnx.io import load_model
from lowbit.onnx.quantize import quantize_onnx


@pytest.fixture(scope="module")
def vad(tmp_path_factory):
    return vad_like(tmp_path_factory.mktemp("calls") / "vad.onnx")


def signatures(vad):
    return model_inputs(load_model(vad))


def test_leading_call_axis_yields_one_batch_per_call(vad):
    calls = vad_calls(5, batch=2)
    data = CalibrationData(calls, signatures(vad))
    batches = list(data.batches(16))
    assert data.num_samples == 5 and data.feed_batch_size(16) == 1 and len(batches) == 5
    for i, batch in enumerate(batches):
        assert batch["x"].shape == (2, 64) and batch["state"].shape == (2, 2, 32) and batch["sr"].shape == ()
        np.testing.assert_array_equal(batch["state"], calls["state"][i])
    session = ort.InferenceSession(str(vad))
    assert session.run(None, batches[0])[1].shape == (2, 2, 32)  # the model accepts each call as is


def test_batch_free_arrays_join_a_call_sequence(vad):
    """x without a call axis gives one sample per call; a 0-d sr is the same in every call."""
    calls = vad_calls(4)
    given = {"x": calls["x"][:, 0], "state": calls["state"], "sr": np.array(8000)}
    batches = list(CalibrationData(given, signatures(vad)).batches(8))
    assert len(batches) == 4
    assert batches[2]["x"].shape == (1, 64) and int(batches[2]["sr"]) == 8000
    np.testing.assert_array_equal(batches[2]["x"][0], calls["x"][2, 0])


def test_folder_of_per_call_files(vad, tmp_path):
    calls = vad_calls(3)
    for i in range(3):  # each file: exactly one model input, no call axis
        np.savez(tmp_path / f"call_{i:02d}.npz", x=calls["x"][i], state=calls["state"][i], sr=calls["sr"][i])
    data = CalibrationData(tmp_path, signatures(vad))
    batches = list(data.batches(32))
    assert data.num_samples == 3 and len(batches) == 3
    np.testing.assert_array_equal(batches[1]["state"], calls["state"][1])
    assert batches[1]["sr"].shape == ()


def test_samples_limit_counts_calls(vad):
    data = CalibrationData(vad_calls(6), signatures(vad), samples=4)
    assert data.num_samples == 4 and len(list(data.batches(2))) == 4


def test_undecidable_layout_is_one_sentence():
    """Without declared shapes the ranks cannot tell; the error says how to give calls."""
    sigs = [InputSignature("x", np.dtype(np.float32), None), InputSignature("state", np.dtype(np.float32), None)]
    with pytest.raises(CalibrationError, match="leading call axis") as info:
        CalibrationData({"x": np.zeros((3, 64), np.float32), "state": np.zeros((2, 3, 8), np.float32)}, sigs)
    assert "\n" not in str(info.value)


def test_static_quantization_from_a_call_sequence(vad, tmp_path):
    result = quantize_onnx(vad, tmp_path / "q.onnx", calib=vad_calls(24), measure_speed=False)
    assert result.report is not None and result.plan.settings["samples"] == 24
    assert any(e.tensor == "conv_w" for e in result.plan.quantized("weight"))
    session_f, session_q = ort.InferenceSession(str(vad)), ort.InferenceSession(str(tmp_path / "q.onnx"))
    for batch in CalibrationData(vad_calls(8, seed=7), signatures(vad)).batches(1):
        ref, got = session_f.run(None, batch), session_q.run(None, batch)
        np.testing.assert_allclose(got[0], ref[0], atol=0.05)
