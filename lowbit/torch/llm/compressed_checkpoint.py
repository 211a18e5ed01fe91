"""Write weight-only quantized linears in the compressed-tensors `pack-quantized` format.

The format (as defined by the `compressed-tensors` package, v0.20, which transformers uses to load
it) stores, per quantized linear `NAME`:

- `NAME.weight_packed`: int32 `[out, ceil(in * bits / 32)]`. Each integer q (signed grid
  [-2^(b-1), 2^(b-1) - 1]) is offset to q + 2^(b-1); element i of a row occupies bits
  [i*b, i*b + b) of the row's bit stream, little end first, so values may straddle words;
- `NAME.weight_scale`: `[out, groups]` (group), `[out, 1]` (channel) or `[1]` (tensor), in the
  model's float dtype;
- `NAME.weight_zero_point` (asymmetric only): the zero points packed the same way but along
  axis 0 (int32 `[ceil(out * bits / 32), groups]`);
- `NAME.weight_shape`: int64 `[out, in]`.

Dequantization is (q - zero_point) * scale, the same formula as `lowbit.numerics.dequantize`, so
a float32 checkpoint reproduces lowbit's quantized weights bit for bit. config.json gets a
`quantization_config` naming the quantized linears (by regex, so head models loaded through
another Auto class still match) and the grid. Writing needs neither transformers' quantizers
nor the compressed-tensors package; loading needs the latter.

`save_compressed` and `targets` are shared with the W8A8 `int-quantized` writer
(`lowbit.torch.llm.w8a8_checkpoint`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec
from lowbit.torch.llm.sequential import LLMQuantization, QuantizedLinear

FORMAT = "pack-quantized"
FORMAT_VERSION = "0.20.0"  # compressed-tensors version whose source this writer follows


def pack_int32(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Signed integers (any int dtype, 2-d) densely packed into int32 words along `packed_dim`."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"pack-quantized stores 1 to 8 bits per weight, not {bits}")
    if 32 % bits == 0 and packed_dim == 1 and values.shape[1] % (32 // bits) == 0:
        return _pack_aligned(values, bits)
    matrix = values.to(torch.int64) + (1 << (bits - 1))  # offset to unsigned, as the format does
    if packed_dim == 0:
        matrix = matrix.T
    rows, cols = matrix.shape
    padded = math.ceil(cols / 32) * 32
    matrix = torch.nn.functional.pad(matrix, (0, padded - cols)).reshape(rows, padded // 32, 32)
    words = torch.zeros(rows, padded // 32, bits + 1, dtype=torch.int64)  # one spare word for spill
    for element in range(32):
        start = element * bits
        word, offset = divmod(start, 32)
        value = matrix[..., element]
        words[..., word] |= (value << offset) & 0xFFFFFFFF
        if offset + bits > 32:
            words[..., word + 1] |= value >> (32 - offset)
    packed = words[..., :bits].reshape(rows, -1)[:, :math.ceil(cols * bits / 32)]
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # reinterpret as signed
    return (packed.T if packed_dim == 0 else packed).contiguous()


def _pack_aligned(values: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_int32` when whole words hold whole rows' values (1, 2, 4 or 8 bits, row length a
    multiple of 32 / bits): one shift-and-or per position in the word, in int32, so packing a
    7B model's linear costs a few passes over its int8 values instead of 32 over int64."""
    per_word = 32 // bits
    unsigned = (values.to(torch.int32) + (1 << (bits - 1))).reshape(values.shape[0], -1, per_word)
    packed = unsigned[..., 0].clone()
    for position in range(1, per_word):
        packed |= unsigned[..., position] << (position * bits)  # int32 shifts wrap like the format's words
    return packed.contiguous()


def _strategy(spec: QuantSpec) -> tuple[str, int | None]:
    kind = spec.granularity.kind
    if kind == "group":
        return "group", spec.granularity.group_size
    if kind in ("channel", "tensor"):
        return kind, None
    raise LowbitError(f"compressed-tensors weights are per-tensor, per-channel or per-group, not {kind}")


def check_exportable(spec: QuantSpec, in_features: dict[str, int]) -> None:
    """Raise a LowbitError before any work if `spec` on these linears (name -> input width) has no
    pack-quantized form: integer grids of 1..8 bits, groups that divide every input width."""
    info = spec.dtype_info
    if info.kind != "int" or not info.signed or info.bits > 8:
        raise LowbitError(f"the compressed-tensors pack-quantized format stores signed int2..int8 weights, "
                          f"not {spec.dtype}; choose --weight-bits 2, 3, 4 or 8")
    strategy, group_size = _strategy(spec)
    if strategy == "group":
        uneven = sorted({width for width in in_features.values() if width % group_size})
        if uneven:
            raise LowbitError(f"group size {group_size} does not divide the input width of some linear layers "
                              f"({', '.join(map(str, uneven))}), which compressed-tensors requires; use a group "
                              "size that divides it (or --group-size 0 for one scale per output channel)")


def compressed_tensors(layer: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The format's tensors (suffix -> tensor) for one quantized linear; `dtype` is the scales' dtype."""
    spec = layer.qparams.spec
    bits = spec.bits
    out_features, in_features = layer.values.shape
    strategy, _ = _strategy(spec)
    scale = torch.as_tensor(layer.qparams.scale, dtype=torch.float32)
    scale = scale.reshape(out_features, -1) if strategy != "tensor" else scale.reshape(1)
    tensors = {
        "weight_packed": pack_int32(layer.values, bits),
        "weight_scale": scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not spec.symmetric:
        zero_point = torch.as_tensor(layer.qparams.zero_point).to(torch.int32)
        if strategy == "tensor":
            raise LowbitError("compressed-tensors packs asymmetric zero points per channel or per group only; "
                              "use --symmetric or a group size")
        tensors["weight_zero_point"] = pack_int32(zero_point.reshape(out_features, -1), bits, packed_dim=0)
    return tensors


def quantization_config(result: LLMQuantization, blocks_name: str, names: Iterable[str] | None = None) -> dict:
    """config.json's `quantization_config` for the linears `result` quantized inside `blocks_name`
    (`names`: those linears' full names, by default the keys of `result.layers`)."""
    spec = result.spec
    strategy, group_size = _strategy(spec)
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
               "group_size": group_size, "dynamic": False, "actorder": None, "block_structure": None,
               "observer": None}
    if not spec.symmetric:
        weights["zp_dtype"] = "torch.int8"
    return {
        "quant_method": "compressed-tensors",
        "version": FORMAT_VERSION,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": targets(result.layers if names is None else names, blocks_name),
                                      "weights": weights,
                                      "input_activations": None, "output_activations": None, "format": FORMAT}},
        "ignore": [],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        # What lowbit did, so a user can ask the checkpoint (ignored by loaders).
        "lowbit": {"algorithm": result.algorithm, "spec": spec.to_dict(),
                   "awq_scaled": sorted(result.awq_scales), "gptq_damping": result.damping},
    }


def targets(names: Iterable[str], blocks_name: str) -> list[str]:
    """One regex per linear position inside a block ("re:(.*\\.)?model\\.layers\\.\\d+\\.mlp\\.up_proj$"):
    every block is quantized, and the optional prefix lets e.g. `bert.` head models match too."""
    prefix = re.escape(blocks_name) + r"\.\d+\."
    relative = sorted({name[len(blocks_name) + 1:].split(".", 1)[1] for name in names})
    return [f"re:(.*\\.)?{prefix}{re.escape(name)}$" for name in relative]


def write_checkpoint(model: torch.nn.Module, result: LLMQuantization, blocks_name: str, directory: Path) -> None:
    """Save `model` (holding the dequantized weights) as a pack-quantized checkpoint in `directory`."""
    dtype = next(model.parameters()).dtype
    layers = {name: compressed_tensors(layer, dtype) for name, layer in result.layers.items()}
    save_compressed(model, directory, layers, quantization_config(result, blocks_name))


def save_compressed(model: torch.nn.Module, directory: Path, layers: dict[str, dict[str, torch.Tensor]],
                    config: dict) -> None:
    """Save `model` with transformers, then replace each linear `NAME`'s float weight by its
    compressed tensors (`layers[NAME]`: suffix -> tensor, e.g. "weight_packed"; a suffix "weight"
    takes the float weight's place), shard by shard, and add `config` as config.json's
    `quantization_config`."""
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    pending = {f"{name}.weight": name for name in layers}
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(shard)
        hits = [key for key in tensors if key in pending]
        if not hits:
            continue
        for key in hits:
            name = pending.pop(key)
            del tensors[key]
            if index is not None:
                index["weight_map"].pop(key, None)
            for suffix, tensor in layers[name].items():
                tensors[f"{name}.{suffix}"] = tensor
                if index is not None:
                    index["weight_map"][f"{name}.{suffix}"] = shard.name
        save_file(tensors, shard, metadata={"format": "pt"})
    if pending:
        raise RuntimeError(f"quantized linears missing from the saved checkpoint: {sorted(pending)[:3]}")
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    config_path = directory / "config.json"
    model_config = json.loads(config_path.read_text())
    model_config["quantization_config"] = config
    config_path.write_text(json.dumps(model_config, indent=2, sort_keys=True))
