"""The C++ skinny product with and without its software prefetch of the next weight row, end to end.

    python -m modegpt_rt.bench.prefetch_ab [PATH] [--batch 1,4,8] [--prompt 128] [--new 128] [--rounds 5]
        [--weights float32,bfloat16] [--json OUT]

`set_prefetch_from(rows)` (kernels/csrc/linear.cpp) makes products with at least `rows` input rows
prefetch; 9 turns it off. Each round runs `generate` (greedy, EOS ignored, random prompt ids) once with it off
and once with the default threshold, for every batch size and weight dtype; medians over rounds. tok/s = new
tokens / wall time including prefill (the prefill's products are MKL's, unaffected). Both settings must give the
same tokens.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from modegpt_rt.bench.machine import add_run_args, interleaved_rounds, write_run
from modegpt_rt.kernels import _cpu_linear

import modegpt_rt

OFF = 9  # more input rows than a product ever has


def _run(model, prompts, new, prefetch_from):
    """A call that generates with products of at least `prefetch_from` rows prefetching."""

    def run():
        _cpu_linear.set_prefetch_from(prefetch_from)
        out = model.generate(prompts, max_new_tokens=new, temperature=0, ignore_eos=True)
        return [r.token_ids for r in out]

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=None, help="checkpoint, HF folder or .gguf (default: SmolLM2 GGUF)")
    add_run_args(p, batch="1,4,8")
    p.add_argument("--weights", default="float32", help="comma-separated weight dtypes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    default = _cpu_linear.get_prefetch_from()
    rows = []
    for wname in args.weights.split(","):
        model = modegpt_rt.load(args.path, weight_dtype=getattr(torch, wname))
        for b in [int(x) for x in args.batch.split(",")]:
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(0, model.config.vocab_size, (b, args.prompt), generator=g).tolist()
            runs = {"off": _run(model, prompts, args.new, OFF), "on": _run(model, prompts, args.new, default)}
            try:
                times = interleaved_rounds(runs, b * args.new, args.rounds, f"{wname} batch {b}")
            finally:
                _cpu_linear.set_prefetch_from(default)
            off, on = statistics.median(times["off"]), statistics.median(times["on"])
            rows.append(
                {
                    "weights": wname,
                    "batch": b,
                    "tok_s_off": off,
                    "tok_s_on": on,
                    "ratio": on / off,
                    "runs": times,
                }
            )
            print(f"{wname:<9} batch {b:<3} prefetch off {off:7.1f}  on {on:7.1f} tok/s  {on / off:5.2f}x")
    write_run(
        args,
        argv,
        "prefetch_ab",
        "prefetch_ab",
        model=args.path or "SmolLM2-135M-Instruct GGUF (default)",
        prefetch_from=default,
        results=rows,
    )


if __name__ == "__main__":
    main()
