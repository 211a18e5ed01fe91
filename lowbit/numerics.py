"""The one implementation of quantize / dequantize in lowbit.

Every backend (ONNX writers, PyTorch fake quantization, large-model algorithms, reports) calls
these functions, so a number computed for export is the number used in training and checks.

Semantics follow ONNX QuantizeLinear / DequantizeLinear exactly (and are tested bit-for-bit
against ONNX Runtime's kernels):

    q = saturate(round_half_to_even(x / scale) + zero_point)      # float32 division
    x' = (q - zero_point) * scale                                  # float32

Functions accept NumPy arrays or torch tensors and return the same kind. With torch,
`fake_quantize` passes gradients straight through the rounding (zero outside the clipping
range) and gives the scale an LSQ-style gradient, so the same call serves QAT.

Scale layout ("compact" layout, as ONNX stores it):
- per-tensor: shape ();
- per-channel(axis): shape (x.shape[axis],);
- per-group(axis, g): x.shape with x.shape[axis] replaced by ceil(x.shape[axis] / g);
- per-token: x.shape[:-1] + (1,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.errors import LowbitError, SpecError
from lowbit.spec import QuantSpec

Array = Any  # numpy.ndarray or torch.Tensor

# Scales below the smallest normal float32 make 1/scale overflow; ranges that small are noise.
_MIN_SCALE = float(np.finfo(np.float32).tiny)


@dataclass
class QParams:
    """Scale and zero point for one tensor under one spec, in compact layout."""

    spec: QuantSpec
    scale: Array
    zero_point: Array

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "scale": _to_numpy(self.scale).tolist(),
            "zero_point": _to_numpy(self.zero_point).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QParams:
        return cls(QuantSpec.from_dict(data["spec"]),
                   np.asarray(data["scale"], dtype=np.float32),
                   np.asarray(data["zero_point"], dtype=np.int32))


# --------------------------------------------------------------------------- array backends

def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _to_numpy(x: Array) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class _NumpyOps:
    @staticmethod
    def asarray(x, like=None):
        return np.asarray(x, dtype=np.float32)

    round = staticmethod(np.rint)  # round half to even, as ONNX
    where = staticmethod(np.where)
    abs = staticmethod(np.abs)
    frexp = staticmethod(np.frexp)

    @staticmethod
    def clip(x, low, high):
        return np.clip(x, low, high)

    @staticmethod
    def full_like(x, value: float):
        # Not `x * 0 + value`: that is NaN where x is infinite.
        return np.full(np.shape(x), value, dtype=np.float32)

    @staticmethod
    def amin(x, axes):
        return np.min(x, axis=axes, keepdims=True)

    @staticmethod
    def amax(x, axes):
        return np.max(x, axis=axes, keepdims=True)

    @staticmethod
    def divide(x, scale):
        # Values beyond float32 saturate to +-inf and then to the grid edge, as in ONNX; that
        # is the defined result, not something to warn about.
        with np.errstate(over="ignore", under="ignore"):
            return x / scale

    @staticmethod
    def mean(x, axes):
        return np.mean(x, axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)

    @staticmethod
    def sum64(x, axes):
        return np.sum(x, axis=axes, keepdims=True, dtype=np.float64)

    @staticmethod
    def to_float32(x):
        return np.asarray(x, dtype=np.float32)

    @staticmethod
    def ldexp(m, e):
        return np.ldexp(m, e).astype(np.float32)

    @staticmethod
    def repeat(x, repeats, axis):
        return np.repeat(x, repeats, axis=axis)

    @staticmethod
    def detach(x):
        return x

    @staticmethod
    def any_nonfinite(x) -> bool:
        return bool(x.size) and not bool(np.isfinite(x).all())

    @staticmethod
    def to_int(q, dtype_name: str):
        return q.astype(_NUMPY_CONTAINER[dtype_name])


class _TorchOps:
    def __init__(self) -> None:
        import torch

        self.torch = torch

    def asarray(self, x, like):
        t = self.torch
        if _is_torch(x):
            return x.to(like.device, t.float32)
        return t.as_tensor(np.asarray(x, dtype=np.float32), device=like.device)

    def round(self, x):
        return self.torch.round(x)  # half to even

    def where(self, c, a, b):
        return self.torch.where(c, a, b)

    def abs(self, x):
        return self.torch.abs(x)

    def frexp(self, x):
        return self.torch.frexp(x)

    def clip(self, x, low, high):
        return self.torch.clamp(x, low, high)

    def full_like(self, x, value: float):
        return self.torch.full_like(x, value, dtype=self.torch.float32)

    def amin(self, x, axes):
        return self.torch.amin(x, dim=axes, keepdim=True) if axes else x.clone()

    def amax(self, x, axes):
        return self.torch.amax(x, dim=axes, keepdim=True) if axes else x.clone()

    def divide(self, x, scale):
        return x / scale

    def mean(self, x, axes):
        # float64 accumulation, as the NumPy path, so both give the same scale.
        t = self.torch
        return t.mean(x.to(t.float64), dim=axes, keepdim=True).to(t.float32) if axes else x.clone()

    def sum64(self, x, axes):
        t = self.torch
        return t.sum(x.to(t.float64), dim=axes, keepdim=True)

    def to_float32(self, x):
        return x.to(self.torch.float32)

    def ldexp(self, m, e):
        # float64: 2**e itself may not fit in float32 even when m * 2**e does.
        t = self.torch
        return (m.to(t.float64) * t.pow(2.0, e.to(t.float64))).to(t.float32)

    def repeat(self, x, repeats, axis):
        return self.torch.repeat_interleave(x, repeats, dim=axis)

    def detach(self, x):
        return x.detach()

    def any_nonfinite(self, x) -> bool:
        return x.numel() > 0 and not bool(self.torch.isfinite(x).all())

    def to_int(self, q, dtype_name: str):
        t = self.torch
        container = {np.int8: t.int8, np.uint8: t.uint8, np.int16: t.int16, np.uint16: t.uint16,
                     np.int32: t.int32}
        return q.to(container[_NUMPY_CONTAINER[dtype_name]])


_NUMPY_OPS = _NumpyOps()
_TORCH_OPS: _TorchOps | None = None


def _ops(x: Array):
    global _TORCH_OPS
    if _is_torch(x):
        if _TORCH_OPS is None:
            _TORCH_OPS = _TorchOps()
        return _TORCH_OPS
    return _NUMPY_OPS


class _StorageTypes(dict):
    """Smallest NumPy integer type holding each integer grid (sub-byte values in a byte)."""

    def __missing__(self, name: str):
        from lowbit.spec import get_dtype

        dt = get_dtype(name)
        if dt.kind in ("binary", "ternary"):
            return np.int8
        if dt.bits <= 8:
            return np.int8 if dt.signed else np.uint8
        if dt.signed:
            return np.int16
        return np.uint16 if dt.bits == 16 else np.int16


_NUMPY_CONTAINER = _StorageTypes()


def storage_dtype(spec: QuantSpec) -> np.dtype:
    """The NumPy dtype `quantize` returns for this spec (sub-byte grids live in a byte)."""
    return np.dtype(_NUMPY_CONTAINER[spec.dtype])


# --------------------------------------------------------------------------- layout helpers

def _normalize_axis(axis: int | None, ndim: int, spec: QuantSpec) -> int:
    if axis is None:
        raise SpecError(f"{spec.granularity.describe()} needs a concrete axis; call spec.with_axis(axis) first")
    if not -ndim <= axis < ndim:
        raise SpecError(f"axis {axis} is out of range for a {ndim}-d tensor")
    return axis % ndim


def _reduction_axes(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    g = spec.granularity
    if g.kind == "tensor":
        return tuple(range(len(shape)))
    if g.kind == "token":
        if len(shape) == 0:
            raise SpecError("per-token granularity needs a tensor with at least one axis")
        return (len(shape) - 1,)
    axis = _normalize_axis(g.axis, len(shape), spec)
    return tuple(i for i in range(len(shape)) if i != axis)


def _grouped(x: Array, spec: QuantSpec, ops, pad_with_zeros: bool = False) -> tuple[Array, int]:
    """View x with the group axis split into (n_groups, group_size); pads the last group by
    repeating its edge values (which changes neither its min nor its max), or with zeros (which
    leaves its sum unchanged)."""
    g = spec.granularity
    axis = _normalize_axis(g.axis, x.ndim, spec)
    n = x.shape[axis]
    n_groups = math.ceil(n / g.group_size)
    pad = n_groups * g.group_size - n
    if pad:
        index = [slice(None)] * x.ndim
        index[axis] = slice(n - 1, n)
        edge = x[tuple(index)]
        if pad_with_zeros:
            edge = edge * 0
        if _is_torch(x):
            import torch

            x = torch.cat([x] + [edge] * pad, dim=axis)
        else:
            x = np.concatenate([x] + [edge] * pad, axis=axis)
    shape = x.shape[:axis] + (n_groups, g.group_size) + x.shape[axis + 1:]
    return x.reshape(shape), axis


def _reduce(x: Array, spec: QuantSpec, how: str) -> Array:
    """Reduce x to compact layout with amin/amax/mean."""
    ops = _ops(x)
    fn = getattr(ops, how)
    g = spec.granularity
    if g.kind == "group" and how == "mean":
        # Edge padding would bias the mean of a partial last group: sum zero-padded groups and
        # divide by the true number of elements in each.
        grouped, axis = _grouped(x, spec, ops, pad_with_zeros=True)
        sums = ops.sum64(grouped, (axis + 1,)).squeeze(axis + 1)
        n, size = x.shape[axis], g.group_size
        counts = np.minimum(size, n - size * np.arange(sums.shape[axis])).astype(np.float64)
        view = [1] * x.ndim
        view[axis] = -1
        counts = counts.reshape(view)
        if _is_torch(sums):
            counts = ops.torch.as_tensor(counts, device=sums.device)
        return ops.to_float32(sums / counts)
    if g.kind == "group":
        grouped, axis = _grouped(x, spec, ops)
        return fn(grouped, (axis + 1,)).squeeze(axis + 1)
    axes = _reduction_axes(tuple(x.shape), spec)
    reduced = fn(x, axes)
    if g.kind == "tensor":
        return reduced.reshape(())
    if g.kind == "channel":
        return reduced.reshape(-1)
    return reduced  # token: keep dims, shape x.shape[:-1] + (1,)


def expand_to(param: Array, shape: tuple[int, ...], spec: QuantSpec) -> Array:
    """Broadcastable view of a compact-layout scale/zero point against a tensor of `shape`."""
    g = spec.granularity
    ops = _ops(param)
    if g.kind in ("tensor", "token"):
        return param
    axis = _normalize_axis(g.axis, len(shape), spec)
    if g.kind == "channel":
        view = [1] * len(shape)
        view[axis] = -1
        return param.reshape(view)
    expanded = ops.repeat(param, g.group_size, axis)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, shape[axis])
    return expanded[tuple(index)]


def compact_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the scale / zero point for a tensor of `shape` under `spec`."""
    g = spec.granularity
    if g.kind == "tensor":
        return ()
    if g.kind == "token":
        return tuple(shape[:-1]) + (1,)
    axis = _normalize_axis(g.axis, len(shape), spec)
    if g.kind == "channel":
        return (shape[axis],)
    out = list(shape)
    out[axis] = math.ceil(shape[axis] / g.group_size)
    return tuple(out)


# --------------------------------------------------------------------------- qparams

def tensor_range(x: Array, spec: QuantSpec, name: str = "tensor") -> tuple[Array, Array]:
    """Min and max of x in the spec's compact layout. NaN or inf is a user error here: weights
    must be finite, and activation ranges come from `lowbit.calibration`, which filters inf."""
    ops = _ops(x)
    x = ops.asarray(x, like=x)
    if ops.any_nonfinite(x):
        raise LowbitError(f"{name} contains NaN or infinite values; fix the model or data before quantizing")
    if 0 in tuple(x.shape):
        raise LowbitError(f"{name} is empty (shape {tuple(x.shape)}); there is nothing to quantize")
    return _reduce(x, spec, "amin"), _reduce(x, spec, "amax")


def choose_qparams(min_val: Array, max_val: Array, spec: QuantSpec) -> QParams:
    """Scale and zero point that map [min_val, max_val] (compact layout) onto the spec's grid.

    - symmetric: scale = max(|min|, |max|) / (qmax - zero_point), zero point at the grid middle
      (0 for signed types, 2^(bits-1) for unsigned ones);
    - asymmetric: the range is widened to contain 0 (so zero padding is exact), then
      scale = (max - min) / (qmax - qmin) and zero_point = round(qmin - min / scale);
    - fp8: scale = max(|min|, |max|) / largest finite value; fp16/bf16: scale 1 (no scaling);
    - binary from a range: scale = max(|min|, |max|) (see `qparams_for` for the L2-optimal one).

    A zero range gives scale 1, so every value maps exactly to the zero point.
    """
    ops = _ops(min_val)
    lo = ops.asarray(min_val, like=min_val)
    hi = ops.asarray(max_val, like=min_val)
    if ops.any_nonfinite(lo) or ops.any_nonfinite(hi):
        raise LowbitError("quantization range is not finite; calibration must exclude inf and NaN values")
    dt = spec.dtype_info
    amax = ops.where(ops.abs(lo) > ops.abs(hi), ops.abs(lo), ops.abs(hi))
    if dt.is_float:
        scale = amax / float(dt.max_finite) if dt.saturates else amax * 0 + 1
        return QParams(spec, _safe_scale(scale, ops), _zeros_like(scale, ops))
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        zero_point = _symmetric_zero_point(spec)
        scale = amax / float(qmax - zero_point)
        return QParams(spec, _safe_scale(scale, ops), _zeros_like(scale, ops) + zero_point)
    lo = ops.where(lo < 0, lo, lo * 0)
    hi = ops.where(hi > 0, hi, hi * 0)
    scale = _safe_scale((hi - lo) / float(qmax - qmin), ops)
    zero_point = ops.clip(ops.round(float(qmin) - lo / scale), qmin, qmax)
    return QParams(spec, scale, _as_int32(zero_point))


def qparams_for(x: Array, spec: QuantSpec, name: str = "tensor") -> QParams:
    """QParams straight from a tensor (weights, or one input for dynamic quantization).

    Integer kinds use the min/max range. Binary uses mean(|x|) per scale group, the scale that
    minimizes the squared error of sign(x) * scale (XNOR-Net). Ternary uses the mean of |x| over
    the values above 0.7 * mean(|x|) (Ternary Weight Networks), which puts the zero threshold
    (scale / 2) where TWN puts it for bell-shaped weights."""
    kind = spec.dtype_info.kind
    if kind in ("binary", "ternary"):
        ops = _ops(x)
        x = ops.asarray(x, like=x)
        tensor_range(x, spec, name)  # validation only
        magnitude = ops.abs(x)
        scale = _reduce(magnitude, spec, "mean")
        if kind == "ternary":
            keep = magnitude > 0.7 * expand_to(scale, tuple(x.shape), spec)
            kept_sum = _reduce(ops.where(keep, magnitude, magnitude * 0), spec, "mean")
            kept_share = _reduce(ops.where(keep, magnitude * 0 + 1, magnitude * 0), spec, "mean")
            scale = ops.where(kept_share > 0, kept_sum / ops.where(kept_share > 0, kept_share, kept_share + 1), scale)
        return QParams(spec, _safe_scale(scale, ops), _zeros_like(scale, ops))
    lo, hi = tensor_range(x, spec, name)
    return choose_qparams(lo, hi, spec)


def _symmetric_zero_point(spec: QuantSpec) -> int:
    return 0 if spec.dtype_info.signed else (spec.qmin + spec.qmax + 1) // 2


def _safe_scale(scale: Array, ops) -> Array:
    scale = ops.where(scale == 0, scale * 0 + 1, scale)
    return ops.where(scale < _MIN_SCALE, scale * 0 + _MIN_SCALE, scale)


def _zeros_like(a: Array, ops) -> Array:
    return _as_int32(a * 0)


def _as_int32(a: Array) -> Array:
    if _is_torch(a):
        import torch

        return a.to(torch.int32)
    return np.asarray(a).astype(np.int32)


# --------------------------------------------------------------------------- quantize / dequantize

def _grid_values(x: Array, qp: QParams, ops, ste: bool) -> Array:
    """x mapped onto the integer grid, as float32 values (before any cast).

    With `ste`, rounding is replaced by a straight-through estimator for autograd."""
    shape = tuple(x.shape)
    scale = expand_to(ops.asarray(qp.scale, like=x), shape, qp.spec)
    zero_point = expand_to(ops.asarray(qp.zero_point, like=x), shape, qp.spec)
    return _on_grid(x, scale, zero_point, qp.spec, ops, ste)


def _on_grid(x: Array, scale: Array, zero_point: Array, spec: QuantSpec, ops, ste: bool) -> Array:
    """`_grid_values` with the scale and zero point already broadcastable against x."""
    y = ops.divide(x, scale)
    if spec.dtype_info.kind == "binary":
        sign = ops.where(y >= 0, ops.full_like(y, 1.0), ops.full_like(y, -1.0))  # sign(0) = +1
        if not ste:
            return sign
        clipped = ops.clip(y, -1.0, 1.0)
        return clipped + ops.detach(sign - clipped)
    rounded = ops.round(y)
    if ste:
        rounded = y + ops.detach(rounded - y)
    return ops.clip(rounded + zero_point, spec.qmin, spec.qmax)


def quantize(x: Array, qp: QParams) -> Array:
    """x -> integers on the spec's grid (stored in int8/uint8/int16/uint16), or for float specs
    the float32 values x / scale rounded to the format."""
    ops = _ops(x)
    x = ops.asarray(x, like=x)
    if qp.spec.dtype_info.is_float:
        scale = expand_to(ops.asarray(qp.scale, like=x), tuple(x.shape), qp.spec)
        return round_to_float_format(ops.divide(x, scale), qp.spec.dtype)
    if ops is _NUMPY_OPS and x.ndim and x.shape[0] > 1 and x.size > _BLOCK_ELEMENTS:
        return _quantize_in_blocks(x, qp)
    return ops.to_int(_grid_values(x, qp, ops, ste=False), qp.spec.dtype)


# A large NumPy tensor is quantized block by block along axis 0 (same values): whole-tensor
# temporaries are fresh mappings that NumPy asks the kernel to back with huge pages, and on a
# machine whose memory is fragmented those page faults cost 2-2.7 s for MiniLM's 30522x384
# embedding table, against 0.03 s for the arithmetic; blocks of this size are reused from the heap.
_BLOCK_ELEMENTS = 1 << 18


def _quantize_in_blocks(x: np.ndarray, qp: QParams) -> np.ndarray:
    shape, spec = tuple(x.shape), qp.spec
    scale = np.broadcast_to(expand_to(_NUMPY_OPS.asarray(qp.scale), shape, spec), shape)
    zero_point = np.broadcast_to(expand_to(_NUMPY_OPS.asarray(qp.zero_point), shape, spec), shape)
    out = np.empty(shape, dtype=_NUMPY_CONTAINER[spec.dtype])
    rows = max(1, _BLOCK_ELEMENTS // (x.size // shape[0]))
    for start in range(0, shape[0], rows):
        block = slice(start, start + rows)
        out[block] = _on_grid(x[block], scale[block], zero_point[block], spec, _NUMPY_OPS, ste=False)
    return out


def dequantize(q: Array, qp: QParams) -> Array:
    """Integers (or rounded float values) back to float32: (q - zero_point) * scale."""
    ops = _ops(q)
    shape = tuple(q.shape)
    scale = expand_to(ops.asarray(qp.scale, like=q), shape, qp.spec)
    if qp.spec.dtype_info.is_float:
        return ops.asarray(q, like=q) * scale
    if _is_torch(q):
        import torch

        zero_point = expand_to(qp.zero_point.to(q.device, torch.int32) if _is_torch(qp.zero_point)
                               else torch.as_tensor(np.asarray(qp.zero_point, np.int32), device=q.device),
                               shape, qp.spec)
        return (q.to(torch.int32) - zero_point).to(torch.float32) * scale
    zero_point = expand_to(np.asarray(qp.zero_point, dtype=np.int32), shape, qp.spec)
    return (q.astype(np.int32) - zero_point).astype(np.float32) * scale


def fake_quantize(x: Array, qp: QParams) -> Array:
    """dequantize(quantize(x)) in float32, differentiable under torch.

    Gradients: straight-through for x inside the clipping range and zero outside; the scale (if
    it is a tensor that requires grad) gets the LSQ gradient."""
    ops = _ops(x)
    x = ops.asarray(x, like=x)
    shape = tuple(x.shape)
    scale = expand_to(ops.asarray(qp.scale, like=x), shape, qp.spec)
    if qp.spec.dtype_info.is_float:
        y = ops.divide(x, scale)
        rounded = round_to_float_format(ops.detach(y), qp.spec.dtype)
        return (y + ops.detach(rounded - y)) * scale
    zero_point = expand_to(ops.asarray(qp.zero_point, like=x), shape, qp.spec)
    return (_grid_values(x, qp, ops, ste=True) - zero_point) * scale


def quantize_dynamic(x: Array, spec: QuantSpec) -> tuple[Array, QParams]:
    """Quantize with qparams computed from x itself (dynamic activations, per-token)."""
    qp = qparams_for(x, spec)
    return quantize(x, qp), qp


# --------------------------------------------------------------------------- float formats

def round_to_float_format(x: Array, dtype: str) -> Array:
    """Round float32 values to the nearest value of a float format (ties to even), as float32.

    fp16/bf16 overflow to inf like a real cast; fp8 saturates to its largest finite value, as
    ONNX Cast does by default. Subnormals of the target format are kept."""
    from lowbit.spec import get_dtype

    dt = get_dtype(dtype)
    if not dt.is_float:
        raise SpecError(f"{dtype} is not a float format")
    ops = _ops(x)
    x = ops.asarray(x, like=x)
    _, exponent = ops.frexp(x)  # x = m * 2**exponent, 0.5 <= |m| < 1
    # The spacing of representable values around x: 2**(e - mantissa_bits) with e the unbiased
    # exponent, floored at the smallest normal exponent (subnormals share that spacing).
    unbiased = exponent - 1
    unbiased = ops.where(unbiased < dt.min_normal_exp, unbiased * 0 + dt.min_normal_exp, unbiased)
    step_exp = unbiased - dt.mantissa_bits
    steps = ops.round(ops.ldexp(x, -step_exp))
    rounded = ops.ldexp(steps, step_exp)
    rounded = ops.where(x == 0, x, rounded)  # keep signed zeros
    big = ops.abs(rounded) > dt.max_finite
    edge = dt.max_finite if dt.saturates else np.inf
    limit = ops.where(x > 0, ops.full_like(x, edge), ops.full_like(x, -edge))
    rounded = ops.where(big, limit, rounded)
    return ops.where(x != x, x, rounded)  # NaN stays NaN


# --------------------------------------------------------------------------- packing

def pack(values: Array, bits: int, signed: bool = True) -> np.ndarray:
    """Pack integers of `bits` bits (1..8) into bytes, little-endian: element 0 sits in the lowest
    bits of byte 0 (the ONNX int4 layout). Signed values are stored in two's complement; binary
    values (+-1) are stored as 1 for +1 and 0 for -1 with bits=1. The last byte is zero-padded."""
    if not 1 <= bits <= 8:
        raise SpecError(f"can pack 1..8-bit values, not {bits}-bit")
    v = _to_numpy(values).astype(np.int64).reshape(-1)
    if bits == 1:
        if v.size and not np.isin(v, (-1, 0, 1)).all():
            raise SpecError("1-bit packing takes -1/+1 (or 0/1) values")
        v = (v > 0).astype(np.int64)
    else:
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if v.size and (v.min() < low or v.max() > high):
            raise SpecError(f"values outside [{low}, {high}] do not fit in {bits} bits")
        v = v & ((1 << bits) - 1)
    bit_planes = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bit_planes, bitorder="little")


def unpack(packed: np.ndarray, bits: int, count: int, signed: bool, binary: bool = False) -> np.ndarray:
    """Inverse of `pack`: `count` values of `bits` bits. Signed 1-bit values (or any 1-bit values
    with `binary`) come back as -1/+1 (int8), the only signed 1-bit grid lowbit has; unsigned
    1-bit values come back as 0/1."""
    if not 1 <= bits <= 8:
        raise SpecError(f"can unpack 1..8-bit values, not {bits}-bit")
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if data.size * 8 < count * bits:
        raise SpecError(f"{data.size} bytes hold fewer than {count} values of {bits} bits")
    bit_planes = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
    v = (bit_planes.astype(np.int64) << np.arange(bits)).sum(axis=1)
    if binary or (bits == 1 and signed):
        return np.where(v > 0, 1, -1).astype(np.int8)
    if signed:
        v = np.where(v >= 2 ** (bits - 1), v - 2**bits, v)
        return v.astype(np.int8)
    return v.astype(np.uint8)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for `count` values of `bits` bits."""
    return (count * bits + 7) // 8
