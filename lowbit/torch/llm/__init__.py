"""Hugging Face transformers models: block-by-block weight quantization (RTN, GPTQ, AWQ),
SmoothQuant W8A8, and compressed-tensors checkpoints."""

from lowbit.torch.llm.architectures import ARCHITECTURES, ArchitectureMap, ScaleGroup, architecture_for, find_blocks
from lowbit.torch.llm.linears import find_linears
from lowbit.torch.llm.pretrained import PretrainedQuantization, quantize_pretrained
from lowbit.torch.llm.pretrained_w8a8 import PretrainedW8A8, smoothquant_pretrained
from lowbit.torch.llm.scaling import ScaledActivation
from lowbit.torch.llm.sequential import ALGORITHMS, LLMQuantization, QuantizedLinear, quantize_llm
from lowbit.torch.llm.smoothquant import SmoothQuantResult, W8A8Linear, smooth_quantize_w8a8

__all__ = ["ALGORITHMS", "ARCHITECTURES", "ArchitectureMap", "LLMQuantization", "PretrainedQuantization",
           "PretrainedW8A8", "QuantizedLinear", "ScaleGroup", "ScaledActivation", "SmoothQuantResult", "W8A8Linear",
           "architecture_for", "find_blocks", "find_linears", "quantize_llm", "quantize_pretrained",
           "smooth_quantize_w8a8", "smoothquant_pretrained"]
