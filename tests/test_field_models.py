"""Real pretrained models from the field, quantized with the default static run, judged on the task.

The small subset of bench/field.py's corpus whose packages are light (test extra): Silero VAD
(silero-vad: a top-level If and an LSTM, state batched on axis 1, a scalar sample-rate input) and a
captcha CRNN with a bidirectional LSTM (captcha-whisperer). Each model runs through its package's
own pre/post-processing with fp32 and with lowbit's int8 model; the task outputs must agree
(speech decision per 32 ms frame; decoded strings). Inputs are made offline: espeak-ng speech and
text rendered with Pillow.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import field_corpus as corpus  # noqa: E402

from lowbit.onnx.quantize import quantize_onnx  # noqa: E402


def quantize_and_score(name: str, tmp_path: Path, *, calib_items: int, eval_items: int, max_calls: int,
                       config=None) -> dict:
    """fp32 vs lowbit's int8 (`config`; default: static) on the package pipeline: the task metrics."""
    model = corpus.BY_NAME[name]
    source = model.path(tmp_path)
    _, feeds = corpus.run_pipeline(model, source, tmp_path, model.make_items("calib", calib_items))
    corpus.write_calls(feeds, tmp_path / "calib", max_calls)
    output = tmp_path / "int8.onnx"
    quantize_onnx(source, output, config, calib=tmp_path / "calib", threads=1, measure_speed=False)
    items = model.make_items("eval", eval_items)
    reference, _ = corpus.run_pipeline(model, source, tmp_path, items)
    candidate, _ = corpus.run_pipeline(model, output, tmp_path, items)
    return model.score(reference, candidate)


def test_frame_metric_sees_a_flipped_decision():
    """The speech metric is not blind: one frame across the threshold out of four is 75% agreement."""
    import numpy as np

    score = corpus.match_frames([np.array([0.1, 0.9, 0.8, 0.2])], [np.array([0.1, 0.9, 0.4, 0.2])], 0.5)
    assert score["frame_agreement"] == pytest.approx(0.75)
    assert score["prob_max_abs_err"] == pytest.approx(0.4)


def test_detection_metric_matches_by_label_and_iou():
    ref = [[("a", [0, 0, 10, 10]), ("b", [20, 20, 30, 30])]]
    got = [[("a", [1, 1, 10, 10]), ("a", [20, 20, 30, 30]), ("c", [50, 50, 60, 60])]]
    score = corpus.match_detections(ref, got)
    assert score["recall"] == pytest.approx(0.5)        # "b" is not matched by an "a" box
    assert score["precision"] == pytest.approx(1 / 3)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="speech needs espeak-ng (apt-get install espeak-ng)")
@pytest.mark.parametrize("name", ["silero-vad", "silero-vad-op15"])
def test_silero_vad_speech_decisions_survive_int8(name, tmp_path):
    pytest.importorskip("silero_vad")
    score = quantize_and_score(name, tmp_path, calib_items=1, eval_items=2, max_calls=32)
    assert score["speech_frames"] > 20                   # the clips hold speech: fp32 itself is meaningful
    assert score["frame_agreement"] >= 0.97, score


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="speech needs espeak-ng (apt-get install espeak-ng)")
def test_silero_vad_default_run_keeps_every_speech_decision(tmp_path):
    """The command line's default (--mode auto): the yes/no decision gate rejects static int8 (whose
    convolutions flip ~2% of the frames once the state is carried) and keeps the int8 LSTMs."""
    pytest.importorskip("silero_vad")
    from lowbit.onnx.config import AutoConfig

    score = quantize_and_score("silero-vad", tmp_path, calib_items=1, eval_items=2, max_calls=32,
                               config=AutoConfig(measure_speed=False))
    assert score["frame_agreement"] >= 0.998, score
    assert score["segment_sample_agreement"] >= 0.998, score
    assert (tmp_path / "int8.onnx").stat().st_size < 0.7 * corpus.BY_NAME["silero-vad"].path(tmp_path).stat().st_size


def test_speech_segments_follow_the_package_rule():
    """silero's own rule: speech from the first call >= 0.5 until >= 100 ms below 0.35, padded 30 ms;
    a one-call dip to 0.4 does not split a segment, a 0.4 call alone does not start one."""
    pytest.importorskip("silero_vad")
    import numpy as np

    probs = np.array([0.1] * 5 + [0.9] * 12 + [0.4] + [0.9] * 12 + [0.1] * 10 + [0.4] * 1 + [0.1] * 5)
    mask = corpus.speech_mask(probs)
    start, end = 5 * 512 - 480, 30 * 512 + 480  # 30 ms = 480 samples of padding on each side
    assert mask[start:end].all() and not mask[:start].any() and not mask[end:].any()
    score = corpus.match_speech([probs], [np.where(probs == 0.4, 0.2, probs)])
    assert score["frame_agreement"] == 1.0 and score["segments"] == [1] == score["segments_candidate"]
    assert score["segment_sample_agreement"] == 1.0


@pytest.mark.slow
def test_captcha_crnn_strings_survive_int8(tmp_path):
    pytest.importorskip("captcha_whisperer")
    score = quantize_and_score("captcha-crnn", tmp_path, calib_items=16, eval_items=32, max_calls=16)
    assert score["exact_match"] >= 0.9, score
