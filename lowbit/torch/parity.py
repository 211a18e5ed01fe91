"""Does the exported ONNX model compute what the fake-quantized PyTorch model computes?

Both run on the same inputs; the report gives top-1 agreement (for outputs with a class axis)
and the largest output difference, also in "quantization steps": the output's range over the
check batch divided by 255, the step an 8-bit quantizer of that output would have. A difference
of a few steps comes from integer kernels rounding intermediate results differently from float
arithmetic; a wrong scale or layout shows up as tens or hundreds of steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from torch import nn

from lowbit.onnx.session import make_session

MIN_AGREEMENT = 0.995
MAX_STEPS = 4.0


@dataclass
class ParityReport:
    samples: int
    top1_agreement: float | None  # None when no output has a class axis
    max_abs_diff: float
    step: float
    max_diff_steps: float
    min_agreement: float = MIN_AGREEMENT
    max_steps: float = MAX_STEPS

    @property
    def passed(self) -> bool:
        agreement_ok = self.top1_agreement is None or self.top1_agreement >= self.min_agreement
        return agreement_ok and self.max_diff_steps <= self.max_steps

    def describe(self) -> str:
        agreement = "n/a" if self.top1_agreement is None else f"{100 * self.top1_agreement:.2f}%"
        verdict = "PASS" if self.passed else "FAIL"
        return (f"parity {verdict}: top-1 agreement {agreement} on {self.samples} samples, max |diff| "
                f"{self.max_abs_diff:.3g} = {self.max_diff_steps:.2f} output steps (limit {self.max_steps:g})")

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def check_parity(model: nn.Module, onnx_model: onnx.ModelProto | bytes, inputs: tuple[torch.Tensor, ...], *,
                 min_agreement: float = MIN_AGREEMENT, max_steps: float = MAX_STEPS) -> ParityReport:
    """Run `model` (eval mode, fake quantization) and `onnx_model` on ONNX Runtime on `inputs`."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = model(*inputs)
    model.train(was_training)
    references = [reference] if isinstance(reference, torch.Tensor) else list(reference)
    session = make_session(onnx_model, threads=1)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    outputs = session.run(None, feeds)
    agreements, worst, worst_steps, step_used = [], 0.0, 0.0, 0.0
    for expected, got in zip(references, outputs):
        expected = expected.detach().numpy().astype(np.float32)
        got = np.asarray(got, dtype=np.float32).reshape(expected.shape)
        diff = float(np.abs(expected - got).max()) if expected.size else 0.0
        step = float(expected.max() - expected.min()) / 255.0 if expected.size else 0.0
        steps = diff / step if step > 0 else (0.0 if diff == 0 else float("inf"))
        if steps >= worst_steps:
            worst, worst_steps, step_used = diff, steps, step
        if expected.ndim >= 2 and expected.shape[-1] > 1:
            agreements.append(float((expected.argmax(-1) == got.argmax(-1)).mean()))
    return ParityReport(samples=int(inputs[0].shape[0]) if inputs[0].ndim else 1,
                        top1_agreement=min(agreements) if agreements else None,
                        max_abs_diff=worst, step=step_used, max_diff_steps=worst_steps,
                        min_agreement=min_agreement, max_steps=max_steps)
