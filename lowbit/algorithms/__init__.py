"""Framework-free weight algorithms: tensors in, new weights and scales out; no graph code.

Weight layout everywhere: `[out_features, in_features]` (torch Linear), groups along the input
features. See `weight_layout`.

The names below are imported on first use: the torch-based ones (AWQ, GPTQ, RTN, the Hessian)
would otherwise import torch into every ONNX run that only needs the numpy modules here
(`bias_correction`, `equalization`), 2-4 s and ~160 MB resident.
"""

import importlib

_MODULE_OF = {"AWQResult": "awq", "awq_quantize": "awq", "clip_search": "awq", "output_error": "awq",
              "search_awq_scales": "awq", "GPTQResult": "gptq", "gptq_quantize": "gptq",
              "HessianAccumulator": "hessian", "rtn_quantize": "rtn", "QuantizedWeight": "weight_layout"}

__all__ = ["AWQResult", "GPTQResult", "HessianAccumulator", "QuantizedWeight", "WEIGHT_ALGORITHMS", "awq_quantize", "clip_search",
           "gptq_quantize", "output_error", "rtn_quantize", "search_awq_scales"]


def __getattr__(name: str):
    if name == "WEIGHT_ALGORITHMS":
        from lowbit.spec import WEIGHT_ALGORITHMS

        return WEIGHT_ALGORITHMS
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"lowbit.algorithms.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'lowbit.algorithms' has no attribute {name!r}")
