"""ONNX Runtime sessions on CPU, with runtime failures turned into one-sentence user errors.

Every session lowbit makes has spin-waiting off (intra-op and inter-op): after a run, ONNX
Runtime's worker threads otherwise keep spinning on the cores for a while, which steals them from
whatever runs next (the other model of a timed pair, the next calibration batch) and makes a model
of many tiny ops look several times slower than it is. Speed ratios are measured between sessions
made here, with the same options, so both sides of a ratio run under identical, stated settings.
"""

from __future__ import annotations

import os

import onnx
import onnxruntime as ort

from lowbit.errors import LowbitError

SPIN_WAIT_OFF = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity), the intra-op thread count lowbit times with."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_threads(threads: int | None = None) -> int:
    """The threads to spread work over: `threads` (None: every core), never more than the cores
    this process may run on."""
    return min(threads or default_threads(), default_threads())


def session_options(threads: int | None = None, *, optimize: bool = True) -> ort.SessionOptions:
    """The options of every lowbit session: spin-waiting off, `threads` intra-op threads (ONNX
    Runtime's default when None), one inter-op thread, full graph optimization unless `optimize` is False."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in SPIN_WAIT_OFF.items():
        options.add_session_config_entry(key, value)
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return options


def make_session(model: onnx.ModelProto | bytes | str | os.PathLike, *, threads: int | None = None,
                 optimize: bool = True) -> ort.InferenceSession:
    """A CPU InferenceSession with `session_options`; ORT failures become a LowbitError naming the cause."""
    if isinstance(model, onnx.ModelProto):
        payload = model.SerializeToString()
    elif isinstance(model, bytes):
        payload = model
    else:
        payload = os.fspath(model)  # a path: ONNX Runtime resolves external data next to it
    try:
        return ort.InferenceSession(payload, session_options(threads, optimize=optimize),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/NotImplemented/InvalidGraph types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"ONNX Runtime cannot run this model ({first}); check that every op is a "
                          "standard ONNX op or one ONNX Runtime implements") from None
