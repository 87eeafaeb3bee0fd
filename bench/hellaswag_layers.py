"""Which layers' compression costs WikiHow? The dense model with one group of layers swapped in from the demo
checkpoint (bfloat16; HellaSwag items 0-199 ActivityNet, 4000-4299 WikiHow; acc_norm). Eighth-session
diagnostic, run as it stands:

    python bench/hellaswag_layers.py 2 > bench/results/hellaswag_layers_smollm2.jsonl   # argument: threads

The refit layers were fitted to the compressed layers before them, so a swap is an approximation.
"""

import json
import sys

import torch

import modegpt_rt
from modegpt_rt import zeroshot

torch.set_num_threads(int(sys.argv[1]))
docs = zeroshot.load_task("hellaswag")
parts = {"anet": docs[0:200], "wikihow": docs[4000:4300]}
dense = modegpt_rt.load(None, backend="torch", dtype=torch.bfloat16)
comp = modegpt_rt.load("out/smollm2-0.3-a0.5", backend="torch", dtype=torch.bfloat16, tokenizer=False)
dense_layers = list(dense.layers)
groups = {"none": [], "0-9": range(0, 10), "10-19": range(10, 20), "20-29": range(20, 30), "all": range(30)}
for name, g in groups.items():
    for i in range(30):
        dense.layers[i] = comp.layers[i] if i in g else dense_layers[i]
    row = {"compressed_layers": name}
    for pn, ds in parts.items():
        reqs = [r for d in ds for r in d.requests]
        lls = zeroshot.loglikelihoods(dense, dense.tokenizer, reqs, batch_size=16)
        row[pn] = zeroshot.score_docs(ds, lls)["hellaswag"]["acc_norm"]
    print(json.dumps(row), flush=True)
