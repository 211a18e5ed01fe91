"""W8A8 dynamic SmoothQuant settings (scale groups, int8 grid) on the Qwen2-shaped model of
llm_vs_llmcompressor.py, in memory. Usage: python bench/llm_w8a8_settings.py '{"name": {"kinds": ["norm"], "full8": false}}'"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_vs_llmcompressor as B  # noqa: E402

import lowbit.algorithms.weight_layout as WL  # noqa: E402
from lowbit.torch.llm.smoothquant import smooth_quantize_w8a8  # noqa: E402

ORIGINAL_FULL_GRID = WL.uses_full_grid


def quantize(model, calib, options: dict) -> None:
    # "full8": also use the -128 level of symmetric int8 (an experiment, patched in for this run only).
    full8 = options.pop("full8", False)
    WL.uses_full_grid = (lambda spec: spec.dtype_info.kind == "int" and spec.dtype_info.signed and spec.symmetric
                         and not spec.narrow_range) if full8 else ORIGINAL_FULL_GRID
    options["kinds"] = tuple(options.get("kinds", ["norm", "linear"]))
    smooth_quantize_w8a8(model, calib, activations=options.pop("activations", "dynamic"), **options)


B.score_settings(sys.argv[1:], quantize, digits=6)
