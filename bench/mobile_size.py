"""Byte-level breakdown of lowbit's mobile exports (.ort, .pte, .tflite) and their float counterparts.

    python bench/mobile_size.py --work /tmp/mw [--models mobilenet_int8 mobilenet_int8_pt] [--targets .ort .pte]
    python bench/mobile_size.py --files a.tflite b.pte        # just break down existing files

Each QDQ model in --work (as bench/mobile.py builds them) is exported with `lowbit.deploy.export_model`
(parity checked as usual, no timing) to every installed target, together with the target's float
export; each file is then parsed with its format's own reader and its bytes split into:

    int8 weights      integer weight tensors (int8, or int4 packed)
    int32 biases      integer biases
    float data        float32 weights and biases (the float export; layers a target runs in float)
    scales            quantization scales (per tensor or per channel; counted once per distinct vector)
    zero points       zero points (same)
    names             tensor / node / constant names and keys (distinct strings, with length prefix)
    structure         the rest: graph tables, shapes, attributes, offsets, alignment padding

`structure` is the file size minus the listed payloads, so it is exact in total, not itemized.
The payload-only ratio (float data of the float file / int8 + int32 + scales + zero points of
the quantized file) is the ratio the file would have with no structure at all: the format's floor.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.deploy.export import TARGETS, export_model, missing_extra, target_for  # noqa: E402

CATEGORIES = ("int8 weights", "int32 biases", "float data", "scales", "zero points", "names", "structure")
PAYLOAD = ("int8 weights", "int32 biases", "scales", "zero points")


def _string_bytes(names) -> int:
    """FlatBuffers string cost: 4-byte length, the bytes, a NUL, padded to 4."""
    return sum(4 + -(-(len(n) + 1) // 4) * 4 for n in set(names) if n)


def ort_breakdown(data: bytes) -> Counter:
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    graph = InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0).Model().Graph()
    parts: Counter = Counter()
    names = []
    for i in range(graph.InitializersLength()):
        tensor = graph.Initializers(i)
        size, rank, dtype = tensor.RawDataLength(), tensor.DimsLength(), tensor.DataType()
        names.append(tensor.Name())
        if dtype == 1:  # float
            parts["float data" if rank >= 1 and _ort_float_is_data(graph, tensor.Name()) else "scales"] += size
        elif dtype in (2, 3, 21, 22):  # uint8, int8, uint4, int4
            parts["int8 weights" if rank >= 2 else "zero points"] += size
        elif dtype == 6:
            parts["int32 biases"] += size
        else:
            parts["structure"] += 0
    for i in range(graph.NodeArgsLength()):
        names.append(graph.NodeArgs(i).Name())
    for i in range(graph.NodesLength()):
        names.append(graph.Nodes(i).Name())
    parts["names"] = _string_bytes(names)
    return parts


def _ort_float_is_data(graph, name: bytes) -> bool:
    """A float initializer is data (weight or bias) unless a quantized op reads it (then a scale)."""
    for i in range(graph.NodesLength()):
        node = graph.Nodes(i)
        if any(node.Inputs(j) == name for j in range(node.InputsLength())):
            op = node.OpType().decode()
            return not (op.startswith("QLinear") or op in ("QGemm", "QuantizeLinear", "DequantizeLinear",
                                                           "MatMulNBits", "DynamicQuantizeMatMul"))
    return True


def tflite_breakdown(data: bytes) -> Counter:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(data, 0)
    parts: Counter = Counter()
    names = []
    seen_buffers, seen_vectors = set(), set()
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            names.append(tensor.name)
            buffer = model.buffers[tensor.buffer] if tensor.buffer else None
            if buffer is not None and buffer.data is not None and len(buffer.data) and tensor.buffer not in seen_buffers:
                seen_buffers.add(tensor.buffer)
                size = len(buffer.data)
                if tensor.type == schema.TensorType.INT8 or tensor.type == schema.TensorType.INT4:
                    parts["int8 weights"] += size
                elif tensor.type == schema.TensorType.INT32 and tensor.quantization is not None and tensor.quantization.scale is not None:
                    parts["int32 biases"] += size
                elif tensor.type == schema.TensorType.FLOAT32:
                    parts["float data"] += size
                else:
                    parts["structure"] += 0
            q = tensor.quantization
            if q is not None:
                for kind, values, dtype in (("scales", q.scale, np.float32), ("zero points", q.zeroPoint, np.int64)):
                    if values is None or not len(values):
                        continue
                    key = (kind, np.asarray(values, dtype).tobytes())
                    if key not in seen_vectors:
                        seen_vectors.add(key)
                        parts[kind] += len(key[1])
    parts["names"] = _string_bytes(names)
    return parts


def pte_breakdown(data: bytes) -> Counter:
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(data)
    parts: Counter = Counter()
    names = []
    # constants inside the XNNPACK delegate: typed through the delegate graph's values
    named = {}
    if pte.named_data is not None:
        named = {key: pte.named_data.buffers[entry.buffer_index] for key, entry in pte.named_data.pte_data.items()}
        names += list(named)
    for blob in pte.program.backend_delegate_data:
        graph = _xnnpack_graph(blob.data)
        keys = [entry["named_key"] for entry in graph["constant_data"]]
        names += [k for k in keys if k]
        typed = {}
        for value in graph["xvalues"]:
            body = value["xvalue_union"]
            tensor = body.get("tensor_value", body)
            if tensor.get("constant_buffer_idx"):
                typed[keys[tensor["constant_buffer_idx"]]] = tensor["datatype"]
            scale_idx = (body.get("quant_params") or {}).get("scale_buffer_idx")
            if scale_idx:
                typed[keys[scale_idx]] = "scale"
        for key, buffer in named.items():
            kind = typed.get(key, "")
            category = ("scales" if kind == "scale" else "int32 biases" if "int32" in kind
                        else "int8 weights" if "int" in kind else "float data")
            parts[category] += len(buffer)
    # constants the program keeps outside the delegate (typed by the program's tensors)
    plan = pte.program.execution_plan[0]
    counted = set()
    for value in plan.values:
        tensor = value.val
        index = getattr(tensor, "data_buffer_idx", 0)
        if index and hasattr(tensor, "scalar_type") and index not in counted:
            counted.add(index)
            size = len(pte.program.constant_buffer[index].storage)
            scalar = int(tensor.scalar_type)
            parts[{1: "int8 weights", 3: "int32 biases", 6: "float data"}.get(scalar, "zero points")] += size
    parts["names"] = _string_bytes(names)
    return parts


def _xnnpack_graph(blob: bytes) -> dict:
    """The XNNPACK delegate's graph as a dict (flatc's JSON; only structure and types are read)."""
    import os

    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader, _get_schema_bytes
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(blob[:XNNHeader.EXPECTED_LENGTH])
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "schema.fbs").write_bytes(_get_schema_bytes())
        Path(scratch, "graph.bin").write_bytes(blob[header.flatbuffer_offset:header.flatbuffer_offset
                                                    + header.flatbuffer_size])
        _flatc_decompile(scratch, os.path.join(scratch, "schema.fbs"), os.path.join(scratch, "graph.bin"),
                         ["--raw-binary"])
        text = Path(scratch, "graph.json").read_text()
    return json.loads(re.sub(r"(?<=[:\[,\s])-?(inf|nan)\b", "0", text))


BREAKDOWN = {".ort": ort_breakdown, ".tflite": tflite_breakdown, ".pte": pte_breakdown}


def breakdown(path: Path) -> dict[str, int]:
    data = path.read_bytes()
    parts = BREAKDOWN[path.suffix](data)
    row = {c: int(parts.get(c, 0)) for c in CATEGORIES if c != "structure"}
    row["structure"] = len(data) - sum(row.values())
    row["total"] = len(data)
    return row


def print_rows(rows: list[dict]) -> None:
    head = f"{'file':<34} " + " ".join(f"{c:>12}" for c in (*CATEGORIES, "total"))
    print(head)
    for r in rows:
        print(f"{r['file']:<34} " + " ".join(f"{r[c] / 1024:>10.1f}KB" for c in (*CATEGORIES, "total")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_artifacts" / "mobile",
                        help="bench/mobile.py's work folder (QDQ models and test data)")
    parser.add_argument("--models", nargs="+", default=["mobilenet_int8", "mobilenet_int8_pt"])
    parser.add_argument("--data", default="mobilenet_test.npz", help="parity data in --work")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--files", nargs="+", type=Path, help="break down these files instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    if args.files:
        rows = [{"file": p.name, **breakdown(p)} for p in args.files]
        print_rows(rows)
    else:
        with tempfile.TemporaryDirectory(prefix="lowbit-size-") as tmp:
            for suffix in args.targets:
                sentence = missing_extra(target_for(f"x{suffix}"))
                if sentence:
                    print(f"skipping {suffix}: {sentence}")
                    continue
                for name in args.models:
                    out, float_out = Path(tmp) / f"{name}{suffix}", Path(tmp) / f"{name}_float{suffix}"
                    report = export_model(args.work / f"{name}.onnx", out, data=args.work / args.data, samples=256,
                                          measure_speed=False, float_output=float_out)
                    quant, flt = breakdown(out), breakdown(float_out)
                    floor = flt["float data"] / max(1, sum(quant[c] for c in PAYLOAD) + quant["float data"])
                    rows += [{"file": out.name, **quant, "ratio": report.size_ratio, "payload_ratio": floor,
                              "parity": report.passed},
                             {"file": float_out.name, **flt}]
                    print(f"{out.name}: {report.size_ratio:.2f}x smaller than the float export (payload only: "
                          f"{floor:.2f}x); parity {'PASS' if report.passed else 'FAIL'} "
                          f"({report.max_error_steps:.2f} steps)", flush=True)
        print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
