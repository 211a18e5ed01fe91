"""Weight-only accuracy budget: every MatMul/Gemm starts at the low-bit grid (int4 by default) and
the most sensitive ones fall back int4 -> int8 -> float until the model is within `max_drop`.

    quantize every site once at `bits` (RTN / GPTQ / AWQ, statistics from the float model)
    -> all-low-bit candidate -> rank the sites by the gain of their float fallback
    -> bisection on the k best-ranked sites at the ladder's last step -> each of those gets the
       cheapest precision that still meets the budget -> save the best candidate, verify it

A candidate is one rewrite (MatMulNBits or blocked DequantizeLinear, `lowbit.onnx.weight_only`)
and one evaluation on ONNX Runtime. Activations stay float, so there is no shared activation
quantization and each MatMul is its own fallback unit. The int8 step rounds to nearest (at 8 bits
GPTQ's error compensation gains nothing measurable and would cost a second pass per layer); for AWQ
it rounds the scaled weight W*s, and a float AWQ site keeps W*s, because its input stays divided by s.
Embedding tables are rounded to `embedding_bits` in every candidate, as `--mode weight-only` does
(they carry no MACs, so they are not fallback units; 0 keeps them float).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lowbit.algorithms import QuantizedWeight, rtn_quantize
from lowbit.search.budget import (METRICS, BudgetResult, CandidateScorer, Layer, Trial, TrialRecorder, best_trial,
                                    bisect_and_refine, check_budget, outcome_warnings, rank_units)
from lowbit.analysis.macs import layer_macs
from lowbit.errors import LowbitError
from lowbit.onnx.blockwise import WeightSite
from lowbit.onnx.calib_data import CalibrationData, model_inputs
from lowbit.onnx.io import drop_shape_annotations, load_model, save_model
from lowbit.onnx.pipeline import prepare_model
from lowbit.onnx.stored_plan import attach_plan
from lowbit.onnx.verify import compare_models
from lowbit.onnx.weight_only import (check_options, find_sites, rewrite, round_weights, weight_matrix,
                                     weight_only_spec)
from lowbit.onnx.registry import rule_for
from lowbit.plan import PlanEntry, QuantPlan
from lowbit.weight_algorithms import algorithm_named

WEIGHT_FALLBACK_LEVELS = ("int8", "float")  # cheapest first


def parse_weight_fallback(value: str | tuple[str, ...] | list[str] | None, bits: int) -> tuple[str, ...]:
    """The weight-only ladder after `bits`, cheapest first (int8 drops out when `bits` is 8)."""
    steps = list(WEIGHT_FALLBACK_LEVELS) if value is None else (
        [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value))
    unknown = [v for v in steps if v not in WEIGHT_FALLBACK_LEVELS]
    if unknown or not steps:
        raise LowbitError(f"unknown weight-only fallback step(s) {unknown or steps}; give one or more of "
                          f"{', '.join(WEIGHT_FALLBACK_LEVELS)} (e.g. --fallback int8,float)")
    ladder = tuple(level for level in WEIGHT_FALLBACK_LEVELS if level in steps and not (level == "int8" and bits >= 8))
    if not ladder:
        raise LowbitError("with --weight-bits 8 the only weight-only fallback is float; use --fallback float")
    return ladder


def search_weight_precision(float_path: str | os.PathLike, out_path: str | os.PathLike, *,
                            max_drop: float, calib: str | os.PathLike | dict | None = None,
                            eval_data: str | os.PathLike | dict | None = None, metric: str = "cosine",
                            evaluate: Callable[[str], float] | None = None, time_limit: float = 600.0,
                            bits: int = 4, group_size: int = 32, algo: str = "rtn", symmetric: bool = True,
                            act_order: bool = False, weight_format: str = "matmulnbits", accuracy_level: int = 0,
                            exclude: tuple[str, ...] | list[str] = (), samples: int | None = None,
                            batch_size: int = 16, threads: int | None = None, measure_speed: bool = True,
                            fallback: str | tuple[str, ...] | list[str] | None = None,
                            embedding_bits: int = 8) -> BudgetResult:
    """Weight-only quantization of `float_path`'s MatMul/Gemm weights at `bits` with per-layer
    fallback (`fallback`, default int8 then float) so the model stays within `max_drop` of float.
    `evaluate(path) -> score` (higher is better) replaces `metric`. Always writes the best candidate
    to `out_path`; `result.met` says whether the budget was met and `result.precision` what each
    fallen-back layer got."""
    started = time.perf_counter()
    float_path, out_path = Path(float_path), Path(out_path)
    check_budget(metric, max_drop, time_limit)
    ladder = parse_weight_fallback(fallback, bits)
    spec, stored_bits = check_options(bits=bits, group_size=group_size, algo=algo, has_calibration=calib is not None,
                                      symmetric=symmetric, act_order=act_order, weight_format=weight_format,
                                      accuracy_level=accuracy_level, embedding_bits=embedding_bits)
    if calib is None and eval_data is None:
        raise LowbitError("the accuracy-budget search compares the quantized model with the float one on data; "
                          "pass --eval EVAL.npz (or --calib CALIB.npz)")
    original = load_model(float_path)
    inputs = model_inputs(original)
    model = prepare_model(original, copy=False)
    del original
    calib_data = CalibrationData(calib, inputs, samples=samples) if calib is not None else None
    eval_set = CalibrationData(eval_data, inputs, what="evaluation data") if eval_data is not None else calib_data
    sites, kept = find_sites(model, set(exclude))
    if not sites:
        raise LowbitError("no MatMul/Gemm with a constant 2-D float weight was found; weight-only quantization has "
                          "nothing to do here (try --mode static)")
    rounded = round_weights(model, sites, calib_data, spec, algo, act_order=act_order, exclude=exclude,
                            embedding_bits=embedding_bits, group_size=group_size, symmetric=symmetric,
                            weight_format=weight_format, batch_size=batch_size, threads=threads)
    working, low, awq, embeddings = rounded.model, rounded.weights, rounded.awq, rounded.embeddings
    kept.update(embeddings.kept)
    fallbacks = _Fallbacks(model, sites, awq, weight_only_spec(8, group_size, symmetric))

    def build(assignment: dict[str, str]) -> onnx.ModelProto:
        base = fallbacks.with_float_weights(working, [n for n, level in assignment.items() if level == "float"])
        quantized_sites = [s for s in sites if assignment.get(s.node) != "float"]
        weights = {s.node: fallbacks.int8(s.node) if assignment.get(s.node) == "int8" else low[s.node]
                   for s in quantized_sites}
        return rewrite(base, quantized_sites + embeddings.sites, {**weights, **embeddings.quantized}, bits=stored_bits,
                       group_size=group_size, weight_format=weight_format, accuracy_level=accuracy_level,
                       site_bits={**{n: 8 for n, level in assignment.items() if level == "int8"},
                                  **embeddings.site_bits()})

    names = [s.node for s in sites]
    macs = layer_macs(model, names, eval_set.first_batch(1), threads=threads)
    layers = [Layer(s.node, s.op_type, macs[s.node], unit=s.node) for s in sites]
    scorer = CandidateScorer(float_path, model, eval_set, metric, evaluate, batch_size, threads, measure_speed)
    record = TrialRecorder(scorer, macs, max_drop)
    deadline = started + time_limit

    def trial(stage: str, assignment: dict[str, str]) -> Trial:
        return record(stage, assignment, lambda: build(assignment))

    start = f"int{bits}"
    first = trial(f"all {start}", {})
    ranking_seconds = 0.0
    if not first.met:
        units = {s.node: [s.node] for s in sites}
        ranking_seconds = rank_units(layers, units, trial, first, deadline, started + time_limit / 2, ladder[-1])
        bisect_and_refine(layers, trial, deadline, ladder)
    best = best_trial(record.trials)
    quantized = build(best.precision)
    plan = _plan(sites, kept, best.precision, spec, fallbacks.spec8, algo, weight_format)
    for entry in embeddings.entries(weight_format):
        plan.add(entry)
    plan.settings = {"per_channel": group_size <= 0, "exclude": list(exclude),
                     "samples": None if calib_data is None else calib_data.num_samples, "source": float_path.name,
                     "weight_only": {"algorithm": algo, "bits": bits, "stored_bits": stored_bits,
                                     "group_size": group_size, "symmetric": symmetric, "act_order": act_order,
                                     "format": weight_format, "accuracy_level": accuracy_level,
                                     "embedding_bits": embedding_bits,
                                     "embedding_tables": [t.node for t in embeddings.sites],
                                     "int8_fallback": "rtn" if not algorithm_named(algo).scales_inputs
                                     else f"rtn of the {algo.upper()}-scaled weight"},
                     "budget": {"metric": metric, "max_drop": max_drop, "met": best.met, "drop": best.drop,
                                "fallback": list(ladder), "fell_back": best.excluded, "precision": best.precision,
                                f"{start}_mac_fraction": best.int8_mac_fraction}}
    attach_plan(quantized, plan)
    drop_shape_annotations(quantized)
    save_model(quantized, out_path, inputs=[float_path])
    report = compare_models(float_path, out_path, eval_set, batch_size=batch_size, threads=threads,
                            speed=measure_speed)
    result = BudgetResult(out_path, best.met, scorer.metric_name, max_drop, scorer.float_score,
                          best.score, best.drop, best.excluded, best.int8_mac_fraction, layers, record.trials,
                          time.perf_counter() - started, ranking_seconds, time_limit,
                          time.perf_counter() > deadline, plan, report, precision=dict(best.precision),
                          fallback=list(ladder), start=start)
    result.warnings += outcome_warnings(result)
    return result


class _Fallbacks:
    """The int8 and float forms of each site, made on first use (AWQ sites: of the scaled weight W*s)."""

    def __init__(self, model: onnx.ModelProto, sites: list[WeightSite], awq: dict[str, dict], spec8) -> None:
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.sites = {s.node: s for s in sites}
        self.scales = {node: info["scales"] for info in awq.values() for node in info["nodes"]}
        self.spec8 = spec8
        self._int8: dict[str, QuantizedWeight] = {}

    def matrix(self, node: str):
        """The site's float weight `[out, in]` as the (possibly AWQ-rescaled) graph needs it."""
        site = self.sites[node]
        matrix = weight_matrix(self.initializers, site)
        if node in self.scales:
            matrix = matrix * torch.from_numpy(self.scales[node])[None, :]
        return matrix

    def int8(self, node: str) -> QuantizedWeight:
        if node not in self._int8:
            self._int8[node] = rtn_quantize(self.matrix(node), self.spec8, name=self.sites[node].weight)
        return self._int8[node]

    def with_float_weights(self, model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
        """`model`, with the float AWQ sites among `nodes` reading W*s (the others keep W as is)."""
        rescaled = [n for n in nodes if n in self.scales]
        if not rescaled:
            return model
        out = onnx.ModelProto()
        out.CopyFrom(model)
        by_name = {n.name: n for n in out.graph.node}
        for node in rescaled:
            site = self.sites[node]
            matrix = self.matrix(node).numpy()
            values = matrix if site.transposed else matrix.T
            tensor = numpy_helper.from_array(np.ascontiguousarray(values, np.float32), f"{site.weight}_{node}_awq")
            out.graph.initializer.append(tensor)
            by_name[node].input[rule_for(by_name[node]).weight_input] = tensor.name
        return out


def _plan(sites: list[WeightSite], kept: dict[str, str], precision: dict[str, str], spec, spec8, algo: str,
          weight_format: str) -> QuantPlan:
    plan = QuantPlan("weight-only")
    form = "MatMulNBits" if weight_format == "matmulnbits" else "blocked DequantizeLinear"
    for site in sites:
        level = precision.get(site.node)
        if level == "float":
            plan.float_nodes[site.node] = "fell back to float by the accuracy-budget search"
        elif level == "int8":
            plan.add(PlanEntry(site.weight, "weight", spec=spec8, nodes=[site.node],
                               reason=f"int8 fallback of the accuracy-budget search (rtn), {form}"))
        else:
            plan.add(PlanEntry(site.weight, "weight", spec=spec, nodes=[site.node], reason=f"{algo}, {form}"))
    plan.float_nodes.update(kept)
    return plan


__all__ = ["METRICS", "WEIGHT_FALLBACK_LEVELS", "parse_weight_fallback", "search_weight_precision"]
