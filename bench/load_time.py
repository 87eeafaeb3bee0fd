"""Time `modegpt_rt.load()` of a GGUF model, alternating variants in one process (medians of --rounds).

    python -m modegpt_rt.bench.load_time [GGUF] [--rounds 3] [--compare reader|dequantizer] [--json OUT]

`--compare reader` (default): the direct GGUF reader with the tokenizer cache against transformers' reader with
no cache. `--compare dequantizer`: the direct reader with our block dequantizer (`modegpt_rt.ggml_blocks`) and the
one-pass finite check against the `gguf` package's dequantizer and `isfinite(t).all()`, with our dequantizer
and `isfinite` between them; every load must give the same weights bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def _reader(ck, before: bool, cache: str | None):
    direct = ck._read_gguf_direct
    ck._read_gguf_direct = (lambda p: None) if before else direct
    if before:
        os.environ["MODEGPT_RT_CACHE"] = "off"
    elif cache is None:
        os.environ.pop("MODEGPT_RT_CACHE", None)
    else:
        os.environ["MODEGPT_RT_CACHE"] = cache
    try:
        yield
    finally:
        ck._read_gguf_direct = direct


@contextmanager
def _dequantizer(ck, package: bool, isfinite: bool):
    """`package`: every tensor through gguf.quants.dequantize; `isfinite`: the boolean-tensor finite check."""
    from modegpt_rt import ggml_blocks

    blocks, finite = dict(ggml_blocks.BLOCK_BYTES), ck._all_finite
    if package:
        ggml_blocks.BLOCK_BYTES.clear()
    if isfinite:
        ck._all_finite = lambda t: bool(torch.isfinite(t).all())
    try:
        yield
    finally:
        ggml_blocks.BLOCK_BYTES.update(blocks)
        ck._all_finite = finite


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modegpt_rt.bench.load_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=None, help="a .gguf file (default: the SmolLM2 GGUF)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", choices=["reader", "dequantizer"], default="reader")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    import modegpt_rt
    import modegpt_rt.checkpoint as ck

    path = args.path or modegpt_rt.default_model_path()
    cache = os.environ.get("MODEGPT_RT_CACHE")
    if args.compare == "reader":
        variants = {
            "transformers reader, no tokenizer cache": lambda: _reader(ck, True, cache),
            "direct reader, cached tokenizer": lambda: _reader(ck, False, cache),
        }
    else:
        variants = {
            "gguf package dequantizer, isfinite().all()": lambda: _dequantizer(ck, True, True),
            "block dequantizer, isfinite().all()": lambda: _dequantizer(ck, False, True),
            "block dequantizer, aminmax finite check": lambda: _dequantizer(ck, False, False),
        }
    times: dict[str, list[float]] = {name: [] for name in variants}
    reference = None
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # each variant leads some rounds
            variant = variants[name]
            with variant():
                t0 = time.perf_counter()
                model = modegpt_rt.load(path)
                times[name].append(time.perf_counter() - t0)
            assert model.tokenizer is not None
            if args.compare == "dequantizer":
                weights = model.state_dict()
                if reference is None:
                    reference = {k: v.clone() for k, v in weights.items()}
                elif any(not torch.equal(reference[k], v) for k, v in weights.items()):
                    raise SystemExit(f"{name}: the weights differ from the first load's")
            del model
    out = {"kind": "load_time", "compare": args.compare, "model": str(path), "rounds": args.rounds, "seconds": times}
    out["median_s"] = {name: statistics.median(v) for name, v in times.items()}
    for name, v in times.items():
        print(f"{name}: {', '.join(f'{x:.2f}' for x in v)} s, median {statistics.median(v):.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
