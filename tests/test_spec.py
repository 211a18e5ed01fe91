"""lowbit.spec: presets and specs survive JSON, bad specs fail with a useful SpecError, and every
data type has the integer grid its bit width implies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.errors import LowbitError, SpecError
from lowbit.numerics import QParams, choose_qparams, qparams_for
from lowbit.spec import PRESETS, Granularity, QuantSpec, Recipe, get_dtype, get_recipe, per_channel, per_group


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    recipe = PRESETS[name]
    text = recipe.to_json()
    json.loads(text)  # plain JSON, nothing Python-specific
    assert Recipe.from_json(text) == recipe
    assert get_recipe(text) == recipe
    assert get_recipe(name.upper()) is recipe
    for spec in (recipe.weights, recipe.activations):
        if spec is not None:
            assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_qparams_of_every_preset_round_trip_through_json(name):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((6, 256)).astype(np.float32)
    for spec in (PRESETS[name].weights, PRESETS[name].activations):
        if spec is None or spec.dynamic:
            continue
        qp = qparams_for(weights, spec.with_axis(0 if spec.granularity.kind == "channel" else 1))
        restored = QParams.from_dict(json.loads(json.dumps(qp.to_dict())))
        assert restored.spec == qp.spec
        # float32 -> Python float -> JSON -> float32 is exact.
        np.testing.assert_array_equal(restored.scale, np.asarray(qp.scale))
        np.testing.assert_array_equal(restored.zero_point, np.asarray(qp.zero_point))
        assert restored.scale.dtype == np.float32 and restored.zero_point.dtype == np.int32


def test_custom_json_recipe():
    recipe = get_recipe(
        '{"name": "mine", "weights": {"dtype": "int4", "symmetric": false,'
        ' "granularity": {"kind": "group", "group_size": 32, "axis": 1}}, "activations": null}'
    )
    assert recipe.weights == QuantSpec("int4", symmetric=False, granularity=per_group(32, 1))
    assert recipe.activations is None
    assert recipe.weights.describe() == "int4 asym per-group(32, axis=1)"


def test_dtype_aliases_resolve_to_canonical_names():
    assert QuantSpec("float16").dtype == "fp16"
    assert QuantSpec("bfloat16").dtype == "bf16"
    assert QuantSpec("E4M3").dtype == "fp8_e4m3"
    assert QuantSpec("int1").dtype == "binary"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: QuantSpec("int9x"), "unknown data type 'int9x'; use one of int2..int16"),
        (lambda: QuantSpec("int17"), "unknown data type 'int17'"),
        (lambda: QuantSpec("uint1"), "unknown data type 'uint1'"),
        (lambda: QuantSpec.from_dict({"dtype": 8}), "a data type is a name such as 'int8'"),
        (lambda: Granularity("group"), "per-group granularity needs a positive group_size"),
        (lambda: per_group(0), "per-group granularity needs a positive group_size"),
        (lambda: Granularity("channel", 0, 4), "group_size only applies to per-group"),
        (lambda: Granularity("row"), "unknown granularity 'row'; use tensor, channel, group or token"),
        (lambda: QuantSpec("int8", granularity=Granularity("token")), "per-token granularity needs dynamic=True"),
        (lambda: QuantSpec("binary", symmetric=False), "binary quantization is symmetric by definition"),
        (lambda: QuantSpec("ternary", symmetric=False), "ternary quantization is symmetric by definition"),
        (lambda: QuantSpec.from_dict({"dtype": "int8", "bits": 8}), r"unknown quantization spec field\(s\) \['bits'\]"),
        (lambda: QuantSpec.from_dict({"dtype": "int8", "granularity": {"kind": "group", "size": 4}}),
         r"unknown granularity field\(s\) \['size'\]"),
        (lambda: QuantSpec.from_dict({"dtype": "int8", "symmetric": "false"}), "symmetric must be true or false"),
        (lambda: QuantSpec.from_dict({"dtype": "int8", "granularity": {"kind": "group", "group_size": "128"}}),
         "group_size must be an integer"),
        (lambda: QuantSpec.from_dict({"dtype": "int8", "granularity": "channel"}), "a granularity must be a JSON object"),
        (lambda: QuantSpec.from_dict("int8"), "a quantization spec must be a JSON object"),
        (lambda: Recipe.from_json("{bad"), "recipe is not valid JSON"),
        (lambda: Recipe.from_json("[1, 2]"), "a recipe needs at least a 'name'"),
        (lambda: Recipe.from_json('{"name": "x", "extra": 1}'), r"unknown recipe field\(s\) \['extra'\]"),
        (lambda: get_recipe("w9a9"), "unknown recipe 'w9a9'; use one of w8a8"),
        (lambda: QuantSpec("fp16").qmin, "fp16 is a float format and has no integer grid"),
    ],
)
def test_invalid_specs_raise_a_spec_error_that_names_the_problem(build, message):
    with pytest.raises(SpecError, match=message) as info:
        build()
    assert isinstance(info.value, LowbitError)  # the CLI prints it without a traceback
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "dtype, full, narrow",
    [
        ("int8", (-128, 127), (-127, 127)),
        ("uint8", (0, 255), (0, 254)),
        ("int4", (-8, 7), (-7, 7)),
        ("uint4", (0, 15), (0, 14)),
        ("int16", (-32768, 32767), (-32767, 32767)),
        ("uint16", (0, 65535), (0, 65534)),
        ("int2", (-2, 1), (-1, 1)),
        ("uint2", (0, 3), (0, 2)),
        ("int3", (-4, 3), (-3, 3)),
        ("binary", (-1, 1), (-1, 1)),
        ("ternary", (-1, 1), (-1, 1)),
    ],
)
def test_integer_grids(dtype, full, narrow):
    assert (QuantSpec(dtype).qmin, QuantSpec(dtype).qmax) == full
    spec = QuantSpec(dtype, narrow_range=True)
    assert (spec.qmin, spec.qmax) == narrow


@pytest.mark.parametrize("bits", range(2, 17))
def test_every_width_has_2_to_the_bits_levels(bits):
    for signed in (True, False):
        spec = QuantSpec(f"{'' if signed else 'u'}int{bits}")
        assert spec.qmax - spec.qmin + 1 == 2**bits
        assert spec.bits == bits and get_dtype(spec.dtype).signed is signed


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
def test_narrow_symmetric_grid_is_symmetric_around_the_zero_point(dtype):
    qp = choose_qparams(np.float32(-2.0), np.float32(1.0), QuantSpec(dtype, narrow_range=True))
    spec = qp.spec
    assert int(qp.zero_point) - spec.qmin == spec.qmax - int(qp.zero_point)
    assert float(qp.scale) == pytest.approx(2.0 / (spec.qmax - int(qp.zero_point)))


def test_with_axis_fills_only_open_axes():
    assert QuantSpec("int8", granularity=per_channel()).with_axis(0).granularity == per_channel(0)
    assert QuantSpec("int8", granularity=per_channel(1)).with_axis(0).granularity == per_channel(1)
    assert QuantSpec("int8", granularity=per_group(32)).with_axis(-1).granularity == per_group(32, -1)
    assert QuantSpec("int8").with_axis(0).granularity == Granularity("tensor")


def test_numpy_integer_axes_become_plain_ints():
    spec = QuantSpec("int4", granularity=per_group(np.int64(32), np.int32(1)))
    assert json.loads(json.dumps(spec.to_dict()))["granularity"] == {"kind": "group", "axis": 1, "group_size": 32}
