"""Write W8A8 (SmoothQuant) linears in the compressed-tensors `int-quantized` format.

The format (compressed-tensors v0.20, which transformers uses to load it) stores, per quantized
linear `NAME`:

- `NAME.weight`: int8 `[out, in]`, the symmetric per-output-channel grid values;
- `NAME.weight_scale`: `[out, 1]` in the model's float dtype;
- `NAME.input_scale`: `[1]`, the static per-tensor scale of the linear's input (symmetric, so
  no zero points are stored: compressed-tensors drops them for symmetric grids too); absent with
  dynamic per-token inputs, whose scales (max|x| / 127.5 per token) exist only at run time.

On CPU, transformers + compressed-tensors load this as a plain `nn.Linear` whose forward first
fake-quantizes its input, clamp(round(x / input_scale), -128, 127) * input_scale (round half to
even, in the input's dtype), then multiplies by the weight decompressed as int8 * weight_scale.
That is exactly what `lowbit.torch.llm.smoothquant.W8A8Linear` computes, so a float32 checkpoint
reproduces lowbit's own quantized model. Static per-tensor inputs were chosen over dynamic
per-token ones because they load and run on CPU as they are and need no per-token reduction at
run time (static is what SmoothQuant's fastest setting uses); dynamic per-token inputs
(`activations="dynamic"`, compressed-tensors' W8A8 dynamic scheme) follow each token's own range
and load the same way. The smoothing scales
are already folded into weights the checkpoint saves as usual: the norms' gammas ("norm" groups)
and the v_proj/up_proj rows and o_proj/down_proj columns ("linear" groups), which are then
quantized like any other weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from lowbit.numerics import QParams
from lowbit.torch.llm.compressed_checkpoint import FORMAT_VERSION, save_compressed, targets
from lowbit.torch.llm.sequential import QuantizedLinear
from lowbit.torch.llm.smoothquant import SmoothQuantResult, plain_linears

FORMAT = "int-quantized"
_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "actorder": None,
         "block_structure": None, "observer": None}


def w8a8_tensors(weights: QuantizedLinear, input_qparams: QParams | None, dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """The format's tensors (suffix -> tensor) for one W8A8 linear; `dtype` is the scales' dtype;
    `input_qparams` None: dynamic inputs, no input scale."""
    out_features = weights.values.shape[0]
    tensors = {
        "weight": weights.values.to(torch.int8).contiguous(),
        "weight_scale": torch.as_tensor(weights.qparams.scale, dtype=torch.float32).reshape(out_features, 1)
        .to(dtype).contiguous(),
    }
    if input_qparams is not None:
        tensors["input_scale"] = torch.as_tensor(input_qparams.scale, dtype=torch.float32).reshape(1).to(dtype)
    return tensors


def w8a8_quantization_config(result: SmoothQuantResult, blocks_name: str, names: Iterable[str] | None = None) -> dict:
    """config.json's `quantization_config` for the W8A8 linears of `result` inside `blocks_name`
    (`names`: those linears' full names, by default the keys of `result.weights`)."""
    group = {"targets": targets(result.weights if names is None else names, blocks_name),
             "weights": {**_INT8, "strategy": "channel", "dynamic": False},
             "input_activations": {**_INT8, "strategy": "token", "dynamic": True} if result.activations == "dynamic"
             else {**_INT8, "strategy": "tensor", "dynamic": False},
             "output_activations": None, "format": FORMAT}
    return {
        "quant_method": "compressed-tensors",
        "version": FORMAT_VERSION,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": [],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        # What lowbit did, so a user can ask the checkpoint (ignored by loaders).
        "lowbit": {"algorithm": "smoothquant" if result.smoothing else "w8a8", "activations": result.activations,
                   "alpha": result.alpha,
                   "smooth_groups": list(result.groups), "smoothed": sorted(result.smoothing)},
    }


def write_w8a8_checkpoint(model: torch.nn.Module, result: SmoothQuantResult, blocks_name: str,
                          directory: Path) -> None:
    """Save `model` (its block linears wrapped by `smooth_quantize_w8a8`) as an int-quantized
    checkpoint in `directory`. The model is unchanged afterwards."""
    with plain_linears(model) as wrappers:
        missing = sorted(set(result.weights) - set(wrappers))
        if missing:
            raise RuntimeError(f"W8A8 linears missing from the model: {missing[:3]}")
        dtype = next(model.parameters()).dtype
        layers = {name: w8a8_tensors(result.weights[name], result.inputs.get(name), dtype) for name in result.weights}
        save_compressed(model, directory, layers, w8a8_quantization_config(result, blocks_name))


__all__ = ["FORMAT", "w8a8_quantization_config", "w8a8_tensors", "write_w8a8_checkpoint"]
