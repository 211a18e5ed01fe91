"""Framework-free weight algorithms: tensors in, new weights and scales out; no graph code.

Weight layout everywhere: `[out_features, in_features]` (torch Linear), groups along the input
features. See `weight_layout`.
"""

from lowbit.algorithms.awq import AWQResult, awq_quantize, clip_search, output_error, search_awq_scales
from lowbit.algorithms.gptq import GPTQResult, gptq_quantize
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.weight_layout import QuantizedWeight
from lowbit.spec import WEIGHT_ALGORITHMS

__all__ = ["AWQResult", "GPTQResult", "HessianAccumulator", "QuantizedWeight", "WEIGHT_ALGORITHMS", "awq_quantize", "clip_search",
           "gptq_quantize", "output_error", "rtn_quantize", "search_awq_scales"]
