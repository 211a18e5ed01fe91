"""Sub-4-bit recipes keep the first/last layers and depthwise convs at int8 (lowbit.torch.mixed)."""

from __future__ import annotations

import copy
import json
import math
import struct

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lowbit.errors import LowbitError
from lowbit.torch import FloatModuleWarning, Int8LayersWarning, calibrate, export_onnx, load_packed, prepare, save_packed
from lowbit.torch.qat import quantized_layers
from lowbit.zoo.depthwise_digits import ResidualDepthwiseCNN, digits_16
from lowbit.zoo.digits import load_digits_split

# Call order of ResidualDepthwiseCNN's layers: stem, then (expand, depthwise, project) x 4, head conv, Linear.
FIRST, LAST = "features.0.0", "classifier"
DEPTHWISE = [f"features.{i}.block.1.0" for i in (1, 2, 3, 4)]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = ResidualDepthwiseCNN().eval()
    data = load_digits_split()
    return model, digits_16(data.x_train[:256]), digits_16(data.x_test[:128])


@pytest.mark.parametrize("recipe, bits", [("w1a8", 1), ("w2a8", 2), ("ternary", 2)])
def test_default_keeps_first_last_and_depthwise_layers_at_int8(net, recipe, bits):
    model, x, _ = net
    with pytest.warns(Int8LayersWarning, match=r"6 layers keep int8 weights .*features\.0\.0 \(first layer\)"):
        prepared = prepare(model, recipe, x[:2])
    assert list(prepared.lowbit.int8_layers) == [FIRST, *DEPTHWISE, LAST]
    widths = {name: layer.weight_quantizer.spec.bits for name, layer in quantized_layers(prepared).items()}
    assert len(widths) == 15
    assert {n for n, b in widths.items() if b == 8} == {FIRST, *DEPTHWISE, LAST}
    assert all(b == bits for n, b in widths.items() if n not in prepared.lowbit.int8_layers)
    assert quantized_layers(prepared)[FIRST].weight_quantizer.spec.symmetric
    # The packed cost, by hand: int8 stores one byte per weight, the recipe ceil(count * bits / 8)
    # (plus, for asymmetric int2, one packed zero point per channel); the scales are the same.
    extra = 0
    for name in prepared.lowbit.int8_layers:
        weight = model.get_submodule(name).weight
        low = math.ceil(weight.numel() * bits / 8) + (math.ceil(weight.shape[0] * 2 / 8) if recipe == "w2a8" else 0)
        extra += weight.numel() - low
    assert prepared.lowbit.int8_cost_bytes == extra
    assert f"int8: {FIRST} (first layer)" in prepared.lowbit.summary()


def test_all_layers_option_wider_recipes_and_explicit_lists(net, recwarn):
    model, x, _ = net
    every = prepare(model, "w1a8", x[:2], keep_int8="none")
    assert every.lowbit.int8_layers == {}
    assert {layer.weight_quantizer.spec.bits for layer in quantized_layers(every).values()} == {1}
    four = prepare(model, "w4a8", x[:2])  # 4 bits and wider quantize every layer well
    assert four.lowbit.int8_layers == {}
    assert not [w for w in recwarn if issubclass(w.category, Int8LayersWarning)]
    with pytest.warns(Int8LayersWarning, match="chosen by the caller"):
        chosen = prepare(model, "w2a8", x[:2], keep_int8=["features.2.block.2"])
    widths = {name: layer.weight_quantizer.spec.bits for name, layer in quantized_layers(chosen).items()}
    assert widths["features.2.block.2"] == 8 and widths[FIRST] == 2
    with pytest.raises(LowbitError, match="not Linear/Conv/Embedding modules"):
        prepare(model, "w2a8", x[:2], keep_int8=["features.1"])
    with pytest.raises(LowbitError, match="keep_int8 must be"):
        prepare(model, "w2a8", x[:2], keep_int8="all")
    with pytest.raises(LowbitError, match="both excluded"):
        prepare(model, "w2a8", x[:2], keep_int8=[LAST], exclude=[LAST])


def test_excluded_float_layers_are_not_counted_as_first_or_last(net):
    model, x, _ = net
    with pytest.warns(Int8LayersWarning), pytest.warns(FloatModuleWarning, match="excluded by the caller"):
        prepared = prepare(model, "w1a8", x[:2], exclude=[FIRST])
    assert FIRST in prepared.lowbit.float_modules
    assert list(prepared.lowbit.int8_layers)[0] == "features.1.block.0.0"


def test_mixed_precision_export_holds_parity_and_writes_each_width(net, tmp_path):
    model, x, x_test = net
    with pytest.warns(Int8LayersWarning):
        prepared = prepare(model, "w1a8", x[:2])
    calibrate(prepared, [x])
    result = export_onnx(prepared, x[:2], tmp_path / "m.onnx", check_data=x_test)
    assert result.parity.passed, result.parity.describe()
    assert list(result.int8_layers) == [FIRST, *DEPTHWISE, LAST]
    exported = onnx.load(result.path)
    weights = {t.name[:-len(".export_weight")]: numpy_helper.to_array(t) for t in exported.graph.initializer
               if t.name.endswith(".export_weight")}
    assert len(weights) == 15
    for name, values in weights.items():
        if name in result.int8_layers:
            assert len(np.unique(values)) > 3 and np.abs(values).max() == 127  # symmetric int8, max channel at 127
        else:
            assert set(np.unique(values)) <= {-1, 1}
    plan = json.loads(next(p.value for p in exported.metadata_props if p.key == "lowbit.plan"))
    assert plan["settings"]["int8_layers"] == [FIRST, *DEPTHWISE, LAST]
    assert result.packed_weight_bytes == prepared.lowbit.int8_cost_bytes + _all_binary_packed(model, x)


def _all_binary_packed(model, x) -> int:
    from lowbit.torch.export import model_nbytes

    every = prepare(model, "w1a8", x[:2], keep_int8="none")
    calibrate(every, [x])
    return model_nbytes(every)[0]


def test_packed_checkpoint_stores_each_width_and_loads_back_exactly(net, tmp_path):
    model, x, x_test = net
    with pytest.warns(Int8LayersWarning):
        prepared = prepare(model, "w2a8", x[:2])
    calibrate(prepared, [x])
    path = save_packed(prepared, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    for name, layer in quantized_layers(prepared).items():
        start, end = header[f"{name}.weight.packed"]["data_offsets"]
        bits = 8 if name in prepared.lowbit.int8_layers else 2
        assert end - start == math.ceil(layer.weight.numel() * bits / 8)
    assert json.loads(header["__metadata__"]["int8_layers"]) == [FIRST, *DEPTHWISE, LAST]
    loaded = load_packed(path, model)
    assert loaded.lowbit.int8_layers.keys() == prepared.lowbit.int8_layers.keys()
    assert torch.equal(loaded(x_test), prepared(x_test))


def test_a_copy_of_a_prepared_graph_module_keeps_its_state(net):
    model, x, _ = net
    prepared = prepare(model, "w4a8", x[:2])
    assert isinstance(prepared, torch.fx.GraphModule)  # the residual adds were traced
    assert copy.deepcopy(prepared).lowbit.recipe.name == "w4a8"
