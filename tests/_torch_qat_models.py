"""Models shared by the QAT tests: a trained digits CNN (cached per process) and a small model
with every layer kind lowbit.torch quantizes (Conv1d, grouped and depthwise Conv2d, Embedding,
a residual QuantAdd)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from lowbit.torch.modules import QuantAdd
from lowbit.zoo.digits import DigitsData, load_digits_split, torch_threads, train_digits_cnn


@functools.lru_cache(maxsize=1)
def _trained_state() -> tuple[dict, float]:
    with torch_threads(1):
        model, metrics = train_digits_cnn(epochs=8, seed=0)
    return model.state_dict(), metrics["test_accuracy"]


def trained_digits() -> tuple[nn.Module, float, DigitsData]:
    """A fresh copy of the trained digits CNN, its float test accuracy and the data split."""
    from lowbit.zoo.digits import DigitsCNN

    state, accuracy = _trained_state()
    model = DigitsCNN()
    model.load_state_dict(state)
    return model.eval(), accuracy, load_digits_split()


class MixedNet(nn.Module):
    """Token ids [N, 12] -> embedding -> Conv1d -> grouped and depthwise Conv2d with a residual
    add -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv1d = nn.Conv1d(8, 16, 3, padding=1)
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.add = QuantAdd()
        self.head = nn.Linear(8 * 4 * 12, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)           # [N, 8, 12]
        x = torch.relu(self.conv1d(x))                # [N, 16, 12]
        x = x.reshape(x.shape[0], 4, 4, 12)           # [N, 4, 4, 12]
        x = torch.relu(self.grouped(x))               # [N, 8, 4, 12]
        x = self.add(torch.relu(self.depthwise(x)), x)
        return self.head(x.flatten(1))


def mixed_net() -> tuple[MixedNet, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (64, 12), generator=torch.Generator().manual_seed(1))
    return MixedNet().eval(), ids
