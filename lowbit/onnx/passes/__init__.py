"""Static-int8 rewrite passes: each one a module here, run by `lowbit.onnx.pipeline.StaticPipeline`.

A pass is a class, named `PASS` in its module (the package finds it there), with
- `name`, the `StaticConfig` field that switches it on (`enabled(config, ctx)` may refine that),
  `options` (its `StaticConfig` fields, which are also its command-line dests), `add_arguments(parser)`
  (its `lowbit quantize` flags), `static_only` (its flags make sense only in static mode), `order`
  within its stage, and `stage`: "graph" (before planning: outlier split, equalization), "planned" (needs the
  planner's int8 nodes: SmoothQuant) or "built" (needs a built plan: bias correction, run once per
  candidate on statistics measured once);
- `apply(ctx) -> Record | None`: measure what it needs on the calibration data, rewrite
  `ctx.model`, and return a typed record of what it did (None: nothing to do);
- a `Record` dataclass: `to_settings()` (the JSON stored in the plan under
  settings["algorithms"]), `from_settings(algorithms)` (None when the stored plan has none), and
  `replay(model, ctx)`, which redoes the pass on a float model from the record alone, so analysis
  and the sweeps rebuild exactly the graph that was quantized.

`PASSES` lists them in the order they run. A new pass is a module here (record, apply, replay,
flags), one field in `StaticConfig` and its algorithm in `lowbit/algorithms/`: three files. The
pipeline, the CLI, the budget search, --mode auto's candidates, the sweeps and the analyses pick it
up from this list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the pass modules import their graph code lazily: the CLI reads their flags at start-up
    import onnx

    from lowbit.onnx.calib_data import CalibrationData


@dataclass
class PassContext:
    """What a pass may read and change: the working model, the exclusions so far, the data."""

    model: onnx.ModelProto
    data: CalibrationData | None
    exclude: list[str] = field(default_factory=list)
    batch_size: int = 16
    threads: int | None = None
    per_channel: bool = True
    planner: Any = None  # StaticPlanner of `model`, from stage "planned" on
    options: Any = None  # the StaticConfig
    memory_budget_mb: float | None = None
    absmax: dict = field(default_factory=dict)  # tensor -> channel peaks measured so far (see channel_absmax)

    def channel_absmax(self, tensors: list[str]) -> dict:
        """max |x| per last-axis channel of each tensor: the peaks measured up front (`prefetch`),
        the others measured now on `model`, in one statistics pass."""
        missing = [t for t in dict.fromkeys(tensors) if t not in self.absmax]
        if missing:
            from lowbit.onnx.smooth import channel_absmax

            self.absmax.update(channel_absmax(self.model, missing, self.data, batch_size=self.batch_size,
                                              threads=self.threads, memory_budget_mb=self.memory_budget_mb))
        return {t: self.absmax[t] for t in tensors}

    def prefetch(self, passes: list) -> None:
        """Measure, in one pass over the data, the channel peaks every one of `passes` will read
        (`absmax_tensors(ctx)`), on the model as it is now. Used before the rewrites: the peaks a
        later pass reads are those of tensors the earlier passes keep equal in exact arithmetic
        (the outlier split is exact, equalization does not touch LayerNorm outputs), so they differ
        from a measurement between the passes by float rounding only, and the data runs once, not
        once per pass."""
        tensors = [t for p in passes if hasattr(p, "absmax_tensors") for t in p.absmax_tensors(self)]
        if tensors and self.data is not None:
            self.channel_absmax(tensors)


def records_from_settings(algorithms: dict) -> list:
    """The typed records of a stored plan's settings["algorithms"], in pass order."""
    records = []
    for rewrite in PASSES:
        record = rewrite.Record.from_settings(algorithms or {})
        if record is not None:
            records.append(record)
    return records


def _discover() -> tuple:
    """Every module of this package that defines `PASS`, in run order (stage, then `order`)."""
    import importlib
    import pkgutil

    stages = ("graph", "planned", "built")
    found = [importlib.import_module(f"{__name__}.{m.name}").PASS for m in pkgutil.iter_modules(__path__)]
    return tuple(sorted(found, key=lambda p: (stages.index(p.stage), p.order)))


PASSES = _discover()

__all__ = ["PASSES", "PassContext", "records_from_settings"]
