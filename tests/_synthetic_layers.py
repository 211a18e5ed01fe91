"""Synthetic linear layers with realistic inputs, shared by the algorithm tests.

Transformer activations are correlated across channels (they live near a low-dimensional
subspace) and a few channels carry outliers 10-50x larger than the rest; weights are roughly
Gaussian. Plain i.i.d. Gaussian inputs would make GPTQ and AWQ look no better than RTN.
"""

from __future__ import annotations

import pytest
import torch


def activations(n: int = 1024, d: int = 256, *, rank: int = 32, n_salient: int = 8, outlier: float = 20.0,
                seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(rank, d, generator=generator) / rank ** 0.5
    x = torch.randn(n, rank, generator=generator) @ mixing + 0.2 * torch.randn(n, d, generator=generator)
    x = x + 0.5 * torch.randn(d, generator=generator)  # per-channel offsets, as after LayerNorm biases
    salient = torch.randperm(d, generator=generator)[:n_salient]
    x[:, salient] *= outlier
    return x


def weight(out: int = 192, d: int = 256, *, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, d, generator=generator) * 0.05


def relative_output_error(x: torch.Tensor, reference_weight: torch.Tensor, quantized_weight: torch.Tensor,
                          input_scales: torch.Tensor | None = None) -> float:
    """||X W^T - X' W_q^T|| / ||X W^T||, with X' = X / s when the quantized layer reads scaled inputs."""
    x64 = x.double()
    reference = x64 @ reference_weight.double().T
    inputs = x64 if input_scales is None else x64 / input_scales.double()
    return float(torch.linalg.norm(reference - inputs @ quantized_weight.double().T) / torch.linalg.norm(reference))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run a test module on one torch thread: these matrices are tiny, and on a shared CPU extra
    threads spin-wait instead of working (10x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
