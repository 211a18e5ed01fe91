"""The digits task: scikit-learn's 8x8 handwritten digits and a small CNN.

Offline (the data ships inside scikit-learn), trained in seconds on two CPU cores, and real
enough that quantization visibly costs accuracy at 1-2 bits. Data, model and training loop are
separate so other parts of lowbit (QAT, ONNX benchmarks) can reuse each one on its own.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.progress import progress

TEST_SIZE = 450  # of 1797 images: a 1347 / 450 split, stratified by class
SPLIT_SEED = 0  # fixed, so every part of lowbit evaluates on the same test images


class DigitsData(NamedTuple):
    """Images as float32 NCHW tensors [N, 1, 8, 8] scaled to [0, 1]; labels as int64 [N]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=1)
def _split_arrays() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    parts = train_test_split(images, labels, test_size=TEST_SIZE, stratify=labels,
                             random_state=SPLIT_SEED)
    for part in parts:
        part.setflags(write=False)
    return tuple(parts)  # x_train, x_test, y_train, y_test


def load_digits_split() -> DigitsData:
    """The fixed train/test split (1347/450), as fresh tensors the caller may modify."""
    x_train, x_test, y_train, y_test = (torch.from_numpy(a.copy()) for a in _split_arrays())
    return DigitsData(x_train, y_train, x_test, y_test)


class DigitsCNN(nn.Sequential):
    """Conv-BN-ReLU x2, max-pool, Conv-ReLU, global average pool, Linear: 24,042 parameters.

    A plain Sequential, so it exports to ONNX and folds BatchNorm without special cases."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, num_classes),
        )


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op torch threads, then restore the previous setting.

    Models this small gain nothing from parallel kernels, and on a busy machine two threads can
    be ten times slower than one; a fixed count also keeps float results reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                     seed: int = 0, lr: float = 1e-2, batch_size: int = 64,
                     weight_decay: float = 1e-4, desc: str = "training") -> list[float]:
    """Train any classifier (logits out) with AdamW, a one-cycle learning rate and cross-entropy.

    Deterministic for a given seed (batch order comes from a seeded generator). Works for any
    nn.Module, including models wrapped with fake quantization. Returns the mean loss of each
    epoch and leaves the model in eval mode."""
    if epochs < 1:
        raise LowbitError(f"epochs must be at least 1, got {epochs}; pass a positive number of epochs")
    if len(x) != len(y) or len(x) == 0:
        raise LowbitError(f"training needs as many labels as inputs, got {len(x)} inputs and {len(y)} labels")
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    epoch_losses: list[float] = []
    model.train()
    with progress(total=epochs * steps_per_epoch, desc=desc, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for start in range(0, len(x), batch_size):
                batch = order[start:start + batch_size]
                loss = loss_fn(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(batch)
                bar.update(1)
            epoch_losses.append(total / len(x))
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    model.eval()
    return epoch_losses


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1], computed in eval mode (the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def train_digits_cnn(epochs: int = 15, seed: int = 0) -> tuple[DigitsCNN, dict[str, Any]]:
    """Train `DigitsCNN` on the fixed digits split (on one thread, see `torch_threads`); returns
    the model (eval mode) and metrics. 15 epochs reach about 99.8% test accuracy in seconds."""
    data = load_digits_split()
    torch.manual_seed(seed)
    model = DigitsCNN()
    started = time.perf_counter()
    with torch_threads(1):
        losses = train_classifier(model, data.x_train, data.y_train, epochs=epochs, seed=seed,
                                  desc="training digits CNN")
        seconds = time.perf_counter() - started
        metrics = {
            "epochs": epochs,
            "seed": seed,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": losses[-1],
            "train_accuracy": evaluate(model, data.x_train, data.y_train),
            "test_accuracy": evaluate(model, data.x_test, data.y_test),
            "train_seconds": seconds,
        }
    return model, metrics
