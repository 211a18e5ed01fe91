"""The cost of extension, checked: a compute op is one op-table entry, a weight-only algorithm is
one module plus one registry entry, and no module outside the op table names a compute op.

Each new thing is registered here, in the test, and then seen end to end (planned, written, run
on ONNX Runtime, counted, read back, offered) without touching any other module. References are
independent: NumPy matrix products for outputs, hand-computed MAC counts, RTN from the algorithm
module itself for the stored codes.
"""

from __future__ import annotations

import argparse
import ast
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.algorithms import rtn_quantize
from lowbit.analysis.graph_precision import node_precisions
from lowbit.analysis.macs import layer_macs
from lowbit.onnx import registry
from lowbit.onnx.config import DynamicConfig, StaticConfig, WeightOnlyConfig
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.onnx.registry import KERNELS, RULES, OpRule
from lowbit.search.budget import unit_inputs
from lowbit.spec import QuantSpec, per_group
from lowbit.weight_algorithms import ALGORITHMS, WeightAlgorithm

K, N, ROWS = 32, 12, 64


# ----------------------------------------------------------------------------- a new compute op

def _einsum_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """x (batch, K) -> Einsum("ij,jk->ik", x, W (K, N)) -> Relu. Einsum is a float op in the table."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.3
    w[:, 0] *= 6.0  # one wide output channel: per-channel scales matter
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "W"], ["y"], name="proj", equation="ij,jk->ik"),
         helper.make_node("Relu", ["y"], ["out"], name="relu")],
        "einsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


def _einsum_as_matmul() -> OpRule:
    """What a contributor would add to `registry._COMPUTE` for a 2-operand Einsum "ij,jk->ik"."""
    return OpRule("compute", (0,), 1, lambda node: -1, None, channel_scales=lambda node, rank: rank == 2,
                  activation_weight=True, float_output=True,
                  macs=lambda node, data, weight, out: int(np.prod(out)) * data[-1],
                  dynamic="matmul", weight_only="matmul")


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def einsum_files(tmp_path):
    model, w = _einsum_model()
    path = tmp_path / "einsum.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(1).standard_normal((ROWS, K)).astype(np.float32)
    return path, w, x


def test_a_compute_op_is_one_table_entry(einsum_files, tmp_path, monkeypatch):
    path, w, x = einsum_files
    reference = np.maximum(x @ w, 0)  # NumPy, not the code under test
    # Without the entry Einsum stays float in every mode.
    float_plan = quantize_onnx(path, tmp_path / "before.onnx", StaticConfig(), calib={"x": x}, verify=False).plan
    assert "proj" in float_plan.float_nodes and not float_plan.quantized("weight")

    monkeypatch.setitem(RULES, "Einsum", _einsum_as_matmul())
    # static: int8 weight, one scale per output column, runs on ORT close to float
    static = tmp_path / "static.onnx"
    plan = quantize_onnx(path, static, StaticConfig(), calib={"x": x}, verify=False).plan
    weight = plan.get("W", "weight")
    assert weight is not None and weight.quantized and weight.spec.granularity.axis == 1
    assert np.abs(_run(static, x) - reference).max() < 0.05 * np.abs(reference).max()
    assert {p.node: p.precision for p in node_precisions(onnx.load(str(static)))}["proj"] == "int8"
    # dynamic: the "matmul" form writes MatMulInteger (an existing kernel, read back as int8)
    dynamic = tmp_path / "dynamic.onnx"
    quantize_onnx(path, dynamic, DynamicConfig(), verify=False)
    written = onnx.load(str(dynamic))
    assert "MatMulInteger" in {n.op_type for n in written.graph.node} and "MatMulInteger" in KERNELS
    assert np.abs(_run(dynamic, x) - reference).max() < 0.05 * np.abs(reference).max()
    # weight-only: MatMulNBits
    weight_only = tmp_path / "weight_only.onnx"
    quantize_onnx(path, weight_only, WeightOnlyConfig(bits=8, group_size=16, embedding_bits=0), verify=False)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(weight_only)).graph.node}
    assert np.abs(_run(weight_only, x) - reference).max() < 0.02 * np.abs(reference).max()
    # MACs (hand count: rows x N x K) and the accuracy budget's unit inputs
    model = onnx.load(str(path))
    assert layer_macs(model, ["proj", "relu"], {"x": x[:3]}) == {"proj": 3 * N * K, "relu": 0}
    assert unit_inputs(model.graph.node[0]) == ["x", "W"]  # W is constant: the unit keeps only x


# ----------------------------------------------------------------------------- a new weight-only algorithm

# The algorithm's module: here this test module itself (a real one lives in lowbit/algorithms/).
seen_statistics: list = []


def quantize_group(matrices, statistics, spec, options, names):
    """"Shrunk RTN": round to nearest with ranges shrunk to the least squared error."""
    seen_statistics.append(statistics)
    return [rtn_quantize(m, spec, n, mse=True) for m, n in zip(matrices, names)]


@pytest.fixture
def shrunk_rtn(monkeypatch):
    algorithm = WeightAlgorithm("shrunk", "RTN with MSE-shrunk ranges", __name__, needs_statistics=True)
    monkeypatch.setitem(ALGORITHMS, "shrunk", algorithm)
    seen_statistics.clear()
    return algorithm


def test_a_weight_algorithm_is_offered_by_the_cli(shrunk_rtn):
    from lowbit.commands.quantize import add_parser

    quantize = add_parser(argparse.ArgumentParser().add_subparsers())
    args = quantize.parse_args(["m.onnx", "-o", "q.onnx", "--mode", "weight-only", "--algo", "shrunk"])
    assert args.algo == "shrunk"
    assert "shrunk: RTN with MSE-shrunk ranges" in " ".join(quantize.format_help().split())


def test_a_weight_algorithm_runs_on_onnx(shrunk_rtn, einsum_files, tmp_path, monkeypatch):
    path, w, x = einsum_files
    monkeypatch.setitem(RULES, "Einsum", _einsum_as_matmul())
    out = tmp_path / "shrunk.onnx"
    with pytest.raises(lowbit.errors.LowbitError, match="needs calibration data"):
        quantize_onnx(path, out, WeightOnlyConfig(algo="shrunk"), verify=False)
    plan = quantize_onnx(path, out, WeightOnlyConfig(algo="shrunk", bits=4, group_size=16, embedding_bits=0),
                         calib={"x": x}, verify=False).plan
    assert read_plan(onnx.load(str(out))).settings["weight_only"]["algorithm"] == "shrunk"
    assert plan.quantized("weight")[0].reason.startswith("shrunk")
    (stats,) = seen_statistics
    np.testing.assert_allclose(stats.gram.numpy(), x.T.astype(np.float64) @ x / ROWS, rtol=1e-5, atol=1e-5)
    # the stored model computes with exactly the algorithm's grid values
    expected = rtn_quantize(torch.from_numpy(w.T.copy()), QuantSpec("int4", granularity=per_group(16)), mse=True)
    np.testing.assert_allclose(_run(out, x), np.maximum(x @ expected.weight.numpy().T, 0), rtol=1e-4, atol=1e-4)


def test_a_weight_algorithm_runs_on_a_torch_llm(shrunk_rtn):
    transformers = pytest.importorskip("transformers")
    from lowbit.torch.llm import quantize_llm
    from lowbit.torch.llm.linears import weight_matrix

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_config(config).eval()
    float_weights = {name: weight_matrix(m).clone() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    spec = QuantSpec("int4", granularity=per_group(16))
    batches = [{"input_ids": torch.randint(0, 50, (2, 8))}]
    result = quantize_llm(model, spec, "shrunk", batches)
    assert set(result.layers) == set(float_weights) and len(seen_statistics) == len(float_weights)
    for name, layer in result.layers.items():
        expected = rtn_quantize(float_weights[name], spec, mse=True)
        assert torch.equal(layer.values, expected.values)


# ----------------------------------------------------------------------------- no op knowledge elsewhere

LOWBIT = Path(lowbit.__file__).parent
# Modules that implement one op or one pattern (their op names are what they are about) and the
# export backends (which map an already-quantized graph to other runtimes).
ABOUT_ONE_OP = {
    "onnx/registry.py": "the op table itself",
    "onnx/recurrent.py": "the LSTM writer",
    "onnx/qdq.py": "Conv weights for AMX (QGEMM) kernels: a Conv-specific speed trick",
    "onnx/equalize.py": "cross-layer equalization of Conv chains",
    "onnx/smooth.py": "SmoothQuant of LayerNorm-fed MatMuls",
    "onnx/outlier_split.py": "the MatMul outlier-split rewrite",
    "onnx/passes/outlier_split.py": "the same pass",
    "onnx/passes/bias_correction.py": "bias correction of Conv outputs",
}


WATCHED = {op for op, rule in RULES.items() if rule.kind in ("compute", "weights") or rule.is_lookup()} | set(KERNELS)


def op_type_comparisons(source: str) -> list[tuple[int, list[str]]]:
    """(line, op names) of each comparison of some `.op_type` with weighted-op names in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            if any(isinstance(p, ast.Attribute) and p.attr == "op_type" for p in parts):
                names = {c.value for p in parts for c in ast.walk(p) if isinstance(c, ast.Constant)} & WATCHED
                if names:
                    found.append((node.lineno, sorted(names)))
    return found


def test_no_module_outside_the_op_table_compares_op_types_with_weighted_ops():
    leaks = []
    for path in sorted(LOWBIT.rglob("*.py")):
        relative = path.relative_to(LOWBIT).as_posix()
        if relative in ABOUT_ONE_OP or relative.startswith(("deploy/", "torch/")):
            continue
        leaks += [f"{relative}:{line} {names}" for line, names in op_type_comparisons(path.read_text())]
    assert not leaks, "op knowledge outside onnx/registry.py: " + ", ".join(leaks)


def test_the_scan_finds_the_comparisons_it_forbids():
    sample = 'if node.op_type in ("MatMul", "Gemm") or n.op_type == "Add":\n    pass\nif op == "Conv":\n    pass\n'
    assert op_type_comparisons(sample) == [(1, ["Gemm", "MatMul"])]
    assert registry.ops_where(lambda r: r.kind == "compute" and r.dynamic is not None) == ["MatMul", "Gemm"]


def test_no_front_end_branches_on_a_weight_algorithm_name():
    """Which algorithm runs, and what it needs, is read from `lowbit.weight_algorithms` only."""
    names = set(ALGORITHMS)
    branches = []
    for path in sorted(LOWBIT.rglob("*.py")):
        relative = path.relative_to(LOWBIT).as_posix()
        if relative == "weight_algorithms.py" or relative.startswith("algorithms/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                found = {c.value for p in [node.left, *node.comparators] for c in ast.walk(p)
                         if isinstance(c, ast.Constant)} & names
                if found:
                    branches.append(f"{relative}:{node.lineno} {sorted(found)}")
    assert not branches, "algorithm-specific branches outside the registry: " + ", ".join(branches)
