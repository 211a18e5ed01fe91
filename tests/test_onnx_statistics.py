"""The one statistics pass (`lowbit.onnx.statistics`): each reducer, fed through memory-bounded
chunks, against NumPy on the same tensors exposed all at once by one ONNX Runtime session."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from _onnx_quant_models import image_calib, small_cnn, tiny_encoder, token_calib
from lowbit.analysis.sensitivity import layer_sensitivity
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import with_outputs
from lowbit.onnx.config import StaticConfig
from lowbit.onnx.equalize import channel_means
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.planner import node_names
from lowbit.onnx.quantize import quantize_onnx
from lowbit.onnx.session import make_session
from lowbit.onnx.statistics import ChannelAbsMax, ChannelMeans, Histograms, InputGram, collect
from lowbit.onnx.weight_only import collect_input_statistics, find_sites

TINY_BUDGET_MB = 1e-6  # one tensor per chunk: the most segments the stream can cut


def _prepared(path):
    model = preprocess(onnx.load(str(path)))
    node_names(model)
    return model


def _exposed(model, names, batches):
    """Every batch's values of `names` from one session exposing them all (the old, unbounded way)."""
    inputs = {i.name for i in model.graph.input}
    produced = [n for n in names if n not in inputs]
    session = make_session(with_outputs(model, produced), optimize=False)
    for batch in batches:
        values = dict(zip(produced, session.run(produced, batch)))
        values.update({n: batch[n] for n in names if n in inputs})
        yield values


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    model = _prepared(small_cnn(root / "cnn.onnx"))
    data = CalibrationData(image_calib(root / "calib.npz", n=20), model)
    return model, data


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    source = tiny_encoder(root / "enc.onnx")
    calib = token_calib(root / "calib.npz", n=20)
    model = _prepared(source)
    return model, CalibrationData(calib, model), source, calib


def test_channel_means_and_absmax_match_numpy_on_all_tensors_at_once(cnn):
    model, data = cnn
    convs = [n.input[0] for n in model.graph.node if n.op_type == "Conv"]
    means, peaks = ChannelMeans(convs), ChannelAbsMax(convs, axis=1)
    stream = collect(model, data.batches(8), [means, peaks], memory_budget_mb=TINY_BUDGET_MB)
    assert stream.runs_per_batch > 1  # really chunked
    sums, counts, maxima = {}, {}, {}
    for values in _exposed(model, convs, data.batches(8)):
        for name, value in values.items():
            rows = np.moveaxis(value.astype(np.float64), 1, 0).reshape(value.shape[1], -1)
            sums[name] = sums.get(name, 0) + rows.sum(1)
            counts[name] = counts.get(name, 0) + rows.shape[1]
            maxima[name] = np.maximum(maxima.get(name, 0), np.abs(rows).max(1))
    assert set(means.result()) == set(convs)
    for name in convs:
        np.testing.assert_allclose(means.result()[name], sums[name] / counts[name], rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(peaks.result()[name], maxima[name].astype(np.float32))
    # Bias correction's entry point gives the same means whatever the budget.
    for name, mean in channel_means(model, convs, data, batch_size=8, memory_budget_mb=math.inf).items():
        np.testing.assert_allclose(mean, means.result()[name], rtol=1e-12, atol=1e-15)


def test_threads_fold_in_exactly_what_one_thread_does(cnn, monkeypatch):
    """Tensors updated in worker threads (every one after its first batch, whatever its size) give
    statistics identical to the one-thread pass, in the same order."""
    import lowbit.onnx.statistics as statistics

    model, data = cnn
    names = [o for n in model.graph.node for o in n.output]
    convs = [n.input[0] for n in model.graph.node if n.op_type == "Conv"]

    def measured(threads):
        reducers = [statistics.Ranges(names), ChannelMeans(convs), ChannelAbsMax(convs, axis=1)]
        collect(model, data.batches(4), reducers, threads=threads, memory_budget_mb=TINY_BUDGET_MB)
        return reducers

    threaded_updates = []
    folded = statistics._fold_in

    def counted(found, batch, wanted, pool, seen):
        threaded_updates.append(pool is not None and bool(set(found) & seen))
        folded(found, batch, wanted, pool, seen)

    monkeypatch.setattr(statistics, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(statistics, "worker_threads", lambda threads=None: threads or 4)  # also on a one-core machine
    monkeypatch.setattr(statistics, "_fold_in", counted)
    single, threaded = measured(1), measured(None)
    assert any(threaded_updates)
    assert list(threaded[0].observers) == list(single[0].observers)
    for name in single[0].observers:
        a, b = single[0].observers[name].histogram_snapshot(), threaded[0].observers[name].histogram_snapshot()
        np.testing.assert_array_equal(a.counts, b.counts)
        assert (a.lo, a.hi, a.data_min, a.data_max) == (b.lo, b.hi, b.data_min, b.data_max)
    for one, many in zip(single[1:], threaded[1:]):
        assert list(one.result()) == list(many.result())
        for name, value in one.result().items():
            np.testing.assert_array_equal(value, many.result()[name])


def test_read_ahead_keeps_order_and_raises_where_the_items_fail():
    from lowbit.onnx.statistics import read_ahead

    made = []

    def items():
        for i in range(4):
            made.append(i)
            yield i
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item in read_ahead(items()):
            got.append(item)
            assert len(made) <= item + 2  # at most one item computed ahead
    assert got == [0, 1, 2, 3]


def test_channel_absmax_leaves_non_finite_values_out():
    value = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) - 7.5
    value[0, 1, 2], value[1, 2, 0] = np.inf, np.nan
    peaks = ChannelAbsMax(["x"], axis=1)
    peaks.update("x", value, {})
    finite = np.where(np.isfinite(value), np.abs(value), 0)
    np.testing.assert_array_equal(peaks.result()["x"], finite.max(axis=(0, 2)))
    np.testing.assert_array_equal(peaks.result()["x"], [7.5, 11.5, 15.5])  # by hand: |0 - 7.5|, 19 - 7.5, 23 - 7.5
    last = ChannelAbsMax(["y"])
    last.update("y", -value[0], {})  # channels on the last axis; -inf and NaN now
    np.testing.assert_array_equal(last.result()["y"], np.where(np.isfinite(value[0]), np.abs(value[0]), 0).max(0))


def test_input_gram_matches_numpy_and_leaves_padding_out(encoder):
    model, data, _, _ = encoder
    sites, _ = find_sites(model, set())
    stats = collect_input_statistics(model, sites, data, batch_size=8, memory_budget_mb=TINY_BUDGET_MB)
    widths = {s.activation: s.in_features for s in sites}
    gram = {n: np.zeros((w, w)) for n, w in widths.items()}
    rows = dict.fromkeys(widths, 0)
    for batch, values in zip(data.batches(8), _exposed(model, list(widths), data.batches(8))):
        keep = batch["attention_mask"] != 0
        for name, value in values.items():
            x = value[keep] if value.shape[:-1] == keep.shape else value.reshape(-1, value.shape[-1])
            x = x.astype(np.float64)
            gram[name] += x.T @ x
            rows[name] += x.shape[0]
    assert set(stats) == set(widths)
    for name, accumulator in stats.items():
        assert accumulator.count == rows[name]
        np.testing.assert_allclose(accumulator.hessian.numpy(), 2 * gram[name] / rows[name], rtol=1e-5, atol=1e-6)


def test_histograms_are_the_same_chunked_or_whole(cnn):
    model, data = cnn
    names = [o for n in model.graph.node for o in n.output][:6]
    chunked, whole = Histograms(names), Histograms(names)
    collect(model, data.batches(8), [chunked], memory_budget_mb=TINY_BUDGET_MB)
    collect(model, data.batches(8), [whole], memory_budget_mb=math.inf)
    for name in names:
        a, b = chunked.observers[name].histogram_snapshot(), whole.observers[name].histogram_snapshot()
        np.testing.assert_array_equal(a.counts, b.counts)
        assert (a.lo, a.hi) == (b.lo, b.hi)


def test_static_sensitivity_is_the_same_with_a_tiny_memory_budget(encoder, tmp_path):
    _, _, source, calib = encoder
    quant = tmp_path / "q.onnx"
    quantize_onnx(source, quant, StaticConfig(), calib=calib, verify=False)
    bounded = layer_sensitivity(source, quant, calib, batch_size=8, memory_budget_mb=TINY_BUDGET_MB)
    whole = layer_sensitivity(source, quant, calib, batch_size=8, memory_budget_mb=math.inf)
    measured = [t for t in whole.tensors if not t.skipped]
    assert measured and all(t.sqnr_db is not None or t.cosine == 1.0 for t in measured)
    assert [(t.tensor, t.skipped) for t in bounded.tensors] == [(t.tensor, t.skipped) for t in whole.tensors]
    for a, b in zip(bounded.tensors, whole.tensors):
        for field in ("sqnr_db", "cosine", "local_sqnr_db", "clipped"):
            want = getattr(b, field)
            assert getattr(a, field) == (want if want is None else pytest.approx(want, rel=1e-9, abs=1e-12)), \
                (a.tensor, field)


def test_outlier_split_and_smoothquant_share_one_data_pass(encoder, monkeypatch):
    """Their channel peaks come from one run over the data before the rewrites; the ranges
    calibrated after them equal, to float rounding, those of measuring between the passes."""
    import lowbit.onnx.statistics as statistics
    from lowbit.onnx.passes import PassContext
    from lowbit.onnx.pipeline import StaticPipeline

    model, data, _, _ = encoder
    config = StaticConfig(calib_method="minmax")
    runs = []
    real = statistics.collect
    monkeypatch.setattr(statistics, "collect", lambda *a, **k: runs.append(1) or real(*a, **k))
    shared = StaticPipeline(model, config, data, batch_size=8).calibrate()
    names = {type(r).__name__ for r in shared.records}
    assert {"SmoothRecord"} <= names and len(runs) == 2  # peaks for every pass, then calibration
    runs.clear()
    monkeypatch.setattr(PassContext, "prefetch", lambda self, passes: None)  # the former order
    between = StaticPipeline(model, config, data, batch_size=8).calibrate()
    assert len(runs) == 3  # outlier split, SmoothQuant, calibration
    assert [r.to_settings() for r in between.records] == [r.to_settings() for r in shared.records]
    assert set(between.stats.ranges) == set(shared.stats.ranges)
    for name, (lo, hi) in between.stats.ranges.items():
        np.testing.assert_allclose(shared.stats.ranges[name][0], lo, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(shared.stats.ranges[name][1], hi, rtol=1e-5, atol=1e-6, err_msg=name)
