"""LSTM with int8 weights on ONNX Runtime: float LSTM vs DequantizeLinear+LSTM vs DynamicQuantizeLSTM.

One LSTM (hidden 128, input 128, batch 1), per-gate-row symmetric int8 weights; latency per call,
median of 7 interleaved repeats of 200 runs, 1 thread, spin-waiting off; max abs error of Y_h.

    python bench/lstm_int8.py
"""
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper, numpy_helper

H = 128; I = 128
rng = np.random.default_rng(0)
W = (rng.standard_normal((1, 4*H, I))*0.1).astype(np.float32); R = (rng.standard_normal((1, 4*H, H))*0.1).astype(np.float32)
B = np.zeros((1, 8*H), np.float32)
def q(w):  # per-row symmetric int8 along axis 1
    s = np.abs(w).max(axis=2, keepdims=True) / 127
    return np.clip(np.rint(w / s), -127, 127).astype(np.int8), s.astype(np.float32)
Wq, Ws = q(W); Rq, Rs = q(R)
inp = [helper.make_tensor_value_info("x", T.FLOAT, ["s", 1, I]), helper.make_tensor_value_info("h", T.FLOAT, [1, 1, H]), helper.make_tensor_value_info("c", T.FLOAT, [1, 1, H])]
out = [helper.make_tensor_value_info("yh", T.FLOAT, None)]
def model(kind):
    inits = [numpy_helper.from_array(B, "B")]; nodes = []
    if kind == "float":
        inits += [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")]
        nodes.append(helper.make_node("LSTM", ["x", "W", "R", "B", "", "h", "c"], ["", "yh"], hidden_size=H))
    elif kind == "qdq":
        for n, wq, ws in (("W", Wq, Ws), ("R", Rq, Rs)):
            inits += [numpy_helper.from_array(wq, n+"q"), numpy_helper.from_array(ws.reshape(-1), n+"s"), numpy_helper.from_array(np.zeros(4*H, np.int8), n+"z")]
            nodes.append(helper.make_node("DequantizeLinear", [n+"q", n+"s", n+"z"], [n], axis=1))
        nodes.append(helper.make_node("LSTM", ["x", "W", "R", "B", "", "h", "c"], ["", "yh"], hidden_size=H))
    else:  # DynamicQuantizeLSTM: W [dirs, input, 4H] transposed, scales per dir x 4H
        for n, wq, ws in (("W", Wq, Ws), ("R", Rq, Rs)):
            inits += [numpy_helper.from_array(np.ascontiguousarray(wq.transpose(0, 2, 1)), n+"q"), numpy_helper.from_array(ws.reshape(1, -1), n+"s"), numpy_helper.from_array(np.zeros((1, 4*H), np.int8), n+"z")]
        nodes.append(helper.make_node("DynamicQuantizeLSTM", ["x", "Wq", "Rq", "B", "", "h", "c", "", "Ws", "Wz", "Rs", "Rz"], ["", "yh"], hidden_size=H, domain="com.microsoft"))
    g = helper.make_graph(nodes, "g", inp, out, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]); m.ir_version = 8
    return m
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
o.add_session_config_entry("session.intra_op.allow_spinning", "0")
sess = {k: ort.InferenceSession(model(k).SerializeToString(), o, providers=["CPUExecutionProvider"]) for k in ("float", "qdq", "dyn")}
for seq in (1, 32):
    feed = {"x": rng.standard_normal((seq, 1, I)).astype(np.float32), "h": np.zeros((1,1,H),np.float32), "c": np.zeros((1,1,H),np.float32)}
    ref = sess["float"].run(None, feed)[0]
    times = {k: [] for k in sess}
    for rep in range(7):
        for k, s in sess.items():
            t = time.perf_counter()
            for _ in range(200): s.run(None, feed)
            times[k].append((time.perf_counter() - t) / 200 * 1e6)
    print("seq", seq, {k: f"{np.median(v):.1f}us err {np.abs(sess[k].run(None, feed)[0]-ref).max():.4f}" for k, v in times.items()})
