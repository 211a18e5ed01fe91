"""Outlier-channel splitting of transformer FFNs (lowbit.onnx.outlier_split)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from _onnx_quant_models import export
from lowbit.onnx.outlier_split import apply_split, outlier_channels, split_sites
from lowbit.onnx.preprocess import preprocess
from lowbit.onnx.qdq import ensure_opset
from lowbit.onnx.quantize import quantize_onnx, read_plan

HIDDEN, INNER, OUTLIER = 32, 128, 17


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> activation -> Linear, with one hidden channel that peaks ~12x higher
    than the rest (as the GELU-fed FFN-out inputs of BERT do)."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, INNER)
        self.act = activation
        self.down = nn.Linear(INNER, HIDDEN)
        with torch.no_grad():
            self.up.weight[OUTLIER] *= 12.0
            self.up.bias[OUTLIER] = 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(self.norm(x))))


def _ffn(tmp_path: Path, activation: nn.Module, name: str = "ffn.onnx") -> Path:
    return export(FeedForward(activation), (torch.randn(2, 6, HIDDEN),), tmp_path / name, ["x"],
                  {"x": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}})


def _prepared(path: Path) -> onnx.ModelProto:
    return preprocess(ensure_opset(onnx.load(str(path))))


def _run(model: onnx.ModelProto | Path, x: np.ndarray, output: int = 0) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[output]


def _inputs(n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6, HIDDEN)).astype(np.float32)


def _matmuls(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node if n.op_type == "MatMul"}


def test_outlier_channels_picks_channels_far_above_the_reference_rank():
    peaks = np.full(256, 1.0)
    peaks[[5, 99]] = [9.0, 2.5]
    peaks[200] = 1.9  # below 2x the 16th-largest peak (1.0): stays
    assert outlier_channels(peaks) == [5, 99]
    assert outlier_channels(np.full(256, 1.0)) == []
    assert outlier_channels(np.r_[np.ones(40), 50.0]) == []  # too few channels to judge


def test_split_is_exact_in_float_and_finds_the_planted_channel(tmp_path):
    model = _prepared(_ffn(tmp_path, nn.GELU()))
    sites = split_sites(model, _matmuls(model))
    assert len(sites) == 1
    x = _inputs()
    hidden = _run(_with_output(model, sites[0].activation), x, output=1)
    peaks = np.abs(hidden).reshape(-1, INNER).max(axis=0)
    sites[0].channels = outlier_channels(peaks)
    assert sites[0].channels == [OUTLIER]
    split = apply_split(model, sites)
    onnx.checker.check_model(split)
    np.testing.assert_allclose(_run(split, x), _run(model, x), rtol=1e-5, atol=1e-5)
    # The main path's activation no longer carries the outlier channel.
    main = _run(_with_output(split, sites[0].activation), x, output=1)
    assert np.abs(main[..., OUTLIER]).max() == 0.0
    assert np.abs(main).max() < 0.5 * peaks[OUTLIER]


def _with_output(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return copy


@pytest.mark.parametrize("activation", [nn.Sigmoid(), nn.Softplus()])
def test_activation_not_zero_at_zero_is_not_split(tmp_path, activation):
    """Zeroing a channel only removes it from the main path when act(0) = 0."""
    model = _prepared(_ffn(tmp_path, activation))
    assert split_sites(model, _matmuls(model)) == []


def test_relu_ffn_is_split(tmp_path):
    model = _prepared(_ffn(tmp_path, nn.ReLU()))
    assert len(split_sites(model, _matmuls(model))) == 1


def test_hidden_activation_read_elsewhere_is_not_split(tmp_path):
    model = _prepared(_ffn(tmp_path, nn.GELU()))
    site = split_sites(model, _matmuls(model))[0]
    model.graph.output.append(onnx.ValueInfoProto(name=site.activation))
    assert split_sites(model, _matmuls(model)) == []


def test_down_projection_not_a_candidate_is_not_split(tmp_path):
    model = _prepared(_ffn(tmp_path, nn.GELU()))
    site = split_sites(model, _matmuls(model))[0]
    assert split_sites(model, _matmuls(model) - {site.down}) == []


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantize_with_split_is_closer_to_float(tmp_path, mode):
    source = _ffn(tmp_path, nn.GELU())
    calib, evaluation = {"x": _inputs(64, seed=2)}, {"x": _inputs(64, seed=3)}
    reference = _run(source, evaluation["x"])
    errors = {}
    for split in (False, None):
        out = tmp_path / f"{mode}_{split}.onnx"
        quantize_onnx(source, out, mode=mode, calib=calib, outlier_split=split, verify=False, measure_speed=False)
        errors[split] = float(np.mean((_run(out, evaluation["x"]) - reference) ** 2))
        plan = read_plan(out)
        recorded = plan.settings["algorithms"].get("outlier_split", [])
        assert [site["channels"] for site in recorded] == ([] if split is False else [[OUTLIER]])
    assert errors[None] < 0.5 * errors[False]


def test_dynamic_without_calibration_does_not_split(tmp_path):
    out = tmp_path / "dyn.onnx"
    quantize_onnx(_ffn(tmp_path, nn.GELU()), out, mode="dynamic", verify=False, measure_speed=False)
    assert "outlier_split" not in read_plan(out).settings["algorithms"]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_sweeps_replay_the_stored_split(tmp_path, mode):
    """The all-but sweep rebuilds the model as stored (split included), so its fully quantized
    variant scores exactly like the written model."""
    from lowbit.search.sweep import all_but_sweep

    source = _ffn(tmp_path, nn.GELU())
    calib = {"x": _inputs(64, seed=2)}
    out = tmp_path / "q.onnx"
    stored = quantize_onnx(source, out, mode=mode, calib=calib, measure_speed=False)
    assert stored.plan.settings["algorithms"]["outlier_split"]
    sweep = all_but_sweep(source, out, calib=calib)
    assert not sweep.notes
    assert sweep.baseline.cosine == pytest.approx(min(o.cosine_mean for o in stored.report.outputs), abs=1e-6)
    assert {r.node for r in sweep.results} == {"/up/MatMul", "/down/MatMul"}


def test_budget_search_starts_from_the_split_model(tmp_path):
    from lowbit.search.budget import search_precision

    source = _ffn(tmp_path, nn.GELU())
    result = search_precision(source, tmp_path / "b.onnx", calib={"x": _inputs(64, seed=2)}, max_drop=0.5,
                              measure_speed=False)
    split = read_plan(tmp_path / "b.onnx").settings["algorithms"]["outlier_split"]
    assert [site["channels"] for site in split] == [[OUTLIER]]
    assert result.met
