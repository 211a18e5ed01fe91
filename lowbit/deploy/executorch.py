"""ExecuTorch: a .pte program with lowbit's quantized graph in one XNNPACK delegate.

The QDQ graph is rebuilt as a PyTorch module (`torch_graph`, integer weight buffers feeding
dequantize ops, activations through quantize -> dequantize with lowbit's grids), exported with
`torch.export` and lowered by `to_edge_transform_and_lower` with the XNNPACK partitioner, which
turns each dq -> op -> q pattern into an int8 XNNPACK kernel using exactly those scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from lowbit.deploy.qdq_graph import QDQGraph
from lowbit.errors import LowbitError

NAME = "ExecuTorch (XNNPACK)"
SUFFIX = ".pte"
EXTRA = "executorch"
MODULE = "executorch"
PRECISIONS = "static int8 (int8 or int4-in-int8 per-channel weights with int8 activations)"


def check(graph: QDQGraph) -> None:
    if graph.precision != "static":
        raise LowbitError("the model is weight-only quantized; ExecuTorch's XNNPACK delegate runs static int8 "
                          "(int8 per-channel weights with int8 activations) from lowbit's QDQ models, so quantize "
                          "with --mode static, or export weight-only models to .ort")


def write(graph: QDQGraph, onnx_model: onnx.ModelProto, example: dict[str, np.ndarray], path: Path,
          *, as_float: bool = False) -> None:
    import executorch.kernels.quantized  # noqa: F401  (out variants of the q/dq ops left outside the delegate)
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from lowbit.deploy.torch_graph import export_program

    inputs = tuple(torch.from_numpy(example[name]) for name in graph.inputs)
    program = export_program(graph, "plain" if as_float else "int", inputs)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    Path(path).write_bytes(lowered.buffer)


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
