"""Framework-free weight algorithms: tensors in, new weights and scales out; no graph code.

Weight layout everywhere: `[out_features, in_features]` (torch Linear), groups along the input
features. See `weight_layout`.

The names below are imported on first use: the ONNX static path reads only the NumPy modules
(bias correction, equalization, SmoothQuant), and importing the torch-based ones with the package
cost it 1.5-2.5 s of start-up (torch) on every `lowbit quantize`.
"""

from __future__ import annotations

import importlib
from typing import Any

from lowbit.spec import WEIGHT_ALGORITHMS

_EXPORTS = {"AWQResult": "awq", "awq_quantize": "awq", "clip_search": "awq", "output_error": "awq",
            "search_awq_scales": "awq", "GPTQResult": "gptq", "gptq_quantize": "gptq",
            "HessianAccumulator": "hessian", "rtn_quantize": "rtn", "QuantizedWeight": "weight_layout"}

__all__ = sorted([*_EXPORTS, "WEIGHT_ALGORITHMS"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
