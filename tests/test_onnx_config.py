"""Configs are data: validation before any work, to_dict/from_dict round trips, the handler table,
the keyword form of earlier versions, and the light `import lowbit` front door."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _onnx_quant_models import image_calib, small_cnn
import lowbit
from lowbit.errors import LowbitError
from lowbit.onnx.config import (CONFIGS, AutoConfig, DynamicConfig, Fp16Config, StaticConfig, WeightOnlyConfig,
                                config_for_mode, config_from_dict)
from lowbit.onnx.quantize import HANDLERS, quantize_onnx


@pytest.mark.parametrize("config", [
    StaticConfig(per_channel=False, exclude=["a", "b"], smooth_alpha={"default": 0.4}, equalize=True),
    DynamicConfig(per_channel=False, outlier_split=False), WeightOnlyConfig(bits=8, group_size=-1, algo="gptq"),
    Fp16Config(exclude=("Softmax",)), AutoConfig(max_drop=0.02, metric="top1", candidates=["fp16"])])
def test_configs_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert data["mode"] == config.mode and data["version"] == 1
    assert config_from_dict(data) == config


def test_every_mode_has_a_handler():
    assert set(HANDLERS) == set(CONFIGS.values())


@pytest.mark.parametrize("data, message", [
    ({"mode": "int3"}, "unknown quantization mode"),
    ({"mode": "static", "per_chanel": False}, "unknown static option"),
    ({"mode": "static", "version": 99}, "config version"),
])
def test_bad_config_dicts_are_refused(data, message):
    with pytest.raises(LowbitError, match=message):
        config_from_dict(data)


@pytest.mark.parametrize("config, has_calibration, message", [
    (StaticConfig(), False, "needs calibration data"),
    (StaticConfig(calib_method="median"), True, "unknown calibration method"),
    (StaticConfig(smooth_alpha=1.5), True, "alpha must be in"),
    (StaticConfig(calib_memory_mb=0), True, "must be positive"),
    (WeightOnlyConfig(algo="gptq"), False, "GPTQ needs calibration"),
    (WeightOnlyConfig(bits=9), False, "2 to 8 weight bits"),
    (AutoConfig(), False, "--mode auto builds its candidates"),
    (AutoConfig(max_drop=-1), True, "--max-drop"),
])
def test_validation_names_the_problem(config, has_calibration, message):
    with pytest.raises(LowbitError, match=message):
        config.validate(has_calibration=has_calibration)


def test_static_recipe_flags_are_refused_outside_static():
    with pytest.raises(LowbitError, match="use them with --mode static"):
        config_for_mode("dynamic", equalize=True)
    assert config_for_mode("dynamic", per_channel=False, calib_method="mse") == DynamicConfig(per_channel=False)


def test_config_and_keyword_forms_write_the_same_model(tmp_path):
    model, calib = small_cnn(tmp_path / "m.onnx"), image_calib(tmp_path / "c.npz", n=16)
    a = quantize_onnx(model, tmp_path / "a.onnx", StaticConfig(per_channel=False, exclude=["/head/Gemm"]),
                      calib=calib, verify=False)
    b = quantize_onnx(model, tmp_path / "b.onnx", mode="static", per_channel=False, exclude=["/head/Gemm"],
                      calib=calib, verify=False)
    assert a.plan.to_json() == b.plan.to_json()
    weights = [{t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}
               for p in (a.output_path, b.output_path)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(LowbitError, match="either a config or keyword"):
        quantize_onnx(model, tmp_path / "c.onnx", StaticConfig(), mode="static", calib=calib)


def test_import_lowbit_and_the_cli_parser_are_light_and_export_the_entry_points():
    code = ("import sys, lowbit; from lowbit.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('onnxruntime', 'torch', 'onnx') if m in sys.modules]; print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    from lowbit.onnx.quantize import quantize_onnx as entry
    from lowbit.torch.qat import prepare

    assert lowbit.quantize_onnx is entry and lowbit.prepare is prepare and lowbit.StaticConfig is StaticConfig
    assert {"quantize_onnx", "AutoConfig", "quantize_pretrained"} <= set(dir(lowbit))
