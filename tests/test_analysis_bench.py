"""`lowbit bench`: generated inputs, interleaved timing, CPU int8 features."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from _onnx_quant_models import image_calib, small_cnn, tiny_encoder
from lowbit.analysis.bench import bench_models
from lowbit.analysis.cpu import cpu_info
from lowbit.analysis.feeds import parse_shapes, synthetic_feed
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.onnx.io import load_model
from lowbit.onnx.quantize import quantize_onnx


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cnn = small_cnn(root / "cnn.onnx")
    calib = image_calib(root / "calib.npz", n=8)
    quant = root / "cnn_int8.onnx"
    quantize_onnx(cnn, quant, calib=calib, batch_size=8, verify=False)
    return {"root": root, "cnn": cnn, "quant": quant, "calib": calib, "enc": tiny_encoder(root / "enc.onnx")}


X86_VNNI = "model name\t: Test Xeon\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw avx512_vnni\n"
X86_AVX2 = "model name\t: Old Core\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
ARM_DOT = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp\nCPU part\t: 0xd0c\n"


def test_cpu_features_and_what_they_mean_for_int8():
    vnni = cpu_info(X86_VNNI, "x86_64")
    assert vnni.features["avx512_vnni"] and not vnni.features["amx_int8"] and vnni.model_name == "Test Xeon"
    assert "VNNI" in vnni.explanation and "no VNNI" not in vnni.explanation
    avx2 = cpu_info(X86_AVX2, "x86_64")
    assert avx2.features["avx2"] and not avx2.features["avx512_vnni"] and not avx2.features["avx_vnni"]
    assert "no VNNI" in avx2.explanation and "U8S8" in avx2.explanation and "saturate" in avx2.explanation
    arm = cpu_info(ARM_DOT, "aarch64")
    assert arm.features["asimddp"] and arm.features["neon"] and "dot product" in arm.explanation
    assert "unknown" in cpu_info("", "x86_64").explanation


def test_parse_shapes_accepts_dims_and_rejects_malformed():
    assert parse_shapes(["input_ids=1x128", "image=2,3,8,8"]) == {"input_ids": (1, 128), "image": (2, 3, 8, 8)}
    for bad in ["input_ids", "ids=1xa", "ids=0x4", "=1x2"]:
        with pytest.raises(LowbitError, match="--shape"):
            parse_shapes([bad])


def test_generated_inputs_respect_vocabulary_masks_and_symbolic_dims(models):
    enc = load_model(models["enc"])
    feed = synthetic_feed(enc, {"input_ids": (3, 20), "attention_mask": (3, 20)})
    ids = feed["input_ids"]
    assert ids.shape == (3, 20) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 64 and len(np.unique(ids)) > 1  # vocabulary of the Embedding: 64
    assert (feed["attention_mask"] == 1).all()
    with pytest.raises(LowbitError, match="--shape input_ids="):
        synthetic_feed(enc)  # the sequence axis is symbolic
    image = synthetic_feed(load_model(models["cnn"]))["image"]
    assert image.shape == (1, 3, 32, 32) and image.dtype == np.float32  # batch axis defaults to 1
    with pytest.raises(LowbitError, match="does not fit"):
        synthetic_feed(load_model(models["cnn"]), {"image": (1, 4, 32, 32)})


def test_two_models_timed_in_one_run_ratio_is_ratio_of_medians(models):
    report = bench_models([models["cnn"], models["quant"]], warmup=1, repeats=5, threads=1)
    first, second = report.models
    assert len(first.latencies_ms) == len(second.latencies_ms) >= 5  # at least the repeats asked (adaptive)
    assert first.median_ms == pytest.approx(statistics.median(first.latencies_ms))
    assert report.speedup == pytest.approx(statistics.median(first.latencies_ms) / statistics.median(second.latencies_ms))
    assert second.p90_ms >= second.median_ms > 0
    assert first.throughput == pytest.approx(1000 / first.median_ms)  # batch of 1
    assert "int8 features" in report.text() and "same run" in report.text()


def test_data_batch_is_the_timed_input(models):
    report = bench_models([models["cnn"]], data=models["calib"], batch_size=4, warmup=0, repeats=2)
    assert report.models[0].batch == 4 and report.inputs == {"image": "4x3x32x32 float32"}
    assert report.speedup is None


def test_user_errors_are_one_sentence(models, capsys):
    with pytest.raises(LowbitError, match="same input names"):
        bench_models([models["cnn"], models["enc"]], shapes={"image": (1, 3, 32, 32)}, repeats=1)
    assert main(["bench", str(models["root"] / "missing.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(models["cnn"]), "--shape", "image=1x3"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["bench", str(models["enc"])]) == 2
    err = capsys.readouterr().err
    assert "--shape" in err and "Traceback" not in err


def test_cli_bench_json(models, capsys):
    assert main(["bench", str(models["cnn"]), str(models["quant"]), "--repeats", "3", "--warmup", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["models"]) == 2 and data["speedup"] > 0
    assert set(data["cpu"]["features"]) >= {"avx2", "avx512_vnni"} or "neon" in data["cpu"]["features"]
