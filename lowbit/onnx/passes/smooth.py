"""SmoothQuant on the LayerNorm-fed int8 MatMuls (see `lowbit.onnx.smooth`): one measuring pass of
per-channel |x| maxima, then the scale migration into the weights."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx



@dataclass
class SmoothRecord:
    groups: list[dict]  # activation, nodes, alpha, folded_into (the stored JSON form)
    key = "smoothquant"

    def to_settings(self) -> dict:
        return {self.key: self.groups}

    @classmethod
    def from_settings(cls, algorithms: dict) -> SmoothRecord | None:
        stored = algorithms.get(cls.key) or []
        return cls([dict(g) for g in stored]) if stored else None

    float_nodes: tuple = ()

    def replay(self, model: onnx.ModelProto, ctx) -> tuple[onnx.ModelProto, bool]:
        """Smooth the same activations with the same alphas, measured on `ctx.data`."""
        from lowbit.onnx.planner import StaticPlanner

        planner = StaticPlanner(model, per_channel_weights=ctx.per_channel, exclude=ctx.exclude)
        alphas = {g["activation"]: g["alpha"] for g in self.groups}
        model, redone = _smooth(model, planner, ctx, alphas)
        return model, sorted(g["activation"] for g in redone) == sorted(g["activation"] for g in self.groups)

    def rescaled(self, reference: onnx.ModelProto) -> dict[str, str]:
        return {g["activation"]: "rescaled per channel by SmoothQuant (its readers undo the scaling)"
                for g in self.groups if g.get("folded_into")}


def _smooth(model: onnx.ModelProto, planner, ctx, alpha) -> tuple[onnx.ModelProto, list[dict]]:
    from lowbit.onnx.smooth import apply_smoothing, channel_absmax, smoothing_groups

    groups = smoothing_groups(model, set(planner.active), alpha=alpha)
    if not groups:
        return model, []
    absmax = ctx.channel_absmax([g.activation for g in groups]) if model is ctx.model else \
        channel_absmax(model, [g.activation for g in groups], ctx.data, batch_size=ctx.batch_size, threads=ctx.threads)
    model = apply_smoothing(model, groups, absmax)
    return model, [{"activation": g.activation, "nodes": g.nodes, "alpha": g.alpha, "folded_into": g.folded_into}
                   for g in groups if g.scales is not None]


class Smooth:
    name = "smooth"
    stage = "planned"
    Record = SmoothRecord
    options = ('smooth', 'smooth_alpha')
    static_only = True
    order = 0

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--smooth", dest="smooth", action="store_true", default=None,
                            help="SmoothQuant scale migration into LayerNorm-fed MatMuls (default: on when present)")
        parser.add_argument("--no-smooth", dest="smooth", action="store_false", help="turn SmoothQuant off")
        parser.add_argument("--smooth-alpha", type=float, default=0.5,
                            help="SmoothQuant migration strength in [0, 1] (default: 0.5)")

    @staticmethod
    def enabled(config, ctx) -> bool:
        return ctx.data is not None and getattr(config, "smooth", None) is not False

    @staticmethod
    def absmax_tensors(ctx) -> list[str]:
        """Every LayerNorm output a MatMul could be smoothed on (the planner decides later which)."""
        from lowbit.onnx.smooth import smoothing_groups

        skipped = set(ctx.exclude)
        kept = {n.name for n in ctx.model.graph.node if not ({n.name, n.op_type, *n.output} & skipped)}
        return [g.activation for g in smoothing_groups(ctx.model, kept)]

    @staticmethod
    def apply(ctx) -> SmoothRecord | None:
        ctx.model, groups = _smooth(ctx.model, ctx.planner, ctx, ctx.options.smooth_alpha)
        return SmoothRecord(groups) if groups else None


PASS = Smooth
