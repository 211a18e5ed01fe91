"""Weight-only low-bit quantization of an ONNX model's MatMul/Gemm weights (RTN, GPTQ, AWQ).

    find sites (constant 2-D float weights) -> [GPTQ/AWQ: stream calibration batches through ONNX
    Runtime into one HessianAccumulator per distinct input] -> quantize every weight with
    `lowbit.algorithms` ([out, in] layout, groups along in) -> [AWQ: divide each input by its
    scales, folded into a LayerNorm's gamma/beta or an inserted Mul] -> rewrite each site as
    MatMulNBits or blocked DequantizeLinear (`lowbit.onnx.blockwise`).

Embedding tables (Gather from a constant 2-D float table) are rounded to `embedding_bits` (RTN:
a lookup has no input statistics to compensate with), blocks of `group_size` along each row, and
written as GatherBlockQuantized (MatMulNBits format; it dequantizes only the rows it gathers) or,
in the standard "dq" format, as blocked DequantizeLinear feeding the Gather. In a transformer
encoder the word embeddings are about half the weights, so this is what makes int4 files small.

Activations stay float. Statistics come from the float model in one pass (every layer sees the
float model's inputs, not those of the already-quantized layers before it), streamed through
`lowbit.onnx.statistics.collect`: memory holds one chunk of exposed activations (the calibration
memory budget) plus one [in, in] Gram matrix per distinct input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from lowbit.algorithms import HessianAccumulator, QuantizedWeight, rtn_quantize
from lowbit.errors import LowbitError
from lowbit.onnx.blockwise import (DQ_BITS, DQ_OPSET, FORMATS, MATMULNBITS_BITS, MS_DOMAIN, WeightSite,
                                   blocked_dq_nodes, gather_block_quantized_node, matmulnbits_node, storage_bits)
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import DEFAULT_MEMORY_BUDGET_MB
from lowbit.onnx.graph_index import insert_after
from lowbit.onnx.qdq import drop_unused_initializers, ensure_opset
from lowbit.onnx.registry import rule_for
from lowbit.onnx.statistics import MASK_INPUTS, InputGram, collect
from lowbit.plan import PlanEntry, QuantPlan
from lowbit.spec import QuantSpec, per_channel, per_group
from lowbit.weight_algorithms import ALGORITHMS, WeightOptions, algorithm_named, option_owners

EMBEDDING_BITS = (0, 4, 8)  # 0 keeps embedding tables float
# Consumers that read only a tensor's shape: they do not stop an AWQ scale from folding into LayerNorm.
_SHAPE_READERS = ("Shape", "Size")


@dataclass
class WeightOnlyResult:
    model: onnx.ModelProto
    plan: QuantPlan
    calibration_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def weight_only_spec(bits: int, group_size: int, symmetric: bool = True) -> QuantSpec:
    """Signed `bits`-bit weights, one scale per `group_size` input features (per output channel
    when `group_size` is 0 or -1)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise LowbitError(f"weight-only quantization takes 2 to 8 weight bits, not {bits}; use --weight-bits 4")
    if not isinstance(group_size, int) or group_size < -1:
        raise LowbitError(f"group size must be a positive number of input features (or 0 / -1 for per-channel), "
                          f"not {group_size}; use --group-size 32 or 128")
    granularity = per_group(group_size, axis=1) if group_size > 0 else per_channel(0)
    return QuantSpec(f"int{bits}", symmetric=symmetric, granularity=granularity)


def block_size_for(site: WeightSite, group_size: int, weight_format: str) -> int:
    """The stored block size: the group size, or for per-channel scales one block spanning the
    row (MatMulNBits wants a power of two >= 16, so the row is padded up to one)."""
    if group_size > 0:
        return group_size
    if weight_format == "dq":
        return site.in_features
    return max(16, 1 << (site.in_features - 1).bit_length())


def check_format(bits: int, group_size: int, weight_format: str, accuracy_level: int) -> int:
    """Validate the output form; returns the stored code width (see `blockwise.storage_bits`)."""
    if weight_format not in FORMATS:
        raise LowbitError(f"unknown weight format {weight_format!r}; use one of {', '.join(FORMATS)}")
    widths = MATMULNBITS_BITS if weight_format == "matmulnbits" else DQ_BITS
    if bits > max(widths):
        raise LowbitError(f"{weight_format} stores at most {max(widths)}-bit weights, not {bits}; "
                          f"use --weight-bits {max(widths)} or fewer")
    if weight_format == "dq" and bits < 3:
        raise LowbitError(f"blocked DequantizeLinear has no {bits}-bit type at opset {DQ_OPSET}; "
                          "use --weight-format matmulnbits for 2-bit weights")
    if weight_format == "matmulnbits" and group_size > 0 and (group_size < 16 or group_size & (group_size - 1)):
        raise LowbitError(f"MatMulNBits needs a power-of-two group size of at least 16, not {group_size}; "
                          "use 32, 64 or 128 (or --weight-format dq, which takes any size)")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise LowbitError(f"accuracy level must be 0 (float activations) to 4 (int8 activations), not {accuracy_level}")
    if accuracy_level and weight_format != "matmulnbits":
        raise LowbitError("an accuracy level applies to MatMulNBits only; drop it or use --weight-format matmulnbits")
    return storage_bits(bits, weight_format)


def check_options(*, bits: int, group_size: int, algo: str, has_calibration: bool, symmetric: bool = True,
                  act_order: bool = False, weight_format: str = "matmulnbits", accuracy_level: int = 0,
                  embedding_bits: int = 0) -> tuple[QuantSpec, int]:
    """Every weight-only option checked before any work: the weight spec and the stored code width."""
    if embedding_bits not in EMBEDDING_BITS:
        raise LowbitError(f"embedding tables take 4 or 8 bits (0 keeps them float), not {embedding_bits}; "
                          "use --embedding-bits 8")
    algorithm = algorithm_named(algo)
    if algorithm.needs_statistics and not has_calibration:
        raise LowbitError(f"{algo.upper()} needs calibration data to measure each layer's inputs; "
                          "pass --calib CALIB.npz (or use --algo rtn)")
    if act_order and "act_order" not in algorithm.options:
        owners = option_owners("act_order")
        raise LowbitError(f"--act-order is a {'/'.join(o.upper() for o in owners)} option; "
                          f"use it with --algo {owners[0]}")
    spec = weight_only_spec(bits, group_size, symmetric)
    return spec, check_format(bits, group_size, weight_format, accuracy_level)


# ----------------------------------------------------------------------------- where the weights are

def find_sites(model: onnx.ModelProto, exclude: set[str]) -> tuple[list[WeightSite], dict[str, str]]:
    """Nodes of the "matmul" weight-only form (MatMul, Gemm: `registry.OpRule.weight_only`) with a
    constant 2-D float weight, and the ones kept float (name -> why)."""
    initializers = {t.name: t for t in model.graph.initializer}
    sites: list[WeightSite] = []
    kept: dict[str, str] = {}
    for node in model.graph.node:
        rule = rule_for(node)
        if rule is None or rule.weight_only != "matmul" or len(node.input) <= rule.weight_input:
            continue
        weight = initializers.get(node.input[rule.weight_input])
        if weight is None or len(weight.dims) != 2 or node.input[0] in initializers:
            continue  # activation x activation (attention scores) or a constant left operand
        if node.name in exclude or node.op_type in exclude or node.output[0] in exclude:
            kept[node.name] = "excluded by the user"
            continue
        if weight.data_type != onnx.TensorProto.FLOAT:
            kept[node.name] = "weight is not float32"
            continue
        # Gemm's attributes, read generically: a node without them is a plain MatMul.
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            kept[node.name] = f"{node.op_type} with transA, alpha or beta is kept float"
            continue
        transposed, bias = bool(attrs.get("transB", 0)), None
        at = rule.bias_input
        if at is not None and len(node.input) > at and node.input[at]:
            c = initializers.get(node.input[at])
            if c is None or len(c.dims) != 1:
                kept[node.name] = f"{node.op_type} bias is not a constant vector"
                continue
            bias = node.input[at]
        rows, cols = weight.dims
        n_in, n_out = (cols, rows) if transposed else (rows, cols)
        sites.append(WeightSite(node.name, node.op_type, weight.name, node.input[0], n_in, n_out, transposed, bias))
    return sites, kept


def find_tables(model: onnx.ModelProto, exclude: set[str]) -> tuple[list[WeightSite], dict[str, str]]:
    """Gather nodes reading rows (axis 0) of a constant 2-D float32 table with computed indices:
    each table as a site whose `[out, in]` weight is `[rows, columns]` and whose activation is
    the indices; and the ones kept float (name -> why)."""
    initializers = {t.name: t for t in model.graph.initializer}
    sites: list[WeightSite] = []
    kept: dict[str, str] = {}
    for node in model.graph.node:
        rule = rule_for(node)
        if rule is None or rule.weight_only != "table" or len(node.input) < 2:
            continue
        table = initializers.get(node.input[rule.weight_input])
        indices = next(name for i, name in enumerate(node.input) if i != rule.weight_input)
        if table is None or len(table.dims) != 2 or indices in initializers:
            continue  # gathers from activations (shapes, hidden states), or constant-folded lookups
        if node.name in exclude or node.op_type in exclude or node.output[0] in exclude:
            kept[node.name] = "excluded by the user"
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if table.data_type != onnx.TensorProto.FLOAT or axis not in (0, -2):
            kept[node.name] = "not a row lookup in a float32 table"
            continue
        rows, columns = table.dims
        sites.append(WeightSite(node.name, node.op_type, table.name, indices, columns, rows, transposed=True))
    return sites, kept


def weight_matrix(model_initializers: dict[str, onnx.TensorProto], site: WeightSite) -> torch.Tensor:
    """The site's weight as float32 `[out, in]`."""
    array = numpy_helper.to_array(model_initializers[site.weight]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array if site.transposed else array.T))


# ----------------------------------------------------------------------------- statistics

def site_groups(sites: list[WeightSite]) -> dict[str, list[WeightSite]]:
    """The sites rounded together, keyed by their first input: sites reading one input (GPTQ/AWQ
    share its statistics) and sites sharing one weight (an unrolled RNN's cell reuses one weight at
    every step: it is written once, so it is rounded once, with the statistics of all its inputs)."""
    parent = list(range(len(sites)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for index, site in enumerate(sites):
        for key in (("input", site.activation), ("weight", site.weight)):
            other = first.setdefault(key, index)
            parent[root(index)] = root(other)
    groups: dict[int, list[WeightSite]] = {}
    for index, site in enumerate(sites):
        groups.setdefault(root(index), []).append(site)
    return {group[0].activation: group for group in groups.values()}


def collect_input_statistics(model: onnx.ModelProto, sites: list[WeightSite], data: CalibrationData, *,
                             batch_size: int = 16, threads: int | None = None,
                             memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB
                             ) -> dict[str, HessianAccumulator]:
    """One HessianAccumulator per group of `site_groups` (the rows of all its inputs pooled),
    filled batch by batch through the one statistics pass (`lowbit.onnx.statistics`: activations
    exposed in chunks within `memory_budget_mb`, each folded into its Gram sums and dropped); rows
    where the model's attention mask is 0 (padding) are left out when the activation's leading
    shape matches it."""
    mask_name = next((i.name for i in model.graph.input if i.name in MASK_INPUTS), None)
    pooled = {site.activation: key for key, group in site_groups(sites).items() for site in group}
    grams = InputGram({s.activation: s.in_features for s in sites}, mask_name, pooled=pooled)
    collect(model, data.batches(batch_size), [grams], threads=threads, memory_budget_mb=memory_budget_mb)
    return grams.accumulators


# ----------------------------------------------------------------------------- quantize

def quantize_sites(model: onnx.ModelProto, sites: list[WeightSite], spec: QuantSpec, algo: str,
                   statistics: dict[str, HessianAccumulator] | None, *, act_order: bool = False
                   ) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """Quantize every site's weight with the algorithm called `algo` (`lowbit.weight_algorithms`),
    one group of `site_groups` at a time (each distinct weight once; sites sharing a weight share
    its QuantizedWeight). Returns node -> QuantizedWeight ([out, in]; with input scales s, of the
    scaled weight W * s) and, for an algorithm that scales inputs (AWQ), activation ->
    {"scales", "alpha", "nodes"} where alpha > 0."""
    algorithm = algorithm_named(algo)
    options = WeightOptions(act_order=act_order)
    initializers = {t.name: t for t in model.graph.initializer}
    results: dict[str, QuantizedWeight] = {}
    scaled: dict[str, dict] = {}
    for key, group in site_groups(sites).items():
        stats = statistics[key] if algorithm.needs_statistics else None
        distinct = list({s.weight: s for s in group}.values())
        matrices = [weight_matrix(initializers, s) for s in distinct]
        if algorithm.scales_inputs:
            scales, alpha = algorithm.input_scales(matrices, stats, spec, options)
            matrices = [matrix * scales[None, :] for matrix in matrices]
            stats = DividedInput(stats, scales)
            if alpha > 0:
                for activation in dict.fromkeys(s.activation for s in group):
                    scaled[activation] = {"scales": scales.numpy().astype(np.float32), "alpha": alpha,
                                          "nodes": [s.node for s in group if s.activation == activation]}
        quantized = dict(zip((s.weight for s in distinct),
                             algorithm.quantize(matrices, stats, spec, options, [s.weight for s in distinct])))
        results.update({site.node: quantized[site.weight] for site in group})
    return results, scaled


@dataclass
class DividedInput:
    """Statistics of x / s from those of x: what an algorithm sees after its input scales s are
    applied (the Gram matrix of x / s is G / (s s^T))."""

    source: HessianAccumulator
    scales: torch.Tensor

    @property
    def gram(self) -> torch.Tensor:
        return self.source.gram.float() / torch.outer(self.scales, self.scales)

    @property
    def hessian(self) -> torch.Tensor:
        return self.source.hessian.float() / torch.outer(self.scales, self.scales)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.source.abs_mean.float() / self.scales


# ----------------------------------------------------------------------------- AWQ: divide inputs by s

def foldable_layernorm(model: onnx.ModelProto, activation: str, nodes: set[str]) -> onnx.NodeProto | None:
    """The LayerNormalization producing `activation` when 1/s can go into its gamma and beta:
    constant affine over the last axis, and nothing but `nodes` (and shape readers) reads it."""
    initializers = {t.name for t in model.graph.initializer}
    source = next((n for n in model.graph.node if activation in n.output), None)
    if source is None or source.op_type != "LayerNormalization" or source.output[0] != activation:
        return None
    axis = next((a.i for a in source.attribute if a.name == "axis"), -1)
    constant = source.input[1] in initializers and (len(source.input) < 3 or not source.input[2]
                                                    or source.input[2] in initializers)
    readers = [n for n in model.graph.node if activation in n.input and n.op_type not in _SHAPE_READERS]
    outputs = {o.name for o in model.graph.output}
    if axis != -1 or not constant or activation in outputs or any(r.name not in nodes for r in readers):
        return None
    return source


def apply_input_scales(model: onnx.ModelProto, awq: dict[str, dict]) -> None:
    """Divide each AWQ input by its scales, in place: folded into a LayerNorm, or a Mul by 1/s
    inserted in front of the group's nodes only (other readers of the tensor are untouched)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    inserted: dict[str, onnx.NodeProto] = {}
    for activation, info in awq.items():
        s = info["scales"].astype(np.float32)
        norm = foldable_layernorm(model, activation, set(info["nodes"]))
        if norm is not None:
            for index in (1, 2):
                if len(norm.input) > index and norm.input[index]:
                    old = numpy_helper.to_array(initializers[norm.input[index]]).astype(np.float32)
                    new = numpy_helper.from_array((old / s).astype(np.float32), f"{norm.input[index]}_awq")
                    graph.initializer.append(new)
                    norm.input[index] = new.name
            info["folded_into"] = norm.name
            continue
        inverse = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{activation}_awq_inverse_scale")
        graph.initializer.append(inverse)
        scaled = f"{activation}_awq_scaled"
        inserted[activation] = helper.make_node("Mul", [activation, inverse.name], [scaled],
                                                name=f"{activation}_AWQMul")
        for name in info["nodes"]:
            node = nodes[name]
            node.input[0] = scaled
        info["folded_into"] = "inserted Mul"
    if inserted:
        insert_after(graph, {tensor: [node] for tensor, node in inserted.items()})


# ----------------------------------------------------------------------------- write

def rewrite(model: onnx.ModelProto, sites: list[WeightSite], quantized: dict[str, QuantizedWeight], *,
            bits: int, group_size: int, weight_format: str, accuracy_level: int = 0,
            site_bits: dict[str, int] | None = None) -> onnx.ModelProto:
    """A new model with every site's weight in the block-wise form (Gather sites: their table).
    `site_bits`: node -> stored code width where it differs from `bits` (the accuracy budget's
    int8 fallback, and embedding tables)."""
    out = ensure_opset(model, DQ_OPSET) if weight_format == "dq" else _copy(model)
    graph = out.graph
    by_node = {s.node: s for s in sites}
    new_inits: list[onnx.TensorProto] = []
    written: dict[tuple[str, int], list[str]] = {}  # (weight, id of its rounding) -> initializer names
    ordered: list[onnx.NodeProto] = []
    for node in graph.node:
        site = by_node.get(node.name)
        if site is None:
            ordered.append(node)
            continue
        width = (site_bits or {}).get(node.name, bits)
        rule = rule_for(node)
        start = len(ordered)
        table = rule.weight_only == "table"
        if table and weight_format == "matmulnbits":
            replacement, inits = gather_block_quantized_node(
                site, quantized[node.name], bits=width, block_size=block_size_for(site, group_size, weight_format),
                output=node.output[0])
            ordered.append(replacement)
        elif table:
            dq, inits = blocked_dq_nodes(site, quantized[node.name], bits=width,
                                         block_size=block_size_for(site, group_size, weight_format))
            node.input[rule.weight_input] = dq.output[0]
            ordered += [dq, node]
        elif weight_format == "matmulnbits":
            block = block_size_for(site, group_size, weight_format)
            replacement, inits = matmulnbits_node(site, quantized[node.name], bits=width, block_size=block,
                                                  accuracy_level=accuracy_level, output=node.output[0])
            replacement.input[0] = node.input[0]  # AWQ may have re-pointed the input
            ordered.append(replacement)
        else:
            dq, inits = blocked_dq_nodes(site, quantized[node.name], bits=width,
                                         block_size=block_size_for(site, group_size, weight_format))
            node.input[rule.weight_input] = dq.output[0]
            ordered += [dq, node]
        shared = written.setdefault((site.weight, id(quantized[node.name])), [t.name for t in inits])
        if shared[0] == inits[0].name:
            new_inits += inits
        else:  # a weight shared by several nodes is stored once
            renamed = dict(zip((t.name for t in inits), shared))
            for reader in ordered[start:]:
                reader.input[:] = [renamed.get(name, name) for name in reader.input]
    del graph.node[:]
    graph.node.extend(ordered)
    drop_unused_initializers(graph)
    graph.initializer.extend(new_inits)
    if weight_format == "matmulnbits" and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    # Shapes recorded for the float graph stay valid (same tensors, same shapes); nothing to redo.
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


# ----------------------------------------------------------------------------- the whole pass

@dataclass
class RoundedWeights:
    """What one weight-only rounding produced: `model`, a copy with AWQ's input scales folded in;
    the rounded weight of each site; AWQ's scales by input; the rounded embedding tables."""

    model: onnx.ModelProto
    weights: dict[str, QuantizedWeight]
    awq: dict
    embeddings: EmbeddingTables
    used_statistics: bool
    statistics_seconds: float


def round_weights(model: onnx.ModelProto, sites: list[WeightSite], calib: CalibrationData | None, spec: Any,
                  algo: str, *, act_order: bool, exclude: tuple[str, ...] | list[str], embedding_bits: int,
                  group_size: int, symmetric: bool, weight_format: str, batch_size: int = 16,
                  threads: int | None = None) -> RoundedWeights:
    """Collect the input statistics `algo` needs, round every site's weight, fold AWQ's input
    scales into a copy of `model` and round its embedding tables: the steps `--mode weight-only`
    and the weight budget search share."""
    statistics, seconds = None, 0.0
    working = _copy(model)
    if algorithm_named(algo).needs_statistics and sites:
        started = time.perf_counter()
        statistics = collect_input_statistics(model, sites, calib, batch_size=batch_size, threads=threads)
        seconds = time.perf_counter() - started
    weights, awq = quantize_sites(working, sites, spec, algo, statistics, act_order=act_order)
    if awq:
        apply_input_scales(working, awq)
    embeddings = embedding_tables(working, exclude, embedding_bits, group_size=group_size, symmetric=symmetric,
                                  weight_format=weight_format)
    return RoundedWeights(working, weights, awq, embeddings, statistics is not None, seconds)


def quantize_weight_only(model: onnx.ModelProto, calib: CalibrationData | None, *, bits: int = 4,
                         group_size: int = 32, algo: str = "rtn", symmetric: bool = True, act_order: bool = False,
                         weight_format: str = "matmulnbits", accuracy_level: int = 0,
                         exclude: tuple[str, ...] | list[str] = (), batch_size: int = 16,
                         threads: int | None = None, embedding_bits: int = 8) -> WeightOnlyResult:
    """Quantize the weights of `model` (pre-processed float ONNX) and return the rewritten model
    with its plan (the caller stores it and saves). `embedding_bits` 4 or 8 also rounds the
    embedding tables (Gather), 0 keeps them float."""
    spec, stored_bits = check_options(bits=bits, group_size=group_size, algo=algo, has_calibration=calib is not None,
                                      symmetric=symmetric, act_order=act_order, weight_format=weight_format,
                                      accuracy_level=accuracy_level, embedding_bits=embedding_bits)
    warnings = []
    if stored_bits != bits:
        warnings.append(f"{weight_format} has no {bits}-bit codes: {bits}-bit weights are stored in {stored_bits}-bit "
                        f"codes (the accuracy of {bits} bits, the size of {stored_bits})")
    sites, kept = find_sites(model, set(exclude))
    rounded = round_weights(model, sites, calib, spec, algo, act_order=act_order, exclude=exclude,
                            embedding_bits=embedding_bits, group_size=group_size, symmetric=symmetric,
                            weight_format=weight_format, batch_size=batch_size, threads=threads)
    working, quantized, awq, embeddings = rounded.model, rounded.weights, rounded.awq, rounded.embeddings
    kept.update(embeddings.kept)
    tables = embeddings.sites
    quantized.update(embeddings.quantized)
    written = rewrite(working, sites + tables, quantized, bits=stored_bits, group_size=group_size,
                      weight_format=weight_format, accuracy_level=accuracy_level, site_bits=embeddings.site_bits())
    plan = _plan(sites, kept, spec, algo, weight_format)
    for entry in embeddings.entries(weight_format):
        plan.add(entry)
    plan.settings["weight_only"] = {
        "algorithm": algo, "bits": bits, "stored_bits": stored_bits, "group_size": group_size,
        "symmetric": symmetric, "act_order": act_order, "format": weight_format, "accuracy_level": accuracy_level,
        "embedding_bits": embedding_bits, "embedding_tables": [t.node for t in tables],
        "statistics": "float model, one pass" if rounded.used_statistics else None,
        "awq_scales": [{"input": a, "alpha": i["alpha"], "nodes": i["nodes"], "folded_into": i.get("folded_into")}
                       for a, i in awq.items()],
        "gptq_damping": _damping(sites, quantized),
    }
    if not sites:
        warnings.append("no MatMul/Gemm with a constant 2-D float weight was found; nothing was quantized")
    return WeightOnlyResult(written, plan, rounded.statistics_seconds, warnings)


def _damping(sites: list[WeightSite], quantized: dict[str, QuantizedWeight]) -> dict[str, float] | None:
    """The damping each weight's Hessian needed (GPTQ), None for algorithms without one."""
    damping = {s.node: getattr(quantized[s.node], "percdamp", None) for s in sites}
    return damping if any(v is not None for v in damping.values()) else None


@dataclass
class EmbeddingTables:
    """Embedding tables rounded to `bits` (RTN: a lookup has no input statistics to use), and
    the lookups kept float (node -> why)."""

    sites: list[WeightSite]
    quantized: dict[str, QuantizedWeight]
    spec: QuantSpec | None
    kept: dict[str, str]
    bits: int

    def site_bits(self) -> dict[str, int]:
        return {t.node: self.bits for t in self.sites}

    def entries(self, weight_format: str) -> list[PlanEntry]:
        form = "GatherBlockQuantized" if weight_format == "matmulnbits" else "blocked DequantizeLinear + Gather"
        return [PlanEntry(t.weight, "weight", spec=self.spec, nodes=[t.node], reason=f"rtn, {form}") for t in self.sites]


def embedding_tables(model: onnx.ModelProto, exclude, bits: int, *, group_size: int, symmetric: bool,
                     weight_format: str) -> EmbeddingTables:
    """The row lookups in constant tables of `model` quantized to `bits` (0: none, all kept float)."""
    if not bits:
        return EmbeddingTables([], {}, None, {}, 0)
    tables, kept = find_tables(model, set(exclude))
    tables, odd = _packable_tables(tables, bits, weight_format)
    spec = weight_only_spec(bits, group_size, symmetric)
    return EmbeddingTables(tables, quantize_tables(model, tables, spec), spec, {**kept, **odd}, bits)


def quantize_tables(model: onnx.ModelProto, tables: list[WeightSite], spec: QuantSpec) -> dict[str, QuantizedWeight]:
    """Round each embedding table ([rows, columns], blocks along the row) to `spec`."""
    initializers = {t.name: t for t in model.graph.initializer}
    return {site.node: rtn_quantize(weight_matrix(initializers, site), spec, name=site.weight) for site in tables}


def _packable_tables(tables: list[WeightSite], bits: int, weight_format: str
                     ) -> tuple[list[WeightSite], dict[str, str]]:
    """GatherBlockQuantized packs 4-bit codes two per byte along a row: odd rows stay float."""
    if bits != 4 or weight_format != "matmulnbits":
        return tables, {}
    odd = {t.node: f"4-bit GatherBlockQuantized needs an even row length, not {t.in_features}; use "
                   "--embedding-bits 8" for t in tables if t.in_features % 2}
    return [t for t in tables if t.node not in odd], odd


def _plan(sites: list[WeightSite], kept: dict[str, str], spec: QuantSpec, algo: str, weight_format: str
          ) -> QuantPlan:
    """Scales and zero points live in the graph (thousands per weight), so entries carry the spec only."""
    plan = QuantPlan("weight-only")
    form = "MatMulNBits" if weight_format == "matmulnbits" else "blocked DequantizeLinear"
    for site in sites:
        plan.add(PlanEntry(site.weight, "weight", spec=spec, nodes=[site.node], reason=f"{algo}, {form}"))
    for node, reason in kept.items():
        plan.float_nodes[node] = reason
    return plan


__all__ = ["ALGORITHMS", "DividedInput", "EMBEDDING_BITS", "EmbeddingTables", "embedding_tables", "WeightOnlyResult", "apply_input_scales", "block_size_for", "check_options",
           "collect_input_statistics", "find_sites", "site_groups", "find_tables", "quantize_sites", "quantize_tables",
           "quantize_weight_only", "rewrite", "weight_only_spec"]
