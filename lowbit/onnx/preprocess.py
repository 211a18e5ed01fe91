"""Prepare a float ONNX graph for quantization.

Three steps, each done by the reference implementation rather than re-invented:
1. shape inference: ONNX Runtime's symbolic shape inference (it understands transformer exports
   with dynamic batch/sequence axes), falling back to onnx.shape_inference when it gives up;
2. ONNX Runtime's offline optimizer at the BASIC level: constant folding, Conv+BatchNorm fusion,
   redundant-node removal. BASIC keeps standard ONNX ops only (EXTENDED would emit com.microsoft
   fused ops that quantizers and other runtimes do not understand), then the constant per-channel
   Mul/Add after a Conv that ORT's fusions skip folded into it (`fold_affine`, exact in float);
3. shape inference again, so every intermediate tensor carries a type and shape where known.

Limit: the optimizer session is built from in-memory bytes, so models over 2 GB are not handled
yet (they would need ORT's external-initializer options).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import onnx
import onnxruntime as ort

from lowbit.onnx.fold_affine import fold_conv_affine
from lowbit.onnx.subgraphs import hoist_shared_initializers

log = logging.getLogger(__name__)

STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}


def preprocess(model: onnx.ModelProto, *, symbolic_shapes: bool = True, optimize: bool = True,
               copy: bool = True) -> onnx.ModelProto:
    """Return a shape-annotated and optimized version of `model`.

    copy=True (default): `model` is left untouched. copy=False: the caller hands `model` over and
    will not use it again, so it is changed in place instead of copied (one model less in memory)."""
    result = model
    if copy:
        result = onnx.ModelProto()
        result.CopyFrom(model)
    _drop_initializers_from_inputs(result)
    result = infer_shapes(result, symbolic=symbolic_shapes)
    if optimize:
        result = optimize_basic(result)
        fold_conv_affine(result)
        # The optimizer copies an outer constant into each If/Loop body reading it: one copy again.
        hoist_shared_initializers(result.graph)
        result = infer_shapes(result, symbolic=symbolic_shapes)
    return result


def infer_shapes(model: onnx.ModelProto, *, symbolic: bool = True) -> onnx.ModelProto:
    """Annotate intermediate tensors with types/shapes; symbolic dims where the graph has them."""
    if symbolic:
        try:
            with _scratch_working_dir():
                inferred = _symbolic_shapes(model)
            if inferred is not None:
                return inferred
        except Exception as exc:  # its failures are diverse (sympy, unsupported ops); fall back, say why
            log.info("symbolic shape inference failed (%s); using onnx.shape_inference", exc)
    # Clear stale value_info first so onnx's inference cannot clash with an earlier pass.
    cleared = onnx.ModelProto()
    cleared.CopyFrom(model)
    del cleared.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(cleared, check_type=False, strict_mode=False)


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference (`SymbolicShapeInference.infer_shapes`, same steps),
    minus its sympy simplification of Resize output dims: on a PaddleOCR detector with dynamic
    height/width (six Resizes in an FPN) simplifying the nested floor() expressions took 200 s per
    pass; without it 2.6 s, the dims the same values in unsimplified form. None when it gives up."""
    import sympy

    ort_inference = ort_symbolic_shape_infer()
    get_opset = ort_inference.get_opset

    class UnsimplifiedResize(ort_inference.SymbolicShapeInference):
        def _infer_Resize(self, node):  # noqa: N802 (ORT's dispatch name)
            simplify = sympy.simplify
            sympy.simplify = _unsimplified
            try:
                super()._infer_Resize(node)
            finally:
                sympy.simplify = simplify

    opset = get_opset(model)
    if not opset or opset < 7:
        return None
    inference = UnsimplifiedResize(2**31 - 1, True, False, 0)
    with _memoized_sympy_str():
        inference._preprocess(model)
        done = False
        while inference.run_:
            done = inference._infer_impl()
        inference._update_output_from_vi()
    return inference.out_mp_ if done else None


@contextlib.contextmanager
def _memoized_sympy_str() -> Iterator[None]:
    """Print each sympy expression once: the inference names every computed dim by its printed
    expression, node after node, and printing the same few dims (h/4 of a 736x992 detector, nested
    through its Resizes) again and again was 70% of its time (0.6 s a pass)."""
    import sympy

    printed: dict = {}
    plain = sympy.Basic.__str__
    own = sympy.Basic.__dict__.get("__str__")  # None where Basic inherits it (sympy's Printable)

    def memoized(expression) -> str:
        text = printed.get(expression)
        if text is None:
            text = printed[expression] = plain(expression)
        return text

    sympy.Basic.__str__ = memoized
    try:
        yield
    finally:
        if own is None:
            del sympy.Basic.__str__
        else:
            sympy.Basic.__str__ = own


def ort_symbolic_shape_infer() -> ModuleType:
    """ONNX Runtime's `onnxruntime.tools.symbolic_shape_infer`, a self-contained module, loaded from
    its file: importing it by name first runs `onnxruntime/tools/__init__.py`, which imports torch
    whenever torch is installed (1.5-2.5 s of every `lowbit quantize`, for helpers lowbit never uses)."""
    name = "onnxruntime.tools.symbolic_shape_infer"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(ort.__file__).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # an ONNX Runtime laid out otherwise: the ordinary import
        return importlib.import_module(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _unsimplified(expression, *args, **kwargs):
    return expression


@contextlib.contextmanager
def _scratch_working_dir() -> Iterator[None]:
    """Run inside a throw-away folder: when ORT's symbolic shape inference gives up it dumps
    'sym_shape_infer_temp.onnx' plus external-data files into the current directory, which
    would litter the user's folder."""
    with tempfile.TemporaryDirectory(prefix="lowbit-shapes-") as tmp, contextlib.chdir(tmp):
        yield


def optimize_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run ONNX Runtime's BASIC graph optimizations offline and return the optimized model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="lowbit-opt-") as tmp:
        target = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(target))
    # Contrib ops the input already had (an ORT-fused transformer) are fine; new ones are not.
    present = {n.op_type + "@" + n.domain for n in model.graph.node}
    foreign = sorted({n.op_type + "@" + n.domain for n in optimized.graph.node
                      if n.domain not in STANDARD_DOMAINS} - present)
    if foreign:
        raise RuntimeError(f"ONNX Runtime's BASIC optimizer produced non-standard ops {foreign}")
    # ORT declares every domain it knows; keep the ones the graph uses or the input declared.
    used = {n.domain for n in optimized.graph.node} | {o.domain for o in model.opset_import}
    kept = [o for o in optimized.opset_import if o.domain in used]
    del optimized.opset_import[:]
    optimized.opset_import.extend(kept)
    # Shapes recorded before fusion may name tensors that are gone; the next inference pass redoes them.
    del optimized.graph.value_info[:]
    # The optimizer drops user metadata; keep the producer's record of what the model is.
    if not optimized.metadata_props and model.metadata_props:
        optimized.metadata_props.extend(model.metadata_props)
    return optimized


def _drop_initializers_from_inputs(model: onnx.ModelProto) -> None:
    """Old exporters list weights as graph inputs, which blocks constant folding (they could be fed)."""
    if model.ir_version < 4:
        return  # before IR 4, initializers had to be listed as inputs
    weights = {init.name for init in model.graph.initializer}
    kept = [inp for inp in model.graph.input if inp.name not in weights]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)
