"""Export a prepared (trained, calibrated) model to QDQ ONNX and check it on ONNX Runtime.

The exported graph holds the integer weights and exactly the scales and zero points of the
fake-quantized model: weights as integer initializers feeding DequantizeLinear (per-channel with
`axis`, per-group with `block_size`), biases as int32 with scale input_scale x weight_scale,
activations as QuantizeLinear -> DequantizeLinear pairs at the points `prepare` placed them
(layer outputs after a fused ReLU/ReLU6, see `points`), written as uint8 (the same grid shifted
by 128, ONNX Runtime's fast U8S8 kernels) unless `uint8_activations=False`.

Sub-8-bit weights (int4, int2, binary +-1, ternary) are written in int8 containers by default:
ONNX Runtime then fuses them into its int8 kernels (QLinearConv, QGemm), whereas it runs an INT4
DequantizeLinear as a separate op and the Conv in float. `ExportResult.packed_weight_bytes` is
the true size packed to each layer's bit width either way (layers a sub-4-bit recipe keeps at
int8, see `mixed`, count 8 bits); `native_int4=True` stores int4 as ONNX INT4
(opset 21) for a file that is small on disk, at the cost of speed.

After export, ONNX Runtime's optimized graph is inspected: `ExportResult.float_ops` lists the
Conv / Gemm / MatMul nodes it left in float (empty when everything runs as int8 kernels).

Parity with the PyTorch model is checked on every export (see `parity`).
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import QParams, quantize
from lowbit.onnx.io import save_model
from lowbit.plan import PLAN_METADATA_KEY, PlanEntry, QuantPlan
from lowbit.torch.modules import QuantAdd, QuantizedLayer
from lowbit.torch.parity import MAX_STEPS, MIN_AGREEMENT, ParityReport, check_parity
from lowbit.torch.qat import (QATState, activation_quantizers, as_input_tuple, check_inputs,
                                  quantized_layers, state_of)
from lowbit.torch.quantizers import ActivationQuantizer, WeightQuantizer
from lowbit.torch.weights import stored_nbytes

OPSET = 21  # int4 tensors and blocked (per-group) DequantizeLinear
IR_VERSION = 10  # what opset 21 needs; newer IR versions are refused by some runtimes
RECIPE_METADATA_KEY = "lowbit.recipe"


class ParityWarning(UserWarning):
    """The exported model does not reproduce the PyTorch model within the parity limits."""


@dataclass
class ExportResult:
    path: Path
    parity: ParityReport
    packed_weight_bytes: int  # every parameter, quantized weights packed to their bit width
    float_weight_bytes: int  # the same parameters in float32
    onnx_file_bytes: int
    native_int4: list[str] = field(default_factory=list)  # initializers stored as ONNX INT4
    float_modules: dict[str, str] = field(default_factory=dict)
    int8_layers: dict[str, str] = field(default_factory=dict)  # int8 weights in a sub-4-bit recipe
    # Conv/Gemm/MatMul nodes ONNX Runtime's optimizer left in float (None: not checked)
    float_ops: list[str] | None = None


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *,
                check_data: Any = None, input_names: list[str] | None = None,
                output_names: list[str] | None = None, native_int4: bool = False,
                uint8_activations: bool = True, check_fusion: bool = True,
                min_agreement: float = MIN_AGREEMENT, max_steps: float = MAX_STEPS) -> ExportResult:
    """Write `model` (prepared, calibrated, in eval mode) as QDQ ONNX to `path` and check parity.

    `check_data` (default: `example_inputs`) are the inputs the parity check runs on; use a
    few hundred real samples for a meaningful top-1 agreement. The model is not modified. A
    parity failure is reported with a ParityWarning (and in the result); the file is still
    written so it can be inspected.

    native_int4: store int4 weights as ONNX INT4 (smaller file, slower on ONNX Runtime);
    uint8_activations: write int8 activation grids as the identical uint8 grids (faster on x86);
    check_fusion: list the layers ONNX Runtime's optimizer leaves in float (`float_ops`)."""
    state = state_of(model)
    if model.training:
        raise LowbitError("the model is in training mode; call model.eval() before exporting (lowbit does not "
                          "switch modes for you, so dropout or range updates never change silently)")
    inputs = as_input_tuple(example_inputs)
    check_inputs(state, inputs, "example inputs")
    checks = inputs if check_data is None else as_input_tuple(check_data, "parity check inputs")
    check_inputs(state, checks, "parity check inputs")
    missing = [q.name for q in activation_quantizers(model).values() if not bool(q.calibrated)]
    if missing:
        raise LowbitError(f"activations {missing} have no range; call lowbit.torch.calibrate(model, batches) "
                          "before exporting")

    onnx_model, int4_names = _to_onnx(model, inputs, state, input_names, output_names, native_int4,
                                      uint8_activations)
    parity = check_parity(model, onnx_model, checks, min_agreement=min_agreement, max_steps=max_steps)
    path = Path(path)
    save_model(onnx_model, path)
    if not parity.passed:
        warnings.warn(f"exported model {path} does not match the PyTorch model: {parity.describe()}",
                      ParityWarning, stacklevel=2)
    packed, float_bytes = model_nbytes(model)
    float_ops = float_ops_after_optimization(onnx_model) if check_fusion else None
    return ExportResult(path, parity, packed, float_bytes, path.stat().st_size, int4_names,
                        dict(state.float_modules), dict(state.int8_layers), float_ops)


_COMPUTE_OPS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose"}


def float_ops_after_optimization(onnx_model: onnx.ModelProto) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes still computing in float after ONNX Runtime's graph
    optimizations (its int8 kernels are QLinearConv, QGemm, MatMulInteger... instead)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the "hardware specific optimized model" notice
        options.intra_op_num_threads = 1
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return [node.name or node.output[0] for node in optimized.graph.node if node.op_type in _COMPUTE_OPS]


def _to_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], state: QATState,
             input_names: list[str] | None, output_names: list[str] | None,
             native_int4: bool, uint8_activations: bool) -> tuple[onnx.ModelProto, list[str]]:
    frozen = copy.deepcopy(model)
    for module in frozen.modules():
        if isinstance(module, (QuantizedLayer, QuantAdd)):
            module.freeze_for_export(uint8_activations)
    with torch.no_grad():
        outputs = frozen(*inputs)
    n_outputs = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
    input_names = input_names or (["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))])
    output_names = output_names or (["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)])
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(frozen, inputs, buffer, dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes={n: {0: "batch"} for n in input_names + output_names},
                          do_constant_folding=True)
    onnx_model = onnx.load_from_string(buffer.getvalue())
    onnx_model.ir_version = IR_VERSION
    int4_names = _store_int4(onnx_model, frozen) if native_int4 else []
    onnx_model.metadata_props.append(onnx.StringStringEntryProto(key=RECIPE_METADATA_KEY, value=state.recipe.to_json()))
    onnx_model.metadata_props.append(onnx.StringStringEntryProto(key=PLAN_METADATA_KEY, value=_plan(model, state).to_json()))
    return onnx_model, int4_names


def _store_int4(onnx_model: onnx.ModelProto, frozen: nn.Module) -> list[str]:
    """Retype 4-bit weights (held in int8 buffers during export) and their zero points as INT4."""
    four_bit = {}
    for name, layer in quantized_layers(frozen).items():
        spec = layer.export_spec
        if spec.dtype_info.kind == "int" and spec.bits == 4:
            kind = TensorProto.INT4 if spec.dtype_info.signed else TensorProto.UINT4
            four_bit[f"{name}.export_weight"] = kind
            four_bit[f"{name}.export_weight_zero_point"] = kind
    converted = []
    initializers = onnx_model.graph.initializer
    for i, tensor in enumerate(initializers):
        if tensor.name not in four_bit:
            continue
        values = numpy_helper.to_array(tensor)
        replacement = helper.make_tensor(tensor.name, four_bit[tensor.name], values.shape,
                                         values.astype(np.int64).reshape(-1).tolist())
        initializers[i].CopyFrom(replacement)
        converted.append(tensor.name)
    expected = {n for n in four_bit if not n.endswith("_zero_point")}
    if not expected <= set(converted):
        raise RuntimeError(f"int4 weights {sorted(expected - set(converted))} were not found among the "
                           "exported initializers")  # an exporter change: a lowbit bug, not user error
    return sorted(n for n in converted if not n.endswith("_zero_point"))


def _plan(model: nn.Module, state: QATState) -> QuantPlan:
    plan = QuantPlan(mode="qat", settings={"recipe": state.recipe.name, "learnable_scales": state.learnable_scales,
                                           "int8_layers": list(state.int8_layers)},
                     float_nodes=dict(state.float_modules))
    for name, layer in quantized_layers(model).items():
        with torch.no_grad():
            _, qp = layer.quantized_weight()
        plan.add(PlanEntry(f"{name}.weight", "weight", spec=qp.spec, qparams=_numpy_qparams(qp), nodes=[name]))
    for quantizer in activation_quantizers(model).values():
        qp = quantizer.qparams()
        plan.add(PlanEntry(quantizer.name, "activation", spec=qp.spec, qparams=_numpy_qparams(qp),
                           nodes=[quantizer.name.rsplit(".", 1)[0]]))
    return plan


def _numpy_qparams(qp: QParams) -> QParams:
    return QParams(qp.spec, torch.as_tensor(qp.scale).detach().numpy().astype(np.float32),
                   torch.as_tensor(qp.zero_point).detach().numpy().astype(np.int32))


@torch.no_grad()
def model_nbytes(model: nn.Module) -> tuple[int, int]:
    """(packed, float32) bytes of the model's parameters: quantized weights packed to their bit
    width with their scales and zero points, everything else (biases, float modules) as float32.
    Learned step sizes are part of the weights' scales, not counted twice."""
    scales = {id(p) for m in model.modules() if isinstance(m, (WeightQuantizer, ActivationQuantizer))
              for p in m.parameters(recurse=False)}
    parameters = [p for p in model.parameters() if id(p) not in scales]
    packed, done = 0, set()
    for layer in quantized_layers(model).values():
        _, qp = layer.quantized_weight()
        values = quantize(layer.weight_quantizer.matrix(layer.effective_weight()), qp)
        packed += stored_nbytes(values, qp)
        done.add(id(layer.weight))
    packed += sum(p.numel() * 4 for p in parameters if id(p) not in done)
    return packed, sum(p.numel() * 4 for p in parameters)
