"""ONNX Runtime sessions on CPU, with runtime failures turned into one-sentence user errors."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from lowbit.errors import LowbitError


def make_session(model: onnx.ModelProto | bytes, *, threads: int | None = None,
                 optimize: bool = True) -> ort.InferenceSession:
    """A CPU InferenceSession; ORT failures become a LowbitError naming the cause."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    payload = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/NotImplemented/InvalidGraph types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"ONNX Runtime cannot run this model ({first}); check that every op is a "
                          "standard ONNX op or one ONNX Runtime implements") from None
