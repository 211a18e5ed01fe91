"""ONNX backend: load and validate models, pre-process graphs, collect activation statistics
through ONNX Runtime, write QDQ / dynamic / fp16 models and verify them on the runtime.

The entry point is `lowbit.onnx.quantize.quantize_onnx(model, out, config)` with a config of
`lowbit.onnx.config`; the static sequence is `lowbit.onnx.pipeline.StaticPipeline` and its rewrite
passes are the modules of `lowbit.onnx.passes`. See docs/architecture.md."""
