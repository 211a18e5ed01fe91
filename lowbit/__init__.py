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

__all__ = [
    "CalibrationError", "Granularity", "LowbitError", "PRESETS", "QParams", "QuantSpec", "Recipe",
    "SpecError", "choose_qparams", "dequantize", "fake_quantize", "get_recipe", "pack",
    "per_channel", "per_group", "qparams_for", "quantize", "quantize_dynamic", "unpack",
]
