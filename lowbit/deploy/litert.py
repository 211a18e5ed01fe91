"""LiteRT (TensorFlow Lite): an int8 .tflite with lowbit's scales, run by ai-edge-litert.

The QDQ graph is rebuilt as a PyTorch module (`torch_graph`) whose weights are float values
followed by quantize -> dequantize on lowbit's grid (litert-torch rejects integer weight
buffers; rounding the exactly representable float values gives back lowbit's integers), and
converted by `litert_torch.convert` in its STATIC q/dq mode, which folds every q/dq pair into
int8 tensors carrying those scales. Without a quantization config the converter silently writes
a float model, so the config is always passed. Weight-only int8 models become LiteRT's
dynamic-range form (int8 weights, activations quantized on the fly by the kernels).

The .tflite takes and returns whatever the converter chose at the boundary: a model whose first
op quantizes its input takes int8 on lowbit's input grid (the tensor's quantization parameters).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import onnx

from lowbit.deploy.qdq_graph import QDQGraph
from lowbit.errors import LowbitError

NAME = "LiteRT (XNNPACK)"
SUFFIX = ".tflite"
EXTRA = "litert"
MODULE = "litert_torch"
PRECISIONS = "static int8, and int8 weight-only as LiteRT's dynamic-range kernels"


def check(graph: QDQGraph) -> None:
    if graph.packed_ops:
        raise LowbitError("the model is weight-only quantized with ONNX Runtime's MatMulNBits op; LiteRT runs static "
                          "int8 QDQ models and int8 weight-only DequantizeLinear weights, so quantize with --mode "
                          "static, or export this model to .ort")
    if graph.precision == "weight-only" and graph.weight_bits > 8:
        raise LowbitError("LiteRT runs static int8 and int8 weight-only (dynamic-range) models; this one has "
                          f"{graph.weight_bits}-bit weights")
    if graph.precision == "weight-only" and graph.weight_bits < 8:
        raise LowbitError(f"the model has {graph.weight_bits}-bit weight-only quantization; LiteRT runs static "
                          "int8 and int8 weight-only (dynamic-range) models, so export int4 weight-only models "
                          "to .ort, or quantize int8 for .tflite")


def write(graph: QDQGraph, onnx_model: onnx.ModelProto, example: dict[str, np.ndarray], path: Path,
          *, as_float: bool = False) -> None:
    Path(path).write_bytes(compact(convert(graph, example, as_float=as_float)))


def convert(graph: QDQGraph, example: dict[str, np.ndarray], *, as_float: bool = False) -> bytes:
    """The converter's .tflite for the rebuilt graph, as it writes it."""
    import torch

    with _quiet():
        import litert_torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig

        from lowbit.deploy.torch_graph import QDQModule

        inputs = tuple(torch.from_numpy(example[name]) for name in graph.inputs)
        config = None
        if not as_float:
            # The quantizer only tells the converter how to read the q/dq ops already in the graph
            # (STATIC: int8 activations; DYNAMIC: int8 weights, float activations); it annotates nothing.
            dynamic = graph.precision == "weight-only"
            quantizer = PT2EQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
            config = QuantConfig(pt2e_quantizer=quantizer)
        module = QDQModule(graph, "plain" if as_float else "float").eval()
        return litert_torch.convert(module, inputs, quant_config=config).model_content()


def compact(content: bytes) -> bytes:
    """The same .tflite model, repacked without duplicate vectors or long tensor names.

    The converter writes every tensor's quantization vectors separately: per output channel an
    int64 zero point (the schema's type) on the weight and again on the int32 bias, all zero for
    lowbit's symmetric weights, plus a float32 scale on each. On small nets that is a third of
    the file. FlatBuffers lets tables share one vector, so identical vectors (the zero points, a
    scale repeated) are stored once; tensor names (the converter's module paths) become t0, t1, ...
    The runtime reads the same numbers: only the layout of the file changes. Applied to the float
    export as well, so the size ratio compares like with like."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    class SharingBuilder(flatbuffers.Builder):
        """Writes each distinct numeric vector once; byte buffers (weights) stay 16-byte aligned
        as the converter writes them."""

        def __init__(self, size: int) -> None:
            super().__init__(size)
            self.vectors: dict[tuple[str, bytes], int] = {}

        def StartVector(self, elemSize, numElems, alignment):  # noqa: N802,N803 (FlatBuffers' API)
            if elemSize == 1 and numElems >= 16:
                alignment = max(alignment, 16)
            return super().StartVector(elemSize, numElems, alignment)

        def CreateNumpyVector(self, x):  # noqa: N802 (FlatBuffers' API)
            key = (x.dtype.str, x.tobytes())
            if key not in self.vectors:
                self.vectors[key] = super().CreateNumpyVector(x)
            return self.vectors[key]

    model = schema.ModelT.InitFromPackedBuf(content, 0)
    for subgraph in model.subgraphs:
        for index, tensor in enumerate(subgraph.tensors):
            tensor.name = f"t{index}"
    builder = SharingBuilder(len(content))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


class _Runner:
    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self._interpreter.allocate_tensors()
        self._inputs = sorted(self._interpreter.get_input_details(), key=lambda d: d["index"])
        self._outputs = sorted(self._interpreter.get_output_details(), key=lambda d: d["index"])

    def run(self, _outputs, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        for detail, value in zip(self._inputs, feed.values()):
            self._interpreter.set_tensor(detail["index"], _to_tensor(value, detail))
        self._interpreter.invoke()
        return [_from_tensor(self._interpreter.get_tensor(d["index"]), d) for d in self._outputs]


def _to_tensor(value: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.int8 and value.dtype != np.int8:
        scale, zero_point = detail["quantization"]
        return np.clip(np.round(value / scale) + zero_point, -128, 127).astype(np.int8)
    return value.astype(detail["dtype"])


def _from_tensor(value: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.int8:
        scale, zero_point = detail["quantization"]
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return value


def load(path: Path, threads: int, input_names: list[str]) -> _Runner:
    return _Runner(path, threads)


@contextlib.contextmanager
def _quiet():
    """litert-torch prints a progress tree and TensorFlow-style logs on every conversion."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
