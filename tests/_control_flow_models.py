"""Small stateful / control-flow ONNX models built with onnx.helper (no exporter needed).

`vad_like`: the shape of a voice-activity detector shipped in the field (silero VAD): inputs
`x` [batch, 64] audio, `state` [2, batch, 8] LSTM state (batch on axis 1) and `sr` (a 0-d int64
sample rate). The network (Conv -> Relu -> LSTM -> MatMul -> Sigmoid) sits either in the main
graph or, with `branches=True`, inside a top-level `If (sr == 16000)` whose two branches hold
different weights: the then-branch as Constant nodes (as exporters inline them), the else-branch
reading outer initializers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 32
SAMPLES = 64
OPSET = 17


def _weights(rng: np.random.Generator, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}conv_w": (rng.standard_normal((HIDDEN, 1, 3)) * 0.5).astype(np.float32),
        f"{prefix}conv_b": (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32),
        f"{prefix}lstm_w": (rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.3).astype(np.float32),
        f"{prefix}lstm_r": (rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.3).astype(np.float32),
        f"{prefix}lstm_b": (rng.standard_normal((1, 8 * HIDDEN)) * 0.1).astype(np.float32),
        f"{prefix}head_w": (rng.standard_normal((HIDDEN, 1)) * 0.5).astype(np.float32),
    }


def _network(p: str, w: dict[str, str]) -> list[onnx.NodeProto]:
    """Nodes from x, state to `{p}prob`, `{p}stateN`; `w` maps weight role -> tensor name."""
    mk = helper.make_node
    return [
        mk("Unsqueeze", ["x", "axes1"], [f"{p}x3"], name=f"{p}unsqueeze"),
        mk("Conv", [f"{p}x3", w["conv_w"], w["conv_b"]], [f"{p}conv"], name=f"{p}conv", strides=[2]),
        mk("Relu", [f"{p}conv"], [f"{p}relu"], name=f"{p}relu"),
        mk("Transpose", [f"{p}relu"], [f"{p}seq"], name=f"{p}transpose", perm=[2, 0, 1]),
        mk("Split", ["state", "split11"], [f"{p}h0", f"{p}c0"], name=f"{p}split", axis=0),
        mk("LSTM", [f"{p}seq", w["lstm_w"], w["lstm_r"], w["lstm_b"], "", f"{p}h0", f"{p}c0"],
           [f"{p}y", f"{p}yh", f"{p}yc"], name=f"{p}lstm", hidden_size=HIDDEN),
        mk("Concat", [f"{p}yh", f"{p}yc"], [f"{p}stateN"], name=f"{p}concat", axis=0),
        mk("Squeeze", [f"{p}yh", "axes0"], [f"{p}last"], name=f"{p}squeeze"),
        mk("MatMul", [f"{p}last", w["head_w"]], [f"{p}logit"], name=f"{p}head"),
        mk("Sigmoid", [f"{p}logit"], [f"{p}prob"], name=f"{p}sigmoid"),
    ]


def vad_like(path: Path, *, branches: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shared = [numpy_helper.from_array(np.array([1], np.int64), "axes1"),
              numpy_helper.from_array(np.array([0], np.int64), "axes0"),
              numpy_helper.from_array(np.array([1, 1], np.int64), "split11")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SAMPLES]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", HIDDEN]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", HIDDEN])]
    if not branches:
        weights = _weights(rng, "")
        nodes = _network("", {k: k for k in weights})
        graph = helper.make_graph(nodes, "vad", inputs, outputs,
                                  shared + [numpy_helper.from_array(v, k) for k, v in weights.items()])
    else:
        then_w = _weights(rng, "t_")
        else_w = _weights(rng, "e_")
        then_nodes = [helper.make_node("Constant", [], [k], name=f"{k}_const", value=numpy_helper.from_array(v, k))
                      for k, v in then_w.items()]
        then_nodes += _network("t_", {k[2:]: k for k in then_w})
        else_nodes = _network("e_", {k[2:]: k for k in else_w})
        def branch(name, nodes, p):
            outs = [helper.make_tensor_value_info(f"{p}prob", TensorProto.FLOAT, None),
                    helper.make_tensor_value_info(f"{p}stateN", TensorProto.FLOAT, None)]
            return helper.make_graph(nodes, name, [], outs)

        nodes = [
            helper.make_node("Constant", [], ["sr16k"], name="sr16k", value=numpy_helper.from_array(np.array(16000, np.int64))),
            helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="is16k"),
            helper.make_node("If", ["is16k"], ["prob", "stateN"], name="by_rate",
                             then_branch=branch("then", then_nodes, "t_"),
                             else_branch=branch("else", else_nodes, "e_")),
        ]
        graph = helper.make_graph(nodes, "vad_if", inputs, outputs,
                                  shared + [numpy_helper.from_array(v, k) for k, v in else_w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def vad_calls(calls: int = 24, *, sr: int = 16000, batch: int = 1, seed: int = 1) -> dict[str, np.ndarray]:
    """A call sequence for `vad_like`: each call one [batch, 64] frame, its state and the rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES, dtype=np.float32)
    x = np.stack([np.sin(t * rng.uniform(0.05, 0.8) + rng.uniform(0, 6))[None].repeat(batch, 0) * rng.uniform(0.1, 1)
                  + rng.standard_normal((batch, SAMPLES)).astype(np.float32) * 0.05 for _ in range(calls)])
    state = rng.standard_normal((calls, 2, batch, HIDDEN)).astype(np.float32) * 0.5
    return {"x": x.astype(np.float32), "state": state, "sr": np.full(calls, sr, np.int64)}


def loop_mlp(path: Path, *, kind: str = "Loop", steps: int = 3, seed: int = 0) -> Path:
    """A recurrence h <- Relu(h @ W + b) run `steps` times inside a Loop (trip count input) or a
    Scan (over the rows of `xs`, added to h each step); W and b are outer initializers."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 16)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(16) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    mk = helper.make_node
    if kind == "Loop":
        body = helper.make_graph(
            [mk("MatMul", ["h_in", "W"], ["mm"], name="body_mm"), mk("Add", ["mm", "b"], ["pre"], name="body_add"),
             mk("Relu", ["pre"], ["h_out"], name="body_relu"), mk("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
            "loop_body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", 16])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", 16])])
        inits += [numpy_helper.from_array(np.array(steps, np.int64), "trips"),
                  numpy_helper.from_array(np.array(True), "go")]
        nodes = [mk("Loop", ["trips", "go", "h0"], ["h"], name="loop", body=body)]
        inputs = [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", 16])]
        result = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 16])
    else:
        body = helper.make_graph(
            [mk("Add", ["h_in", "x_t"], ["mixed"], name="body_mix"),
             mk("MatMul", ["mixed", "W"], ["mm"], name="body_mm"), mk("Add", ["mm", "b"], ["pre"], name="body_add"),
             mk("Relu", ["pre"], ["h_out"], name="body_relu")],
            "scan_body",
            [helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 16]),
             helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, 16])],
            [helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 16])])
        nodes = [mk("Scan", ["h0", "xs"], ["h"], name="scan", body=body, num_scan_inputs=1)]
        inputs = [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 16]),
                  helper.make_tensor_value_info("xs", TensorProto.FLOAT, [steps, 1, 16])]
        result = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 16])
    graph = helper.make_graph(nodes, kind.lower(), inputs, [result], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
