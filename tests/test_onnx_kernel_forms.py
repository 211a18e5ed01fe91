"""Runtime-specific forms of the same quantized numbers, and same-run timing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from _onnx_quant_models import export
from lowbit.onnx.calib_data import CalibrationData
from lowbit.onnx.collect import collect_activation_stats
from lowbit.onnx.planner import ACTIVATION_SPEC, StaticPlanner, node_names
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import QGEMM_MIN_REDUCTION, write_qdq
from lowbit.onnx.session import session_options
from lowbit.onnx.verify import time_pair


class WideConvNet(nn.Module):
    """A 3x3 conv over 64 channels (reduction 576), a depthwise conv and a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.wide = nn.Conv2d(64, 64, 3, padding=1)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.pointwise = nn.Conv2d(64, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.wide(x))
        return self.pointwise(torch.relu(self.depthwise(x)))


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    torch.manual_seed(0)
    path = export(WideConvNet(), (torch.randn(1, 3, 12, 12),), tmp_path_factory.mktemp("forms") / "wide.onnx",
                  ["image"], {"image": {0: "batch"}})
    model = preprocess(onnx.load(str(path)))
    node_names(model)
    images = np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32)
    planner = StaticPlanner(model)
    stats = collect_activation_stats(model, planner.candidates(), CalibrationData({"image": images}, model),
                                     method="minmax", spec=ACTIVATION_SPEC, batch_size=8)
    return model, planner.build(stats), images


def _weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Conv name -> (stored int8 weight, scale, zero point) as written."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            base = node.input[1].removesuffix("_dequantized")
            found[node.name] = (inits[f"{base}_quantized"], inits[f"{base}_scale"], inits[f"{base}_zero_point"])
    return found


def test_qgemm_form_stores_the_same_numbers_with_zero_point_minus_one_on_large_convs_only(planned):
    model, plan, _ = planned
    symmetric = _weights(write_qdq(model, plan))
    shifted = _weights(write_qdq(model, plan, conv_weights_for_qgemm=True))
    forms = {}
    for name, (q, scale, zp) in symmetric.items():
        q2, scale2, zp2 = shifted[name]
        assert not zp.any()
        np.testing.assert_array_equal(scale, scale2)
        # Dequantized values are identical in both forms.
        np.testing.assert_array_equal(q.astype(np.int32) - zp.reshape(-1, 1, 1, 1),
                                      q2.astype(np.int32) - zp2.reshape(-1, 1, 1, 1))
        forms[name] = int(zp2[0])
        assert int(q2.min()) >= -128 and q2.dtype == np.int8
    by_shape = {name: q.shape for name, (q, _, _) in symmetric.items()}
    for name, shape in by_shape.items():
        large = shape[1] > 1 and int(np.prod(shape[1:])) >= QGEMM_MIN_REDUCTION
        assert forms[name] == (-1 if large else 0), (name, shape)
    assert sorted(forms.values()) == [-1, 0, 0, 0]  # only the 64-channel 3x3 conv moves


def test_both_forms_fuse_into_qlinearconv_and_give_the_same_outputs(planned, tmp_path):
    model, plan, images = planned
    outputs, fused = [], []
    for flag in (False, True):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(tmp_path / f"optimized_{flag}.onnx")
        session = ort.InferenceSession(write_qdq(model, plan, conv_weights_for_qgemm=flag).SerializeToString(),
                                       options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"image": images})[0])
        fused.append([n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node])
    for ops in fused:
        assert ops.count("QLinearConv") == 4 and "Conv" not in ops
    # Same integer math; the kernels' requantization may round a rare value one step apart.
    step = next(e.qparams.scale for e in plan.quantized("activation") if e.tensor == model.graph.output[0].name)
    assert np.max(np.abs(outputs[0] - outputs[1])) <= float(step) * 1.001
    assert np.mean(outputs[0] == outputs[1]) > 0.99


class _CountingSession:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def run(self, names, feed):
        self.log.append(self.name)

    def get_session_options(self):
        return session_options(threads=1)


def test_time_pair_times_each_session_in_turns_after_its_own_untimed_run():
    log: list[str] = []
    first, second = _CountingSession(log, "a"), _CountingSession(log, "b")
    fast, slow = time_pair(first, second, {}, warmup=1, repeats=8, min_seconds=0, precision=None)
    assert fast >= 0 and slow >= 0
    # first run a b, warm-up a b, then turns (order alternating): 3 untimed + up to RUNS_PER_TURN (6) timed
    # runs, the last turn only the timed runs still missing (8 = 6 + 2).
    assert log == ["a", "b"] * 2 + ["a"] * 9 + ["b"] * 9 + ["b"] * 5 + ["a"] * 5


def test_plan_summary_uses_real_plurals(planned):
    _, plan, _ = planned
    keys = set(plan.summary())
    assert {"weights quantized", "activations quantized", "biases quantized"} <= keys
    assert not any("biass" in key for key in keys)


def test_dynamic_mode_stores_the_embedding_int8_per_row_and_gathers_exact_rows(tmp_path):
    from _onnx_quant_models import tiny_encoder

    from lowbit.numerics import dequantize, qparams_for, quantize
    from lowbit.onnx.quantize import quantize_onnx
    from lowbit.spec import QuantSpec, per_channel

    source = tiny_encoder(tmp_path / "enc.onnx")
    float_model = onnx.load(str(source))
    table = next(numpy_helper.to_array(t) for t in float_model.graph.initializer if "embed" in t.name)
    out = tmp_path / "enc_dynamic.onnx"
    quantize_onnx(source, out, mode="dynamic", verify=False)
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not any(v.dtype == np.float32 and v.shape == table.shape for v in inits.values())  # no float table left
    q = next(v for k, v in inits.items() if k.endswith("_table_quantized"))
    scale = next(v for k, v in inits.items() if k.endswith("_row_scale"))
    spec = QuantSpec("int8", granularity=per_channel(0))
    expected = qparams_for(table, spec)
    np.testing.assert_array_equal(q, quantize(table, expected))
    np.testing.assert_array_equal(scale.ravel(), expected.scale)
    # The graph's lookup returns exactly the dequantized rows of the looked-up ids.
    gather = next(n for n in model.graph.node if n.name.endswith("_Dequantize"))
    ids = np.array([[3, 0, 63, 3]], np.int64)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.helper.make_tensor_value_info(gather.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    np.testing.assert_allclose(rows[0], dequantize(quantize(table, expected), expected)[ids[0]], rtol=1e-6)
