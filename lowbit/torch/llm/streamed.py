"""Quantize a Hugging Face checkpoint bigger than memory, one block at a time.

The model is built without weights (parameters on the meta device; buffers such as rotary
frequencies are real, they are computed from the config). `quantize_llm` then walks the blocks
with a `ShardStore`: just before a block is quantized its weights are read from the input's
safetensors shards (each tensor read from its offset straight into memory of its own, so no
mapping of the multi-GB shard lingers in resident memory); right after, its quantized
tensors are written to an output shard of their own and the block goes back to the meta device.
The tensors outside the blocks (embeddings, final norm, head) are copied one at a time.

Peak memory is one block in float (plus its float32 working copies), the calibration
activations at one block boundary (in and out), GPTQ/AWQ statistics for one group of linears,
and a fixed overhead (Python, torch, the embeddings when calibration text runs through them);
it does not grow with depth. The float model never exists whole, so output fidelity against it
is not measured on this path.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.memory import LIBC, release_freed_memory
from lowbit.torch.llm.compressed_checkpoint import compressed_tensors
from lowbit.torch.llm.hf_io import available_memory
from lowbit.torch.llm.sequential import LLMQuantization

INDEX = "model.safetensors.index.json"


@contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory); buffers stay
    real, since models compute some of them (rotary frequencies) in their constructors."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(model_class: Any, config: Any) -> nn.Module:
    """`model_class(config)` with every parameter on the meta device, in eval mode."""
    with empty_weights(), torch.device("cpu"):
        model = model_class._from_config(config) if hasattr(model_class, "_from_config") else model_class(config)
    return model.eval()


class ShardReader:
    """Which safetensors file of a checkpoint holds each tensor; reads tensors one at a time."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: model_dir / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(model_dir.glob("*.safetensors")):
                with open(path, "rb") as handle:
                    header, _ = _header(handle, path)
                self.files.update({name: path for name in header if name != "__metadata__"})
        for path in set(self.files.values()):
            if path.resolve().parent != model_dir.resolve() or not path.is_file():
                raise LowbitError(f"{model_dir / INDEX} names {path.name}, which is not a file in that folder; "
                                  "fix the index or re-save the checkpoint")

    def locate(self, name: str) -> tuple[Path, dict[str, Any], int]:
        """Where tensor `name` lies: its file, its header entry and where that file's data starts."""
        path = self.files[name]
        with open(path, "rb") as handle:
            header, start = _header(handle, path)
        return path, header[name], start

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each read straight from its file into memory of its own (no
        mapping of the file stays behind, so resident memory holds exactly these tensors)."""
        missing = [name for name in names if name not in self.files]
        if missing:
            raise LowbitError(f"the checkpoint has no tensor {missing[0]!r}, which the model built from config.json "
                              "needs; check that the weights belong to this config")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        tensors = {}
        for path, in_file in by_file.items():
            with open(path, "rb") as handle:
                header, start = _header(handle, path)
                for name in in_file:
                    tensors[name] = _read_tensor(handle, start, header[name], path, name)
        return tensors


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def _header(handle, path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (8-byte little-endian length, then JSON) and where data starts."""
    try:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    except (ValueError, UnicodeDecodeError):
        raise LowbitError(f"{path} is not a safetensors file (its header does not parse); re-save the checkpoint "
                          "with safe_serialization=True") from None
    return header, 8 + length


def _read_tensor(handle, start: int, entry: dict[str, Any], path: Path, name: str) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
    begin, end = entry["data_offsets"]
    if dtype is None:
        raise LowbitError(f"{name} in {path.name} has dtype {entry.get('dtype')}, which lowbit does not read; "
                          "save the weights as float32, float16 or bfloat16")
    tensor = torch.empty(entry["shape"], dtype=dtype)
    if tensor.numel() * tensor.element_size() != end - begin:
        raise LowbitError(f"{name} in {path.name} has {end - begin} bytes for shape {entry['shape']}; the file is "
                          "damaged, re-save the checkpoint")
    handle.seek(start + begin)
    if end > begin and handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
        raise LowbitError(f"{path.name} ends before the data of {name}; the file is truncated, re-save the checkpoint")
    return tensor


def assign(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Replace `module`'s parameters by `tensors[prefix + name]` (no copy)."""
    for name, param in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(tensors[prefix + name], requires_grad=False)


class ShardStore:
    """A `sequential.BlockStore` that reads blocks from `reader` and writes each quantized block
    to its own safetensors shard in `directory`, then frees it."""

    def __init__(self, reader: ShardReader, directory: Path, blocks_name: str, n_blocks: int,
                 calibration_only: list[nn.Module] | None = None) -> None:
        self.reader = reader
        self.calibration_only = calibration_only or []  # freed once block 0's inputs are captured
        self.directory = directory
        self.blocks_name = blocks_name
        self.n_files = n_blocks + 1
        self.weight_map: dict[str, str] = {}
        self.quantized: list[str] = []  # names of the linears written
        self.bytes_written = 0

    def load(self, index: int, block: nn.Module) -> None:
        if self.calibration_only:  # the embeddings have done their work by now
            for module in self.calibration_only:
                module.to("meta")
            self.calibration_only = []
            release_freed_memory()
        prefix = f"{self.blocks_name}.{index}."
        assign(block, self.reader.read([prefix + name for name, _ in block.named_parameters()]), prefix)

    def save(self, index: int, block: nn.Module, result: LLMQuantization) -> None:
        """Write the weight-only quantized `block` (pack-quantized) and free it and its
        entries of `result.layers`."""
        prefix = f"{self.blocks_name}.{index}."
        dtype = next(block.parameters()).dtype
        layers = {name: compressed_tensors(result.layers.pop(prefix + name), dtype)
                  for name, _ in block.named_modules() if prefix + name in result.layers}
        self.save_block(index, block, layers)

    def save_block(self, index: int, block: nn.Module, layers: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write `block`'s state dict to its shard, each linear `NAME` of `layers` (names inside
        the block) stored as its format's tensors (`layers[NAME]`: suffix -> tensor, "weight"
        taking the float weight's place), then put the block back on the meta device."""
        prefix = f"{self.blocks_name}.{index}."
        tensors = {}
        for name, tensor in block.state_dict().items():
            linear = name[:-len(".weight")] if name.endswith(".weight") else None
            if linear not in layers:
                tensors[prefix + name] = tensor.contiguous()
                continue
            self.quantized.append(prefix + linear)
            for suffix, value in layers[linear].items():
                tensors[f"{prefix}{linear}.{suffix}"] = value
        self._write(tensors, index + 1)
        block.to("meta")
        release_freed_memory()

    def copy_rest(self) -> None:
        """Copy the tensors outside the blocks (embeddings, final norm, head) into the last shard,
        byte for byte in chunks: the embedding tables and the head (the biggest tensors of many
        checkpoints) never sit in memory whole."""
        names = sorted(name for name in self.reader.files if not name.startswith(self.blocks_name + "."))
        sources = {name: self.reader.locate(name) for name in names}
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (_, entry, _) in sources.items():
            begin, end = entry["data_offsets"]
            header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        file = f"model-{self.n_files:05d}-of-{self.n_files:05d}.safetensors"
        with open(self.directory / file, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            for name, (path, entry, start) in sources.items():
                begin, end = entry["data_offsets"]
                with open(path, "rb") as source:
                    source.seek(start + begin)
                    _copy_bytes(source, out, end - begin, path, name)
        self.weight_map.update({name: file for name in names})
        self.bytes_written += (self.directory / file).stat().st_size

    def _write(self, tensors: dict[str, torch.Tensor], number: int) -> None:
        from safetensors.torch import save_file

        file = f"model-{number:05d}-of-{self.n_files:05d}.safetensors"
        save_file(tensors, self.directory / file, metadata={"format": "pt"})
        self.weight_map.update({name: file for name in tensors})
        self.bytes_written += (self.directory / file).stat().st_size

    def finish(self, model_dir: Path, config_entry: dict[str, Any]) -> None:
        """Write the index and config.json (the input's, plus `config_entry` as its
        quantization_config)."""
        total = sum(path.stat().st_size for path in self.directory.glob("*.safetensors"))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2))
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"] = config_entry
        (self.directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        generation = model_dir / "generation_config.json"
        if generation.is_file():
            (self.directory / generation.name).write_text(generation.read_text())


COPY_CHUNK = 16 << 20


def _copy_bytes(source, out, count: int, path: Path, name: str) -> None:
    while count > 0:
        chunk = source.read(min(count, COPY_CHUNK))
        if not chunk:
            raise LowbitError(f"{path.name} ends before the data of {name}; the file is truncated, re-save the checkpoint")
        out.write(chunk)
        count -= len(chunk)


MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def map_large_allocations() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own memory mapping, returned
    to the OS the moment it is freed. By default glibc raises that threshold after each large
    free (up to 32 MiB), so a block's many temporaries of a few MiB to 32 MiB (GPTQ's weight
    copies, Hessian factors, activations) pile up on the heap: measured on 2048-wide blocks,
    resident memory grew by ~600 MB within each block until the block's end. Fixing the
    threshold also turns off that adjustment. Call it before the large work starts (before
    tokenizing the calibration text): large requests are still served from free chunks already
    on the heap, and measured on the same blocks, setting it after tokenization left ~110 MB more
    resident within each block (process peak 1306 -> 1009 MB). A no-op where the C library is
    not glibc."""
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def stream_blocks(input_bytes: int, low_memory: bool | None) -> bool:
    """Whether to quantize block by block from the shards: as asked, or (None) when the weights
    take more than half the available memory. When streaming, glibc is set up at once
    (`map_large_allocations`: before tokenizing, so the heap keeps none of its first large frees)."""
    if low_memory is None:
        memory = available_memory()
        low_memory = memory is not None and input_bytes > memory / 2
    if low_memory:
        map_large_allocations()
    return low_memory


def materialize_outside_blocks(model: nn.Module, blocks_name: str, reader: ShardReader) -> list[nn.Module]:
    """Load the parameters outside the blocks but the output head (what runs before block 0:
    embeddings, and small norms) so calibration text can reach the first block. Returns the
    modules loaded, to be freed once the first block's inputs are captured."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {prefix for prefix, module in model.named_modules(remove_duplicate=False) if module is head}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and head is not None and embeddings.weight is head.weight:
        head_names = set()  # tied: the head's weight is the input embeddings', which calibration needs
    outside = [name for name, _ in model.named_parameters(remove_duplicate=False)
               if not name.startswith(blocks_name + ".") and name.rpartition(".")[0] not in head_names]
    present = [name for name in outside if name in reader.files]
    tensors = reader.read(present)
    owners = []
    for name in present:
        owner_name, _, leaf = name.rpartition(".")
        owners.append(model.get_submodule(owner_name))
        owners[-1]._parameters[leaf] = nn.Parameter(tensors[name], requires_grad=False)
    return owners


__all__ = ["ShardReader", "ShardStore", "assign", "empty_weights", "map_large_allocations", "stream_blocks",
           "materialize_outside_blocks", "release_freed_memory", "skeleton"]
