"""`lowbit demo --fast --json`: the numbers it reports behave as quantization must."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from lowbit import cli
from lowbit.commands._demo_qat import interpret_qat
from lowbit.commands._demo_runtime import interpret_onnx, multiply_adds
from lowbit.zoo.digits import DigitsCNN, evaluate, load_digits_split, train_digits_cnn

WEIGHTS = 23_824  # Conv and Linear weights of the BatchNorm-folded DigitsCNN
CHANNELS = 122  # output channels = biases = per-channel scales


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run `lowbit demo --fast` once for the whole module: (JSON result, printed text)."""
    path = tmp_path_factory.mktemp("demo") / "demo.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["demo", "--fast", "--json", str(path)]) == 0
    return json.loads(path.read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def demo(demo_run):
    result, _ = demo_run
    return result, {row["scheme"]: row for row in result["rows"]}


def test_float_model_is_accurate(demo):
    _, rows = demo
    assert rows["fp32"]["accuracy"] >= 0.9
    assert rows["fp16"]["drop_points"] <= 0.5


def test_int8_per_channel_is_nearly_free(demo):
    _, rows = demo
    assert rows["int8-channel"]["drop_points"] <= 1.0


def test_sizes_follow_the_bit_widths(demo):
    _, rows = demo
    size = {name: row["size_bytes"] for name, row in rows.items()}
    order = ["fp32", "fp16", "int8-channel", "int4-channel", "int2-channel-asym", "binary-channel"]
    assert all(size[a] > size[b] for a, b in zip(order, order[1:])), size
    # The model is 23,824 Conv/Linear weights plus 122 float32 biases.
    assert size["fp32"] == 4 * (23_824 + 122)
    # int8 is a quarter of fp32 plus the float32 biases (3 extra bytes each) and the scales.
    assert size["fp32"] / 4 < size["int8-tensor"] < size["int8-channel"] < size["fp32"] / 4 * 1.05
    assert size["int8-channel"] == 23_824 + 4 * 122 + 4 * 122  # one scale per output channel
    assert 0.5 <= size["int4-channel"] / size["int8-channel"] <= 0.53
    # Groups of 16 cost one float32 scale per 16 weights: 2 more bits per weight.
    assert size["int4-channel"] < size["int4-g16"] < size["int8-channel"]


def test_binary_weights_are_not_free(demo):
    _, rows = demo
    assert rows["binary-channel"]["accuracy"] < rows["fp32"]["accuracy"] - 0.05
    assert rows["binary-channel"]["compression"] > 20


def test_per_channel_int4_is_not_worse_than_per_tensor(demo):
    _, rows = demo
    tensor, channel = rows["int4-tensor"], rows["int4-channel"]
    # Weight error is a deterministic measure; accuracy on 450 images moves by 0.22 points per image.
    assert channel["weight_sqnr_db"] > tensor["weight_sqnr_db"] + 2
    assert channel["accuracy"] >= tensor["accuracy"] - 0.02


def test_fewer_bits_mean_more_weight_error(demo):
    _, rows = demo
    sqnr = [rows[name]["weight_sqnr_db"] for name in ("fp16", "int8-channel", "int4-channel", "int2-channel-asym")]
    assert sqnr == sorted(sqnr, reverse=True)
    # Uniform quantization gains about 6 dB per bit.
    assert 20 < rows["int8-channel"]["weight_sqnr_db"] - rows["int4-channel"]["weight_sqnr_db"] < 30


def test_report_records_training(demo):
    result, _ = demo
    assert result["training"]["epochs"] == 6
    assert result["data"] == {"name": "sklearn digits 8x8", "train": 1347, "test": 450}
    assert result["rows"][0]["accuracy"] == pytest.approx(result["training"]["test_accuracy"], abs=0.005)


def test_split_is_fixed_stratified_and_scaled():
    first, second = load_digits_split(), load_digits_split()
    assert first.x_train.shape == (1347, 1, 8, 8) and first.x_test.shape == (450, 1, 8, 8)
    assert first.x_train.dtype == torch.float32 and first.y_train.dtype == torch.int64
    assert 0.0 == float(first.x_train.min()) and float(first.x_train.max()) == 1.0
    assert torch.equal(first.x_test, second.x_test)
    # Stratified: each class has its share of the 1797 images in the test set, to within one.
    test_counts = np.bincount(first.y_test.numpy(), minlength=10)
    all_counts = test_counts + np.bincount(first.y_train.numpy(), minlength=10)
    assert np.abs(test_counts - 450 * all_counts / 1797).max() < 1
    first.x_test.zero_()  # the caller's copy; the next call is unaffected
    assert float(load_digits_split().x_test.max()) == 1.0


def test_training_is_deterministic_and_learns():
    model_a, metrics_a = train_digits_cnn(epochs=2, seed=3)
    model_b, metrics_b = train_digits_cnn(epochs=2, seed=3)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert metrics_a["test_accuracy"] == metrics_b["test_accuracy"] > 0.5
    assert metrics_a["parameters"] == sum(p.numel() for p in DigitsCNN().parameters())


def test_evaluate_counts_correct_predictions():
    data = load_digits_split()

    class Constant(torch.nn.Module):  # always predicts class 3
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    expected = float((data.y_test == 3).float().mean())
    assert evaluate(Constant(), data.x_test, data.y_test) == pytest.approx(expected)


def test_output_has_three_sections_and_an_interpretation(demo_run):
    _, printed = demo_run
    for heading in ("Weight-only quantization in PyTorch", "On ONNX Runtime",
                    "Quantization-aware training recovers what rounding loses", "What the numbers say"):
        assert f"\n{heading}\n" in printed, heading
    assert printed.index("On ONNX Runtime") < printed.index("Quantization-aware training recovers")


def test_int8_on_onnx_runtime_keeps_the_predictions(demo):
    result, rows = demo
    ort = result["onnx_runtime"]
    assert ort["top1_agreement"] >= 0.98
    assert ort["cosine_min"] > 0.99
    assert abs(ort["int8_accuracy"] - ort["fp32_accuracy"]) <= 0.01
    # The exported fp32 model is the PyTorch model: same accuracy to within one test image.
    assert ort["fp32_accuracy"] == pytest.approx(rows["fp32"]["accuracy"], abs=1.01 / 450)
    # Every weight, activation and bias was quantized; nothing was left float.
    assert ort["quantized"] == {"weights": 4, "activations": 7, "biases": 4, "float nodes": 0}


def test_int8_onnx_file_sizes_follow_the_bit_widths(demo):
    ort = demo[0]["onnx_runtime"]
    # fp32 holds every folded parameter in 4 bytes; int8 one byte per weight plus int32 biases,
    # the stored plan (JSON metadata) and a graph with scales that is only a few kB on top.
    assert 4 * (WEIGHTS + CHANNELS) < ort["fp32_bytes"] < 4 * (WEIGHTS + CHANNELS) + 4_000
    tensors_and_graph = ort["int8_bytes"] - ort["metadata_bytes"]
    assert WEIGHTS + 4 * CHANNELS < tensors_and_graph < WEIGHTS + 4 * CHANNELS + 10_000
    assert 0 < ort["metadata_bytes"] < ort["int8_bytes"] / 2
    assert ort["size_ratio"] == pytest.approx(ort["fp32_bytes"] / ort["int8_bytes"], rel=1e-3)


def test_latency_is_measured_on_the_whole_test_set(demo):
    ort = demo[0]["onnx_runtime"]
    assert ort["batch"] == 450 and ort["repeats"] >= 10
    assert ort["fp32_ms"] > 0 and ort["int8_ms"] > 0
    assert ort["speedup"] == pytest.approx(ort["fp32_ms"] / ort["int8_ms"], rel=1e-2)
    # conv1 + conv2 + conv3 + linear, computed by hand from the layer shapes.
    assert ort["multiply_adds_per_image"] == 16 * 9 * 64 + 32 * 16 * 9 * 64 + 64 * 32 * 9 * 16 + 10 * 64


def test_multiply_adds_counts_grouped_convolutions():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(8 * 4, 5))
    # Each of the 8 x 2 x 2 conv outputs reads 2 channels x 9 taps; the linear layer 32 x 5.
    assert multiply_adds(model, torch.zeros(1, 4, 4, 4)) == 8 * 4 * 2 * 9 + 32 * 5


def test_qat_recovers_binary_and_two_bit_accuracy(demo):
    result, rows = demo
    qat = {row["recipe"]: row for row in result["qat"]["rows"]}
    assert result["qat"]["epochs"] == 4
    binary, two_bit = qat["w1a8"], qat["w2a8"]
    assert binary["ptq_accuracy"] < 0.5  # rounding to one bit destroys the model ...
    assert binary["qat_accuracy"] > binary["ptq_accuracy"] + 0.3  # ... and training brings it back
    assert two_bit["qat_accuracy"] > two_bit["ptq_accuracy"]
    assert two_bit["qat_accuracy"] >= rows["fp32"]["accuracy"] - 0.03
    for row in qat.values():
        assert row["parity_passed"]
        # ONNX Runtime and the fake-quant PyTorch model agree on the QAT accuracy to within an image.
        assert row["qat_accuracy"] == pytest.approx(row["qat_torch_accuracy"], abs=1.01 / 450)


def test_qat_sizes_follow_the_bit_widths(demo):
    result, rows = demo
    qat = {row["recipe"]: row for row in result["qat"]["rows"]}
    scales_and_biases = 4 * CHANNELS + 4 * CHANNELS
    assert qat["w1a8"]["packed_bytes"] == WEIGHTS // 8 + scales_and_biases
    # 2-bit asymmetric: four weights per byte, plus the zero points, also packed to 2 bits.
    assert qat["w2a8"]["packed_bytes"] == WEIGHTS // 4 + (2 * CHANNELS + 7) // 8 + scales_and_biases
    # The same weight format costs the same bytes in the weight table, measured another way.
    for row in qat.values():
        assert row["packed_bytes"] == rows[row["weight_row"]]["size_bytes"]
        assert row["float_bytes"] == rows["fp32"]["size_bytes"]


ORT_SECTION = {"fp32_accuracy": 0.98, "int8_accuracy": 0.98, "top1_agreement": 1.0, "size_ratio": 2.28,
               "batch": 450, "threads": 1, "multiply_adds_per_image": 599_680, "qdq_nodes": 22}


@pytest.mark.parametrize("speedup, says", [(1.5, "1.50x faster"), (1.0, "is no faster than"),
                                           (0.7, "is slower than")])
def test_speed_sentence_follows_the_measurement(speedup, says):
    text = interpret_onnx({**ORT_SECTION, "speedup": speedup})
    assert says in text
    # A model that is not faster gets a reason, not silence.
    assert ("multiply-adds per image" in text) == (speedup < 1.05)


def test_qat_sentence_says_when_training_did_not_help():
    section = {"epochs": 1, "rows": [
        {"recipe": "w2a8", "ptq_accuracy": 0.60, "qat_accuracy": 0.97, "compression": 13.76},
        {"recipe": "w1a8", "ptq_accuracy": 0.20, "qat_accuracy": 0.15, "compression": 24.23}]}
    text = interpret_qat(section, fp32_accuracy=0.98)
    assert "lifts W2A8 (13.8x smaller) from 60.0% to 97.0% (1.0 points below fp32)" in text
    assert "did not help W1A8 (20.0% -> 15.0%)" in text


def test_qat_epochs_must_be_positive(capsys):
    assert cli.main(["demo", "--fast", "--qat-epochs", "0"]) == cli.EXIT_USER_ERROR
    assert "--qat-epochs must be at least 1" in capsys.readouterr().err


def test_mobile_rows_match_onnx_runtime_or_name_the_extra(demo):
    result, _ = demo
    rows = result["mobile"]["rows"]
    assert [row["file"] for row in rows] == [".ort", ".pte", ".tflite"]
    assert "install" not in rows[0]  # ORT Mobile needs nothing beyond onnxruntime
    for row in rows:
        if "install" in row:
            assert row["install"].startswith("pip install 'lowbit[")
            continue
        assert row["passed"] and row["samples"] == result["onnx_runtime"]["batch"]
        assert row["file_bytes"] < row["float_file_bytes"] and row["latency_ms"] > 0
