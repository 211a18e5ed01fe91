"""Read and write ONNX files safely.

Loading turns every way a file can fail to be a usable model (missing, a folder, not protobuf,
external data gone, invalid graph) into one `LowbitError` sentence. Saving is atomic and never
overwrites an input model: a crash halfway leaves the old file, or no file, never half a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from lowbit.errors import LowbitError

PathLike = str | os.PathLike

# Protobuf refuses to serialize a message over 2 GiB; stay clear of it with some headroom.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def load_model(path: PathLike) -> onnx.ModelProto:
    """Load and validate an ONNX model, external data included."""
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"Model file {path} does not exist; check the path.")
    if path.is_dir():
        raise LowbitError(f"{path} is a directory, not an ONNX file; pass the path of the .onnx file.")
    if path.stat().st_size == 0:
        raise LowbitError(f"Model file {path} is empty; re-export or re-download the model.")

    model = onnx.ModelProto()
    payload = path.read_bytes()
    try:
        model.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise LowbitError(
            f"{path} is not a valid ONNX file (it is truncated or not protobuf: {_first_line(exc)}); "
            "re-export the model."
        ) from None
    # Protobuf parsing is lenient: some byte strings decode "successfully" into an empty message.
    if model.ir_version == 0 or not model.HasField("graph"):
        raise LowbitError(f"{path} does not contain an ONNX model (no IR version or graph); re-export the model.")

    base_dir = path.parent
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    for tensor in external:
        location = ExternalDataInfo(tensor).location
        if not (base_dir / location).is_file():
            raise LowbitError(
                f"External data file {base_dir / location} (weights of tensor {tensor.name!r}) is missing; "
                f"copy it next to {path.name}."
            )

    try:
        # The path form lets the checker handle models whose weights live in external files; the
        # bytes already read spare it a re-serialization of the model (0.45 s on MiniLM's 90 MB).
        onnx.checker.check_model(str(path) if external else payload)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise LowbitError(f"{path} is not a valid ONNX model ({_first_line(exc)}); fix or re-export it.") from None
    del payload

    if external:
        try:
            onnx.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError) as exc:
            raise LowbitError(f"Cannot read external data of {path} ({_first_line(exc)}); re-export the model.") from None
    return model


def save_model(
    model: onnx.ModelProto,
    path: PathLike,
    *,
    inputs: Sequence[PathLike] = (),
    external_data: bool | None = None,
) -> None:
    """Write `model` to `path` atomically; refuse to overwrite any of `inputs`.

    `external_data=None` stores weights in `<name>.data` next to the model only when the model is
    too large for one protobuf message; True/False force the choice.
    """
    path = Path(path)
    if path.is_dir():
        raise LowbitError(f"Output path {path} is a directory; give a file name such as {path / 'model.onnx'}.")
    if not path.parent.is_dir():
        raise LowbitError(f"Output folder {path.parent} does not exist; create it first.")
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = path.name + ".data"
    for written in [path] + ([path.parent / data_name] if external_data else []):
        for source in inputs:
            if _same_file(written, Path(source)):
                raise LowbitError(
                    f"Output {written} is the input model {source}; choose a different output path "
                    "(lowbit never overwrites its input)."
                )

    # A private folder next to the target keeps the final renames on one file system (atomic).
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged_model = staging / path.name
        if external_data:
            # onnx.save_model moves tensors to external data *in place*; keep the caller's model intact.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, staged_model, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            # Data first: the model file must never point at weights that are not there yet.
            os.replace(staging / data_name, path.parent / data_name)
        else:
            with open(staged_model, "wb") as handle:
                handle.write(model.SerializeToString())
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(staged_model, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def drop_shape_annotations(model: onnx.ModelProto) -> None:
    """Remove the intermediate shapes (graph.value_info) lowbit's pre-processing added.

    They are only needed while quantizing. Left in a written model they make ONNX Runtime fuse
    every residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel is
    several times slower than the two ops it replaces (measured with ORT 1.31, 2 threads,
    64x128x384: 20 ms vs 3.3 ms): all-MiniLM-L6-v2 static int8 ran at 1.57x fp32 with them,
    1.88x without. Graph inputs and outputs keep their types and shapes."""
    del model.graph.value_info[:]


def model_size_bytes(model_or_path: onnx.ModelProto | PathLike) -> int:
    """Serialized size in bytes, external data files included."""
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
        # Tensors still pointing at external files contribute their recorded length.
        external = sum(int(ExternalDataInfo(t).length or 0) for t in _get_all_tensors(model) if uses_external_data(t))
        return model.ByteSize() + external
    path = Path(model_or_path)
    if not path.is_file():
        raise LowbitError(f"Model file {path} does not exist; check the path.")
    header = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in _get_all_tensors(header) if uses_external_data(t)}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations
                                     if (path.parent / loc).is_file())


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def size_growth_warning(source: PathLike, written: PathLike) -> list[str]:
    """One warning when the written model is bigger than its input, saying why."""
    before, after = Path(source).stat().st_size, Path(written).stat().st_size
    if after <= before:
        return []
    return [f"the written model is {after / before - 1:.0%} bigger than its input ({before / 1e6:.3f} -> "
            f"{after / 1e6:.3f} MB): its weights are too small for int8 to save more than the added scales, "
            "zero points and stored plan take; keep the float model if size is what matters"]
