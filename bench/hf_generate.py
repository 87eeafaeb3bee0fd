"""transformers' `generate` on a modegpt checkpoint: with the runtime's KV cache (`state`), without it
(`use_cache=False`: every step recomputes the sequences), and `modegpt_rt`'s own `generate`.

    python -m modegpt_rt.bench.hf_generate CHECKPOINT [--batch 1,8] [--prompt 128] [--new 128]
        [--rounds 3] [--no-recompute] [--json OUT]

Greedy, EOS ignored (`min_new_tokens`), random prompt ids; the three paths run one after the other in
each round (`--no-recompute` leaves out the slow second one), medians over rounds. tok/s = new tokens / wall
time including prefill. All paths must give the same tokens; the run stops with an error if they do not.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from modegpt_rt.bench.machine import add_run_args, interleaved_rounds, write_run

import modegpt_rt  # noqa: F401  (registers the Auto classes)


def _paths(hf, ids, n):
    """The three ways to generate `n` greedy tokens after `ids` [B, T]; each returns the new token ids."""
    T, rt = ids.shape[1], hf.runtime
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)
    kw.update(do_sample=False, pad_token_id=0)
    return {
        "transformers generate, runtime cache": lambda: hf.generate(**kw)[:, T:].tolist(),
        "transformers generate, use_cache=False": lambda: hf.generate(**kw, use_cache=False)[:, T:].tolist(),
        "modegpt_rt generate": lambda: [
            r.token_ids for r in rt.generate(ids.tolist(), max_new_tokens=n, temperature=0, ignore_eos=True)
        ],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a modegpt checkpoint folder")
    add_run_args(p, rounds=3)
    p.add_argument("--no-recompute", action="store_true", help="skip the use_cache=False path (slow at large batch)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.path)
    rt = hf.runtime
    n = args.new
    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        ids = torch.randint(0, rt.config.vocab_size, (b, args.prompt), generator=torch.Generator().manual_seed(b))
        runs = _paths(hf, ids, n)
        if args.no_recompute:
            del runs["transformers generate, use_cache=False"]
        times = interleaved_rounds(runs, b * n, args.rounds, f"batch {b}")
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"batch": b, "path": name, "tok_s": med, "runs": ts})
            print(f"batch {b:<3} {name:<40} {med:8.1f} tok/s")
    write_run(args, argv, "hf_generate", "hf_generate", model=args.path, backend=rt.backend, results=rows)


if __name__ == "__main__":
    main()
