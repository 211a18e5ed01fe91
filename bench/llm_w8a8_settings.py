"""W8A8 dynamic SmoothQuant settings (scale groups, int8 grid) on the Qwen2-shaped model of
llm_vs_llmcompressor.py, in memory. Usage: python bench/llm_w8a8_settings.py '{"name": {"kinds": ["norm"], "full8": false}}'"""
import json, sys, tempfile, time, warnings
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_vs_llmcompressor as B
import lowbit.algorithms.weight_layout as WL
from lowbit.torch.llm.smoothquant import smooth_quantize_w8a8
import transformers

torch.set_num_threads(2)
d = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="lowbit-settings-")) / "model"
if not d.exists():
    B.build(d)
calib = B.rows(d, "calib.txt", B.CALIB)
ev = B.rows(d, "eval.txt", B.EVAL)
ref = B.logits(d, ev)
orig_full = WL.uses_full_grid
for name, opts in json.loads(sys.argv[1]).items():
    full8 = opts.pop("full8", False)
    WL.uses_full_grid = (lambda spec: spec.dtype_info.kind == "int" and spec.dtype_info.signed and spec.symmetric
                         and not spec.narrow_range) if full8 else orig_full
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    t = time.perf_counter()
    opts["kinds"] = tuple(opts.get("kinds", ["norm", "linear"]))
    smooth_quantize_w8a8(m, calib, activations=opts.pop("activations", "dynamic"), **opts)
    with torch.no_grad():
        out = [m(**b).logits.float() for b in ev]
    cos, kl = B.compare(ref, out)
    print(json.dumps(dict(variant=name, cosine=round(cos, 6), kl=round(kl, 6), s=round(time.perf_counter() - t, 1))), flush=True)
