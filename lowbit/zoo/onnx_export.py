"""One torch -> ONNX export path for the zoo models."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch

from lowbit.onnx.io import save_model


def export_to_onnx(model: torch.nn.Module, args: tuple, path: str | Path, *, input_names: list[str],
                   output_names: list[str], dynamic_axes: dict, opset: int = 17,
                   fold_constants: bool = True) -> Path:
    """Export in eval mode with the TorchScript exporter and write the file atomically.

    dynamo=False: the TorchScript exporter ships with torch and needs no onnxscript. With
    `fold_constants` (the default) it folds BatchNorm into Conv, as deployment exports normally do.
    """
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=fold_constants)
    path = Path(path)
    save_model(onnx.load_from_string(buffer.getvalue()), path)
    return path
