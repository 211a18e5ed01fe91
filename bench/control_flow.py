"""A model whose whole network sits in a top-level If: silero VAD (PyPI silero-vad 6.2.3,
silero_vad/data/silero_vad.onnx: If on the sample rate, LSTM state [2, batch, 128] on axis 1).

Speech is synthesized offline with espeak-ng (Debian), resampled to 16 kHz and cut into 512-sample
calls with the model's own 64-sample context and state carried by the fp32 model; calibration and
evaluation are given as call sequences (leading call axis). Metric: per-call speech decision
(p > 0.5) agreement with fp32 on a different sentence, max probability error, size, time, peak RSS.

    python bench/control_flow.py MODEL.onnx static|dynamic
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def speech(text: str) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "150", text], capture_output=True, check=True).stdout
    audio = np.frombuffer(wav[44:], np.int16).astype(np.float32) / 32768  # 22050 Hz mono
    at_16k = np.arange(0, len(audio), 22050 / 16000)
    silence = np.zeros(4000, np.float32)
    return np.concatenate([silence, np.interp(at_16k, np.arange(len(audio)), audio).astype(np.float32), silence])


def calls(model: str, audio: np.ndarray) -> dict[str, np.ndarray]:
    """The calls a streaming user makes: 64 samples of context + 512 new ones, state carried over."""
    session = ort.InferenceSession(model)
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32)
    inputs, states = [], []
    for start in range(0, len(audio) - 512 + 1, 512):
        chunk = audio[None, start:start + 512]
        inputs.append(np.concatenate([context, chunk], 1))
        states.append(state)
        _, state = session.run(None, {"input": inputs[-1], "state": state, "sr": np.array(16000, np.int64)})
        context = chunk[:, -64:]
    return {"input": np.stack(inputs), "state": np.stack(states), "sr": np.full(len(inputs), 16000, np.int64)}


def main() -> None:
    model, mode = sys.argv[1], sys.argv[2]
    calib = calls(model, speech("the quick brown fox jumps over the lazy dog, one two three"))
    evaluation = calls(model, speech("speech detection should survive quantization, four five six"))
    from lowbit.onnx.quantize import quantize_onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        started = time.perf_counter()
        quantize_onnx(model, out, mode=mode, calib=calib, verify=False, threads=1)
        seconds = time.perf_counter() - started
        fp32, int8 = ort.InferenceSession(model), ort.InferenceSession(str(out))
        feeds = [{k: np.asarray(v[i]) for k, v in evaluation.items()} for i in range(len(evaluation["sr"]))]
        ref = np.array([fp32.run(None, f)[0].item() for f in feeds])
        got = np.array([int8.run(None, f)[0].item() for f in feeds])
        size = out.stat().st_size
    print(json.dumps({"mode": mode, "calls": len(feeds), "speech_calls_fp32": int((ref > 0.5).sum()),
                      "decision_agreement": round(float(np.mean((ref > 0.5) == (got > 0.5))), 4),
                      "max_prob_error": round(float(np.abs(ref - got).max()), 4),
                      "size_mb": [round(Path(model).stat().st_size / 1e6, 2), round(size / 1e6, 2)],
                      "seconds": round(seconds, 1),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


if __name__ == "__main__":
    main()
