"""Inputs for timing a model when the user has no data: generated from its declared inputs.

Symbolic dimensions are resolved from `--shape name=1x3x224x224`; a symbolic first (batch) axis
defaults to 1, any other symbolic dim must be given. Values are valid for what the input feeds:
token ids stay below the vocabulary size of the embedding (Gather) they index, masks are all
ones, other integer inputs are zeros, floats are standard normal (seeded).
"""

from __future__ import annotations

import re

import numpy as np
import onnx

from lowbit.errors import LowbitError
from lowbit.onnx.calib_data import InputSignature, model_inputs
from lowbit.onnx.graph_index import GraphIndex
from lowbit.onnx.registry import RULES

_SHAPE = re.compile(r"^([^=]+)=(\d+(?:[x,]\d+)*)$")


def parse_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """`["ids=1x128", "mask=1x128"]` -> {"ids": (1, 128), ...}; malformed entries are user errors."""
    shapes = {}
    for spec in specs or []:
        match = _SHAPE.match(spec.strip())
        if not match:
            raise LowbitError(f"--shape {spec!r} is not NAME=DIMS; write it like input_ids=1x128 "
                              "(positive integers joined by x)")
        dims = tuple(int(d) for d in re.split("[x,]", match.group(2)))
        if any(d < 1 for d in dims):
            raise LowbitError(f"--shape {spec!r} has a zero dimension; every dimension must be at least 1")
        shapes[match.group(1)] = dims
    return shapes


def synthetic_feed(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """One input batch for `model`, shaped from its declaration and `shapes` overrides."""
    shapes = shapes or {}
    signatures = model_inputs(model)
    unknown = sorted(set(shapes) - {s.name for s in signatures})
    if unknown:
        raise LowbitError(f"--shape names {unknown} which is not an input of the model; its inputs are "
                          f"{[s.name for s in signatures]}")
    rng = np.random.default_rng(seed)
    vocab = _vocab_sizes(model)
    feed = {}
    for sig in signatures:
        shape = _resolve(sig, shapes.get(sig.name))
        feed[sig.name] = _values(sig, shape, vocab.get(sig.name), rng)
    return feed


def _resolve(sig: InputSignature, given: tuple[int, ...] | None) -> tuple[int, ...]:
    if given is not None:
        if sig.shape is not None and (len(given) != len(sig.shape) or any(
                d is not None and d != g for d, g in zip(sig.shape, given))):
            declared = "x".join("?" if d is None else str(d) for d in sig.shape)
            raise LowbitError(f"--shape {sig.name}={'x'.join(map(str, given))} does not fit the declared shape "
                              f"{declared}; give a shape of that rank that matches its fixed dims")
        return given
    if sig.shape is None:
        raise LowbitError(f"input {sig.name!r} declares no shape; pass --shape {sig.name}=DIMS (e.g. 1x3x224x224)")
    dims = list(sig.shape)
    if dims and dims[0] is None:
        dims[0] = 1  # the batch axis
    if None in dims:
        example = "x".join("?" if d is None else str(d) for d in dims)
        raise LowbitError(f"input {sig.name!r} has symbolic dims ({example}); pass --shape {sig.name}=DIMS "
                          "with every dim set (e.g. 1x128 for a sequence), or give real inputs with --data")
    return tuple(dims)


def _values(sig: InputSignature, shape: tuple[int, ...], vocab: int | None, rng) -> np.ndarray:
    kind = sig.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape).astype(sig.dtype)
    if kind == "b":
        return np.ones(shape, bool)
    if kind in "iu":
        if vocab:
            return rng.integers(0, vocab, shape).astype(sig.dtype)
        fill = 1 if "mask" in sig.name.lower() else 0
        return np.full(shape, fill, sig.dtype)
    raise LowbitError(f"input {sig.name!r} has dtype {sig.dtype}, which lowbit cannot generate; pass --data X.npz")


def _vocab_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input -> rows of the constant table a Gather looks it up in (directly or via Cast)."""
    index = GraphIndex.of(model)
    initializers, producer = index.initializers, index.producer
    # Dequantized tables (int8 embeddings) count too: their row count is the DequantizeLinear input's.
    table_rows = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims) >= 2}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers and len(initializers[node.input[0]].dims) >= 2:
            table_rows[node.output[0]] = initializers[node.input[0]].dims[0]
    sizes: dict[str, int] = {}
    for node in model.graph.node:
        rule = RULES.get(node.op_type)
        if rule is None or not rule.is_lookup() or node.input[rule.weight_input] not in table_rows:
            continue
        table = node.input[rule.weight_input]
        index = next(name for i, name in enumerate(node.input) if i != rule.weight_input)
        while index in producer and producer[index].op_type in ("Cast", "Identity", "Unsqueeze", "Reshape"):
            index = producer[index].input[0]
        rows = int(table_rows[table])
        sizes[index] = min(sizes.get(index, rows), rows)
    return sizes
