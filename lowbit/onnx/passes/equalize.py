"""Cross-layer equalization of Conv chains (see `lowbit.onnx.equalize`); exact in float except
that equalized ReLU6 links become ReLU. Needs no statistics: replaying it is re-running it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import onnx


RESCALED = "rescaled per channel by cross-layer equalization"


@dataclass
class EqualizeRecord:
    chains: list[list[str]]
    relu6_replaced: list[str]

    def to_settings(self) -> dict:
        return {"equalized_chains": self.chains, "relu6_to_relu": self.relu6_replaced}

    @classmethod
    def from_settings(cls, algorithms: dict) -> EqualizeRecord | None:
        chains = algorithms.get("equalized_chains") or []
        return cls([list(c) for c in chains], list(algorithms.get("relu6_to_relu") or [])) if chains else None

    float_nodes: tuple = ()

    def replay(self, model: onnx.ModelProto, ctx=None) -> tuple[onnx.ModelProto, bool]:
        from lowbit.onnx.equalize import equalize_model

        skip = set(ctx.exclude) if ctx is not None else set()
        model, report = equalize_model(model, skip=skip)
        return model, report.chains == self.chains

    def rescaled(self, reference: onnx.ModelProto) -> dict[str, str]:
        """Every link but the last conv's output is scaled (and the ReLU/Clip right after it)."""
        nodes = {n.name: n for n in reference.graph.node}
        from lowbit.onnx.graph_index import readers_of  # lazily: the CLI imports the passes for their flags

        readers = readers_of(reference.graph)
        rescaled = {}
        for chain in self.chains:
            for conv in chain[:-1]:
                if conv not in nodes:
                    continue
                for out in nodes[conv].output:
                    rescaled[out] = RESCALED
                    for reader in readers.get(out, []):
                        if reader.op_type in ("Relu", "Clip"):
                            rescaled[reader.output[0]] = RESCALED
        return rescaled


    def rescaled_exactly(self, model: onnx.ModelProto) -> set[str] | None:
        """The tensors whose float values this rewrite changed in `model` (the equalized graph), when
        it only rescaled them per channel (Relu links: every other tensor keeps its float values up to
        rounding); None when a ReLU6 became a Relu (then what follows it may change too)."""
        return None if self.relu6_replaced else set(self.rescaled(model))


class Equalize:
    name = "equalize"
    stage = "graph"
    Record = EqualizeRecord
    options = ('equalize',)
    static_only = True
    order = 1

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--equalize", action="store_true",
                            help="cross-layer equalization of Conv chains (helps per-tensor int8 on depthwise nets)")

    @staticmethod
    def enabled(config, ctx) -> bool:
        return bool(getattr(config, "equalize", False))

    @staticmethod
    def apply(ctx) -> EqualizeRecord | None:
        from lowbit.onnx.equalize import equalize_model

        ctx.model, report = equalize_model(ctx.model, skip=set(ctx.exclude))
        return EqualizeRecord(report.chains, report.relu6_replaced)


PASS = Equalize
