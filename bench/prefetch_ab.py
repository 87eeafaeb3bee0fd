"""The C++ skinny product with and without one of its switches, end to end: its software prefetch of the
next weight row (`--switch prefetch`, the default) or its three-row blocks at 8 inputs (`--switch rows3`).

    python -m modegpt_rt.bench.prefetch_ab [PATH] [--switch prefetch|rows3] [--batch 1,4,8] [--prompt 128]
        [--new 128] [--rounds 5] [--weights float32,bfloat16] [--json OUT]

`set_prefetch_from(rows)` (kernels/csrc/linear.cpp) makes products with at least `rows` input rows
prefetch; 9 turns it off. Each round runs `generate` (greedy, EOS ignored, random prompt ids) once with it off
and once with the default threshold, for every batch size and weight dtype; medians over rounds. tok/s = new
tokens / wall time including prefill (the prefill's products are MKL's, unaffected). Both settings must give the
same tokens. `set_rows3_min_k(1 << 30)` likewise turns the three-row blocks (kernels/csrc/linear.cpp, float32
weights, 8 inputs, rows of at least 1024) off.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from modegpt_rt.bench.machine import add_run_args, interleaved_rounds, write_run
from modegpt_rt.kernels import _cpu_linear

import modegpt_rt

OFF = 9  # more input rows than a product ever has
NEVER = 1 << 30  # longer rows than a product ever has


def _run(model, prompts, new, setting):
    """A call that generates with the kernel switch set as `setting` says (a call that sets it)."""

    def run():
        setting()
        out = model.generate(prompts, max_new_tokens=new, temperature=0, ignore_eos=True)
        return [r.token_ids for r in out]

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=None, help="checkpoint, HF folder or .gguf (default: SmolLM2 GGUF)")
    add_run_args(p, batch="1,4,8")
    p.add_argument("--switch", choices=("prefetch", "rows3"), default="prefetch", help="the kernel switch to A/B")
    p.add_argument("--weights", default="float32", help="comma-separated weight dtypes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    default, rows3_default = _cpu_linear.get_prefetch_from(), _cpu_linear.get_rows3_min_k()
    settings = {
        "prefetch": (lambda: _cpu_linear.set_prefetch_from(OFF), lambda: _cpu_linear.set_prefetch_from(default)),
        "rows3": (lambda: _cpu_linear.set_rows3_min_k(NEVER), lambda: _cpu_linear.set_rows3_min_k(rows3_default)),
    }[args.switch]
    rows = []
    for wname in args.weights.split(","):
        model = modegpt_rt.load(args.path, weight_dtype=getattr(torch, wname))
        for b in [int(x) for x in args.batch.split(",")]:
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(0, model.config.vocab_size, (b, args.prompt), generator=g).tolist()
            runs = {name: _run(model, prompts, args.new, fn) for name, fn in zip(("off", "on"), settings)}
            try:
                times = interleaved_rounds(runs, b * args.new, args.rounds, f"{wname} batch {b}")
            finally:
                settings[1]()
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
            print(f"{wname:<9} batch {b:<3} {args.switch} off {off:7.1f}  on {on:7.1f} tok/s  {on / off:5.2f}x")
    write_run(
        args,
        argv,
        f"{args.switch}_ab",
        "prefetch_ab",
        model=args.path or "SmolLM2-135M-Instruct GGUF (default)",
        switch=args.switch,
        prefetch_from=default,
        results=rows,
    )


if __name__ == "__main__":
    main()
