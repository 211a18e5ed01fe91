"""One peer quantization in its own process, so bench/field.py can time it and read its peak RSS.

    python bench/field_quantize.py {ort,ort-per-channel,nncf,nncf-transformer} MODEL CALIB_DIR OUTPUT

CALIB_DIR holds one .npz per call (keys = input names, arrays exactly as the model is fed), the
same files `lowbit quantize --calib CALIB_DIR` reads. Exit status 0 and OUTPUT written, or the
error on stderr and a non-zero status.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np


def read_calls(folder: Path) -> list[dict[str, np.ndarray]]:
    calls = []
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            calls.append({k: data[k] for k in data.files})
    return calls


def quantize_ort(model: Path, calls: list[dict], output: Path, *, per_channel: bool) -> None:
    """ORT's documented recipe: quant_pre_process, then quantize_static with its defaults (QDQ,
    QInt8 activations and weights, MinMax), per-tensor or per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calls)

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(model), str(source))
        except Exception as exc:  # the recipe's optional step; fall back to the model as shipped
            print(f"quant_pre_process failed ({type(exc).__name__}: {(str(exc).splitlines() or [repr(exc)])[0][:200]}); "
                  "quantizing the model as shipped", file=sys.stderr)
            source = model
        quantize_static(str(source), str(output), Reader(), per_channel=per_channel)


def quantize_nncf(model: Path, calls: list[dict], output: Path, *, transformer: bool) -> None:
    """nncf.quantize on the ONNX model: PERFORMANCE preset for CNNs, MIXED + TRANSFORMER for
    transformers; fast bias correction on (NNCF's default)."""
    import nncf
    import onnx

    kwargs = {"preset": nncf.QuantizationPreset.MIXED, "model_type": nncf.ModelType.TRANSFORMER} if transformer \
        else {"preset": nncf.QuantizationPreset.PERFORMANCE}
    quantized = nncf.quantize(onnx.load(str(model)), nncf.Dataset(calls), subset_size=len(calls),
                              fast_bias_correction=True, **kwargs)
    onnx.save(quantized, str(output))


def main(argv: list[str]) -> int:
    tool, model, calib, output = argv
    calls = read_calls(Path(calib))
    if tool in ("ort", "ort-per-channel"):
        quantize_ort(Path(model), calls, Path(output), per_channel=tool == "ort-per-channel")
    elif tool in ("nncf", "nncf-transformer"):
        quantize_nncf(Path(model), calls, Path(output), transformer=tool == "nncf-transformer")
    else:
        raise SystemExit(f"unknown tool {tool}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
