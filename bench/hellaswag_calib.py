"""HellaSwag by part (items 0-399: ActivityNet; 4000-4399: WikiHow) for a 30% SmolLM2 (the demo setting with
32 x 2048 calibration) calibrated on different text. Seventh-session experiment, run as it stands:

    python bench/hellaswag_calib.py wiki|generated|instr-mixed   # appends a line to runs/hs_domain.jsonl

instr-mixed needs runs/instr_calib_32x2048.pt from `python bench/instr_calib.py runs/instr_calib_32x2048.pt`.
"""

import json
import sys
import time
from pathlib import Path

import torch
from modegpt_rt.compressor.compress import CompressOptions, compress

import modegpt_rt
from modegpt_rt import data, zeroshot

torch.set_num_threads(2)
calib_kind = sys.argv[1]
docs = zeroshot.load_task("hellaswag")
parts = {"anet_0_400": docs[0:400], "wikihow_4000_4400": docs[4000:4400]}
model = modegpt_rt.load(None, backend="torch")
t0 = time.time()
wiki = data.calibration_windows(data.tokenize(model.tokenizer, data.read_text("wikitext2", "valid")), 32, 2048, 0)
if calib_kind == "wiki":
    calib = wiki
elif calib_kind == "generated":  # sampled once, then reused from runs/
    gen_path = Path("runs/gen_calib_32x2048.pt")
    if gen_path.exists():
        calib = torch.load(gen_path)
    else:
        calib = data.generated_calibration(model, 32, 2048, 0, progress=False)
        torch.save(calib, gen_path)
elif calib_kind == "instr-mixed":
    instr = torch.load("runs/instr_calib_32x2048.pt")
    calib = torch.cat([wiki[:16], instr[:16]])[torch.randperm(32, generator=torch.Generator().manual_seed(0))]
else:
    raise SystemExit(f"unknown calibration {calib_kind!r}: choose wiki, generated or instr-mixed")
t_cal = time.time() - t0
opts = CompressOptions(rate=0.3, max_layer_sparsity=0.5, refit="all", attn_ratio=0.5, refit_samples=32)
compress(model, calib, opts, progress=False)
out = {"calib": calib_kind, "calib_seconds": round(t_cal, 1)}
for name, ds in parts.items():
    reqs = [r for d in ds for r in d.requests]
    lls = zeroshot.loglikelihoods(model, model.tokenizer, reqs, batch_size=16)
    res = zeroshot.score_docs(ds, lls)["hellaswag"]
    out[name] = res
    print(name, {m: res.get(m) for m in ("acc", "acc_norm")}, flush=True)
with open("runs/hs_domain.jsonl", "a") as f:
    f.write(
        json.dumps(
            {
                k: (v if not isinstance(v, dict) else {m: v.get(m) for m in ("acc", "acc_norm", "n", "items")})
                for k, v in out.items()
            }
        )
        + "\n"
    )
