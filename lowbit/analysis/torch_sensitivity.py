"""Per-layer sensitivity of a PyTorch model under fake quantization: the PyTorch twin of
`sensitivity` (per-layer SQNR and cosine) and `sweep` (quantize only this layer / all but it).

The analysis runs on a private copy of the fake-quant model (`lowbit.torch.prepare` + `calibrate`
for a recipe, a deep copy of an already prepared model), never on the caller's model. Every
quantizer of that copy belongs to exactly one *unit*: a quantized layer (Conv/Linear/Embedding)
owns its weight quantizer, its own input quantizer and its output quantizer; a `QuantAdd` owns its
operand and output quantizers. A layer whose input is on its producer's grid (`share_input_grid`)
reads a quantizer its producer owns. Switching a unit off makes its weights float and its
quantizers pass values through; the reference "float model" is the copy with every unit off
(BatchNorm folded, the fused ReLUs still applied: exactly the float computation).

Per batch, with forward hooks on the units and running float64 sums only (memory: one batch of
unit outputs):
- float pass (all units off): each unit's output is the reference; the unit is then run once
  more on the same float inputs with only itself on, which gives `local_sqnr_db` / `local_cosine`
  (its own quantization error, nothing upstream) and `clipped` (share of the float values its own
  activation quantizers see that fall outside their grid);
- quantized pass (all units on): `sqnr_db` / `cosine`, the error accumulated up to that unit as
  the fake-quant model really runs;
- sweeps: the final output with only this unit on ("solo") and with every unit but this one on
  ("all_but"), scored against the float output: top-1 agreement when the output looks like class
  scores ([batch, classes]), else the mean per-sample cosine (the worst output for several), or a
  callable(model) -> score (higher is better) that evaluates the model itself.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.analysis.sensitivity import SensitivityReport, TensorSensitivity
from lowbit.errors import LowbitError
from lowbit.progress import progress
from lowbit.spec import Recipe
from lowbit.torch.modules import QuantAdd, QuantizedLayer
from lowbit.torch.qat import check_inputs, prepare, state_of
from lowbit.torch.quantizers import ActivationQuantizer
from lowbit.torch.ranges import calibrate

SWEEPS = ("solo", "all_but")
Metric = str | Callable[[nn.Module], float] | None


@dataclass
class LayerSensitivity(TensorSensitivity):
    """One unit (layer or add). `tensor` is the module name and `nodes` the quantizers it owns,
    so the ONNX report's tables render it unchanged; `sqnr_db`/`cosine` are accumulated."""

    kind: str = ""
    local_cosine: float | None = None
    solo_score: float | None = None  # final-output metric with only this unit quantized
    solo_cosine: float | None = None
    all_but_score: float | None = None  # ... with every unit but this one quantized
    all_but_cosine: float | None = None
    all_but_recovery: float | None = None  # all_but_score minus the whole fake-quant model's score
    calls: int = 0  # forward calls per batch (a module used twice is measured on both)


RANKINGS = ("solo", "all_but", "local", "accumulated")


@dataclass
class TorchSensitivityReport(SensitivityReport):
    """The ranked report; `float_path`/`quant_path` name the models (there are no files)."""

    recipe: str = ""
    metric: str = ""
    float_score: float | None = None  # the metric of the float model (1.0 for agreement metrics)
    full_score: float | None = None  # ... of the whole fake-quant model
    sweeps: tuple[str, ...] = ()

    def ranked(self, by: str | None = None) -> list[LayerSensitivity]:
        """Measured units, the one that hurts most first: by the solo sweep's score when it ran,
        else the all-but sweep's, else local SQNR; `by` picks one of RANKINGS explicitly."""
        by = by or next((s for s in SWEEPS if s in self.sweeps), "local")
        if by not in RANKINGS or by in SWEEPS and by not in self.sweeps:
            raise LowbitError(f"cannot rank by {by!r}; use one of {', '.join(('local', 'accumulated') + self.sweeps)}")
        measured = [t for t in self.tensors if not t.skipped]
        last = _none_last
        keys = {"local": lambda t: (last(t.local_sqnr_db), last(t.sqnr_db)),
                "accumulated": lambda t: (last(t.sqnr_db), last(t.local_sqnr_db)),
                "solo": lambda t: (last(t.solo_score), last(t.solo_cosine), last(t.local_sqnr_db)),
                # keeping the worst unit float recovers the most: highest all-but score first
                "all_but": lambda t: (-last(t.all_but_score), -last(t.all_but_cosine), last(t.local_sqnr_db))}
        return sorted(measured, key=keys[by])

    def to_dict(self) -> dict:
        return {"float_model": self.float_path, "quant_model": self.quant_path, "recipe": self.recipe,
                "samples": self.samples, "metric": self.metric, "float_score": self.float_score,
                "full_score": self.full_score, "sweeps": list(self.sweeps),
                "ranked": [asdict(t) for t in self.ranked()],
                "skipped": [asdict(t) for t in self.tensors if t.skipped], "notes": self.notes}

    def to_markdown(self, top: int = 20) -> str:
        ranked = self.ranked()
        order = next((s for s in SWEEPS if s in self.sweeps), "local")
        lines = [f"## Per-layer sensitivity of {self.quant_path} vs {self.float_path}", "",
                 f"{self.samples} samples; worst first (by {order.replace('_', '-')}); metric: {self.metric}.", ""]
        if self.full_score is not None:
            lines += [f"Whole fake-quant model: {self.metric} {_fmt(self.full_score)} "
                      f"(float model: {_fmt(self.float_score)}).", ""]
        header, rows = self._rows(ranked[:top])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        if len(ranked) > top:
            lines.append(f"\n... {len(ranked) - top} more (to_markdown(top=...) or to_dict())")
        lines += ["", "own dB / own cos: the layer alone quantized, fed float inputs; SQNR / cosine: as it runs "
                  "in the whole fake-quant model (error accumulated so far); solo: final output with only this "
                  "layer quantized; all-but gain: the score won back when only this layer stays float "
                  "(higher = it hurts more)."]
        lines += [f"- skipped {t.tensor}: {t.skipped}" for t in self.tensors if t.skipped]
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines)

    def text(self, top: int = 20) -> str:
        return self.to_markdown(top)

    def _rows(self, ranked: list[LayerSensitivity]) -> tuple[list[str], list[list[str]]]:
        header = ["layer", "kind", "own dB", "own cos", "SQNR dB", "cosine", "clipped %"]
        header += [f"solo {self.metric}" if s == "solo" else f"all-but gain ({self.metric})" for s in self.sweeps]
        rows = []
        for t in ranked:
            row = [t.tensor, t.kind, _db(t.local_sqnr_db), _fmt(t.local_cosine), _db(t.sqnr_db), _fmt(t.cosine),
                   "-" if t.clipped is None else f"{100 * t.clipped:.3f}"]
            row += [_fmt(t.solo_score) if s == "solo" else _fmt(t.all_but_recovery, "+.5f") for s in self.sweeps]
            rows.append(row)
        return header, rows


def torch_layer_sensitivity(model: nn.Module | None, quantization: str | Recipe | nn.Module,
                            inputs: torch.Tensor | Iterable[Any], *, calib: Iterable[Any] | None = None,
                            calib_method: str = "minmax", metric: Metric = None,
                            sweeps: Iterable[str] = SWEEPS) -> TorchSensitivityReport:
    """Per-layer sensitivity of `model` fake-quantized (see the module docstring).

    - model: the float nn.Module. With a prepared `quantization` it may be None; given, the note
      says how far the prepared model's own float weights (e.g. after QAT) are from it.
    - quantization: a recipe (preset name such as "w8a8" / "w4a8", JSON text, Recipe), prepared
      and calibrated here on a copy; or a model returned by `lowbit.torch.prepare` and calibrated.
    - inputs: one batch (a tensor) or an iterable of batches, each a tensor or a tuple whose first
      tensors are the model inputs (so (x, y) pairs work). Iterated once, streamed batch by batch.
    - calib: calibration batches for a recipe (default: `inputs`, which must then be re-iterable,
      e.g. a list or a DataLoader), calibrated with `calib_method` (see `lowbit.torch.calibrate`).
    - metric: None (top-1 agreement for class scores, else cosine), "cosine", "top1", or a
      callable(model) -> float, higher is better, called on the fake-quant copy per sweep step.
    - sweeps: any of "solo", "all_but" (or "all-but"); () skips them (each costs one forward pass
      per unit per batch, or one metric call per unit).
    """
    sweeps = _check_sweeps(sweeps)
    if metric is not None and not callable(metric) and metric not in ("cosine", "top1"):
        raise LowbitError(f"metric must be 'cosine', 'top1', a callable(model) -> score or None, not {metric!r}")
    batches = [inputs] if isinstance(inputs, torch.Tensor) else inputs
    if not isinstance(batches, Iterable):
        raise LowbitError(f"inputs must be a tensor or an iterable of batches, got {type(inputs).__name__}; "
                          "pass e.g. a list of input tensors or a DataLoader")
    working, recipe = _working_copy(model, quantization, batches, calib, calib_method)
    units = _units(working)
    if not units:
        raise LowbitError("the prepared model has no quantized layer to analyze; prepare it with a recipe "
                          "that quantizes its Conv/Linear layers")
    analysis = _Analysis(working, units, sweeps, metric)
    # After QAT the prepared model's own float weights differ from the float model's: say how much.
    reference = model if isinstance(quantization, nn.Module) and model is not None else None
    samples = analysis.run(batches, reference)
    name = type(model if model is not None else working).__name__
    state = state_of(working)
    report = TorchSensitivityReport(f"{name} (float)", f"{name} ({recipe} fake-quant)", samples,
                                    [analysis.result(u) for u in units], recipe=recipe,
                                    metric=analysis.metric_name, sweeps=sweeps)
    report.float_score, report.full_score = analysis.float_score, analysis.full_score
    for entry in report.tensors:
        if entry.all_but_score is not None and report.full_score is not None:
            entry.all_but_recovery = entry.all_but_score - report.full_score
    report.notes += analysis.notes
    report.notes += [f"kept float: {n} ({r})" for n, r in state.float_modules.items()]
    return report


# --------------------------------------------------------------------------- the working copy

def _working_copy(model: nn.Module | None, quantization: str | Recipe | nn.Module, batches: Iterable[Any],
                  calib: Iterable[Any] | None, calib_method: str) -> tuple[nn.Module, str]:
    """(a private, calibrated, eval-mode fake-quant model, recipe name)."""
    if isinstance(quantization, nn.Module):
        state = state_of(quantization)  # raises "not prepared by lowbit" for a plain module
        if any(getattr(m, "exporting", False) for m in quantization.modules()):
            raise LowbitError("this prepared model was frozen for export; analyze the prepared model itself, "
                              "not one that freeze_for_export changed")
        uncalibrated = [q.name for q in quantization.modules()
                        if isinstance(q, ActivationQuantizer) and not bool(q.calibrated)]
        if uncalibrated:
            raise LowbitError(f"activation {uncalibrated[0]!r} of the prepared model has no range yet; call "
                              "lowbit.torch.calibrate(prepared, batches) before analyzing it")
        working = copy.deepcopy(quantization)  # the caller's model keeps its mode, scales and code
        return working.eval(), state.recipe.name
    if model is None or not isinstance(model, nn.Module):
        raise LowbitError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the float model "
                          "with a recipe, or a prepared model as `quantization`")
    calib = batches if calib is None else calib
    if iter(calib) is calib and calib is batches:
        raise LowbitError("inputs is a one-shot iterator, but it is needed twice (calibration, then analysis); "
                          "pass a list of batches or a DataLoader, or separate calib= batches")
    stream = iter(calib)
    first = next(stream, None)
    if first is None:
        raise LowbitError("no calibration batches; pass at least one batch of model inputs")
    if stream is calib:  # a one-shot iterator: put the batch just read back in front
        calib = itertools.chain([first], stream)
    example = _model_inputs(first, _positional_inputs(model, first))
    prepared = prepare(model, quantization, example)  # a deep copy: `model` is not touched
    calibrate(prepared, calib, calib_method)
    return prepared.eval(), prepared.lowbit.recipe.name


def _positional_inputs(model: nn.Module, batch: Any) -> int:
    """How many leading tensors of a tuple batch the model takes: its required positional
    parameters (all tensors of the batch when forward takes *args)."""
    if isinstance(batch, torch.Tensor):
        return 1
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return len(batch)
    return max(1, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                      for p in parameters))


def _model_inputs(batch: Any, count: int) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and len(batch) >= count and all(
            isinstance(t, torch.Tensor) for t in batch[:count]):
        return tuple(batch[:count])
    raise LowbitError(f"a batch must be a tensor or a tuple of tensors, got {type(batch).__name__}; "
                      "pass e.g. a list of input tensors or (inputs, labels) pairs")


def _check_sweeps(sweeps: Iterable[str]) -> tuple[str, ...]:
    sweeps = (sweeps,) if isinstance(sweeps, str) else tuple(sweeps)
    sweeps = tuple("all_but" if s == "all-but" else s for s in sweeps)  # the CLI's spelling
    unknown = [s for s in sweeps if s not in SWEEPS]
    if unknown:
        raise LowbitError(f"unknown sweep {unknown[0]!r}; use any of {', '.join(SWEEPS)} (or () for none)")
    return tuple(s for s in SWEEPS if s in sweeps)


# --------------------------------------------------------------------------- units and switches

@dataclass
class _Unit:
    """A module and the quantizers it owns, switched on and off together (off: float weights and
    bias, activations passed through). Only the private working copy is ever switched."""

    name: str
    module: nn.Module
    kind: str
    activations: list[ActivationQuantizer]
    layer: QuantizedLayer | None
    owned: list[str]

    def set(self, on: bool) -> None:
        for quantizer in self.activations:
            quantizer.enabled = on
        if self.layer is not None:
            self.layer.quantize_weights = on

    def grids(self, args: tuple) -> list[tuple[ActivationQuantizer, torch.Tensor | None]]:
        """(own activation quantizer, the input it reads or None for the module's output)."""
        pairs = []
        for quantizer in self.activations:
            role = next((r for r in ("input_quantizer", "lhs_quantizer", "rhs_quantizer")
                         if getattr(self.module, r, None) is quantizer), None)
            if role is not None:
                index = 1 if role == "rhs_quantizer" else 0
                pairs.append((quantizer, args[index] if len(args) > index else None))
            elif quantizer is getattr(self.module, "output_quantizer", None) or quantizer is self.module:
                pairs.append((quantizer, None))
        return pairs


def _units(model: nn.Module) -> list[_Unit]:
    """Every quantized layer and quantizing add, plus any activation quantizer no layer owns."""
    units, owned = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, (QuantizedLayer, QuantAdd)):
            continue
        activations = [m for m in module.children() if isinstance(m, ActivationQuantizer)]
        layer = module if isinstance(module, QuantizedLayer) else None
        if layer is None and not activations:
            continue  # a QuantAdd under a weight-only recipe: a plain add
        owned.update(id(q) for q in activations)
        names = ([f"{name}.weight"] if layer is not None else []) + [q.name for q in activations]
        units.append(_Unit(name, module, type(module).__name__.removeprefix("Quant"), activations, layer, names))
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer) and id(module) not in owned:
            units.append(_Unit(name, module, "Activation", [module], None, [module.name]))
    return units


# --------------------------------------------------------------------------- measurement

class _Agreement:
    """Running float64 sums for SQNR and cosine of a tensor stream against its reference."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.power = 0.0

    def add(self, reference: torch.Tensor, got: torch.Tensor) -> None:
        reference, got = reference.detach().double().flatten(), got.detach().double().flatten()
        finite = torch.isfinite(reference) & torch.isfinite(got)
        if not bool(finite.all()):
            reference, got = reference[finite], got[finite]
        diff = reference - got
        self.signal += float(reference @ reference)
        self.noise += float(diff @ diff)
        self.dot += float(reference @ got)
        self.power += float(got @ got)

    def sqnr_db(self) -> float | None:
        """None when there is no noise at all; -inf when the reference is all zeros."""
        if self.noise <= 0:
            return None
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    def cosine(self) -> float:
        norms = math.sqrt(self.signal * self.power)
        return self.dot / norms if norms > 0 else (1.0 if self.signal == self.power == 0 else 0.0)


class _OutputScore:
    """Mean per-sample cosine of each final output vs float, and top-1 agreement."""

    def __init__(self) -> None:
        self.cosine_sums: list[float] = []
        self.samples: list[int] = []
        self.agree = self.total = 0

    def add(self, reference: list[torch.Tensor], got: list[torch.Tensor], classes: bool) -> None:
        if len(self.cosine_sums) < len(reference):
            self.cosine_sums += [0.0] * (len(reference) - len(self.cosine_sums))
            self.samples += [0] * (len(reference) - len(self.samples))
        for i, (ref, out) in enumerate(zip(reference, got)):
            ref = ref.detach().double().reshape(ref.shape[0] if ref.ndim else 1, -1)
            out = out.detach().double().reshape(ref.shape)
            dot, ref_norm, out_norm = (ref * out).sum(1), ref.norm(dim=1), out.norm(dim=1)
            both_zero = (ref_norm == 0) & (out_norm == 0)
            cosine = torch.where(both_zero, torch.ones_like(dot), dot / (ref_norm * out_norm).clamp_min(1e-300))
            self.cosine_sums[i] += float(cosine.sum())
            self.samples[i] += ref.shape[0]
        if classes:
            self.agree += int((reference[0].argmax(dim=1) == got[0].argmax(dim=1)).sum())
            self.total += reference[0].shape[0]

    def cosine(self) -> float:
        return min(s / max(n, 1) for s, n in zip(self.cosine_sums, self.samples))

    def top1(self) -> float | None:
        return self.agree / self.total if self.total else None


def _outputs(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple/list, dict), in order."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _outputs(item)]
    return []


class _Analysis:
    """The batch loop: hooks on every unit, running sums per unit and per sweep variant."""

    def __init__(self, model: nn.Module, units: list[_Unit], sweeps: tuple[str, ...], metric: Metric) -> None:
        self.model, self.units, self.sweeps, self.metric = model, units, sweeps, metric
        self.local = {u.name: _Agreement() for u in units}
        self.accumulated = {u.name: _Agreement() for u in units}
        self.clipped = {u.name: [0, 0] for u in units}  # values outside the grid, values seen
        self.calls = {u.name: 0 for u in units}
        self.references: dict[str, list[torch.Tensor]] = {}
        self.phase: str | None = None
        self.not_tensor: set[str] = set()
        self.variants: dict[tuple[str, str], _OutputScore | float] = {}  # float: a callable's score
        self.full = _OutputScore()
        self.classes: bool | None = None
        name = getattr(metric, "__name__", "score") if callable(metric) else ""
        self.metric_name = "score" if name == "<lambda>" else name
        self.float_score: float | None = None
        self.full_score: float | None = None
        self.notes: list[str] = []
        self.drift = _OutputScore()

    def _switch(self, on: set[str]) -> None:
        for unit in self.units:
            unit.set(unit.name in on)

    def _hook(self, unit: _Unit):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.phase is None:
                return
            if not isinstance(output, torch.Tensor):
                self.not_tensor.add(unit.name)
                return
            if self.phase == "float":
                self.calls[unit.name] += 1
                # a copy: an in-place op after the unit (ReLU(inplace=True)) would rewrite it
                self.references.setdefault(unit.name, []).append(output.detach().clone())
                unit.set(True)  # the unit alone, on the float inputs it just received
                try:
                    alone = module.forward(*args, **kwargs)
                finally:
                    unit.set(False)
                self.local[unit.name].add(output, alone)
                self._count_clipped(unit, args, output)
            elif self.references.get(unit.name):
                self.accumulated[unit.name].add(self.references[unit.name].pop(0), output)
        return hook

    def _count_clipped(self, unit: _Unit, args: tuple, output: torch.Tensor) -> None:
        counts = self.clipped[unit.name]
        for quantizer, value in unit.grids(args):
            value = output if value is None else value
            if not isinstance(value, torch.Tensor) or not bool(quantizer.calibrated):
                continue
            spec, scale, zero = quantizer.spec, float(quantizer.scale.detach()), float(quantizer.zero_point)
            low, high = (spec.qmin - zero - 0.5) * scale, (spec.qmax - zero + 0.5) * scale
            value = value.detach()
            counts[0] += int(((value < low) | (value > high)).sum())
            counts[1] += value.numel()

    def run(self, batches: Iterable[Any], float_model: nn.Module | None) -> int:
        state = state_of(self.model)
        count = len(state.input_signature)
        everything = {u.name for u in self.units}
        hooks = [u.module.register_forward_hook(self._hook(u), with_kwargs=True) for u in self.units]
        samples = index = 0
        modes = [(m, m.training) for m in float_model.modules()] if float_model is not None else []
        total = len(batches) if hasattr(batches, "__len__") else None
        try:
            if float_model is not None:
                float_model.eval()  # its BatchNorm statistics must not move; restored below
            with torch.no_grad(), progress(total=total, desc="layer sensitivity", unit="batch") as bar:
                for batch in batches:
                    inputs = _model_inputs(batch, count)
                    check_inputs(state, inputs, f"batch {index}")
                    samples += self._batch(inputs, everything, float_model)
                    index += 1
                    bar.update(1)
        finally:
            for hook in hooks:
                hook.remove()
            self.phase = None
            self._switch(everything)
            for module, training in modes:  # each module's own mode, as the caller had it
                module.training = training
        if index == 0:
            raise LowbitError("inputs held no batches; pass at least one batch of model inputs")
        self._scores(everything, float_model)
        return samples

    def _batch(self, inputs: tuple[torch.Tensor, ...], everything: set[str], float_model: nn.Module | None) -> int:
        self._switch(set())
        self.phase = "float"
        reference = _outputs(self.model(*inputs))
        self._switch(everything)
        self.phase = "quant"
        full = _outputs(self.model(*inputs))
        self.phase = None
        self.references.clear()  # units that ran in float but not quantized (data-dependent paths)
        if not reference:
            raise LowbitError("the model returned no floating-point tensor to compare; analyze a model whose "
                              "output is a tensor or a tuple/dict of tensors")
        if self.classes is None:
            self._choose_metric(reference)
        if float_model is not None:
            self.drift.add(_outputs(float_model(*inputs)), reference, self.classes)
        if callable(self.metric):
            return inputs[0].shape[0] if inputs[0].ndim else 1
        self.full.add(reference, full, self.classes)
        for sweep in self.sweeps:
            for unit in self.units:
                self._switch({unit.name} if sweep == "solo" else everything - {unit.name})
                got = _outputs(self.model(*inputs))
                self.variants.setdefault((sweep, unit.name), _OutputScore()).add(reference, got, self.classes)
        self._switch(everything)
        return inputs[0].shape[0] if inputs[0].ndim else 1

    def _choose_metric(self, reference: list[torch.Tensor]) -> None:
        looks_like_classes = len(reference) == 1 and reference[0].ndim == 2 and reference[0].shape[1] > 1
        if self.metric == "top1" and not looks_like_classes:
            raise LowbitError(f"metric 'top1' needs one [batch, classes] output, but the model returns "
                              f"{[list(t.shape) for t in reference]}; use metric='cosine'")
        self.classes = looks_like_classes and not callable(self.metric)
        if not callable(self.metric):
            self.metric_name = "top-1 agreement" if self.classes and self.metric != "cosine" else "cosine"

    def _score(self, scores: _OutputScore) -> float:
        return scores.top1() if self.metric_name == "top-1 agreement" else scores.cosine()

    def _scores(self, everything: set[str], float_model: nn.Module | None) -> None:
        if float_model is not None:
            self.notes.append(f"output cosine of the prepared model's float weights vs the float model: "
                              f"{self.drift.cosine():.6f} (sensitivities are measured against the former)")
        if not callable(self.metric):
            self.float_score, self.full_score = 1.0, self._score(self.full)
            return
        try:
            self._switch(set())
            self.float_score = float(self.metric(self.model))
            self._switch(everything)
            self.full_score = float(self.metric(self.model))
            for sweep in self.sweeps:
                for unit in self.units:
                    self._switch({unit.name} if sweep == "solo" else everything - {unit.name})
                    self.variants[(sweep, unit.name)] = float(self.metric(self.model))
        finally:
            self._switch(everything)

    def result(self, unit: _Unit) -> LayerSensitivity:
        entry = LayerSensitivity(unit.name, unit.owned, kind=unit.kind, calls=self.calls[unit.name])
        if unit.name in self.not_tensor:
            entry.skipped = "its output is not a tensor"
            return entry
        if self.calls[unit.name] == 0:
            entry.skipped = "the model's forward did not call it on these inputs"
            return entry
        local, accumulated = self.local[unit.name], self.accumulated[unit.name]
        entry.local_sqnr_db, entry.local_cosine = local.sqnr_db(), local.cosine()
        entry.sqnr_db, entry.cosine = accumulated.sqnr_db(), accumulated.cosine()
        outside, seen = self.clipped[unit.name]
        entry.clipped = outside / seen if seen else None
        for sweep in self.sweeps:
            scores = self.variants.get((sweep, unit.name))
            if isinstance(scores, _OutputScore):
                score, cosine = self._score(scores), scores.cosine()
            else:
                score, cosine = scores, None
            if sweep == "solo":
                entry.solo_score, entry.solo_cosine = score, cosine
            else:
                entry.all_but_score, entry.all_but_cosine = score, cosine
        return entry


def _none_last(value: float | None) -> float:
    """Sort key: None (no noise at all, or not measured) after every number."""
    return math.inf if value is None else value


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.1f}"


def _fmt(value: float | None, spec: str = ".5f") -> str:
    return "-" if value is None else format(value, spec)
