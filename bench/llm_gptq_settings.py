"""GPTQ settings one to one (act_order, static_groups, true_sequential) on the Qwen2-shaped model of
llm_vs_llmcompressor.py, in memory (logits vs fp32). Usage: python bench/llm_gptq_settings.py '{"name": {options}}'"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_vs_llmcompressor as B  # noqa: E402

from lowbit.torch.llm.pretrained import weight_only_spec  # noqa: E402
from lowbit.torch.llm.sequential import quantize_llm  # noqa: E402


def quantize(model, calib, options: dict) -> None:
    algorithm = options.pop("algorithm", "gptq")
    quantize_llm(model, weight_only_spec(4, 128), algorithm, calib, **options)


B.score_settings(sys.argv[1:], quantize)
