"""Compress SmolLM2 with one set of options and measure WikiText-2 perplexity: one JSON line per run.

    python -m modegpt_rt.bench.experiment --rate 0.3 --samples 32 --windows 20 --out runs/exp.jsonl [options]

Used to choose defaults (allocation temperature, B.11 split, ridge λ, calibration size);
the full-size numbers in the README come from `modegpt compress` + `modegpt eval ppl`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from modegpt_rt.compressor.compress import CompressOptions, compress

import modegpt_rt
from modegpt_rt import data
from modegpt_rt.evaluate import perplexity


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=20, help="test windows of 2048 (0 = all)")
    p.add_argument("--allocation", default="global")
    p.add_argument("--split", action="store_true")
    p.add_argument("--attn-ratio", type=float, default=1.0)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--max-layer-sparsity", type=float, default=0.8)
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument("--absolute-ridge", action="store_true")
    p.add_argument("--value-method", default="stacked")
    p.add_argument("--multiples", default=None)
    p.add_argument("--bi-samples", type=int, default=8)
    p.add_argument("--probe-tokens", type=int, default=1024)
    p.add_argument("--sensitivity-from", default=None)
    p.add_argument("--refit", default="all")
    p.add_argument("--refit-samples", type=int, default=32)
    p.add_argument("--refit-prior", type=float, default=0.0)
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", default="wikitext2", help="wikitext2 | generated | a text file")
    p.add_argument("--zeroshot-limit", type=int, default=0, help="also score the five tasks on N items each")
    p.add_argument(
        "--zeroshot-sample",
        action="store_true",
        help="draw the --zeroshot-limit items at random (seed 0), not a prefix",
    )
    p.add_argument("--zeroshot-json", default=None, help="also write the full zero-shot result (per-item answers) here")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    model = modegpt_rt.load(None, backend="torch")
    t0 = time.time()
    if args.calib == "generated":
        calib = data.generated_calibration(model, args.samples, args.seqlen, args.seed, progress=False)
    else:
        text = data.read_text(args.calib, "valid", tokenizer=model.tokenizer)
        calib = data.calibration_windows(data.tokenize(model.tokenizer, text), args.samples, args.seqlen, args.seed)
    t_calib = time.time() - t0
    t0 = time.time()
    report = {}
    if args.rate > 0:
        opts = CompressOptions.from_args(args)
        report = compress(model, calib, opts, progress=False)
    t_compress = time.time() - t0
    res = perplexity(model, model.tokenizer, "wikitext2", 2048, limit=args.windows or None, progress=False)
    zs = {}
    if args.zeroshot_limit:
        from modegpt_rt import zeroshot

        n = args.zeroshot_limit
        pick = {"sample": n} if args.zeroshot_sample else {"limit": n}
        r = zeroshot.evaluate(model, model.tokenizer, zeroshot.TASKS, **pick, progress=False)
        zs = {"zeroshot": {k: v.get("acc_norm", v["acc"]) for k, v in r["tasks"].items()}, "zs_avg": r["average_norm"]}
        if args.zeroshot_json:
            Path(args.zeroshot_json).write_text(json.dumps({**r, "model": args.tag}, indent=1) + "\n")
    row = {
        "tag": args.tag,
        **{k: v for k, v in vars(args).items() if k not in ("out", "tag", "zeroshot_json")},
        "ppl": res["ppl"],
        "windows": res["windows"],
        **zs,
        "calib_seconds": round(t_calib, 1),
        "compress_seconds": round(t_compress, 1),
        "achieved_rate": report.get("achieved_rate"),
        "eps_used": report.get("eps"),
        "widths": [[w.k_mlp, w.d_qk, w.d_v] for w in model.config.layers],
        "sensitivity": report.get("sensitivity"),  # the measured table (reusable with --sensitivity-from)
        "threads": torch.get_num_threads(),
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("widths", "sensitivity")}))


if __name__ == "__main__":
    main()
