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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
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
    return (f"loaded {kept} of {layers} blocks with transformers + compressed-tensors ({scheme.num_bits}-bit "
            f"{scheme.strategy}, group {scheme.group_size}); forward pass finite: {finite}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="checkpoint folder (written first when missing)")
    parser.add_argument("--size-gb", type=float, default=25.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--algo", default="rtn", choices=["rtn", "gptq", "awq"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
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
    out = args.model.with_name(args.model.name + f"-{args.algo}")
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "lowbit", "quantize", str(args.model), "-o", str(out), "--mode", "weight-only",
               "--algo", args.algo, "--group-size", "128", "--low-memory", "--json"]
    if args.algo != "rtn":
        text = args.model / "calib.txt"
        if not text.is_file():
            import pydoc_data.topics

            text.write_text("\n".join(pydoc_data.topics.topics.values()))
        command += ["--calib-text", str(text), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    print(f"checkpoint: {size / 1e9:.2f} GB, {layers} blocks, {args.dtype}; load {os.getloadavg()}", flush=True)
    print("$ " + shlex.join(command), flush=True)
    seen: dict[str, float] = {}
    peaks: dict[str, int] = {}
    stop = threading.Event()
    start = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watcher = threading.Thread(target=watch_shards, args=(out.parent, out.name, child.pid, stop, seen, peaks),
                               daemon=True)
    watcher.start()
    stdout, stderr = child.communicate()
    done = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
    wall = time.time() - start
    stop.set()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    times = sorted(seen.values())
    per_block = [b - a for a, b in zip([start] + times, times)][1:layers] if len(times) > 1 else []
    report = {"checkpoint_bytes": size, "blocks": layers, "dtype": args.dtype, "algorithm": args.algo,
              "returncode": done.returncode, "wall_seconds": wall, "peak_rss_bytes": peak,
              "peak_rss_share_of_checkpoint": peak / size, "shards_seen": len(times),
              "median_seconds_per_block": sorted(per_block)[len(per_block) // 2] if per_block else None,
              "load_average_end": os.getloadavg()}
    if done.returncode == 0:
        result = json.loads(done.stdout)
        report.update(written_bytes=sum(p.stat().st_size for p in out.iterdir()),
                      lowbit_block_seconds=result["block_seconds"], lowbit_seconds=result["seconds"])
        report["load_check"] = load_check(out, layers, size)
    else:
        report["stderr"] = done.stderr[-2000:]
    print(json.dumps(report, indent=2), flush=True)
    if args.clean:
        shutil.rmtree(args.model, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
