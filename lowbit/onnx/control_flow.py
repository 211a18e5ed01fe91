"""Plan and write the bodies of `If` / `Loop` / `Scan` with the main graph's planner and writers.

Each body is planned as a standalone model (see `lowbit.onnx.subgraphs.standalone`): static
mode with the same calibration statistics as the main graph (body tensors are observed through
`subgraphs.expose`, used by `collect.ActivationStream`), dynamic mode without any. The written
body replaces the original in the already-written main model; its entries join the main plan.
"""

from __future__ import annotations

import onnx

from lowbit.onnx.collect import ActivationStats
from lowbit.onnx.dynamic import plan_dynamic, write_dynamic
from lowbit.onnx.planner import StaticPlanner, all_nodes
from lowbit.onnx.qdq import drop_unused_initializers, write_qdq
from lowbit.onnx.subgraphs import (Standalone, all_names, bodies, hoist_shared_initializers, put_back,
                                   scope_values, standalone)
from lowbit.plan import QuantPlan


class BodyPlanners:
    """One planner per control-flow body of `model` (outer bodies first)."""

    def __init__(self, model: onnx.ModelProto, *, per_channel_weights: bool = True,
                 exclude: tuple[str, ...] | list[str] = (), mode: str = "static") -> None:
        self.mode = mode
        self.per_channel = per_channel_weights
        constants, infos = scope_values(model)
        self.parts: list[Standalone] = [standalone(b, model, constants, infos) for b in bodies(model.graph)]
        self.exclude = [_known_patterns(p.model, exclude) for p in self.parts]
        self.planners = ([StaticPlanner(p.model, per_channel_weights=per_channel_weights, exclude=ex)
                          for p, ex in zip(self.parts, self.exclude)] if mode == "static" else [])

    def __bool__(self) -> bool:
        return bool(self.parts)

    def candidates(self) -> list[str]:
        return list(dict.fromkeys(t for planner in self.planners for t in planner.candidates()))

    def write(self, written: onnx.ModelProto, plan: QuantPlan, stats: ActivationStats | None = None, *,
              conv_weights_for_qgemm: bool = False) -> onnx.ModelProto:
        """Quantize every body of `written` (the main graph already written from `model`) in
        place, add the bodies' entries to `plan`, and return `written`."""
        taken = all_names(written.graph)
        for index, part in enumerate(self.parts):
            target = list(bodies(written.graph))[index]  # written bodies keep the original order
            part.body = target
            if self.mode == "static":
                body_plan = self.planners[index].build(stats)
                quantized = write_qdq(part.model, body_plan, conv_weights_for_qgemm=conv_weights_for_qgemm)
            else:
                body_plan = plan_dynamic(part.model, per_channel_weights=self.per_channel, exclude=self.exclude[index])
                quantized = write_dynamic(part.model, body_plan)
            if not body_plan.quantized():
                continue
            put_back(part, quantized, taken)
            known = {o.domain for o in written.opset_import}
            written.opset_import.extend(o for o in quantized.opset_import if o.domain not in known)
            for entry in body_plan.entries:
                plan.add(entry)
            plan.float_nodes.update(body_plan.float_nodes)
            plan.unsupported_ops = sorted(set(plan.unsupported_ops) | set(body_plan.unsupported_ops))
        if self.parts:
            hoist_shared_initializers(written.graph)
            for body in [*bodies(written.graph)][::-1]:  # inner first: float weights the int8 ones replaced
                drop_unused_initializers(body.graph)
            drop_unused_initializers(written.graph)
        return written


def _known_patterns(model: onnx.ModelProto, exclude) -> list[str]:
    """The --exclude patterns that name something in this body (the others name other graphs)."""
    known: set[str] = set()
    for node in all_nodes(model.graph):
        known |= {node.name, node.op_type, *node.output}
    return [p for p in exclude if p in known]
