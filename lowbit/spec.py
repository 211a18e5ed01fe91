"""Plain-data descriptions of *what* a tensor is quantized to.

A `QuantSpec` says: this data type, this mapping (symmetric or asymmetric, full or narrow
range), this granularity (per-tensor, per-channel, per-group, per-token), static or dynamic.
Specs carry no numbers (scales live in `numerics.QParams`) and no graph knowledge, so every
backend, algorithm and report can share them. Everything here round-trips through JSON, which is
how a quantized model records what was done to it.
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from lowbit.errors import SpecError
from lowbit.weight_algorithms import ALGORITHMS

# The names of the built-in weight-only algorithms; the table every front end reads (and where a
# new one is registered) is `lowbit.weight_algorithms.ALGORITHMS`.
WEIGHT_ALGORITHMS = tuple(ALGORITHMS)

DTypeKind = Literal["int", "binary", "ternary", "float"]


@dataclass(frozen=True)
class DType:
    """A storage type. Integer kinds have a grid; float kinds are simulated by rounding."""

    name: str
    kind: DTypeKind
    bits: int
    signed: bool = True
    # Float formats only: mantissa bits, smallest normal exponent, largest finite value and
    # whether overflow saturates (fp8 as ONNX casts it) or becomes inf (IEEE fp16/bf16).
    mantissa_bits: int = 0
    min_normal_exp: int = 0
    max_finite: float = 0.0
    saturates: bool = False

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_integer_grid(self) -> bool:
        """True for kinds stored as small integers (int, binary, ternary)."""
        return self.kind != "float"


_FLOAT_DTYPES = {
    "fp16": DType("fp16", "float", 16, True, 10, -14, 65504.0, False),
    "bf16": DType("bf16", "float", 16, True, 7, -126, 3.3895313892515355e38, False),
    "fp8_e4m3": DType("fp8_e4m3", "float", 8, True, 3, -6, 448.0, True),
    "fp8_e5m2": DType("fp8_e5m2", "float", 8, True, 2, -14, 57344.0, True),
}
_SPECIAL_DTYPES = {
    # 1-bit: the sign of x times a scale, values +-scale.
    "binary": DType("binary", "binary", 1, True),
    # Three levels -scale, 0, +scale, stored in 2 bits.
    "ternary": DType("ternary", "ternary", 2, True),
}
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "e4m3": "fp8_e4m3",
                  "e5m2": "fp8_e5m2", "fp8": "fp8_e4m3", "int1": "binary", "1bit": "binary"}
_INT_PATTERN = re.compile(r"^(u?)int(\d+)$")


def get_dtype(name: str) -> DType:
    """Look up a data type by name: int2..int16, uint2..uint16, binary, ternary, fp16, bf16,
    fp8_e4m3, fp8_e5m2."""
    if not isinstance(name, str):
        raise SpecError(f"a data type is a name such as 'int8', not {name!r}")
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[key]
    if key in _SPECIAL_DTYPES:
        return _SPECIAL_DTYPES[key]
    match = _INT_PATTERN.match(key)
    if match and 2 <= int(match.group(2)) <= 16:
        return DType(key, "int", int(match.group(2)), signed=not match.group(1))
    raise SpecError(
        f"unknown data type {name!r}; use one of int2..int16, uint2..uint16, binary, ternary, "
        "fp16, bf16, fp8_e4m3, fp8_e5m2"
    )


GranularityKind = Literal["tensor", "channel", "group", "token"]


@dataclass(frozen=True)
class Granularity:
    """How many scales a tensor gets.

    - tensor: one scale for the whole tensor;
    - channel: one per index along `axis`;
    - group: blocks of `group_size` consecutive elements along `axis` share a scale (the layout of
      ONNX blocked quantization: the scale has the tensor's shape with that axis divided);
    - token: one per row over the last axis (dynamic activations of transformers).

    `axis=None` on channel/group means "let the backend choose" (the output-channel axis for
    per-channel weights, the input-feature axis for groups); numerics needs a concrete axis, see
    `resolved`.
    """

    kind: GranularityKind = "tensor"
    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("tensor", "channel", "group", "token"):
            raise SpecError(
                f"unknown granularity {self.kind!r}; use tensor, channel, group or token"
            )
        # JSON gives any type; a string axis or group size must not slip through as "128".
        for name in ("axis", "group_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise SpecError(f"granularity {name} must be an integer, not {value!r}")
            object.__setattr__(self, name, int(value))  # NumPy integers become JSON-safe ints
        if self.kind == "group" and (self.group_size is None or self.group_size < 1):
            raise SpecError("per-group granularity needs a positive group_size, e.g. 128")
        if self.kind != "group" and self.group_size is not None:
            raise SpecError(f"group_size only applies to per-group granularity, not {self.kind!r}")

    def resolved(self, axis: int) -> Granularity:
        """The same granularity with a concrete axis, if it had none."""
        if self.kind in ("channel", "group") and self.axis is None:
            return replace(self, axis=axis)
        return self

    def describe(self) -> str:
        if self.kind == "channel":
            return "per-channel" if self.axis is None else f"per-channel(axis={self.axis})"
        if self.kind == "group":
            where = "" if self.axis is None else f", axis={self.axis}"
            return f"per-group({self.group_size}{where})"
        return f"per-{self.kind}"


PER_TENSOR = Granularity("tensor")
PER_TOKEN = Granularity("token")


def per_channel(axis: int | None = None) -> Granularity:
    return Granularity("channel", axis)


def per_group(group_size: int, axis: int | None = None) -> Granularity:
    return Granularity("group", axis, group_size)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: data type, mapping and granularity."""

    dtype: str = "int8"
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=Granularity)
    # Dynamic: ranges are computed from each input at run time instead of from calibration.
    dynamic: bool = False

    def __post_init__(self) -> None:
        dt = get_dtype(self.dtype)  # raises SpecError for unknown names
        for name in ("symmetric", "narrow_range", "dynamic"):
            # A JSON string "false" is truthy; accept real booleans only.
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if not isinstance(self.granularity, Granularity):
            raise SpecError(f"granularity must be a Granularity, not {self.granularity!r}")
        object.__setattr__(self, "dtype", dt.name)
        if dt.kind in ("binary", "ternary") and not self.symmetric:
            raise SpecError(f"{dt.name} quantization is symmetric by definition; drop symmetric=False")
        if self.granularity.kind == "token" and not self.dynamic:
            raise SpecError("per-token granularity needs dynamic=True (token ranges exist only at run time)")

    @property
    def dtype_info(self) -> DType:
        return get_dtype(self.dtype)

    @property
    def bits(self) -> int:
        return self.dtype_info.bits

    @property
    def qmin(self) -> int:
        """Smallest integer on the grid (integer kinds only)."""
        return self._grid()[0]

    @property
    def qmax(self) -> int:
        return self._grid()[1]

    def _grid(self) -> tuple[int, int]:
        dt = self.dtype_info
        if dt.kind == "binary":
            return -1, 1
        if dt.kind == "ternary":
            return -1, 1
        if dt.kind == "float":
            raise SpecError(f"{dt.name} is a float format and has no integer grid")
        if dt.signed:
            low, high = -(2 ** (dt.bits - 1)), 2 ** (dt.bits - 1) - 1
            return (low + 1 if self.narrow_range else low), high
        high = 2**dt.bits - 1
        return 0, (high - 1 if self.narrow_range else high)

    def with_axis(self, axis: int) -> QuantSpec:
        """The spec with a concrete channel/group axis (for granularities that left it open)."""
        return replace(self, granularity=self.granularity.resolved(axis))

    def describe(self) -> str:
        dt = self.dtype_info
        if dt.is_float:
            return f"{dt.name} {self.granularity.describe()}"
        mapping = "sym" if self.symmetric else "asym"
        extra = " narrow" if self.narrow_range else ""
        kind = " dynamic" if self.dynamic else ""
        return f"{dt.name} {mapping}{extra} {self.granularity.describe()}{kind}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        return _build(cls, data, "quantization spec", nested={"granularity": Granularity})


@dataclass(frozen=True)
class Recipe:
    """What to do to a model: a spec for weights and one for activations (None = keep float)."""

    name: str
    weights: QuantSpec | None
    activations: QuantSpec | None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
            "description": self.description,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict) or "name" not in data:
            raise SpecError("a recipe needs at least a 'name' and 'weights'/'activations' specs")
        unknown = set(data) - {"name", "weights", "activations", "description"}
        if unknown:
            raise SpecError(f"unknown recipe field(s) {sorted(unknown)}; allowed: name, weights, activations, description")
        specs = {k: None if data.get(k) is None else QuantSpec.from_dict(data[k]) for k in ("weights", "activations")}
        return cls(str(data["name"]), specs["weights"], specs["activations"], str(data.get("description", "")))

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"recipe is not valid JSON ({exc.msg} at line {exc.lineno}); check the text or use a preset name") from None
        return cls.from_dict(data)


def _build(cls: type, data: Any, what: str, nested: dict[str, type] | None = None) -> Any:
    """Construct a frozen dataclass from a dict, turning every problem into a SpecError."""
    if not isinstance(data, dict):
        raise SpecError(f"a {what} must be a JSON object, got {type(data).__name__}")
    allowed = set(cls.__dataclass_fields__)
    unknown = set(data) - allowed
    if unknown:
        raise SpecError(f"unknown {what} field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    kwargs = dict(data)
    for key, sub in (nested or {}).items():
        if key in kwargs:
            kwargs[key] = _build(sub, kwargs[key], key)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"invalid {what}: {exc}") from None


def _int_weights(dtype: str, granularity: Granularity, symmetric: bool = True) -> QuantSpec:
    return QuantSpec(dtype, symmetric=symmetric, granularity=granularity)


_ACT_INT8 = QuantSpec("int8", symmetric=False)
_ACT_DYNAMIC = QuantSpec("uint8", symmetric=False, dynamic=True)

PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("w8a8", _int_weights("int8", per_channel()), _ACT_INT8,
               "int8 per-channel weights, static int8 activations (calibrated)"),
        Recipe("w8a8-dynamic", _int_weights("int8", per_channel()), _ACT_DYNAMIC,
               "int8 per-channel weights, uint8 activations quantized at run time"),
        Recipe("w8a16", _int_weights("int8", per_channel()), None, "int8 weight-only"),
        Recipe("w4a16", _int_weights("int4", per_channel()), None, "int4 per-channel weight-only"),
        Recipe("w4a16-g128", _int_weights("int4", per_group(128)), None,
               "int4 weight-only, groups of 128 input features"),
        Recipe("w4a16-g32", _int_weights("int4", per_group(32)), None,
               "int4 weight-only, groups of 32 input features"),
        Recipe("w4a8", _int_weights("int4", per_channel()), _ACT_INT8,
               "int4 per-channel weights, static int8 activations"),
        Recipe("w2a16", _int_weights("int2", per_group(64), symmetric=False), None,
               "int2 asymmetric weight-only, groups of 64"),
        Recipe("w2a8", _int_weights("int2", per_channel(), symmetric=False), _ACT_INT8,
               "int2 asymmetric per-channel weights, static int8 activations"),
        Recipe("w1", _int_weights("binary", per_channel()), None,
               "binary weights (+-scale per output channel), float activations"),
        Recipe("w1a8", _int_weights("binary", per_channel()), _ACT_INT8,
               "binary weights, static int8 activations"),
        Recipe("ternary", _int_weights("ternary", per_channel()), None,
               "ternary weights (-s, 0, +s per output channel), float activations"),
        Recipe("fp16", QuantSpec("fp16"), QuantSpec("fp16"), "half precision weights and compute"),
        Recipe("bf16", QuantSpec("bf16"), QuantSpec("bf16"), "bfloat16 weights and compute"),
        Recipe("fp8", QuantSpec("fp8_e4m3", granularity=per_channel()), QuantSpec("fp8_e4m3"),
               "fp8 e4m3 weights (per-channel scale) and activations (per-tensor scale)"),
    ]
}


def get_recipe(name_or_json: str) -> Recipe:
    """A preset by name, or a recipe given as a JSON object."""
    text = name_or_json.strip()
    if text.startswith("{"):
        return Recipe.from_json(text)
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    raise SpecError(f"unknown recipe {name_or_json!r}; use one of {', '.join(PRESETS)} or a JSON recipe")
