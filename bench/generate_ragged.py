"""`generate` on a batch whose sequences end at different steps: ended rows leaving the batch against the
fixed batch that steps every row to the end.

    python -m modegpt_rt.bench.generate_ragged [PATH] [--batch 8] [--prompt 128] [--new 16:128]
        [--rounds 5] [--json OUT]

Every prompt gets its own `max_new_tokens`, spread evenly over `--new LO:HI` (EOS ignored, greedy), the way
stop tokens end the sequences of a real batch at different steps. Each round runs `generate` (on CPU: the
prompts as a `ContinuousBatch`, an ended sequence leaves the batch) and the fixed-batch loop
(`_generate_static` without a CUDA graph: every row steps until the longest sequence ends), one after the
other; medians over rounds. tok/s = new tokens of all sequences / wall time including prefill. Both must
give the same tokens; the run stops with an error if they do not.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from modegpt_rt.bench.machine import add_run_args, interleaved_rounds, write_run

import modegpt_rt
from modegpt_rt.generate import _generate_static, generate


def _limits(batch: int, spec: str) -> list[int]:
    lo, _, hi = spec.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 0 < lo <= hi:
        raise SystemExit(f"--new wants LO:HI with 0 < LO <= HI, got {spec!r}")
    if batch == 1:
        return [hi]
    return [round(lo + (hi - lo) * i / (batch - 1)) for i in range(batch)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=None, help="checkpoint, HF folder or .gguf (default: SmolLM2 GGUF)")
    add_run_args(p, batch="8", new="16:128")
    args = p.parse_args(argv)
    args.batch = int(args.batch)
    torch.set_num_threads(args.threads)
    model = modegpt_rt.load(args.path) if args.path else modegpt_rt.load()
    limits = _limits(args.batch, args.new)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    sampling, ends = (0.0, None, None, None), (None, True)

    def compacting():
        return [r.token_ids for r in generate(model, prompts, limits, temperature=0, ignore_eos=True)]

    def static():
        out = _generate_static(model, prompts, limits, sampling, ends, None, None, None, cuda_graph=False)
        return [r.token_ids for r in out]

    runs = {"compacting": compacting, "static": static}
    times = interleaved_rounds(runs, sum(limits), args.rounds, f"batch {args.batch}")
    med = {name: statistics.median(v) for name, v in times.items()}
    for name in runs:
        print(
            f"{name:<11} batch {args.batch} new {args.new:<8} {med[name]:7.1f} tok/s  {med[name] / med['static']:5.2f}x"
        )
    model_name = args.path or "SmolLM2-135M-Instruct GGUF (default)"
    speedup = med["compacting"] / med["static"]
    write_run(
        args,
        argv,
        "generate_ragged",
        "generate_ragged",
        model=model_name,
        backend=model.backend,
        batch=args.batch,
        limits=limits,
        tok_s=med,
        speedup=speedup,
        runs=times,
    )


if __name__ == "__main__":
    main()
