"""Weight-only quantization of embedding tables (Gather): GatherBlockQuantized and DQ + Gather.

The reference is independent of the code under test: the stored codes and scales are those of a
`QuantizedWeight`, dequantized here with NumPy (code x block scale, zero point subtracted) and
indexed with NumPy; ONNX Runtime's kernels must return exactly those rows.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _onnx_quant_models import tiny_encoder, token_calib
from onnx import TensorProto, helper, numpy_helper

from lowbit.algorithms import rtn_quantize
from lowbit.errors import LowbitError
from lowbit.onnx.blockwise import WeightSite, blocked_dq_nodes, gather_block_quantized_node
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.onnx.weight_only import quantize_weight_only, weight_only_spec

ROWS, COLUMNS = 50, 80  # 80 columns: blocks of 32 leave a partial last block


def numpy_rows(quantized, ids: np.ndarray, block: int) -> np.ndarray:
    """Rows `ids` of the table the codes stand for, dequantized with NumPy."""
    values = np.asarray(quantized.values, np.float64)
    scale = np.repeat(np.asarray(quantized.qparams.scale, np.float64).reshape(ROWS, -1), block, axis=1)[:, :COLUMNS]
    zero = np.repeat(np.asarray(quantized.qparams.zero_point, np.float64).reshape(ROWS, -1), block, axis=1)[:, :COLUMNS]
    return ((values - zero) * scale).astype(np.float32)[ids]


def table_model(nodes, inits, opset: int = 21) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["b", "s", COLUMNS])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", opset),
                                                                  helper.make_opsetid("com.microsoft", 1)])


def run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.mark.parametrize("bits, symmetric, block", [(4, True, 32), (4, False, 16), (8, True, 32), (8, False, 64)])
def test_onnx_runtime_lookups_equal_numpy_dequantized_rows(bits, symmetric, block):
    rng = np.random.default_rng(bits + block)
    table = torch.from_numpy(rng.standard_normal((ROWS, COLUMNS)).astype(np.float32) + (0 if symmetric else 0.7))
    quantized = rtn_quantize(table, weight_only_spec(bits, block, symmetric))
    if not symmetric:
        assert np.any(np.asarray(quantized.qparams.zero_point) != 0)  # zero points are really stored
    ids = np.array([[0, 49, 7, 7], [-1, 3, 25, 48]], np.int64)  # repeats and a negative index
    expected = numpy_rows(quantized, ids % ROWS, block)
    site = WeightSite("embed", "Gather", "table", "ids", COLUMNS, ROWS, transposed=True)
    node, inits = gather_block_quantized_node(site, quantized, bits=bits, block_size=block, output="rows")
    assert node.op_type == "GatherBlockQuantized"
    np.testing.assert_array_equal(run(table_model([node], inits), {"ids": ids}), expected)
    dq, inits = blocked_dq_nodes(site, quantized, bits=bits, block_size=block)
    gather = helper.make_node("Gather", [dq.output[0], "ids"], ["rows"])
    np.testing.assert_array_equal(run(table_model([dq, gather], inits), {"ids": ids}), expected)


def embedding_mlp(columns: int = COLUMNS) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul W -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((ROWS, columns)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((columns, 16)).astype(np.float32) * 0.1, "W")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 16])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("weight_format, op", [("matmulnbits", "GatherBlockQuantized"), ("dq", "DequantizeLinear")])
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_rounds_the_table_and_the_model_computes_with_it(weight_format, op, bits):
    model = embedding_mlp()
    done = quantize_weight_only(model, None, group_size=32, weight_format=weight_format, embedding_bits=bits)
    ops = [n.op_type for n in done.model.graph.node]
    assert op in ops and "table" not in {t.name for t in done.model.graph.initializer}
    assert done.plan.settings["weight_only"]["embedding_tables"] == ["embed"]
    entry = next(e for e in done.plan.quantized("weight") if e.tensor == "table")
    assert entry.spec.dtype == f"int{bits}" and entry.spec.granularity.group_size == 32
    # The reference: the float model with its table replaced by the NumPy-dequantized codes and
    # its MatMul weight by the same weight-only MatMul (so only the table's form differs).
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "table"))
    quantized = rtn_quantize(torch.from_numpy(table.copy()), weight_only_spec(bits, 32))
    reference = quantize_weight_only(model, None, group_size=32, weight_format=weight_format, embedding_bits=0).model
    dequantized = numpy_rows(quantized, np.arange(ROWS), 32)
    for tensor in reference.graph.initializer:
        if tensor.name == "table":
            tensor.CopyFrom(numpy_helper.from_array(dequantized, "table"))
    ids = np.random.default_rng(1).integers(0, ROWS, (3, 7)).astype(np.int64)
    np.testing.assert_allclose(run(done.model, {"ids": ids}), run(reference, {"ids": ids}), rtol=1e-5, atol=1e-6)
    size = done.model.ByteSize()
    assert size < reference.ByteSize() - ROWS * COLUMNS * (4 - bits / 8) + 1000  # the table really shrank


def test_tables_kept_float_by_choice_odd_rows_or_exclusion():
    model = embedding_mlp(columns=81)
    done = quantize_weight_only(model, None, group_size=32, embedding_bits=4)
    assert "Gather" in [n.op_type for n in done.model.graph.node]
    assert "even row length" in done.plan.float_nodes["embed"]
    eight = quantize_weight_only(model, None, group_size=32, embedding_bits=8)  # one code per byte: any length
    assert "GatherBlockQuantized" in [n.op_type for n in eight.model.graph.node]
    kept = quantize_weight_only(embedding_mlp(), None, group_size=32, embedding_bits=8, exclude=["embed"])
    assert kept.plan.float_nodes["embed"] == "excluded by the user"
    none = quantize_weight_only(embedding_mlp(), None, group_size=32, embedding_bits=0)
    assert none.plan.settings["weight_only"]["embedding_tables"] == []
    with pytest.raises(LowbitError, match="embedding tables take 4 or 8 bits"):
        quantize_weight_only(embedding_mlp(), None, embedding_bits=2)


def test_quantize_onnx_rounds_the_encoder_embeddings_by_default(tmp_path):
    path = tiny_encoder(tmp_path / "enc.onnx")
    calib = token_calib(tmp_path / "calib.npz", n=8)
    result = quantize_onnx(path, tmp_path / "q.onnx", mode="weight-only", calib=calib, group_size=32,
                           measure_speed=False)
    assert result.report.outputs[0].cosine_mean > 0.999
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in written.graph.node].count("GatherBlockQuantized") == 1
    tables = {t.name for t in written.graph.initializer if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT}
    assert not [n for n in written.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    assert read_plan(tmp_path / "q.onnx").settings["weight_only"]["embedding_bits"] == 8
