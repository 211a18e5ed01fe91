"""Fewer model copies: preprocess consuming a model the caller hands over, CalibrationData keeping
only the input signatures. Each must give exactly what the full-copy path gave."""

from __future__ import annotations

import numpy as np

from _tiny_models import tiny_attention_onnx
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.preprocess import preprocess


def test_preprocess_without_copy_gives_the_same_model():
    model = tiny_attention_onnx()
    kept = model.SerializeToString()
    copied = preprocess(model)
    assert model.SerializeToString() == kept
    consumed = preprocess(model, copy=False)  # the caller hands `model` over
    assert consumed.SerializeToString() == copied.SerializeToString()


def test_calibration_data_from_signatures_batches_like_from_model():
    model = tiny_attention_onnx()
    rng = np.random.default_rng(2)
    data = {"input_ids": rng.integers(0, 50, (5, 7)), "attention_mask": np.ones((5, 7), np.int64)}
    from_model = list(CalibrationData(data, model).batches(2))
    from_signatures = list(CalibrationData(data, model_inputs(model)).batches(2))
    assert len(from_model) == len(from_signatures) == 3
    for a, b in zip(from_model, from_signatures):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].dtype == b[key].dtype
