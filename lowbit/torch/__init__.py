"""PyTorch backend: weight quantization, and quantization-aware training that exports to ONNX.

    prepared = prepare(model, "w4a8", example_inputs)    # fold BN, swap in fake-quant layers
    calibrate(prepared, batches)                          # activation ranges
    ... train `prepared` with your own loop (optionally distillation_loss, prune) ...
    prepared.eval(); result = export_onnx(prepared, example_inputs, "model.onnx", check_data=x)
    save_packed(prepared, "model.safetensors")            # sub-byte weights, really packed

Submodules are imported lazily so `import lowbit.torch.weights` stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "prepare": "lowbit.torch.qat",
    "QATState": "lowbit.torch.qat",
    "FloatModuleWarning": "lowbit.torch.qat",
    "Int8LayersWarning": "lowbit.torch.qat",
    "sensitive_layers": "lowbit.torch.mixed",
    "calibrate": "lowbit.torch.ranges",
    "export_onnx": "lowbit.torch.export",
    "ExportResult": "lowbit.torch.export",
    "ParityWarning": "lowbit.torch.export",
    "model_nbytes": "lowbit.torch.export",
    "check_parity": "lowbit.torch.parity",
    "ParityReport": "lowbit.torch.parity",
    "save_packed": "lowbit.torch.checkpoint",
    "load_packed": "lowbit.torch.checkpoint",
    "prune": "lowbit.torch.pruning",
    "sparsity_of": "lowbit.torch.pruning",
    "distillation_loss": "lowbit.torch.distill",
    "distill_finetune": "lowbit.torch.distill",
    "QuantAdd": "lowbit.torch.modules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowbit.torch' has no attribute {name!r}")
