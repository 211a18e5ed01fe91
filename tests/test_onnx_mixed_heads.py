"""Outputs whose parts mix ranges (detector boxes in pixels next to class probabilities)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from _detector_models import detections_kept, mixed_head
from lowbit.onnx.quantize import quantize_onnx


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return mixed_head(tmp_path_factory.mktemp("heads") / "head.onnx")


def test_detections_survive_a_head_that_mixes_pixels_and_probabilities(head, tmp_path):
    rng = np.random.default_rng(0)
    calib = {"image": rng.standard_normal((32, 3, 32, 32)).astype(np.float32)}
    images = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    out = tmp_path / "q.onnx"
    result = quantize_onnx(head, out, calib=calib, verify=False)
    reference = ort.InferenceSession(str(head)).run(None, {"image": images})[0]
    got = ort.InferenceSession(str(out)).run(None, {"image": images})[0]
    assert (reference[..., 4:] > 0.05).sum() > 100  # the fp32 model detects plenty
    # One per-tensor scale for 0-400 px would leave the 0-1 scores a single level (0 kept before).
    assert detections_kept(reference, got) >= 0.95
    assert len(np.unique(got[..., 4:])) > 1000
    reasons = " ".join(result.plan.float_nodes.values())
    assert "span ranges" in reasons
    # The backbone stays int8: only the mixed parts are float.
    assert sum(1 for e in result.plan.quantized("weight")) >= 2
