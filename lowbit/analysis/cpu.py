"""Which int8 instructions this CPU has, and what that means for int8 speed in ONNX Runtime.

Read from /proc/cpuinfo (Linux): the x86 `flags` line or the ARM `Features` line. The explanation
is what a user needs when an int8 model is not faster than float: without VNNI, x86 int8 GEMMs use
vpmaddubsw (uint8 x int8 only, 16-bit intermediate sums that can saturate) and gain little.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

X86_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FEATURES = ("neon", "asimd", "asimddp", "i8mm", "sve")


@dataclass
class CpuInfo:
    model_name: str
    arch: str
    features: dict[str, bool] = field(default_factory=dict)
    explanation: str = ""

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "arch": self.arch, "features": self.features,
                "explanation": self.explanation}

    def line(self) -> str:
        present = [name for name, has in self.features.items() if has] or ["none detected"]
        return f"CPU: {self.model_name} ({self.arch}); int8 features: {', '.join(present)}\n  {self.explanation}"


def cpu_info(cpuinfo_text: str | None = None, arch: str | None = None) -> CpuInfo:
    """This machine's int8 features (or those described by `cpuinfo_text`, for tests)."""
    arch = arch or platform.machine() or "unknown"
    if cpuinfo_text is None:
        path = Path("/proc/cpuinfo")
        cpuinfo_text = path.read_text(errors="replace") if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    is_arm = arch.lower().startswith(("arm", "aarch")) or ("features" in fields and "flags" not in fields)
    names = ARM_FEATURES if is_arm else X86_FEATURES
    features = {name: name in flags for name in names}
    if is_arm and features.get("asimd"):
        features["neon"] = True  # AArch64 reports NEON as asimd
    model = fields.get("model name") or fields.get("cpu part") or platform.processor() or "unknown CPU"
    info = CpuInfo(model, arch, features)
    info.explanation = explain(features, known=bool(flags))
    return info


def explain(features: dict[str, bool], known: bool = True) -> str:
    """One line: what these features mean for int8 (vs float32) speed in ONNX Runtime."""
    has = lambda name: features.get(name, False)  # noqa: E731
    if not known:
        return "CPU features unknown (no /proc/cpuinfo): int8 speed cannot be predicted; measure it."
    if has("amx_int8"):
        return ("AMX int8 tiles: int8 matrix multiplies can run several times faster than float32 on large "
                "GEMMs; small or memory-bound layers gain less.")
    if has("avx512_vnni") or has("avx_vnni"):
        return ("VNNI: one-instruction U8S8/S8S8 int8 dot products with 32-bit sums, no saturation; int8 "
                "MatMul/Conv typically run ~2-4x faster than float32 (less where Q/DQ overhead dominates).")
    if has("avx512bw") or has("avx2"):
        return ("no VNNI: int8 runs on AVX2/AVX-512BW vpmaddubsw, U8S8 only (uint8 activations x int8 "
                "weights) with 16-bit intermediate sums that can saturate; the gain over float32 is small "
                "and small models can be SLOWER than float32.")
    if has("i8mm"):
        return "ARM i8mm: SMMLA/UMMLA int8 matrix multiply; int8 GEMMs are typically 2-4x faster than float32."
    if has("asimddp"):
        return "ARM dot product (SDOT/UDOT): int8 GEMMs are typically ~2x faster than float32."
    if has("neon"):
        return ("ARM NEON without dot product: int8 uses widening multiplies; expect little or no gain, "
                "possibly SLOWER than float32.")
    return "no SIMD int8 support detected: expect int8 to be SLOWER than float32 on this CPU."
