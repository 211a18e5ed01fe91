"""lowbit: quantize neural networks and prove the result is smaller, faster and still right."""

from lowbit.errors import CalibrationError, LowbitError, SpecError
from lowbit.numerics import (
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack,
    qparams_for,
    quantize,
    quantize_dynamic,
    unpack,
)
from lowbit.spec import PRESETS, Granularity, QuantSpec, Recipe, get_recipe, per_channel, per_group

__version__ = "0.1.0"

# The entry points, imported on first use so `import lowbit` stays light (no onnxruntime, no torch):
#   lowbit.quantize_onnx(model, out, lowbit.StaticConfig(), calib=...)   ONNX models (all modes)
#   lowbit.prepare(model, "w4a8") ...                                    PyTorch QAT / PTQ
#   lowbit.quantize_pretrained(model_dir, out_dir, bits=4)               Hugging Face LLMs (weight-only)
# (`lowbit.quantize` stays the numerics primitive: one tensor to integers.)
_LAZY = {
    "quantize_onnx": "lowbit.onnx.quantize", "StaticConfig": "lowbit.onnx.config",
    "DynamicConfig": "lowbit.onnx.config", "WeightOnlyConfig": "lowbit.onnx.config",
    "Fp16Config": "lowbit.onnx.config", "AutoConfig": "lowbit.onnx.config",
    "config_from_dict": "lowbit.onnx.config", "prepare": "lowbit.torch",
    "quantize_pretrained": "lowbit.torch.llm.pretrained",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AutoConfig", "CalibrationError", "DynamicConfig", "Fp16Config", "Granularity", "LowbitError", "PRESETS",
    "QParams", "QuantSpec", "Recipe", "SpecError", "StaticConfig", "WeightOnlyConfig", "choose_qparams",
    "config_from_dict", "dequantize", "fake_quantize", "get_recipe", "pack", "per_channel", "per_group", "prepare",
    "qparams_for", "quantize", "quantize_dynamic", "quantize_onnx", "quantize_pretrained", "unpack",
]
