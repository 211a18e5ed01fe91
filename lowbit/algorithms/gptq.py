"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized so that the layer's *output* error stays small (Frantar et al., 2022).

Given H = 2 X^T X / n (see `hessian.HessianAccumulator`), the error of column j is spread over
the remaining columns with the rows of the upper Cholesky factor of H^-1. Columns are processed
in blocks: inside a block the update is applied column by column; the rest of the matrix gets
one lazy, batched update per block (the same result, far fewer memory passes).

Options:
- group size (32/64/128...) or per-channel or per-tensor scales, symmetric or asymmetric, any
  integer grid (8/4/3/2 bits), scales on the full grid (`weight_layout.weight_qparams`), with
  `mse=True` each shrunk to the least squared rounding error of the weights it covers. A group's scale is chosen when its first column is reached, from
  the group's weights as updated so far (as the reference implementation does).
- act-order: columns in decreasing order of H's diagonal (the most active inputs first, while
  there is the most freedom left to absorb their error). Groups stay contiguous blocks of input
  features, so the result is stored exactly like any other per-group weight.
- damping: percdamp * mean(diag H) is added to the diagonal; when the Cholesky factorization
  still fails (rank-deficient or indefinite H), the damping rises tenfold until it succeeds.

Weight layout: `[out_features, in_features]`, see `weight_layout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lowbit.algorithms.weight_layout import (QuantizedWeight, as_weight_matrix, quantized_from_qparams,
                                             weight_qparams_for, weight_spec)
from lowbit.errors import LowbitError
from lowbit.numerics import QParams, dequantize, quantize
from lowbit.spec import QuantSpec, per_channel

DAMPING_STEPS = 6  # percdamp, x10, x100, ... before giving up


@dataclass
class GPTQResult(QuantizedWeight):
    """The quantized weight plus the damping ratio that made H factorize (>= the one asked)."""

    percdamp: float = 0.0


def gptq_quantize(weight, hessian, spec: QuantSpec, *, block_size: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, mse: bool = False,
                  name: str = "weight") -> GPTQResult:
    """Quantize a `[out, in]` weight with GPTQ under `spec`, given the `[in, in]` Hessian of its inputs.

    Returns the dequantized weight, its integers and qparams (groups along `in`), and the
    damping ratio used. Computes in float32 on the weight's device; the Hessian is damped,
    inverted and factorized in its own precision (float64, or float32 for a float32 Hessian, as
    llm-compressor does: half the memory of the in x in matrices).
    """
    if block_size < 1:
        raise LowbitError(f"GPTQ block size must be a positive number of columns, not {block_size}")
    if not percdamp >= 0 or not math.isfinite(percdamp):
        raise LowbitError(f"GPTQ damping percdamp must be a finite number >= 0, not {percdamp}; 0.01 is usual")
    original = as_weight_matrix(weight, name)
    spec = weight_spec(spec, "GPTQ")
    n_out, n_in = original.shape
    hessian = _checked_hessian(hessian, n_in, name)
    precision = torch.float64 if hessian.dtype == torch.float64 else torch.float32

    # Inputs that never fired carry no information: their weights become 0 (exact on any grid)
    # and their Hessian entry 1 so the factorization exists.
    diagonal = torch.diagonal(hessian).to(original.device, precision, copy=True)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    perm = (torch.argsort(diagonal, descending=True, stable=True) if act_order
            else torch.arange(n_in)).to(original.device)
    W = original[:, perm] if act_order else original.clone()  # the working copy, columns in `perm`'s order
    W[:, dead[perm]] = 0.0

    def private_hessian() -> torch.Tensor:
        """A fresh copy of H (dead inputs fixed, columns in `perm`'s order): the factorization
        overwrites it, and `hessian` may be shared by the linears of one group."""
        if act_order:
            H = hessian.index_select(0, perm.to(hessian.device)).to(original.device, precision)
            H = H.index_select(1, perm)
        else:
            H = hessian.to(original.device, precision, copy=True)
        H[dead[perm], dead[perm]] = 1.0
        return H

    Hinv, used_damp = _damped_inverse_cholesky(private_hessian, percdamp, name)

    scales = _ColumnScales(original, spec, perm, mse, static_groups)
    Q = torch.zeros_like(W)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        err_block = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column_qparams = scales.for_column(i1 + i, W, W1, i1, i2)
            w = W1[:, i:i + 1]
            q = dequantize(quantize(w, column_qparams), column_qparams)
            Q[:, i1 + i] = q[:, 0]
            err = (w[:, 0] - q[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            err_block[:, i] = err
        W[:, i2:] -= err_block @ Hinv[i1:i2, i2:]

    del W, W1, err_block, Hinv, Hinv1  # before the output's copies: the peak of a large layer
    Q = Q[:, torch.argsort(perm)]
    result = quantized_from_qparams(Q, scales.final_qparams())
    return GPTQResult(result.weight, result.values, result.qparams, percdamp=used_damp)


def _checked_hessian(hessian, n_in: int, name: str) -> torch.Tensor:
    """`hessian` as a tensor (not copied) after checking its shape and values."""
    H = torch.as_tensor(hessian).detach()
    if not H.is_floating_point():
        H = H.to(torch.float64)
    if tuple(H.shape) != (n_in, n_in):
        raise LowbitError(f"the Hessian for {name} has shape {tuple(H.shape)} but the weight has {n_in} input "
                          f"features; accumulate it from this layer's inputs ([{n_in}, {n_in}])")
    if not bool(torch.isfinite(H).all()):
        raise LowbitError(f"the Hessian for {name} contains NaN or infinite values; check the calibration "
                          "activations (fp16 overflow?)")
    return H


def _damped_inverse_cholesky(private_hessian, percdamp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in float32, raising the damping
    tenfold while the factorization fails. Returns the factor and the damping ratio used.
    `private_hessian()` gives a fresh copy of H for each attempt: the inverse and its factor
    overwrite that copy, so at most two in x in matrices are alive (H and its factor L)."""
    damp = percdamp
    for _ in range(DAMPING_STEPS):
        H = private_hessian()
        diagonal = torch.diagonal(H)  # a view: H is damped in place
        diagonal += damp * float(diagonal.mean())
        L, info = torch.linalg.cholesky_ex(H)
        factorized = int(info) == 0
        if factorized:
            torch.cholesky_inverse(L, out=H)
        del L
        if factorized:
            torch.linalg.cholesky_ex(H, upper=True, out=(H, info))
            if int(info) == 0 and bool(torch.isfinite(H).all()):
                return H.to(torch.float32), damp
        del H
        damp = damp * 10 if damp > 0 else 1e-4
    raise LowbitError(f"the Hessian of {name} is not positive definite even with damping {damp / 10:g}; "
                      "calibrate with more (and more varied) samples")


class _ColumnScales:
    """Scales and zero points for each column of the (permuted) weight, in the spec's layout.

    Per-tensor and per-channel qparams come from the original weight, as in reference GPTQ.
    Per-group qparams are chosen the first time a column of the group is reached, from the
    current (error-updated) values of all the group's columns."""

    def __init__(self, original: torch.Tensor, spec: QuantSpec, perm: torch.Tensor, mse: bool = False,
                 static_groups: bool = False) -> None:
        self.spec = spec
        self.mse = mse
        self.column_spec = replace(spec, granularity=per_channel(0))  # one scale per row of a column
        kind = spec.granularity.kind
        if kind == "group":
            size = spec.granularity.group_size
            n_groups = math.ceil(original.shape[1] / size)
            self.group_of_position = (perm // size).tolist()
            positions = torch.argsort(perm)  # position of each original column in permuted order
            self.group_positions = [positions[g * size:(g + 1) * size] for g in range(n_groups)]
            self.scale = torch.zeros(original.shape[0], n_groups, device=original.device)
            self.zero_point = torch.zeros(original.shape[0], n_groups, dtype=torch.int32, device=original.device)
            self.ready = [False] * n_groups
            if static_groups:  # every group's qparams from the original weights, before any update
                whole = weight_qparams_for(original, spec, mse=mse)
                self.scale.copy_(whole.scale.reshape(self.scale.shape))
                self.zero_point.copy_(whole.zero_point.reshape(self.zero_point.shape))
                self.ready = [True] * n_groups
        else:
            self.whole = weight_qparams_for(original, spec, mse=mse)
            self.column = self.whole if kind == "tensor" else QParams(self.column_spec, self.whole.scale,
                                                                      self.whole.zero_point)

    def for_column(self, position: int, W: torch.Tensor, W1: torch.Tensor, i1: int, i2: int) -> QParams:
        if self.spec.granularity.kind != "group":
            return self.column
        g = self.group_of_position[position]
        if not self.ready[g]:
            # All of the group's columns lie at or after `position` (none was reached before);
            # those inside the current block hold their latest values in W1.
            positions = self.group_positions[g]
            current = torch.where((positions < i2)[None, :], W1[:, (positions - i1).clamp(0, i2 - i1 - 1)],
                                  W[:, positions])
            qp = weight_qparams_for(current, self.column_spec, mse=self.mse)
            self.scale[:, g], self.zero_point[:, g] = qp.scale, qp.zero_point
            self.ready[g] = True
        return QParams(self.column_spec, self.scale[:, g], self.zero_point[:, g])

    def final_qparams(self) -> QParams:
        if self.spec.granularity.kind == "group":
            return QParams(self.spec, self.scale, self.zero_point)
        return self.whole


def quantize_group(matrices, statistics, spec: QuantSpec, options, names: list[str]) -> list[GPTQResult]:
    """The `lowbit.weight_algorithms` hook: every matrix with the Hessian of their shared input."""
    hessian = statistics.hessian
    return [gptq_quantize(matrix, hessian, spec, block_size=options.block_size, percdamp=options.percdamp,
                          act_order=options.act_order, static_groups=options.static_groups, name=name)
            for matrix, name in zip(matrices, names)]
