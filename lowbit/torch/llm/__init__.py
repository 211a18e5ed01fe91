"""Hugging Face transformers models: block-by-block weight quantization (RTN, GPTQ, AWQ)."""

from lowbit.torch.llm.architectures import ARCHITECTURES, ArchitectureMap, ScaleGroup, architecture_for, find_blocks
from lowbit.torch.llm.linears import find_linears
from lowbit.torch.llm.pretrained import PretrainedQuantization, quantize_pretrained
from lowbit.torch.llm.scaling import ScaledActivation
from lowbit.torch.llm.sequential import ALGORITHMS, LLMQuantization, QuantizedLinear, quantize_llm

__all__ = ["ALGORITHMS", "ARCHITECTURES", "ArchitectureMap", "LLMQuantization", "QuantizedLinear", "PretrainedQuantization", "ScaleGroup", "ScaledActivation",
           "architecture_for", "find_blocks", "find_linears", "quantize_llm",
           "quantize_pretrained"]
