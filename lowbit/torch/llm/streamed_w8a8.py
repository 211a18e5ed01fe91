"""SmoothQuant W8A8 of a checkpoint bigger than memory, one block at a time.

The in-memory path (`smooth_quantize_w8a8`) records every block linear's input max |x| in one
float pass of the whole model, smooths, then quantizes. Here the same happens block by block
through a `streamed.ShardStore`: block 0's calibration inputs are captured through the
embeddings; each block in turn is read from the shards and run in float over the calibration
batches (recording its linears' input ranges, and its outputs: the next block's inputs, as the
float model computes them), then smoothed and quantized with those ranges, written as
int-quantized tensors and freed. Ranges, smoothing scales and integers are the in-memory path's,
so the checkpoint is the same tensor for tensor. Plain dynamic W8A8 (no smoothing) needs no
calibration: each block is only read, quantized and written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lowbit.progress import progress
from lowbit.torch.llm.architectures import ProducerKind, architecture_for, find_blocks
from lowbit.torch.llm.linears import find_linears
from lowbit.torch.llm.sequential import BlockInput, capture_block_inputs, run_block
from lowbit.torch.llm.smoothquant import (SmoothQuantResult, plain_linears, quantize_w8a8, recording_input_absmax,
                                          smooth_model)
from lowbit.torch.llm.streamed import ShardStore
from lowbit.torch.llm.w8a8_checkpoint import w8a8_tensors


def smooth_quantize_w8a8_streamed(model: nn.Module, calibration: Iterable[Mapping[str, torch.Tensor]] | None,
                                  store: ShardStore, *, alpha: float, smooth: bool,
                                  kinds: tuple[ProducerKind, ...], activations: str) -> SmoothQuantResult:
    """`smooth_quantize_w8a8` on the weightless `model`, block by block from and to `store`.
    Returns the result, its `weights` and `inputs` emptied as each block is written (the
    written linears' names are in `store.quantized`)."""
    result = SmoothQuantResult(alpha, tuple(kinds) if smooth else (), activations=activations)
    blocks_name, blocks = find_blocks(model, architecture_for(model, need_scale_groups=False))
    calibrated = smooth or activations == "static"
    cpu = torch.device("cpu")
    batches = capture_block_inputs(model, blocks[0], calibration, cpu, cpu) if calibrated else []
    for index, block in enumerate(progress(blocks, desc="w8a8 blocks", unit="block")):
        store.load(index, block)
        prefix = f"{blocks_name}.{index}."
        with torch.no_grad():
            if calibrated:
                absmax, outputs = _float_pass(block, prefix, batches)
                batches = [batch.with_hidden(output) for batch, output in zip(batches, outputs)]
                del outputs
            else:
                absmax = {prefix + name: None for name in find_linears(block)}
            if smooth:
                result.smoothing.update(smooth_model(model, absmax, alpha, kinds=kinds, block_index=index))
            quantize_w8a8(model, absmax, result)
        dtype = next(block.parameters()).dtype
        with plain_linears(block) as wrappers:
            layers = {name: w8a8_tensors(result.weights.pop(prefix + name), result.inputs.pop(prefix + name, None),
                                         dtype) for name in wrappers}
            store.save_block(index, block, layers)
    return result


def _float_pass(block: nn.Module, prefix: str, batches: list[BlockInput]
                ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The block's linears' input max |x| (full names) over `batches` and the block's outputs."""
    targets = {prefix + name: module for name, module in find_linears(block).items()}
    outputs = []
    with recording_input_absmax(targets) as (absmax, mask):
        for batch in batches:
            mask[0] = batch.mask
            outputs.append(run_block(block, batch))
    return absmax, outputs


__all__ = ["smooth_quantize_w8a8_streamed"]
