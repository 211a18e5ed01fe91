"""Know what you got: inspect a model (what was done, each node's precision, sizes), benchmark it
on this CPU (with the int8 features that explain the numbers), and measure per-layer sensitivity
of a quantized model against its float original through ONNX Runtime.

Modules: `graph_precision` (read precisions and sizes from an ONNX graph), `inspect` (the report
of `lowbit inspect`), `cpu` (int8 features of this CPU), `feeds` (inputs generated from a model's
declared inputs), `bench` (latency/throughput), `sensitivity` (per-activation SQNR and cosine;
`sensitivity_report` holds its report types and running sums), `torch_sensitivity` (the same, plus
"all but this layer", for a PyTorch model under fake quantization). Nothing here writes a model:
the searches that do (accuracy budget, sweeps, --mode auto) live in `lowbit.search`.
"""
