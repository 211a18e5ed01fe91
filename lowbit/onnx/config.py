"""What to do to an ONNX model, as plain data: one config dataclass per mode.

    StaticConfig      calibrated int8 activations and weights (QDQ), with the static rewrite passes
    DynamicConfig     int8 weights, activations quantized at run time
    WeightOnlyConfig  low-bit MatMul/Gemm weights (MatMulNBits or blocked DequantizeLinear)
    Fp16Config        half precision
    AutoConfig        build candidates of the modes above from one calibration, keep the fastest
                      one within an accuracy budget (`lowbit.search.auto`)

The mode is the config's type: `quantize_onnx(model, out, config)` looks the handler up by
`type(config)`. Each config validates itself (`validate`), before any model is read, and
round-trips through `to_dict` / `config_from_dict` (JSON-native values only), so a run can be
stored, compared and replayed. Options that are about the data rather than the quantization
(calibration samples, batch size, threads) are arguments of `quantize_onnx`, not config fields.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from lowbit.calibration.observer import CALIBRATION_METHODS
from lowbit.errors import LowbitError
from lowbit.spec import WEIGHT_ALGORITHMS

CONFIG_VERSION = 1
AUTO_METRICS = ("auto", "cosine", "top1")
# The accuracy budget of --mode auto when none is given: top-1 agreement with the float model may
# drop by 1 point on classifiers; elsewhere output cosine by 0.003 (MiniLM's target is >= 0.997).
DEFAULT_MAX_DROP = {"top1": 0.01, "cosine": 0.003}
# Outputs of per-position class scores (`verify.looks_like_position_scores`: a CTC recognizer's
# frames, a tagger's tokens) are also gated on their decisions: the expected share of positions
# whose arg-max class changes may be at most this. A call holds tens of such decisions and its
# result (a decoded string) changes when one of them does: at 0.2% per position, a few percent of
# 50-position calls. PP-OCRv4 rec: dynamic int8 0.25% (5.4% of 240 strings changed), its output
# MatMul float 0.12% (1.7%); a cosine budget of 0.003 passes both (0.99994 / 0.99998).
# Yes/no probabilities (`verify.looks_like_binary_probabilities`, one per call or frame) share the
# budget: silero-vad's static int8 1.6% expected (1.8% of 1663 frames flipped, state carried), its
# int8 LSTMs with float convolutions 0% (none flipped).
DEFAULT_MAX_POSITION_DROP = 0.002


def _exclude_tuple(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value or ())


@dataclass
class _Config:
    mode: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.exclude = _exclude_tuple(self.exclude)

    def validate(self, *, has_calibration: bool) -> None:
        """Raise a `LowbitError` naming the problem and the fix; nothing is read or written yet."""
        if self.needs_calibration and not has_calibration:
            raise LowbitError(f"{self.mode} quantization needs calibration data; pass --calib CALIB.npz "
                              "(or use --mode dynamic)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude"] = list(self.exclude)
        return {"mode": self.mode, "version": CONFIG_VERSION, **data}


@dataclass
class StaticConfig(_Config):
    """Static int8. `smooth` None: SmoothQuant on whenever LayerNorm-fed int8 MatMuls exist;
    `outlier_split` None: on whenever calibration data is given; `calib_memory_mb` None: the
    calibration default (`collect.DEFAULT_MEMORY_BUDGET_MB`), math.inf: unbounded."""

    mode: ClassVar[str] = "static"
    needs_calibration: ClassVar[bool] = True
    calib_method: str = "auto"
    per_channel: bool = True
    smooth: bool | None = None
    smooth_alpha: float | dict[str, float] = 0.5
    equalize: bool = False
    bias_correction: bool = False
    outlier_split: bool | None = None
    calib_memory_mb: float | None = None

    def validate(self, *, has_calibration: bool) -> None:
        super().validate(has_calibration=has_calibration)
        check_calib_method(self.calib_method)
        if self.calib_memory_mb is not None and not self.calib_memory_mb > 0:
            raise LowbitError(f"calibration memory budget must be positive, got {self.calib_memory_mb} MB")
        alphas = self.smooth_alpha.values() if isinstance(self.smooth_alpha, dict) else [self.smooth_alpha]
        if not all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in alphas):
            raise LowbitError(f"SmoothQuant alpha must be in [0, 1], got {self.smooth_alpha}; use --smooth-alpha 0.5")


@dataclass
class DynamicConfig(_Config):
    mode: ClassVar[str] = "dynamic"
    per_channel: bool = True
    outlier_split: bool | None = None


@dataclass
class WeightOnlyConfig(_Config):
    """Weight-only: MatMul/Gemm weights to `bits` with one scale per `group_size` input features
    (0 or -1: per output channel); see `lowbit.onnx.weight_only`."""

    mode: ClassVar[str] = "weight-only"
    bits: int = 4
    group_size: int = 32
    algo: str = "rtn"
    symmetric: bool = True
    act_order: bool = False
    weight_format: str = "matmulnbits"
    accuracy_level: int = 0
    embedding_bits: int = 8  # embedding tables (Gather): 8 or 4 bits, 0 keeps them float

    def validate(self, *, has_calibration: bool) -> None:
        from lowbit.onnx.weight_only import check_options  # imports torch: only for this mode

        check_options(bits=self.bits, group_size=self.group_size, algo=self.algo, has_calibration=has_calibration,
                      symmetric=self.symmetric, act_order=self.act_order, weight_format=self.weight_format,
                      accuracy_level=self.accuracy_level, embedding_bits=self.embedding_bits)


@dataclass
class Fp16Config(_Config):
    mode: ClassVar[str] = "fp16"


@dataclass
class AutoConfig(_Config):
    """Try candidates built from one calibration; keep the fastest within `max_drop` of float.

    `metric`: "top1" (agreement of the arg-max with the float model, for (batch, classes) outputs),
    "cosine" (worst output's mean per-sample cosine) or "auto" (top1 when the model has a class-score
    output). `max_drop` None: `DEFAULT_MAX_DROP[metric]`. `per_channel` False restricts the static
    candidates to per-tensor weights (True/None: both are tried). `candidates`: names to try (None:
    all that the model's statistics make worth a trial, see `lowbit.search.auto`).
    `max_position_drop`: the most expected arg-max disagreement per position allowed on outputs of
    per-position class scores and of yes/no probabilities (`DEFAULT_MAX_POSITION_DROP`), on top of `max_drop`."""

    mode: ClassVar[str] = "auto"
    needs_calibration: ClassVar[bool] = True
    max_drop: float | None = None
    metric: str = "auto"
    per_channel: bool | None = None
    calib_method: str = "auto"
    time_limit: float = 600.0
    measure_speed: bool = True
    candidates: tuple[str, ...] | None = None
    calib_memory_mb: float | None = None
    max_position_drop: float = DEFAULT_MAX_POSITION_DROP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates is not None:
            self.candidates = _exclude_tuple(self.candidates)

    def validate(self, *, has_calibration: bool) -> None:
        if not has_calibration:
            raise LowbitError("--mode auto builds its candidates from one calibration; pass --calib CALIB.npz "
                              "(or pick a mode that needs no data: --mode dynamic, fp16 or weight-only)")
        check_calib_method(self.calib_method)
        if self.metric not in AUTO_METRICS:
            raise LowbitError(f"unknown metric {self.metric!r}; use one of {', '.join(AUTO_METRICS)}")
        if self.max_drop is not None and not (self.max_drop >= 0 and math.isfinite(self.max_drop)):
            raise LowbitError(f"--max-drop must be a non-negative number (0.01 = 1 point), got {self.max_drop}")
        if not self.time_limit > 0:
            raise LowbitError(f"--time-limit must be positive seconds, got {self.time_limit}")
        if not (self.max_position_drop >= 0 and math.isfinite(self.max_position_drop)):
            raise LowbitError("--max-position-drop must be a non-negative fraction of positions (0.002 = 0.2%), "
                              f"got {self.max_position_drop}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["candidates"] = None if self.candidates is None else list(self.candidates)
        return data


CONFIGS: dict[str, type[_Config]] = {c.mode: c for c in (StaticConfig, DynamicConfig, WeightOnlyConfig, Fp16Config,
                                                          AutoConfig)}
MODES = tuple(CONFIGS)
QuantConfig = StaticConfig | DynamicConfig | WeightOnlyConfig | Fp16Config | AutoConfig


def check_calib_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise LowbitError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """The config `to_dict` wrote; unknown modes or fields are refused, not ignored."""
    if not isinstance(data, dict) or data.get("mode") not in CONFIGS:
        mode = data.get("mode") if isinstance(data, dict) else None
        raise LowbitError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    if data.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        raise LowbitError(f"config version {data.get('version')} is not {CONFIG_VERSION}; write it again with this "
                          "lowbit")
    cls = CONFIGS[data["mode"]]
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in data.items() if k not in ("mode", "version")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LowbitError(f"unknown {cls.mode} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def config_for_mode(mode: str, **options: Any) -> QuantConfig:
    """The config of `mode` from keyword options, dropping the ones that mode does not take
    (the CLI and the old keyword API pass every flag)."""
    if mode not in CONFIGS:
        raise LowbitError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    from lowbit.onnx.passes import PASSES  # the static rewrite passes and their switches

    static_only = [p for p in PASSES if p.static_only and options.get(p.name)]
    if mode != "static" and static_only:
        hint = ("--mode auto tries them itself when the statistics say they can help; " if mode == "auto" else "")
        raise LowbitError(f"--smooth, --equalize and --bias-correction need calibration; {hint}use them with "
                          "--mode static")
    cls = CONFIGS[mode]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in known})


__all__ = ["AUTO_METRICS", "AutoConfig", "CALIBRATION_METHODS", "CONFIGS", "DEFAULT_MAX_DROP", "DynamicConfig",
           "Fp16Config", "MODES", "QuantConfig", "StaticConfig", "WEIGHT_ALGORITHMS", "WeightOnlyConfig",
           "check_calib_method", "config_for_mode", "config_from_dict"]
