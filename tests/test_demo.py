"""`lowbit demo --fast --json`: the numbers it reports behave as quantization must."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit import cli
from lowbit.zoo.digits import DigitsCNN, evaluate, load_digits_split, train_digits_cnn


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.json"
    assert cli.main(["demo", "--fast", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
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
