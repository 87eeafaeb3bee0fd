"""Time `modegpt_rt.load()` of a GGUF model: the direct GGUF reader with the tokenizer cache against
transformers' reader with no cache, alternating in one process (medians of --rounds).

    python -m modegpt_rt.bench.load_time [GGUF] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modegpt_rt.bench.load_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=None, help="a .gguf file (default: the SmolLM2 GGUF)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import modegpt_rt
    import modegpt_rt.checkpoint as ck

    path = args.path or modegpt_rt.default_model_path()
    direct = ck._read_gguf_direct
    cache = os.environ.get("MODEGPT_RT_CACHE")
    variants = {"transformers reader, no tokenizer cache": True, "direct reader, cached tokenizer": False}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(args.rounds):
            for name, before in variants.items():
                ck._read_gguf_direct = (lambda p: None) if before else direct
                if before:
                    os.environ["MODEGPT_RT_CACHE"] = "off"
                elif cache is None:
                    os.environ.pop("MODEGPT_RT_CACHE", None)
                else:
                    os.environ["MODEGPT_RT_CACHE"] = cache
                t0 = time.perf_counter()
                model = modegpt_rt.load(path)
                times[name].append(time.perf_counter() - t0)
                assert model.tokenizer is not None
                del model
    finally:
        ck._read_gguf_direct = direct
    out = {"kind": "load_time", "model": str(path), "rounds": args.rounds, "seconds": times}
    out["median_s"] = {name: statistics.median(v) for name, v in times.items()}
    for name, v in times.items():
        print(f"{name}: {', '.join(f'{x:.1f}' for x in v)} s, median {statistics.median(v):.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
