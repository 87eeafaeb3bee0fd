"""HellaSwag by source: items 0-399 (ActivityNet captions) and 4000-4399 (WikiHow articles), per model.

    python bench/hellaswag_parts.py dense out/smollm2-0.1 ... >> bench/results/hellaswag_parts_smollm2.jsonl

One JSON line per model (bfloat16, 2 threads): acc and acc_norm of each part, and the mean negative
log-likelihood per token of the gold endings (how much worse the model predicts the right text).
"""

import argparse
import json

import torch

import modegpt_rt
from modegpt_rt import zeroshot

PARTS = {"anet": slice(0, 400), "wikihow": slice(4000, 4400)}


def score_part(model, docs) -> dict:
    reqs = [r for d in docs for r in d.requests]
    lls = zeroshot.loglikelihoods(model, model.tokenizer, reqs, batch_size=16)
    res = zeroshot.score_docs(docs, lls)["hellaswag"]
    nll, ntok, k = 0.0, 0, 0
    for d in docs:
        ntok += len(model.tokenizer.encode(d.continuations[d.gold]))
        nll -= lls[k + d.gold]
        k += len(d.requests)
    return {"acc": res["acc"], "acc_norm": res["acc_norm"], "gold_nll_tok": nll / ntok}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint folders, or 'dense' for the default model")
    args = p.parse_args()
    torch.set_num_threads(2)
    docs = zeroshot.load_task("hellaswag")
    for path in args.models:
        model = modegpt_rt.load(None if path == "dense" else path, backend="torch", dtype=torch.bfloat16)
        row = {"model": path, **{name: score_part(model, docs[sl]) for name, sl in PARTS.items()}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
