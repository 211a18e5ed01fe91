"""Bias correction of int8 Convs (see `lowbit.onnx.equalize.correct_biases`): each bias absorbs
the output mean shift its weight rounding causes. The input channel means are float-model
statistics measured once (`measure`); the correction itself depends on which Convs are int8, so it
runs per built candidate and is not replayed by analysis (a note says so)."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import onnx



@dataclass
class BiasCorrectionRecord:
    nodes: list[str]
    key = "bias_corrected"

    def to_settings(self) -> dict:
        return {self.key: self.nodes}

    @classmethod
    def from_settings(cls, algorithms: dict) -> BiasCorrectionRecord | None:
        stored = algorithms.get(cls.key)
        return cls(list(stored)) if stored else None

    float_nodes: tuple = ()

    def replay(self, model: onnx.ModelProto, ctx=None) -> tuple[onnx.ModelProto, bool]:
        return model, False  # depends on the int8 layers of the candidate; see the module docstring

    def rescaled(self, reference: onnx.ModelProto) -> dict[str, str]:
        return {}


class BiasCorrection:
    name = "bias_correction"
    stage = "built"
    Record = BiasCorrectionRecord
    options = ('bias_correction',)
    static_only = True
    order = 0

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--bias-correction", action="store_true",
                            help="correct Conv biases for the output mean shift caused by weight rounding")

    @staticmethod
    def enabled(config, ctx) -> bool:
        return bool(getattr(config, "bias_correction", False))

    @staticmethod
    def reducer(ctx, only: set[str] | None = None):
        """The statistics `measure` returns, as a reducer for a pass over the data that also does
        other things (the calibration pass): channel means of every Conv input (of those in `only`)."""
        from lowbit.onnx.statistics import ChannelMeans

        tensors = [t for t in dict.fromkeys(n.input[0] for n in ctx.model.graph.node if n.op_type == "Conv")
                   if only is None or t in only]
        return ChannelMeans(tensors, axis=1)

    @staticmethod
    def measure(ctx) -> dict[str, np.ndarray]:
        """Channel means of every Conv input the correction may need, once for all candidates."""
        from lowbit.onnx.collect import DEFAULT_MEMORY_BUDGET_MB
        from lowbit.onnx.statistics import collect

        means = BiasCorrection.reducer(ctx)
        if means.tensors:
            collect(ctx.model, ctx.data.batches(ctx.batch_size), [means], threads=ctx.threads,
                    memory_budget_mb=ctx.memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB)
        return means.result()

    @staticmethod
    def apply_built(model: onnx.ModelProto, plan, means: dict[str, np.ndarray]) -> BiasCorrectionRecord | None:
        """Correct `model` (a copy the candidate owns) in place for `plan`."""
        from lowbit.onnx.equalize import conv_bias_targets, correct_biases

        if not conv_bias_targets(model, plan):
            return None
        return BiasCorrectionRecord(correct_biases(model, plan, None, means=means))


PASS = BiasCorrection
