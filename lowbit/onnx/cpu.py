"""What this CPU offers ONNX Runtime's int8 kernels, so the writers can pick the fast form.

ONNX Runtime (MLAS) runs an int8 Conv through one of two kernel families, chosen from the weights:

- symmetric weights (all weight zero points 0): its "symmetric conv" kernels (indirect
  convolution, no im2col), written for AVX2 / AVX512-VNNI;
- any other int8 weights: im2col + its general U8S8 GEMM, which uses AMX tiles on CPUs with
  AMX-INT8 (measured here: about 10x the fp32 MatMul throughput, against about 3.5x for VNNI).

So on AMX CPUs the fast form of a symmetric int8 Conv weight is the same numbers stored with
zero point -1 (see `qdq.write_qdq`). The choice follows the CPU's flags, read from
/proc/cpuinfo on Linux; elsewhere nothing is detected and the portable symmetric form is kept.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_amx_int8() -> bool:
    """True when the CPU has AMX tiles with int8 support (and the kernel exposes them)."""
    flags = cpu_flags()
    return "amx_tile" in flags and "amx_int8" in flags


__all__ = ["cpu_flags", "has_amx_int8"]
