"""Decide, from the op registry, which tensors of an ONNX graph get quantized and how.

Static planning runs in two steps around calibration:

1. `StaticPlanner.candidates()` lists every activation that *might* get a Q/DQ pair (all float
   inputs and outputs of quantizable nodes), so calibration observes them all in one pass;
2. `StaticPlanner.build(stats)` decides the final set, now knowing which tensors hold -inf or
   mask-sized values (their consumers stay float), and fills scales and zero points.

The decision rules, per node kind (see `registry`): compute and elementwise nodes want their
activation inputs and output quantized; Relu/Clip right after such a node fold into it (only the
activation's output is quantized); shape ops pass their input's quantization through unchanged.
"""

from __future__ import annotations


import numpy as np
import onnx

from lowbit.errors import LowbitError
from lowbit.numerics import QParams, choose_qparams, qparams_for
from lowbit.onnx.collect import ActivationStats
from lowbit.onnx.graph_index import GraphIndex
from lowbit.onnx.recurrent import int8_lstm_ok
from lowbit.onnx.registry import OpRule, node_matches, rule_for, weight_axis
from lowbit.plan import PlanEntry, QuantPlan
from lowbit.spec import PER_TENSOR, QuantSpec, per_channel

# uint8 activations with int8 weights is the U8S8 flavour ONNX Runtime's x86 kernels run natively
# (with VNNI there is no 16-bit saturation; without, U8S8 is still the fast path and the weight
# range is what matters). ONNX Runtime would convert int8 activations to uint8 anyway.
ACTIVATION_SPEC = QuantSpec("uint8", symmetric=False)
WEIGHT_SPEC = QuantSpec("int8", symmetric=True)
DYNAMIC_ACTIVATION_SPEC = QuantSpec("uint8", symmetric=False, dynamic=True)


def node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed or twice-named node (control-flow bodies included) a unique name, so
    plans and --exclude can refer to it."""
    seen: set[str] = set()
    counter = 0
    for node in all_nodes(model.graph):
        if not node.name or node.name in seen:
            candidate = node.name or f"{node.op_type}_{counter}"
            while candidate in seen:
                candidate += "_"
            node.name = candidate
        seen.add(node.name)
        counter += 1


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from all_nodes(sub)


def check_exclude(model: onnx.ModelProto, exclude: set[str]) -> None:
    """Every --exclude pattern must name a node, an op type or a tensor of the model."""
    known: set[str] = set()
    for node in all_nodes(model.graph):
        known |= {node.name, node.op_type, *node.output}
    unknown = sorted(set(exclude) - known)
    if unknown:
        raise LowbitError(f"--exclude names {unknown} match no node name, op type or tensor of the model; "
                          "check the spelling (node names are listed in the plan)")


def classify_nodes(index: GraphIndex, exclude: set[str]) -> tuple[dict[str, OpRule], dict[str, str], list[str]]:
    """Rules of the nodes that may be quantized, float nodes with reasons, unsupported op types."""
    active: dict[str, OpRule] = {}
    float_nodes: dict[str, str] = {}
    unsupported: set[str] = set()
    for node in index.model.graph.node:
        rule = rule_for(node)
        if rule is None:
            unsupported.add(node.op_type if not node.domain else f"{node.domain}.{node.op_type}")
            float_nodes[node.name] = f"unsupported op {node.op_type}: left float"
        elif node_matches(node, exclude):
            float_nodes[node.name] = "excluded by the user"
        elif rule.kind == "float":
            float_nodes[node.name] = rule.reason
        elif rule.kind == "shape" or not any(index.is_float(o) for o in node.output):
            continue  # no float math (shape arithmetic on int64 tensors, ...)
        elif rule.kind == "compute" and not _compute_ok(node, rule, index):
            float_nodes[node.name] = "weight is not a constant 2-D+ tensor"
        elif rule.kind == "weights" and not (int8_lstm_ok(node) and all(
                index.is_constant(n) for n in node.input[1:3])):
            float_nodes[node.name] = "needs constant W and R and the default layout for int8 weights"
        else:
            active[node.name] = rule
    return active, float_nodes, sorted(unsupported)


def prune_isolated_elementwise(index: GraphIndex, active: dict[str, OpRule]) -> dict[str, str]:
    """Keep elementwise nodes float when an activation input comes from float math, or when no
    int8 node reads their output.

    An int8 Add/Mul only pays off between int8 kernels (a CNN's residual Add between Convs). In a
    transformer the Adds and Muls sit between MatMuls (float outputs), LayerNorm, Softmax and GELU:
    quantizing them adds rounding error on the outlier-heavy residual stream without any int8
    kernel to gain, which is what collapses ONNX Runtime's static BERT. Likewise an elementwise
    node whose output goes only to float nodes or graph outputs (a decomposed HardSwish's
    `x * clip(x + 3, 0, 6)` before its float `/ 6`, a final Sigmoid) would round its output once
    more for nobody's int8 kernel. Runs to a fixed point, since a pruned node makes its elementwise
    neighbours float too. Returns node -> reason."""
    pruned: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for node in index.model.graph.node:
            rule = active.get(node.name)
            if rule is None or rule.kind != "elementwise":
                continue
            if node.output and not any(_int8_reader(index, active, out) for out in node.output):
                active.pop(node.name)
                pruned[node.name] = "no int8 node reads its output; int8 here would only add error"
                changed = True
                continue
            for name in node.input:
                if not name or index.is_constant(name) or not index.is_float(name):
                    continue
                source = _int8_source(index, active, name)
                if source is not None:
                    active.pop(node.name)
                    pruned[node.name] = f"input {name!r} comes from {source}; int8 here would only add error"
                    changed = True
                    break
    return pruned


def _int8_reader(index: GraphIndex, active: dict[str, OpRule], name: str, depth: int = 0) -> bool:
    """Whether an int8 compute or elementwise node reads `name` (through shape ops and Relu/Clip)."""
    for consumer in index.consumers.get(name, []):
        rule = active.get(consumer.name)
        if rule is None:
            continue
        if rule.kind in ("compute", "elementwise"):
            return True
        if rule.kind in ("passthrough", "fold") and depth < 64 and consumer.input and consumer.input[0] == name \
                and any(_int8_reader(index, active, out, depth + 1) for out in consumer.output):
            return True
    return False


def _int8_source(index: GraphIndex, active: dict[str, OpRule], name: str) -> str | None:
    """None when `name` is int8-produced (through shape ops); otherwise what makes it float."""
    seen = 0
    while seen < 10_000:
        producer = index.producer.get(name)
        if producer is None:
            return None  # a graph input: quantized where it enters
        rule = active.get(producer.name)
        if rule is None:
            return f"float node {producer.name!r} ({producer.op_type})"
        if rule.kind in ("passthrough", "fold"):
            name, seen = producer.input[0], seen + 1
            continue
        if rule.float_output or rule.kind == "weights":
            return f"{producer.op_type} {producer.name!r} (float output)"
        return None
    return None


# Parts of one tensor whose observed ranges are this far apart cannot share an int8 scale: the
# narrow part gets fewer than 256 / ratio levels (a detector's class probabilities, 0-1, next to
# box coordinates in pixels, 0-320: at most one level). Such a Concat stays float (each input keeps
# its own scale) and so does the producer of a tensor whose slices differ that much.
MIXED_RANGE_RATIO = 16.0


def mixed_range_nodes(index: GraphIndex, active: dict[str, OpRule], stats: ActivationStats) -> dict[str, str]:
    """Active nodes to keep float because one int8 scale would cover parts with far-apart ranges:
    Concats of such inputs, and producers of a tensor whose slices (Slice/Split/Gather) are such parts."""
    def width(name: str) -> float | None:
        if name not in stats.ranges:
            return None
        lo, hi = stats.ranges[name]
        return float(np.max(hi) - np.min(lo))

    def spread(names: list[str]) -> tuple[float, str, str] | None:
        widths = {n: w for n in names if (w := width(n)) is not None and w > 0}
        if len(widths) < 2:
            return None
        wide, narrow = max(widths, key=widths.get), min(widths, key=widths.get)
        return widths[wide] / widths[narrow], wide, narrow

    found: dict[str, str] = {}
    for node in index.model.graph.node:
        rule = active.get(node.name)
        if rule is None:
            continue
        if node.op_type == "Concat":
            parts = [n for n in node.input if n and not index.is_constant(n)]
            what = "inputs"
        elif rule.kind in ("compute", "elementwise") and node.output:
            parts = _slices_of(index, node.output[0])
            what = "output's slices"
        else:
            continue
        measured = spread(parts)
        if measured is not None and measured[0] > MIXED_RANGE_RATIO:
            ratio, wide, narrow = measured
            found[node.name] = (f"its {what} span ranges {ratio:,.0f}x apart ({wide!r} vs {narrow!r}); one int8 "
                                "scale would flatten the narrow one, kept float so each part keeps its own scale")
    return found


def _slices_of(index: GraphIndex, name: str, depth: int = 0) -> list[str]:
    """Outputs of the Slice/Split/Gather nodes reading `name`, also through reshapes/transposes
    (which share its quantization)."""
    found: list[str] = []
    for consumer in index.consumers.get(name, []):
        rule = rule_for(consumer)
        if rule is not None and rule.slices:
            found += [o for o in consumer.output if o]
        elif rule is not None and rule.kind == "passthrough" and depth < 8:
            found += _slices_of(index, consumer.output[0], depth + 1)
    return found


def _compute_ok(node: onnx.NodeProto, rule: OpRule, index: GraphIndex) -> bool:
    if rule.activation_weight:
        return True  # two activations are fine (QLinearMatMul)
    weight = node.input[rule.weight_input] if len(node.input) > rule.weight_input else ""
    return index.is_constant(weight) and len(index.initializers[weight].dims) >= 2


# Headroom for int32 biases: their scale is input scale x weight scale, so a channel whose weights
# are (nearly) zero while its bias is not (a pruned or dead channel: PP-OCRv4 has dozens, weights
# 1e-30 and biases near 1) gets a scale so small that the bias saturates int32 and dequantizes to
# about 0: the channel's constant output is lost. Such a channel's weight scale is raised until the
# bias fits with this margin (its weights, far below one step, round to 0 either way).
INT32_BIAS_LIMIT = 2.0**30


def widen_for_int32_bias(weight: PlanEntry, bias: np.ndarray, activation: QParams) -> None:
    """Raise `weight`'s scale where `bias` (one value per output channel) would not fit int32 at
    scale = activation scale x weight scale; in place. Only symmetric weight grids (zero point 0)."""
    scale = np.asarray(weight.qparams.scale, np.float64)
    act_scale = float(np.max(np.asarray(activation.scale, np.float64)))
    needed = np.abs(np.asarray(bias, np.float64)).reshape(-1) / (act_scale * INT32_BIAS_LIMIT)
    if scale.ndim == 0 or scale.size == 1:
        needed = needed.max(initial=0.0)
    elif needed.size != scale.size:
        return
    else:
        needed = needed.reshape(scale.shape)
    if not np.any(needed > scale) or np.any(np.asarray(weight.qparams.zero_point) != 0):
        return
    widened = np.maximum(scale, needed).astype(np.float32)
    weight.qparams = QParams(weight.qparams.spec, widened.reshape(np.shape(weight.qparams.scale)),
                             weight.qparams.zero_point)
    weight.reason = (weight.reason + "; " if weight.reason else "") + \
        "scale raised on near-zero channels so their int32 bias fits"


class StaticPlanner:
    """Static int8: calibrated activations (uint8), per-channel int8 weights, int32 biases."""

    def __init__(self, model: onnx.ModelProto, *, per_channel_weights: bool = True,
                 exclude: tuple[str, ...] | list[str] = ()) -> None:
        self.model = model
        self.index = GraphIndex.of(model)
        self.per_channel = per_channel_weights
        self.exclude = set(exclude)
        check_exclude(model, self.exclude)
        self.active, self.float_nodes, self.unsupported = classify_nodes(self.index, self.exclude)
        self.float_nodes.update(prune_isolated_elementwise(self.index, self.active))

    # ------------------------------------------------------------------ step 1

    def candidates(self) -> list[str]:
        """Every activation tensor a quantizable node reads or writes (calibrate them all)."""
        names: list[str] = []
        for node in self.model.graph.node:
            if node.name not in self.active or self.active[node.name].kind == "weights":
                continue
            for name in list(node.input) + list(node.output):
                if name and not self.index.is_constant(name) and self.index.is_float(name):
                    names.append(name)
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------ step 2

    def build(self, stats: ActivationStats) -> QuantPlan:
        tainted = stats.mask_like | stats.non_float
        active = dict(self.active)
        float_nodes = dict(self.float_nodes)
        mixed = mixed_range_nodes(self.index, active, stats)
        if mixed:
            for name, reason in mixed.items():
                active.pop(name)
                float_nodes[name] = reason
            float_nodes.update(prune_isolated_elementwise(self.index, active))
        while True:
            wanted, shares, weights, constants = self._decide(active)
            unobserved = {t for t in wanted if t not in stats.ranges and t not in shares}
            blocked = self._blocked_nodes(active, wanted, tainted | unobserved, stats)
            if not blocked:
                break
            for name, reason in blocked.items():
                active.pop(name)
                float_nodes[name] = reason
        plan = QuantPlan("static", float_nodes=float_nodes, unsupported_ops=self.unsupported)
        act_qparams: dict[str, QParams] = {}
        for tensor in self._topological(wanted):
            source = shares.get(tensor)
            if source is not None and source in act_qparams:
                qp = act_qparams[source]
            else:
                lo, hi = stats.ranges[tensor]
                qp = choose_qparams(np.asarray(lo, np.float32), np.asarray(hi, np.float32), ACTIVATION_SPEC)
                source = None
            act_qparams[tensor] = qp
            entry = PlanEntry(tensor, "activation", spec=ACTIVATION_SPEC, qparams=qp, shares=source,
                              nodes=[n.name for n in self.index.consumers.get(tensor, [])])
            if source is None:
                entry.range = tuple(np.asarray(v, np.float32).tolist() for v in stats.ranges[tensor])
            plan.add(entry)
        self._add_weights(plan, weights, constants, act_qparams)
        for tensor in sorted(tainted & set(self.candidates())):
            why = "holds -inf or mask-sized values (|x| >= 1e4)" if tensor in stats.mask_like else "not float"
            plan.add(PlanEntry(tensor, "activation", status="float", reason=why,
                               nodes=[n.name for n in self.index.consumers.get(tensor, [])]))
        return plan

    def _decide(self, active: dict[str, OpRule]):
        """(wanted activations, shared-parameter map, weight uses, constant activation uses)."""
        index = self.index
        wanted: set[str] = set()
        weights: dict[str, list[onnx.NodeProto]] = {}  # initializer -> quantized consumers
        constants: dict[str, list[onnx.NodeProto]] = {}  # constant inputs of elementwise ops
        for node in self.model.graph.node:
            rule = active.get(node.name)
            if rule is not None and rule.kind == "weights":  # int8 weights only, activations float
                for i in (rule.weight_input, *rule.more_weights):
                    name = node.input[i] if len(node.input) > i else ""
                    if index.is_constant(name) and index.is_float(name):
                        weights.setdefault(name, []).append(node)
                continue
            if rule is None or rule.kind not in ("compute", "elementwise"):
                continue
            for i, name in enumerate(node.input):
                if not name or not index.is_float(name):
                    continue
                if rule.kind == "compute":
                    if i == rule.weight_input and index.is_constant(name):
                        weights.setdefault(name, []).append(node)
                    elif i in rule.unit_inputs():
                        wanted.add(name)
                elif index.is_constant(name):
                    constants.setdefault(name, []).append(node)
                else:
                    wanted.add(name)
            out = node.output[0]
            # MatMul/Gemm with a float output still run as int8 kernels (MatMulIntegerToFloat, QGemm
            # without y_scale), so their output is quantized only when an int8 consumer reads it.
            float_output_fuses = rule.float_output and (
                out in index.graph_outputs or not any(c.name in active for c in index.consumers.get(out, [])))
            if not float_output_fuses and index.is_float(out):
                wanted.add(out)
        # Relu / Clip right after a quantized node: quantize only the activation's output.
        for node in self.model.graph.node:
            rule = active.get(node.name)
            if rule is None or rule.kind != "fold":
                continue
            source = node.input[0]
            producer = index.producer.get(source)
            if (producer is not None and producer.name in active
                    and active[producer.name].kind in ("compute", "elementwise")
                    and len(index.consumers.get(source, [])) == 1 and source not in index.graph_outputs
                    and all(index.is_constant(n) for n in node.input[1:] if n)):
                wanted.discard(source)
                wanted.add(node.output[0])
            elif source in wanted:
                wanted.add(node.output[0])
        # Shape ops, in graph (topological) order: the output reuses the input's parameters.
        shares: dict[str, str] = {}
        for node in self.model.graph.node:
            rule = active.get(node.name)
            if rule is None or rule.kind != "passthrough":
                continue
            source = node.input[0]
            if index.is_constant(source):
                continue  # an embedding table: handled as a weight below
            if source in wanted:
                for out in node.output:
                    if index.is_float(out):
                        wanted.add(out)
                        shares[out] = shares.get(source, source)
        for node in self.model.graph.node:  # a lookup (Gather) in a constant table: int8 embedding
            rule = active.get(node.name)
            if rule is not None and rule.is_lookup():
                table = node.input[rule.weight_input]
                if index.is_constant(table) and index.is_float(table):
                    weights.setdefault(table, []).append(node)
        return wanted, shares, weights, constants

    def _blocked_nodes(self, active, wanted, tainted, stats) -> dict[str, str]:
        """Nodes whose quantized inputs/outputs cannot be quantized (mask values, non-float)."""
        blocked = {}
        for node in self.model.graph.node:
            if node.name not in active:
                continue
            for name in list(node.input) + list(node.output):
                if name in tainted and (name in wanted or name in node.output):
                    what = "-inf or mask-sized values" if name in stats.mask_like else "a non-float or unobserved value"
                    blocked[node.name] = f"tensor {name!r} holds {what}; kept float"
                    break
        return blocked

    def _topological(self, wanted: set[str]) -> list[str]:
        order = [i.name for i in self.model.graph.input if i.name in wanted]
        for node in self.model.graph.node:
            order.extend(o for o in node.output if o in wanted)
        return order

    def _add_weights(self, plan: QuantPlan, weights, constants, act_qparams) -> None:
        index = self.index
        for name, nodes in weights.items():
            values = index.constant(name)
            spec = self._weight_spec(nodes[0], values)
            weight_entry = PlanEntry(name, "weight", spec=spec, qparams=qparams_for(values, spec, name),
                                     nodes=[n.name for n in nodes])
            plan.add(weight_entry)
            for consumer in nodes:
                rule = self.active_rule(consumer)
                bias_at = rule.bias_input if rule else None
                if bias_at is None or len(consumer.input) <= bias_at or not consumer.input[bias_at]:
                    continue
                bias = consumer.input[bias_at]
                act = consumer.input[0]
                if index.is_constant(bias) and act in act_qparams and self._bias_fits(consumer, spec, values):
                    widen_for_int32_bias(weight_entry, index.constant(bias), act_qparams[act])
                    plan.add(PlanEntry(bias, "bias", nodes=[consumer.name], scale_of=[act, name],
                                       reason="int32, scale = input scale x weight scale"))
        for name, nodes in constants.items():
            values = index.constant(name).astype(np.float32)
            plan.add(PlanEntry(name, "weight", spec=ACTIVATION_SPEC,
                               qparams=qparams_for(values, ACTIVATION_SPEC, name),
                               nodes=[n.name for n in nodes],
                               reason="constant input of an elementwise op, on the activation grid"))

    def active_rule(self, node: onnx.NodeProto) -> OpRule | None:
        return rule_for(node)

    def _weight_spec(self, node: onnx.NodeProto, values: np.ndarray) -> QuantSpec:
        rule = rule_for(node)
        if not self.per_channel or not rule.channel_scales(node, values.ndim):
            return WEIGHT_SPEC
        return QuantSpec("int8", granularity=per_channel(weight_axis(node, values.ndim)))

    @staticmethod
    def _bias_fits(node: onnx.NodeProto, spec: QuantSpec, weight: np.ndarray) -> bool:
        """Gemm with transB=0 has a per-column weight axis 1 that matches the bias; all fine."""
        return spec.granularity.kind in ("tensor", "channel")


# The accuracy budget's intermediate step between int8 and float: 16-bit symmetric activations and
# weights. Standard QuantizeLinear/DequantizeLinear take int16 from opset 21 on; ONNX Runtime's CPU
# kernels have no int16 GEMM/conv, so such a layer runs float math between exact 16-bit roundings.
INT16_OPSET = 21
INT16_ACTIVATION_SPEC = QuantSpec("int16", symmetric=True)


def widen_to_int16(plan: QuantPlan, model: onnx.ModelProto, layers: set[str]) -> None:
    """Move the weighted `layers` of a static int8 plan to 16 bits, in place: their weights (same
    granularity), and every activation they read or write unless an int8 compute layer also reads it
    (that one keeps its int8 kernel). Activations sharing parameters through shape ops move together.
    Their biases stay float: int32 on the product of two 16-bit scales would saturate. The model must
    be at opset >= INT16_OPSET."""
    if not layers:
        return
    index = GraphIndex.of(model)
    nodes = {n.name: n for n in model.graph.node}
    for entry in plan.quantized("weight"):
        if entry.spec.dtype == "int8" and entry.nodes and set(entry.nodes) <= layers:
            spec = QuantSpec("int16", symmetric=True, granularity=entry.spec.granularity)
            entry.spec, entry.qparams = spec, qparams_for(index.constant(entry.tensor), spec, entry.tensor)
    for entry in plan.quantized("bias"):
        if set(entry.nodes) <= layers:
            entry.status, entry.reason = "float", "float bias of an int16 layer"
    touched = {t for name in layers if name in nodes for t in _layer_tensors(index, nodes[name])}
    groups: dict[str, list[PlanEntry]] = {}
    for entry in plan.quantized("activation"):
        groups.setdefault(entry.shares or entry.tensor, []).append(entry)
    for source, members in groups.items():
        tensors = {e.tensor for e in members}
        int8_readers = [c for t in tensors for c in index.consumers.get(t, [])
                        if c.name not in layers and c.name not in plan.float_nodes
                        and (rule_for(c) is not None and rule_for(c).kind == "compute")]
        if not tensors & touched or int8_readers:
            continue
        head = next(e for e in members if e.range is not None)  # the source: sharers carry no range
        lo, hi = (np.asarray(v, np.float32) for v in head.range)
        qparams = choose_qparams(lo, hi, INT16_ACTIVATION_SPEC)
        for entry in members:
            entry.spec, entry.qparams = INT16_ACTIVATION_SPEC, qparams


def _layer_tensors(index: GraphIndex, node: onnx.NodeProto) -> set[str]:
    """A layer's activation inputs and outputs, plus the output of a Relu/Clip folded into it."""
    tensors = {t for t in [*node.input, *node.output] if t and not index.is_constant(t)}
    for out in node.output:
        readers = index.consumers.get(out, [])
        if len(readers) == 1 and rule_for(readers[0]) is not None and rule_for(readers[0]).kind == "fold":
            tensors.update(readers[0].output)
    return tensors


__all__ = ["ACTIVATION_SPEC", "DYNAMIC_ACTIVATION_SPEC", "INT16_ACTIVATION_SPEC", "INT16_OPSET", "WEIGHT_SPEC", "GraphIndex", "StaticPlanner",
           "check_exclude", "classify_nodes", "node_names", "widen_to_int16", "PER_TENSOR"]
