"""A detector head whose output mixes ranges in one tensor, as YOLO-style exports do:
box coordinates in pixels (0-320) and class probabilities (0-1) concatenated on the last axis,
both sliced out of one head convolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from _onnx_quant_models import export

CLASSES = 6


class MixedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(32, 4 + CLASSES, 1)
        with torch.no_grad():
            self.head.weight[:4] *= 600.0  # box channels: pixels
            self.head.bias[:4] = 160.0
            self.head.weight[4:] *= 25.0
            self.head.bias[4:] = -4.0  # class logits: some anchors score above 0.05

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        y = self.head(self.backbone(image)).flatten(2).transpose(1, 2)  # (batch, anchors, 4 + classes)
        boxes, scores = y[..., :4], y[..., 4:].sigmoid()
        return torch.cat([boxes, scores], dim=-1)


def mixed_head(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return export(MixedHead(), (torch.randn(1, 3, 32, 32),), path, ["image"],
                  {"image": {0: "batch"}, "out": {0: "batch"}})


def detections_kept(reference: np.ndarray, quantized: np.ndarray, threshold: float = 0.05,
                    box_tolerance: float = 8.0) -> float:
    """Share of the fp32 detections (anchor, class with score > threshold) that the quantized
    model still reports above the threshold, with every box coordinate within `box_tolerance` px."""
    ref_scores, got_scores = reference[..., 4:], quantized[..., 4:]
    hits = np.argwhere(ref_scores > threshold)
    if not len(hits):
        return 1.0
    kept = 0
    for b, anchor, cls in hits:
        close = np.abs(reference[b, anchor, :4] - quantized[b, anchor, :4]).max() <= box_tolerance
        kept += bool(got_scores[b, anchor, cls] > threshold and close)
    return kept / len(hits)
