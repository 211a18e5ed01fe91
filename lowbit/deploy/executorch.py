"""ExecuTorch: a .pte program with lowbit's quantized graph in one XNNPACK delegate.

The QDQ graph is rebuilt as a PyTorch module (`torch_graph`, integer weight buffers feeding
dequantize ops, activations through quantize -> dequantize with lowbit's grids), exported with
`torch.export` and lowered by `to_edge_transform_and_lower` with the XNNPACK partitioner, which
turns each dq -> op -> q pattern into an int8 XNNPACK kernel using exactly those scales.

Weight-only models (int4 or int8 per-channel linear weights) go to XNNPACK's dynamic-quantization
kernels: the weights keep lowbit's integers and scales (4-bit ones are stored packed, two per
byte), and each linear layer's input is quantized to int8 per row at run time, so the file does
not compute exactly the float-activation model ONNX Runtime runs; the parity check measures that.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import numpy as np
import onnx

from lowbit.deploy.qdq_graph import QDQGraph, matmulnbits_weight
from lowbit.errors import LowbitError

NAME = "ExecuTorch (XNNPACK)"
SUFFIX = ".pte"
EXTRA = "executorch"
MODULE = "executorch"
PRECISIONS = ("static int8 (int8 or int4-in-int8 per-channel weights with int8 activations), and weight-only "
              "int8/int4 per-channel symmetric linear weights (activations quantized per row at run time)")


def check(graph: QDQGraph) -> None:
    """Static int8 runs as is. Weight-only runs on XNNPACK's dynamic-quantization kernels (the
    only 4-bit ones it has), which take symmetric per-channel linear weights: lowbit's blocked
    (per-group) weights would need XNNPACK's blockwise kernels, which store group scales as
    bfloat16, rounding lowbit's float32 scales."""
    if graph.precision == "static":
        return
    advice = ("quantize with --group-size 0 (one scale per output channel, symmetric) for .pte, or export "
              "this model to .ort")
    for op in graph.packed_ops:
        weight = matmulnbits_weight(op, graph.constants)
        if weight is None:
            raise LowbitError(f"{op.name} has per-group weights ({op.attrs['block_size']} of {op.attrs['K']} inputs "
                              "per scale); ExecuTorch's XNNPACK kernels take weight-only int4/int8 with one scale "
                              f"per output channel (its group kernels round scales to bfloat16), so {advice}")
        if weight.grid.zero_point.any():
            raise LowbitError(f"{op.name} has asymmetric weights (zero points); ExecuTorch's XNNPACK kernels take "
                              f"symmetric weight-only int4/int8, so {advice}")
    linear_weights = {op.inputs[1] for op in graph.ops if op.op_type in ("Gemm", "MatMul")}
    for name, weight in graph.weights.items():
        if name not in linear_weights or weight.grid.axis is None or weight.grid.zero_point.any():
            raise LowbitError(f"weight {name} is not a symmetric per-channel weight of a MatMul/Gemm; ExecuTorch's "
                              f"XNNPACK kernels run weight-only linear layers only, so {advice}")


def write(graph: QDQGraph, onnx_model: onnx.ModelProto, example: dict[str, np.ndarray], path: Path,
          *, as_float: bool = False) -> None:
    import executorch.kernels.quantized  # noqa: F401  (out variants of the q/dq ops left outside the delegate)
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from lowbit.deploy.torch_graph import export_program

    inputs = tuple(torch.from_numpy(example[name]) for name in graph.inputs)
    program = export_program(graph, "plain" if as_float else "int", inputs)
    with short_constant_keys():
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    lowered = lowered.to_executorch(ExecutorchBackendConfig(segment_alignment=SEGMENT_ALIGNMENT))
    Path(path).write_bytes(lowered.buffer)


# ExecuTorch's default (128) starts every constant of the delegate on a 128-byte boundary; XNNPACK
# packs the weights into its own buffers when the program loads, so 16 bytes (its SIMD width) do.
SEGMENT_ALIGNMENT = 16


@contextlib.contextmanager
def short_constant_keys():
    """While lowering: the XNNPACK delegate names each constant it stores (weights, biases,
    per-channel scales) by the SHA-256 of its bytes, 64 hex characters written twice (the
    program's named-data table and the delegate's graph), 7 KB on a small net. This gives every
    distinct content a short key ("0", "1", ...) instead: constants with equal bytes still share
    one key and one copy, and the runtime reads the same data. (A rewrite of the finished file
    would go through flatc's JSON, which prints the scales with 6 digits.)"""
    import hashlib

    from executorch.backends.xnnpack.operators import node_visitor

    keys: dict[str, str] = {}

    class ShortDigest:
        def __init__(self, data: bytes) -> None:
            self.full = hashlib.sha256(data).hexdigest()

        def hexdigest(self) -> str:
            return keys.setdefault(self.full, str(len(keys)))

    original = node_visitor.hashlib
    node_visitor.hashlib = types.SimpleNamespace(sha256=ShortDigest)
    try:
        yield
    finally:
        node_visitor.hashlib = original


class _Runner:
    def __init__(self, path: Path, names: list[str]) -> None:
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        self._method = Runtime.get().load_program(Path(path)).load_method("forward")
        self._names = names

    def run(self, _outputs, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        results = self._method.execute([torch.from_numpy(feed[name]) for name in self._names])
        return [r.numpy() for r in results]


def set_threads(threads: int) -> None:
    """Size XNNPACK's thread pool; only before the first program loads (a reset after loading crashed)."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def load(path: Path, threads: int, input_names: list[str]) -> _Runner:
    return _Runner(path, input_names)
