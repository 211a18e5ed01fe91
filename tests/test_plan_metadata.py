"""The plan stored in a model's metadata: compact (per-channel values are summarized, not copied),
still complete in meaning, and its exact parameters read back from the model's initializers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _onnx_quant_models import image_calib, small_cnn
from lowbit.analysis.inspect import inspect_model
from lowbit.errors import LowbitError
from lowbit.numerics import QParams, qparams_for
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.plan import PLAN_METADATA_KEY, PlanEntry, QuantPlan
from lowbit.spec import QuantSpec, per_channel, per_group

CHANNEL_SPEC = QuantSpec("int8", granularity=per_channel(0))
ASYM_GROUP_SPEC = QuantSpec("uint4", symmetric=False, granularity=per_group(4, axis=1))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A static int8 CNN (per-channel weights): (in-memory plan, written model, its path)."""
    root = tmp_path_factory.mktemp("plan")
    out = root / "cnn_static.onnx"
    result = quantize_onnx(small_cnn(root / "cnn.onnx"), out, mode="static", calib=image_calib(root / "c.npz", n=16),
                           batch_size=8, verify=False)
    return result.plan, onnx.load(str(out)), out


def stored_json(model: onnx.ModelProto) -> dict:
    return json.loads(next(p.value for p in model.metadata_props if p.key == PLAN_METADATA_KEY))


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_per_channel_weights_are_stored_as_a_summary_of_the_graph_scales(cnn):
    _, model, _ = cnn
    data, inits = stored_json(model), arrays(model)
    weights = [e for e in data["entries"] if e["role"] == "weight"]
    assert weights
    for entry in weights:
        qp = entry["qparams"]
        scale = inits[f"{entry['tensor']}_scale"]  # what the DequantizeLinear node really uses
        assert scale.ndim == 1 and scale.size > 1
        assert qp["shape"] == [scale.size]
        assert qp["scale"]["min"] == float(scale.min()) and qp["scale"]["max"] == float(scale.max())
        assert qp["scale"]["mean"] == pytest.approx(float(scale.astype(np.float64).mean()), rel=1e-12)
        assert qp["zero_point"]["nonzero"] == int(np.count_nonzero(inits[f"{entry['tensor']}_zero_point"]))
        assert isinstance(entry["spec"], int) and data["specs"][entry["spec"]]["granularity"]["kind"] == "channel"
    # Per-tensor activations keep their numbers.
    first = next(e for e in data["entries"] if e["role"] == "activation" and "qparams" in e)
    assert isinstance(first["qparams"]["scale"], float) and isinstance(first["qparams"]["zero_point"], int)


def test_read_plan_gives_back_the_exact_parameters_that_were_written(cnn):
    written, model, path = cnn
    for stored in (read_plan(model), read_plan(path)):
        assert stored.summarized() == []
        assert stored.summary() == written.summary() and stored.settings == written.settings
        for before, after in zip(written.entries, stored.entries, strict=True):
            assert (before.tensor, before.role, before.spec, before.nodes) == (after.tensor, after.role, after.spec,
                                                                              after.nodes)
            if before.qparams is None:
                assert after.qparams is None
                continue
            assert after.qparams.spec == before.qparams.spec
            np.testing.assert_array_equal(after.qparams.scale, np.asarray(before.qparams.scale, np.float32))
            np.testing.assert_array_equal(after.qparams.zero_point, before.qparams.zero_point)
            assert np.shape(after.qparams.scale) == np.shape(before.qparams.scale)


def test_metadata_does_not_grow_with_the_channel_count():
    """Same plan with 8 or 512 output channels: a few bytes apart, while the old layout (every
    value in JSON, still readable as format 1) grows by kilobytes."""
    rng = np.random.default_rng(0)
    sizes, full = [], []
    for channels in (8, 512):
        weight = rng.standard_normal((channels, 16)).astype(np.float32)
        plan = QuantPlan("static", [PlanEntry("w", "weight", spec=CHANNEL_SPEC, qparams=qparams_for(weight, CHANNEL_SPEC),
                                              nodes=["fc"])])
        sizes.append(len(plan.to_json()))
        format1 = {"format": 1, "mode": "static", "entries": [{"tensor": "w", "role": "weight",
                                                               "spec": CHANNEL_SPEC.to_dict(),
                                                               "qparams": plan.entries[0].qparams.to_dict()}]}
        full.append(len(json.dumps(format1)))
        # Format 1 reads back with its exact values.
        old = QuantPlan.from_dict(json.loads(json.dumps(format1)))
        np.testing.assert_array_equal(old.entries[0].qparams.scale, plan.entries[0].qparams.scale)
    assert abs(sizes[1] - sizes[0]) <= 8
    assert full[1] - full[0] > 5000


def test_restore_finds_values_by_content_whatever_their_name_shape_or_integer_type():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 16)).astype(np.float32) + 0.3  # asymmetric: nonzero zero points
    qp = qparams_for(weight, ASYM_GROUP_SPEC)  # scale (6, 4)
    assert np.count_nonzero(qp.zero_point) > 0
    plan = QuantPlan("weight_only", [PlanEntry("w", "weight", spec=ASYM_GROUP_SPEC, qparams=qp)])
    stored = QuantPlan.from_json(plan.to_json())
    entry = stored.entries[0]
    assert entry.qparams is None and entry.qparams_summary.nonzero_zero_points == np.count_nonzero(qp.zero_point)
    # The writer kept the scales transposed ([in, out] layout) and the zero points as uint8, among other arrays.
    decoys = [rng.standard_normal(24).astype(np.float32), np.zeros(24, np.uint8), weight]
    missing = stored.restore_qparams([decoys[0], np.asarray(qp.zero_point).astype(np.uint8).T.copy(), decoys[1],
                                      np.asarray(qp.scale).T.copy(), decoys[2]])
    assert missing == []
    np.testing.assert_array_equal(entry.qparams.scale, qp.scale)
    np.testing.assert_array_equal(entry.qparams.zero_point, qp.zero_point)
    assert entry.qparams.spec == ASYM_GROUP_SPEC
    # ONNX's 4-bit integer tensors read back as ml_dtypes arrays: found as well.
    uint4 = numpy_helper.to_array(onnx.helper.make_tensor("zp", onnx.TensorProto.UINT4, list(np.shape(qp.zero_point)),
                                                          np.asarray(qp.zero_point).ravel().tolist()))
    again = QuantPlan.from_json(plan.to_json())
    assert again.restore_qparams([np.asarray(qp.scale), uint4]) == []
    np.testing.assert_array_equal(again.entries[0].qparams.zero_point, qp.zero_point)


def test_a_plan_whose_values_are_gone_keeps_its_summary_and_round_trips():
    weight = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    plan = QuantPlan("static", [PlanEntry("w", "weight", spec=CHANNEL_SPEC, qparams=qparams_for(weight, CHANNEL_SPEC))])
    text = plan.to_json()
    stored = QuantPlan.from_json(text)
    close_but_wrong = np.asarray(plan.entries[0].qparams.scale) * np.float32(1.0001)
    assert [e.tensor for e in stored.restore_qparams([close_but_wrong])] == ["w"]
    assert stored.entries[0].qparams is None
    assert stored.to_json() == text  # the summary survives as it was


def test_inspect_notes_a_model_whose_scales_were_changed_after_quantization(cnn, tmp_path):
    _, model, path = cnn
    assert not any("changed after quantization" in n for n in inspect_model(path).notes)
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    weight = next(e["tensor"] for e in stored_json(model)["entries"] if e["role"] == "weight")
    scale = next(t for t in edited.graph.initializer if t.name == f"{weight}_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(2), scale.name))
    onnx.save(edited, str(tmp_path / "edited.onnx"))
    notes = inspect_model(tmp_path / "edited.onnx").notes
    assert any("1 per-channel scale set(s)" in n and weight in n for n in notes), notes
    entry = read_plan(edited).get(weight, "weight")
    assert entry.qparams is None and entry.qparams_summary is not None


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format=7), "this lowbit reads formats 1, 2"),
    (lambda d: d["entries"][0].update(spec=3), "names spec 3, but the plan has 1"),
])
def test_unreadable_plans_say_what_to_do(change, message):
    data = QuantPlan("static", [PlanEntry("w", "weight", spec=CHANNEL_SPEC,
                                          qparams=QParams(CHANNEL_SPEC, np.array([0.1, 0.2], np.float32),
                                                          np.zeros(2, np.int32)))]).to_dict()
    change(data)
    with pytest.raises(LowbitError, match=message):
        QuantPlan.from_json(json.dumps(data))
