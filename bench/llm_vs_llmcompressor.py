"""lowbit vs llm-compressor on the same model, calibration rows and held-out text.

A Qwen2-shaped causal LM (4 blocks, hidden 512, MLP 1408, 8 heads, vocab 8000, q/k/v biases;
random weights with a few loud norm channels, as trained LLMs have) is saved as a float32
Hugging Face folder with a word-level tokenizer trained on Python's pydoc text. Calibration:
the first 32 rows of 256 tokens of pydoc text, cut by lowbit's own text cutter; the very same
token rows go to llm-compressor's `oneshot` (on CPU). Each quantization runs in a fresh process
(peak RSS = that process's maximum resident memory, model load included; time = the
quantization call). Each checkpoint is then loaded by transformers + compressed-tensors and
compared with the float model on 8 held-out rows of 256 tokens: mean cosine of the logits per
token, and the mean per-token KL divergence float -> quantized (the weights are random, so
perplexity says nothing here; the logits' distance does).

Schemes: W4A16 symmetric int4 group 128 (RTN, RTN with lowbit's MSE clip, GPTQ, AWQ), and W8A8
int8 per-channel weights with SmoothQuant 0.5 and int8 inputs static per-tensor or dynamic
per-token. llm-compressor recipes: QuantizationModifier / GPTQModifier / AWQModifier with
scheme W4A16 (ignore lm_head); SmoothQuantModifier(0.5) + QuantizationModifier W8A8 (dynamic
per-token) or a static per-tensor input config group.

Run in a venv that has both (llm-compressor is never a lowbit dependency):

    /work/venvs/llm-bench/bin/python bench/llm_vs_llmcompressor.py --json /tmp/cmp.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

MODEL = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
SEQ, CALIB, EVAL = 256, 32, 8
VARIANTS = ["rtn", "rtn-mse", "gptq", "awq", "w8a8-static", "w8a8-dynamic"]


def text(pages: slice) -> str:
    import pydoc_data.topics

    return "\n".join(list(pydoc_data.topics.topics.values())[pages])


def build(directory: Path) -> None:
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llm_synthetic_checkpoint import word_tokenizer

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL))
        with torch.no_grad():  # a few loud channels, as in trained models
            for module in model.modules():
                if "norm" in type(module).__name__.lower():
                    module.weight[:8] *= 8.0
        model.save_pretrained(directory)
        word_tokenizer(MODEL["vocab_size"]).save_pretrained(directory)
    (directory / "calib.txt").write_text(text(slice(0, 60)), encoding="utf-8")
    (directory / "eval.txt").write_text(text(slice(60, None)), encoding="utf-8")


def rows(directory: Path, name: str, count: int) -> list[dict[str, torch.Tensor]]:
    from lowbit.torch.llm.calib_text import load_tokenizer
    from lowbit.torch.llm.hf_io import text_batches

    cut = text_batches(load_tokenizer(directory), (directory / name).read_text(), seq_len=SEQ, samples=count)
    return cut.calibration


def run_lowbit(variant: str, model_dir: Path, out: Path) -> None:
    from lowbit.torch.llm import quantize_pretrained, smoothquant_pretrained

    common = dict(calib_text=model_dir / "calib.txt", samples=CALIB, seq_len=SEQ)
    if variant.startswith("w8a8"):
        smoothquant_pretrained(model_dir, out, activations=variant.split("-")[1], alpha=0.5, **common)
    else:
        quantize_pretrained(model_dir, out, algorithm=variant.split("-")[0], group_size=128,
                            rtn_mse=variant == "rtn-mse", low_memory=False, **common)


def run_llmcompressor(variant: str, model_dir: Path, out: Path) -> None:
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    cpu_only_pinning_shim()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = torch.cat([batch["input_ids"] for batch in rows(model_dir, "calib.txt", CALIB)])
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    w4 = dict(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    static_w8a8 = {"group_0": {"targets": ["Linear"],
                               "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                               "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                                     "strategy": "tensor", "dynamic": False}}}
    recipe = {"rtn": [QuantizationModifier(**w4)], "gptq": [GPTQModifier(**w4)], "awq": [AWQModifier(**w4)],
              "w8a8-dynamic": [SmoothQuantModifier(smoothing_strength=0.5),
                               QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
              "w8a8-static": [SmoothQuantModifier(smoothing_strength=0.5),
                              QuantizationModifier(config_groups=static_w8a8, ignore=["lm_head"])]}[variant]
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=SEQ,
            num_calibration_samples=CALIB, shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


def cpu_only_pinning_shim() -> None:
    """Let llm-compressor's AWQ run on a torch without an accelerator.

    AWQModifier._apply_smoothing (llmcompressor 0.14.0.1, modifiers/transform/awq/base.py:507)
    calls `IntermediatesCache.pin_memory` on the cached block inputs before its grid search, so
    that later host-to-device copies can be non-blocking; `Tensor.pin_memory()` raises
    "RuntimeError: Cannot access accelerator device when none is available" on CPU-only torch.
    Pinning moves no values (the tensors stay on the CPU, bit for bit), so on such a torch the
    bench makes it a no-op; nothing else of llm-compressor is touched."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def worker(tool: str, variant: str, model_dir: Path, out: Path) -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    (run_lowbit if tool == "lowbit" else run_llmcompressor)(variant, model_dir, out)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def logits(directory: Path, batches) -> list[torch.Tensor]:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(**batch).logits.float() for batch in batches]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    ref = torch.cat([r.reshape(-1, r.shape[-1]) for r in reference]).double()
    out = torch.cat([c.reshape(-1, c.shape[-1]) for c in candidate]).double()
    cosine = torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean().item()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return cosine, kl


def score_settings(argv: list[str], quantize, digits: int = 5) -> None:
    """The settings drivers (bench/llm_*_settings.py): argv[0] is JSON {name: options}, argv[1] an
    optional model folder (built if missing). For each variant: load the float model in memory,
    `quantize(model, calibration rows, options)`, print token cosine and KL vs fp32 as JSON."""
    torch.set_num_threads(2)
    folder = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="lowbit-settings-")) / "model"
    if not folder.exists():
        build(folder)
    calib, evaluation = rows(folder, "calib.txt", CALIB), rows(folder, "eval.txt", EVAL)
    reference = logits(folder, evaluation)
    import transformers

    for name, options in json.loads(argv[0]).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        started = time.perf_counter()
        quantize(model, calib, options)
        with torch.no_grad():
            cosine, kl = compare(reference, [model(**b).logits.float() for b in evaluation])
        print(json.dumps(dict(variant=name, cosine=round(cosine, digits), kl=round(kl, digits),
                              s=round(time.perf_counter() - started, 1))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--tools", nargs="+", default=["lowbit", "llm-compressor"])
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=4, metavar=("TOOL", "VARIANT", "MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, variant, model_dir, out = args.worker
        worker(tool, variant, Path(model_dir), Path(out))
        return
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="lowbit-vs-llmc-"))
    model_dir = work / "model"
    build(model_dir)
    evaluation = rows(model_dir, "eval.txt", EVAL)
    reference = logits(model_dir, evaluation)
    results = []
    for variant in args.variants:
        for tool in args.tools:
            out = work / f"{tool}-{variant}"
            done = subprocess.run([sys.executable, __file__, "--worker", tool, variant, str(model_dir), str(out)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{tool} {variant} failed:\n{done.stderr[-3000:]}", flush=True)
                continue
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            cosine, kl = compare(reference, logits(out, evaluation))
            results.append(dict(tool=tool, variant=variant, cosine=cosine, kl=kl, **measured))
            print(json.dumps(results[-1]), flush=True)
    print()
    print(f"`{shlex.join(['python', 'bench/llm_vs_llmcompressor.py', *sys.argv[1:]])}`")
    print()
    print("| scheme | tool | token cosine vs fp32 | KL(fp32 ‖ quantized) per token | seconds | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['variant']} | {row['tool']} | {row['cosine']:.5f} | {row['kl']:.5f} | {row['seconds']:.1f} | "
              f"{row['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
