"""Block-wise low-bit weight forms for ONNX Runtime: MatMulNBits and blocked DequantizeLinear.

Both store, per output feature, blocks of `block_size` consecutive input features that share one
scale (and zero point): the `[out, in]` per-group layout of `lowbit.algorithms`.

- `matmulnbits` (com.microsoft MatMulNBits, ONNX Runtime only): Y = A @ dequant(B)^T (+ bias) in
  one kernel. B holds unsigned codes `[N, k_blocks, blob]` packed low bits first along K, scales
  `[N, k_blocks]`, optional packed unsigned zero points (default 2^(bits-1)). Signed grids are
  stored shifted by 2^(bits-1), so q * scale is reproduced exactly. 2, 4 and 8 bits,
  power-of-two block sizes >= 16.
- `dq` (standard ONNX, opset 21): an int4/int8 initializer in the op's own weight layout, a
  blocked DequantizeLinear (`axis` = the input-feature axis, `block_size`), the original
  MatMul/Gemm reading its output. Any runtime that implements opset 21 runs it; ONNX Runtime
  fuses DQ + MatMul into MatMulNBits at session start where it can.

Embedding tables (a Gather from a constant 2-D float table, rows = tokens) are stored the same
way, blocks running along each row (`WeightSite` with the table as the `[out, in]` weight):

- `gather_block_quantized_node` (com.microsoft GatherBlockQuantized, ONNX Runtime only): gathers
  the rows and dequantizes only those; codes in uint8 as for MatMulNBits (4-bit packed two per
  byte along the row, which must have even length). Block sizes: powers of two >= 16.
- `blocked_dq_nodes` with the Gather reading its output: standard ONNX, but the runtime
  dequantizes the whole table on every run (unless it folds the constant).

`accuracy_level` (MatMulNBits only): 0 keeps float activations (the weight-only model exactly);
4 lets ONNX Runtime quantize the activations to int8 per block inside the kernel (faster on
CPUs with int8 dot products, a little less accurate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.algorithms import QuantizedWeight
from lowbit.numerics import pack

FORMATS = ("matmulnbits", "dq")
MATMULNBITS_BITS = (2, 4, 8)
DQ_BITS = (4, 8)
DQ_OPSET = 21  # blocked DequantizeLinear and int4 tensors
MS_DOMAIN = "com.microsoft"


@dataclass
class WeightSite:
    """Where a weight is used: the node that multiplies by it and the weight's layout there."""

    node: str
    op_type: str             # MatMul, Gemm, or Gather (an embedding table)
    weight: str              # initializer name
    activation: str          # the tensor the weight multiplies
    in_features: int
    out_features: int
    transposed: bool = False  # stored [out, in] (Gemm transB=1) instead of [in, out]
    bias: str | None = None   # Gemm's C (1-D, constant)


def storage_bits(bits: int, weight_format: str) -> int:
    """The code width stored for a `bits`-bit grid: itself where the format has it, else the
    next wider width (3-bit grids ride in 4-bit codes: 3-bit accuracy, 4-bit size)."""
    widths = MATMULNBITS_BITS if weight_format == "matmulnbits" else DQ_BITS
    return min(w for w in widths if w >= bits)


def unsigned_codes(quantized: QuantizedWeight, bits: int, rows: int, k_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The weight's integer values and its (rows, k_blocks) zero points as the unsigned codes
    ONNX Runtime's packed kernels (MatMulNBits, GatherBlockQuantized) store: signed grids move up by
    2^(bits-1), which leaves every dequantized value unchanged."""
    offset = 2 ** (bits - 1) if quantized.qparams.spec.dtype_info.signed else 0
    codes = np.asarray(quantized.values, np.int64) + offset
    zero_points = np.asarray(quantized.qparams.zero_point, np.int64).reshape(rows, k_blocks) + offset
    return codes, zero_points


def matmulnbits_node(site: WeightSite, quantized: QuantizedWeight, *, bits: int, block_size: int,
                     accuracy_level: int = 0, output: str | None = None,
                     ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A MatMulNBits node computing `site`'s product with the quantized weight."""
    n_out, n_in = site.out_features, site.in_features
    k_blocks = math.ceil(n_in / block_size)
    codes, zero_points = unsigned_codes(quantized, bits, n_out, k_blocks)
    # Pad K to whole blocks with the zero point's code (dequantizes to 0; the kernel ignores it anyway).
    padded = np.repeat(zero_points, block_size, axis=1)
    padded[:, :n_in] = codes
    blob = block_size * bits // 8
    base = site.node
    packed = pack(padded, bits, signed=False).reshape(n_out, k_blocks, blob)
    scales = np.asarray(quantized.qparams.scale, np.float32).reshape(n_out, k_blocks)
    inits = [numpy_helper.from_array(packed, f"{base}_B_{bits}bit"),
             numpy_helper.from_array(scales, f"{base}_B_scales")]
    inputs = [site.activation, inits[0].name, inits[1].name]
    if not bool(np.all(zero_points == 2 ** (bits - 1))):  # the kernel's default zero point
        rows = [pack(row, bits, signed=False) for row in zero_points]
        inits.append(numpy_helper.from_array(np.stack(rows).reshape(-1), f"{base}_B_zero_points"))
        inputs.append(inits[-1].name)
    if site.bias:
        inputs += [""] * (5 - len(inputs)) + [site.bias]
    attributes = {"K": n_in, "N": n_out, "bits": bits, "block_size": block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", inputs, [output or f"{base}_output"], name=f"{base}_MatMulNBits",
                            domain=MS_DOMAIN, **attributes)
    return node, inits


def blocked_dq_nodes(site: WeightSite, quantized: QuantizedWeight, *, bits: int, block_size: int
                     ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A DequantizeLinear (opset 21, blocked) producing `site`'s weight in its original layout;
    the caller points the MatMul/Gemm at its output."""
    k_blocks = math.ceil(site.in_features / block_size)
    values = np.asarray(quantized.values, np.int64)                                           # [out, in]
    scale = np.asarray(quantized.qparams.scale, np.float32).reshape(site.out_features, k_blocks)
    zero_point = np.asarray(quantized.qparams.zero_point, np.int64).reshape(site.out_features, k_blocks)
    signed = quantized.qparams.spec.dtype_info.signed
    axis = 1
    if not site.transposed:  # MatMul / Gemm transB=0 store [in, out]: blocks run along axis 0
        values, scale, zero_point, axis = values.T, scale.T, zero_point.T, 0
    element = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
               (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}[(bits, signed)]
    base = site.node
    inits = [_integer_tensor(values, element, bits, signed, f"{base}_W_{bits}bit"),
             numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}_W_scales")]
    inputs = [inits[0].name, inits[1].name]
    if bool(np.any(zero_point != 0)):
        inits.append(_integer_tensor(zero_point, element, bits, signed, f"{base}_W_zero_points"))
        inputs.append(inits[-1].name)
    node = helper.make_node("DequantizeLinear", inputs, [f"{base}_W_dequantized"], name=f"{base}_W_DequantizeLinear",
                            axis=axis, block_size=block_size)
    return node, inits


def gather_block_quantized_node(site: WeightSite, quantized: QuantizedWeight, *, bits: int, block_size: int,
                                output: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A GatherBlockQuantized node gathering rows `site.activation` (the indices) of the
    quantized table `[rows, columns]` = `[out_features, in_features]`.

    Codes are stored as MatMulNBits stores them: unsigned, shifted by 2^(bits-1) for signed
    grids, 4-bit codes packed two per uint8 byte (low nibble first) along the row. ONNX Runtime's
    uint8 path was several times faster than its INT4-tensor path (8,192 random rows of 384), and
    needs an even row length for 4 bits."""
    rows, columns = site.out_features, site.in_features
    k_blocks = math.ceil(columns / block_size)
    codes, zero_points = unsigned_codes(quantized, bits, rows, k_blocks)
    base = site.node
    data = pack(codes, bits, signed=False).reshape(rows, columns * bits // 8)
    scales = np.ascontiguousarray(np.asarray(quantized.qparams.scale, np.float32).reshape(rows, k_blocks))
    inits = [numpy_helper.from_array(data, f"{base}_table_{bits}bit"),
             numpy_helper.from_array(scales, f"{base}_table_scales")]
    inputs = [inits[0].name, site.activation, inits[1].name]
    if not bool(np.all(zero_points == 2 ** (bits - 1))):  # the kernel's default zero point
        packed = np.stack([pack(row, bits, signed=False) for row in zero_points])
        inits.append(numpy_helper.from_array(packed, f"{base}_table_zero_points"))
        inputs.append(inits[-1].name)
    node = helper.make_node("GatherBlockQuantized", inputs, [output], name=f"{base}_GatherBlockQuantized",
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)
    return node, inits


def _integer_tensor(values: np.ndarray, element: int, bits: int, signed: bool, name: str) -> onnx.TensorProto:
    values = np.ascontiguousarray(values)
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
    # ONNX stores 4-bit tensors packed, element 0 in the low nibble: `numerics.pack`'s layout.
    return helper.make_tensor(name, element, list(values.shape), pack(values, bits, signed).tobytes(), raw=True)


__all__ = ["DQ_BITS", "DQ_OPSET", "FORMATS", "MATMULNBITS_BITS", "MS_DOMAIN", "WeightSite", "blocked_dq_nodes",
           "gather_block_quantized_node", "matmulnbits_node", "storage_bits"]
