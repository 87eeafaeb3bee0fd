"""Side-by-side decode throughput with the models interleaved round by round.

    python -m modegpt_rt.bench.interleaved PATH [PATH...] [--batch 1,8] [--rounds 5]
        [--weights float32,bfloat16] [--huge-pages off,on] [--json OUT]

`modegpt bench throughput` times one model after another, so a change in the machine's memory
bandwidth between them (shared hosts) shows up as a speed difference. Here every round runs each
model once (prompt 128 + 128 new greedy tokens, EOS ignored) and the medians over rounds are
compared, so slow phases hit all models alike. `--weights float32,bfloat16` runs every path twice: with
float32 matrices and with bfloat16 ones (`load(weight_dtype=...)`, computing in float32). `--huge-pages on,off`
runs every path with its weights on transparent huge pages (`load`'s default) and on ordinary 4 KB pages
(`load(huge_pages=False)`); without it `load`'s default applies ($MODEGPT_RT_HUGE_PAGES).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from modegpt_rt.bench.machine import add_run_args, write_run

import modegpt_rt


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("paths", nargs="+")
    add_run_args(p)
    p.add_argument("--weights", default="float32", help="comma-separated weight dtypes to run each path with")
    p.add_argument(
        "--huge-pages",
        default="auto",
        help="on, off, or both comma-separated: weights on transparent huge pages or ordinary ones (auto: load's"
        " default)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = [getattr(torch, w) for w in args.weights.split(",")]
    choices = {"on": True, "off": False, "auto": None}
    if any(x not in choices for x in args.huge_pages.split(",")):
        p.error(f"--huge-pages takes on, off (both comma-separated) or auto, got {args.huge_pages!r}")
    pages = [choices[x] for x in args.huge_pages.split(",")]
    runs = list(itertools.product(args.paths, weights, pages))
    models = [modegpt_rt.load(path, weight_dtype=w, huge_pages=hp) for path, w, hp in runs]
    names = [
        path
        + ("" if w == torch.float32 else f" [{str(w).removeprefix('torch.')} weights]")
        + (" [4 KB pages]" if hp is False else "")
        for path, w, hp in runs
    ]
    batches = [int(b) for b in args.batch.split(",")]
    g = torch.Generator().manual_seed(0)
    vocab = models[0].config.vocab_size
    times = {(i, b): [] for i in range(len(models)) for b in batches}
    for b in batches:
        prompts = torch.randint(0, vocab, (b, args.prompt), generator=g).tolist()
        for m in models:
            m.generate(prompts, max_new_tokens=4, temperature=0, ignore_eos=True)  # warm-up
        for _ in range(args.rounds):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m.generate(prompts, max_new_tokens=args.new, temperature=0, ignore_eos=True)
                times[(i, b)].append(b * args.new / (time.perf_counter() - t0))
    rows = []
    for b in batches:
        base = statistics.median(times[(0, b)])
        for i, path in enumerate(names):
            med = statistics.median(times[(i, b)])
            rate = (models[i].config.compression or {}).get("target_rate", 0.0)
            rows.append(
                {
                    "path": runs[i][0],
                    "name": path,
                    "weight_dtype": str(runs[i][1]).removeprefix("torch."),
                    "huge_pages": runs[i][2],
                    "rate": rate,
                    "batch": b,
                    "tok_s": med,
                    "vs_first": med / base,
                    "runs": times[(i, b)],
                }
            )
            print(f"{path:<58} rate {rate:<5} batch {b:<3} {med:7.1f} tok/s  {med / base:5.2f}x first")
    write_run(args, argv, "interleaved_throughput", "interleaved", results=rows)


if __name__ == "__main__":
    main()
