"""Plan metadata I/O (`attach_plan`, `read_plan`), its typed settings (`StoredSettings`), and
reading back the exact per-channel / per-group parameters of a stored plan from the model itself.

The plan in the metadata keeps only a summary and a fingerprint of parameters with more than one
value (see `lowbit.plan`); the values are the model's own initializers (Q/DQ scales, dynamic-mode
weight scales). This finds them by fingerprint, so it works for every writer whatever it named
the tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.errors import LowbitError
from lowbit.plan import PLAN_METADATA_KEY, VERSION_METADATA_KEY, PlanEntry, QuantPlan


def restore_plan_qparams(plan: QuantPlan, model: onnx.ModelProto) -> list[PlanEntry]:
    """Fill in `plan`'s summarized parameters from `model`'s initializers; returns the entries
    whose values are no longer in the model (it was edited after quantization)."""
    sizes = {e.qparams_summary.count for e in plan.summarized()}
    return plan.restore_qparams(_arrays_of_size(model, sizes)) if sizes else []


def _arrays_of_size(model: onnx.ModelProto, sizes: set[int]) -> Iterator[np.ndarray]:
    # Only tensors of a wanted element count are converted: the weights themselves never are.
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) in sizes:
            yield numpy_helper.to_array(tensor)


# ----------------------------------------------------------------------------- plan metadata I/O

def attach_plan(model: onnx.ModelProto, plan: QuantPlan) -> None:
    """Store the plan and lowbit's version in the model's metadata (replacing earlier ones)."""
    from lowbit import __version__

    kept = [p for p in model.metadata_props if p.key not in (PLAN_METADATA_KEY, VERSION_METADATA_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept}, PLAN_METADATA_KEY: plan.to_json(),
                                        VERSION_METADATA_KEY: __version__})


def read_plan(model_or_path: onnx.ModelProto | str | os.PathLike) -> QuantPlan:
    """The plan stored in a model written by lowbit, its per-channel parameters read back from the
    model's initializers (entries whose values are no longer there keep only their summary)."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    for prop in model.metadata_props:
        if prop.key == PLAN_METADATA_KEY:
            plan = QuantPlan.from_json(prop.value)
            restore_plan_qparams(plan, model)
            return plan
    raise LowbitError("this model has no lowbit plan in its metadata; it was not written by lowbit quantize")


@dataclass
class StoredSettings:
    """A stored plan's settings, typed: the one place their JSON keys are read back."""

    mode: str
    per_channel: bool = True
    calib_method: str = "auto"
    exclude: list[str] = field(default_factory=list)  # the user's, plus a budget search's fallbacks
    records: list = field(default_factory=list)  # the rewrite passes' typed records, in pass order
    added_by_search: list[str] = field(default_factory=list)  # fallbacks and elementwise nodes a search chose
    algorithms: dict = field(default_factory=dict)  # what each pass and search did, as stored (for display)
    other: dict = field(default_factory=dict)  # every other stored setting, as stored (for display)

    @classmethod
    def of(cls, plan: QuantPlan) -> StoredSettings:
        from lowbit.onnx.passes import records_from_settings

        settings = plan.settings
        algorithms = settings.get("algorithms") or {}
        budget = settings.get("budget") or {}
        return cls(plan.mode, bool(settings.get("per_channel", True)), settings.get("calib_method") or "auto",
                   list(settings.get("exclude") or []), records_from_settings(algorithms),
                   [*budget.get("fell_back", []), *algorithms.get("elementwise_float", [])], dict(algorithms),
                   {k: v for k, v in settings.items() if k != "algorithms"})

    @property
    def user_exclude(self) -> list[str]:
        """What the rewrites ran with: the exclusions minus what a search added later."""
        added = set(self.added_by_search)
        return [p for p in self.exclude if p not in added]

    def record(self, record_type) -> object | None:
        return next((r for r in self.records if isinstance(r, record_type)), None)
