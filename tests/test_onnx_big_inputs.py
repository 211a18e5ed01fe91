"""Big inputs: bounded first chunk for tensors of unknown size, sampled statistics, fast mask check."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.calibration import ObserverSet
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import (OBSERVED_VALUES_MAX, ActivationStream, _looks_like_mask, observed_sample,
                                 unsized_tensors)
from lowbit.onnx.planner import node_names


def conv_chain(layers: int = 6) -> onnx.ModelProto:
    """Convs on an image whose height and width are dynamic, with no shapes recorded inside."""
    nodes, inits, x = [], [], "image"
    for i in range(layers):
        inits.append(numpy_helper.from_array(np.full((4, 4, 3, 3), 0.05, np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        x = f"c{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                               ["n", 4, "h", "w"])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    node_names(model)
    return model


def test_tensors_of_unknown_size_are_sized_for_the_fed_shapes_before_the_first_chunk():
    model = conv_chain()
    tensors = [f"c{i}" for i in range(6)]
    batch = {"image": np.ones((1, 4, 64, 64), np.float32)}
    assert unsized_tensors(model, tensors, batch) == set(tensors)  # the graph's shapes cannot tell
    one_tensor = 4 * 64 * 64 * 4
    stream = ActivationStream(model, tensors, memory_budget_mb=3 * one_tensor / 2**20)
    first = [sorted(chunk) for chunk in stream.chunks(batch)]
    # Counted as tiny, all six would come in one chunk; sized for 64x64 they come three at a time.
    assert [len(chunk) for chunk in first] == [3, 3]
    assert stream.peak_bytes <= 3 * one_tensor + batch["image"].nbytes


def test_large_tensors_are_observed_through_a_sample_with_exact_extremes():
    rng = np.random.default_rng(0)
    value = rng.standard_normal(3 * OBSERVED_VALUES_MAX).astype(np.float32)
    value[12345] = 40.0
    sample = observed_sample(value)
    assert sample.size < value.size // 2 and sample.max() == 40.0 and sample.min() == value.min()
    full, sampled = ObserverSet(), ObserverSet()
    full.update({"t": value})
    sampled.update({"t": sample})
    for method in ("minmax", "percentile"):
        lo_f, hi_f = full.ranges(method)["t"]
        lo_s, hi_s = sampled.ranges(method)["t"]
        assert abs(float(hi_s) - float(hi_f)) <= 0.02 * float(hi_f) and abs(float(lo_s) - float(lo_f)) <= 0.02 * abs(float(lo_f))
    small = np.ones(10, np.float32)
    assert observed_sample(small) is small


def test_mask_check():
    assert not _looks_like_mask(np.array([-3.0, 2.0], np.float32))
    assert _looks_like_mask(np.array([-1e9, 2.0], np.float32))
    assert _looks_like_mask(np.array([-np.inf, 2.0], np.float32))
    assert _looks_like_mask(np.array([np.nan, 2.0], np.float32))


def test_calls_feed_model_inputs_to_the_stream():
    model = conv_chain(2)
    data = CalibrationData({"image": np.ones((3, 1, 4, 16, 16), np.float32)}, model)
    batches = list(data.batches(8))
    assert len(batches) == 3 and batches[0]["image"].shape == (1, 4, 16, 16)
