"""The weight-only algorithms by name: what each needs, and how it quantizes a group of weights.

Every front end reads this one table: the ONNX weight-only path (`onnx/weight_only.py`), the
PyTorch LLM path (`torch/llm/sequential.py`, `torch/llm/pretrained.py`), the CLI (`--algo`
choices and help) and the configs (`spec.WEIGHT_ALGORITHMS` is its names). The adapters own the
graph or module work (finding the layers, collecting the statistics of their inputs, folding
input scales into the op that produces the input, writing the result); an algorithm owns only the
math on `[out, in]` weight matrices, in its module under `lowbit.algorithms`, which must define

    quantize_group(matrices, statistics, spec, options, names) -> list[QuantizedWeight]

for weights that read the same input (`statistics`: that input's `HessianAccumulator`, or None
when the algorithm needs none), and, when `scales_inputs` is set,

    input_scales(matrices, statistics, spec, options) -> (scales, alpha)

the per-input-channel scales s to multiply the weights by (the adapter divides the input by s;
alpha 0 means s = 1). The module is imported on first use: this table stays importable without
torch, so the CLI starts fast.

A new algorithm is its module plus one entry in `_ALGORITHMS` below (2 files).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class WeightOptions:
    """Options an algorithm may read (each reads its own; the rest are ignored)."""

    act_order: bool = False  # GPTQ: columns by decreasing activation energy
    block_size: int = 128  # GPTQ: columns updated at once
    percdamp: float = 0.01  # GPTQ: Hessian damping, as a share of its mean diagonal
    rtn_mse: bool = False  # RTN: shrink ranges to the least squared weight error
    awq_grid: int = 20  # AWQ: alpha grid of the scale search
    awq_clip: bool = True  # AWQ: clipping search after scaling (else round to nearest)
    static_groups: bool = False  # GPTQ: group scales from the original weights, not the updated ones
    true_sequential: bool = True  # LLM blocks: statistics from the partly quantized block (else one float pass)
    statistics_dtype: str = "float64"  # LLM blocks: precision of the input Gram / Hessian sums (torch dtype name)


@dataclass(frozen=True)
class WeightAlgorithm:
    name: str
    help: str  # one phrase for the CLI's --algo help
    module: str  # the module defining quantize_group (and input_scales)
    needs_statistics: bool = False  # the Gram / Hessian of each layer's input, from calibration data
    scales_inputs: bool = False  # searches input scales the adapter folds into the input's producer
    needs_integer_grid: bool = False  # refuses non-integer weight types (fp8, binary, ...)
    options: tuple[str, ...] = ()  # the user-facing options only it takes (checked by the front ends)
    one_pass_by_default: bool = False  # LLM blocks: all statistics from one float pass (llm-compressor's GPTQ)
    statistics_dtype: str = "float64"  # LLM blocks: default precision of the input statistics' sums

    def hooks(self) -> ModuleType:
        return importlib.import_module(self.module)

    def quantize(self, matrices: list, statistics: Any, spec: Any, options: WeightOptions,
                 names: list[str]) -> list:
        """Quantize `[out, in]` matrices that read one input; see the module docstring."""
        return self.hooks().quantize_group(matrices, statistics, spec, options, names)

    def input_scales(self, matrices: list, statistics: Any, spec: Any, options: WeightOptions) -> tuple[Any, float]:
        """(scales, alpha) for weights that read one input (only when `scales_inputs`)."""
        return self.hooks().input_scales(matrices, statistics, spec, options)


_ALGORITHMS = (
    WeightAlgorithm("rtn", "round to nearest (no data)", "lowbit.algorithms.rtn"),
    WeightAlgorithm("gptq", "error-compensating rounding", "lowbit.algorithms.gptq", needs_statistics=True,
                    needs_integer_grid=True, options=("act_order",), one_pass_by_default=True,
                    statistics_dtype="float32"),
    WeightAlgorithm("awq", "activation-aware scaling", "lowbit.algorithms.awq", needs_statistics=True,
                    scales_inputs=True, needs_integer_grid=True),
)
# Read it live (`name in ALGORITHMS`, `tuple(ALGORITHMS)`): `register` adds to this very dict.
ALGORITHMS: dict[str, WeightAlgorithm] = {a.name: a for a in _ALGORITHMS}


def register(algorithm: WeightAlgorithm) -> WeightAlgorithm:
    """Add an algorithm at run time (a plugin, a test); every front end sees it from then on."""
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def algorithm_named(name: str) -> WeightAlgorithm:
    """The algorithm called `name`, or a `LowbitError` listing the known ones."""
    from lowbit.errors import LowbitError

    if name not in ALGORITHMS:
        raise LowbitError(f"unknown weight-only algorithm {name!r}; use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def option_owners(option: str) -> list[str]:
    """Names of the algorithms that take the user-facing `option` (for "--act-order is a GPTQ option")."""
    return [a.name for a in ALGORITHMS.values() if option in a.options]


def cli_help() -> str:
    """'rtn: round to nearest (no data); gptq: ...' for the --algo help."""
    return "; ".join(f"{a.name}: {a.help}" for a in ALGORITHMS.values())


__all__ = ["ALGORITHMS", "WeightAlgorithm", "WeightOptions", "algorithm_named", "cli_help", "option_owners",
           "register"]
