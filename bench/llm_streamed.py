"""Quantize a synthetic LLaMA-shaped checkpoint bigger than memory with `lowbit quantize --low-memory`.

Writes the checkpoint with `llm_synthetic_checkpoint.py` (unless it exists), runs the command in
a child process and records: the child's peak resident memory (ru_maxrss), wall time, seconds
per block (from the shards appearing in the output's temporary folder, so a run stopped early
still reports them), bytes written, and then loads the output with transformers +
compressed-tensors (the whole model when it fits in a third of this machine's memory, else a
copy of its config cut to 2 blocks, which loads those blocks' packed tensors from the same
shards) and runs a forward pass. Delete the big folders afterwards (--clean).

    python bench/llm_streamed.py /work/big/llama-25g --size-gb 25 --dtype float32 --algo rtn --clean
    python bench/llm_streamed.py /work/big/llama-4g --size-gb 4.2 --dtype float32 --hidden 2048 \\
        --intermediate 2816 --heads 16 --kv-heads 16 --algo gptq --samples 16 --seq-len 128 --clean
    python bench/llm_streamed.py /work/big/llama-1g --size-gb 1.2 --dtype float32 --hidden 2048 \\
        --intermediate 2816 --heads 16 --kv-heads 16 --algo smoothquant --mode static --clean
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def resident_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def watch_shards(parent: Path, name: str, pid: int, stop: threading.Event, seen: dict[str, float],
                 peaks: dict[str, int]) -> None:
    """Record when each output shard appears in the run's temporary folder (`.NAME.*.lowbit-tmp`)
    and the child's peak resident memory while each shard was being made (sampled every 0.5 s),
    printing one line per shard so a long run can be followed."""
    peak = 0
    while not stop.wait(0.5):
        peak = max(peak, resident_bytes(pid) or 0)
        for folder in parent.glob(f".{name}.*.lowbit-tmp"):
            for shard in sorted(folder.glob("model-*.safetensors")):
                if shard.name not in seen:
                    seen[shard.name], peaks[shard.name] = time.time(), peak
                    print(f"{time.strftime('%H:%M:%S')} {shard.name}: peak RSS so far {peak / 1e9:.2f} GB, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)


def load_check(out: Path, layers: int, float_bytes: int) -> str:
    import torch
    import transformers

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    kept = layers if float_bytes < memory / 3 else 2  # transformers decompresses to float
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(out, num_hidden_layers=kept)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 5, 9, 200]])).logits
    scheme = model.model.layers[kept - 1].mlp.down_proj.quantization_scheme.weights
    finite = bool(torch.isfinite(logits).all())
    inputs = model.model.layers[kept - 1].mlp.down_proj.quantization_scheme.input_activations
    activations = f", inputs int{inputs.num_bits} {inputs.strategy}" if inputs is not None else ""
    return (f"loaded {kept} of {layers} blocks with transformers + compressed-tensors ({scheme.num_bits}-bit "
            f"{scheme.strategy}, group {scheme.group_size}{activations}); forward pass finite: {finite}")


def llmcompressor_worker(model: Path, out: Path, samples: int, seq_len: int) -> None:
    """llm-compressor's `oneshot` GPTQ W4A16 (group 128, lm_head float) on the CPU, on the very
    token rows lowbit calibrates with; it loads the whole float model first."""
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from lowbit.torch.llm.calib_text import load_tokenizer
    from lowbit.torch.llm.hf_io import text_batches

    start = time.perf_counter()
    cut = text_batches(load_tokenizer(model), (model / "calib.txt").read_text(), seq_len=seq_len, samples=samples)
    ids = torch.cat([batch["input_ids"] for batch in cut.calibration])
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * len(ids)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype="float32")
    oneshot(model=float_model, tokenizer=transformers.AutoTokenizer.from_pretrained(model), dataset=dataset,
            recipe=[GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])], max_seq_length=seq_len,
            num_calibration_samples=len(ids), shuffle_calibration_samples=False)
    float_model.save_pretrained(out, save_compressed=True)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--llmcompressor-worker":
        llmcompressor_worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="checkpoint folder (written first when missing)")
    parser.add_argument("--size-gb", type=float, default=25.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--algo", default="rtn", choices=["rtn", "gptq", "awq", "smoothquant"])
    parser.add_argument("--mode", default="weight-only", choices=["weight-only", "static", "dynamic"],
                        help="static / dynamic: W8A8 (with --algo smoothquant), per-tensor or per-token inputs")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tool", default="lowbit", choices=["lowbit", "llm-compressor"],
                        help="llm-compressor: its oneshot GPTQ W4A16 g128 in memory (bench venv only)")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint and the output afterwards")
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS=str(args.threads), LOWBIT_NO_PROGRESS="1")
    if not (args.model / "config.json").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "llm_synthetic_checkpoint.py"), str(args.model),
                        "--size-gb", str(args.size_gb), "--dtype", args.dtype, "--hidden", str(args.hidden),
                        "--intermediate", str(args.intermediate), "--heads", str(args.heads),
                        "--kv-heads", str(args.kv_heads)], check=True, env=env)
        print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)
    config = json.loads((args.model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    size = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    out = args.model.with_name(args.model.name + f"-{args.algo}" + ("" if args.mode == "weight-only" else f"-{args.mode}"))
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "lowbit", "quantize", str(args.model), "-o", str(out), "--mode", args.mode,
               "--algo", args.algo, "--low-memory", "--json"]
    if args.mode == "weight-only":
        command += ["--group-size", "128"]
    if args.algo != "rtn":
        text = args.model / "calib.txt"
        if not text.is_file():
            import pydoc_data.topics

            text.write_text("\n".join(pydoc_data.topics.topics.values()))
        command += ["--calib-text", str(text), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    if args.tool == "llm-compressor":
        if args.algo != "gptq":
            parser.error("--tool llm-compressor runs GPTQ only")
        out = out.with_name(out.name + "-llmcompressor")
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, __file__, "--llmcompressor-worker", str(args.model), str(out), str(args.samples),
                   str(args.seq_len)]
    print(f"checkpoint: {size / 1e9:.2f} GB, {layers} blocks, {args.dtype}; load {os.getloadavg()}", flush=True)
    print("$ " + shlex.join(command), flush=True)
    seen: dict[str, float] = {}
    peaks: dict[str, int] = {}
    stop = threading.Event()
    start = time.time()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env)
        watcher = threading.Thread(target=watch_shards, args=(out.parent, out.name, child.pid, stop, seen, peaks),
                                   daemon=True)
        watcher.start()
        # wait4: this child's own peak (RUSAGE_CHILDREN would include the checkpoint generator's)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        done = subprocess.CompletedProcess(command, child.returncode, stdout.read(), stderr.read())
    wall = time.time() - start
    stop.set()
    peak = usage.ru_maxrss * 1024
    times = sorted(seen.values())
    per_block = [b - a for a, b in zip([start] + times, times)][1:layers] if len(times) > 1 else []
    report = {"checkpoint_bytes": size, "blocks": layers, "dtype": args.dtype, "algorithm": args.algo,
              "returncode": done.returncode, "wall_seconds": wall, "peak_rss_bytes": peak,
              "peak_rss_share_of_checkpoint": peak / size, "shards_seen": len(times),
              "median_seconds_per_block": sorted(per_block)[len(per_block) // 2] if per_block else None,
              "load_average_end": os.getloadavg()}
    if done.returncode == 0:
        result = json.loads(done.stdout.strip().splitlines()[-1] if args.tool == "llm-compressor" else done.stdout)
        report.update(written_bytes=sum(p.stat().st_size for p in out.iterdir()),
                      lowbit_block_seconds=result.get("block_seconds"), lowbit_seconds=result["seconds"])
        report["load_check"] = load_check(out, layers, size)
    else:
        report["stderr"] = done.stderr[-2000:]
    print(json.dumps(report, indent=2), flush=True)
    if args.clean:
        shutil.rmtree(args.model, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
