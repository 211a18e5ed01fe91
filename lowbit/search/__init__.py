"""Searches that build, score and save quantized models, on top of `lowbit.onnx.pipeline` (which
builds candidates) and `lowbit.analysis` / `lowbit.onnx.verify` (which measure them).

Modules: `auto` (--mode auto: the fastest of many strategies within an accuracy budget), `budget`
(per-layer int8 -> float/int16 fallback within --max-drop), `budget_weights` (the same for
weight-only int4 -> int8 -> float), `sweep` (per-layer "solo" / "all-but" sweeps of a stored plan).
Nothing below this package imports it (`onnx/quantize.py` reaches `auto` only through its lazy
handler for `AutoConfig`).
"""
