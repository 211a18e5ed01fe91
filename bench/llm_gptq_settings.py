"""GPTQ settings one to one (act_order, static_groups, true_sequential) on the Qwen2-shaped model of
llm_vs_llmcompressor.py, in memory (logits vs fp32). Usage: python bench/llm_gptq_settings.py '{"name": {options}}'"""
import json, sys, tempfile, time, warnings
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_vs_llmcompressor as B
from lowbit.torch.llm.sequential import quantize_llm
from lowbit.torch.llm.pretrained import weight_only_spec
import transformers

torch.set_num_threads(2)
d = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="lowbit-settings-")) / "model"
if not d.exists():
    B.build(d)
calib = B.rows(d, "calib.txt", B.CALIB)
ev = B.rows(d, "eval.txt", B.EVAL)
ref = B.logits(d, ev)
variants = json.loads(sys.argv[1])
for name, opts in variants.items():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    t = time.perf_counter()
    algo = opts.pop("algorithm", "gptq")
    quantize_llm(m, weight_only_spec(4, 128), algo, calib, **opts)
    with torch.no_grad():
        out = [m(**b).logits.float() for b in ev]
    cos, kl = B.compare(ref, out)
    print(json.dumps(dict(variant=name, cosine=round(cos, 5), kl=round(kl, 5), s=round(time.perf_counter() - t, 1))), flush=True)
