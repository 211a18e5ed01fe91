"""Outlier-channel splitting of transformer FFNs (see `lowbit.onnx.outlier_split`): the few hidden
channels that peak far above the rest move to a thin float branch, exact in float."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx



@dataclass
class SplitRecord:
    node: str  # the down projection
    channels: list[int]
    float_branch: list[str]


@dataclass
class OutlierSplitRecord:
    sites: list[SplitRecord]
    key = "outlier_split"

    def to_settings(self) -> dict:
        return {self.key: [dict(vars(s)) for s in self.sites]}

    @classmethod
    def from_settings(cls, algorithms: dict) -> OutlierSplitRecord | None:
        stored = algorithms.get(cls.key) or []
        return cls([SplitRecord(s["node"], list(s["channels"]), list(s.get("float_branch", []))) for s in stored]) \
            if stored else None

    @property
    def float_nodes(self) -> list[str]:
        return [name for site in self.sites for name in site.float_branch]

    def replay(self, model: onnx.ModelProto, ctx=None) -> tuple[onnx.ModelProto, bool]:
        """The same channels split off `model`; False when this model lacks some stored site."""
        from lowbit.onnx.outlier_split import apply_split, split_sites

        stored = {s.node: s.channels for s in self.sites}
        sites = split_sites(model, set(stored))
        for site in sites:
            site.channels = stored[site.down]
        model = apply_split(model, sites)
        if ctx is not None:
            ctx.exclude += [name for site in sites for name in site.float_branch]
        return model, len(sites) == len(stored)

    def rescaled(self, reference: onnx.ModelProto) -> dict[str, str]:
        return {}


class OutlierSplit:
    name = "outlier_split"
    stage = "graph"
    Record = OutlierSplitRecord
    options = ('outlier_split',)
    static_only = False
    order = 0

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--no-outlier-split", dest="outlier_split", action="store_false", default=None,
                            help="keep transformer FFN outlier channels in the int8 path (by default, when "
                                 "calibration data is given, they move to a thin float branch, exact in float)")

    @staticmethod
    def enabled(config, ctx) -> bool:
        return ctx.data is not None and getattr(config, "outlier_split", None) is not False

    @staticmethod
    def _sites(ctx) -> list:
        from lowbit.onnx.outlier_split import split_sites

        skipped = set(ctx.exclude)
        candidates = {n.name for n in ctx.model.graph.node
                      if n.op_type == "MatMul" and not ({n.name, n.op_type, *n.output} & skipped)}
        return split_sites(ctx.model, candidates)

    @staticmethod
    def absmax_tensors(ctx) -> list[str]:
        """The FFN activations whose channel peaks pick the outlier channels."""
        return [s.activation for s in OutlierSplit._sites(ctx)]

    @staticmethod
    def apply(ctx) -> OutlierSplitRecord | None:
        from lowbit.onnx.outlier_split import apply_split, outlier_channels

        sites = OutlierSplit._sites(ctx)
        if not sites:
            return None
        absmax = ctx.channel_absmax([s.activation for s in sites])
        for site in sites:
            site.channels = outlier_channels(absmax[site.activation])
        ctx.model = apply_split(ctx.model, sites)
        record = OutlierSplitRecord([SplitRecord(s.down, s.channels, s.float_branch) for s in sites if s.channels])
        if not record.sites:
            return None
        ctx.exclude += record.float_nodes
        return record


PASS = OutlierSplit
