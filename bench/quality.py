"""The quality table: perplexity, zero-shot accuracy and decode speed per checkpoint, as one JSON.

    python -m modegpt_rt.bench.quality --rate LABEL=RATE ... --json bench/results/quality.json \
        [--ppl-json LABEL=FILE ...] [--zeroshot-json LABEL=FILE ...] [--series LABEL=NAME ...] \
        [--throughput-json FILE] [--speed LABEL=FILE@CHECKPOINT ...]

Runs nothing itself: it gathers the JSON written by `modegpt eval ppl --json`,
`modegpt eval zeroshot --json` and `modegpt bench throughput --json`, so every
figure in the table traces back to the command that produced it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pairs(items):
    out = {}
    for item in items or []:
        label, _, path = item.partition("=")
        out[label] = json.loads(Path(path).read_text())
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rate", action="append", default=[], help="LABEL=RATE")
    p.add_argument("--ppl-json", action="append", default=[])
    p.add_argument("--zeroshot-json", action="append", default=[])
    p.add_argument("--series", action="append", default=[], help="LABEL=NAME: the method a row belongs to")
    p.add_argument("--throughput-json", default=None)
    p.add_argument(
        "--speed",
        action="append",
        default=[],
        help="LABEL=FILE@CHECKPOINT: that row's decode speeds are CHECKPOINT's (its `path`) in FILE, an "
        "interleaved or throughput JSON, instead of --throughput-json's row at the same rate",
    )
    p.add_argument("--title", default="SmolLM2-135M, MoDeGPT")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    rates = {k: float(v) for k, v in (r.split("=") for r in args.rate)}
    series = dict(s.split("=", 1) for s in args.series)
    if set(series) - set(rates):
        p.error(f"--series for labels without --rate: {sorted(set(series) - set(rates))}")
    ppl, zs = _pairs(args.ppl_json), _pairs(args.zeroshot_json)
    speeds = {}
    for item in args.speed:
        label, _, spec = item.partition("=")
        file, sep, ckpt = spec.rpartition("@")
        if not sep or label not in rates:
            p.error(f"--speed {item!r}: expected LABEL=FILE@CHECKPOINT with a LABEL given by --rate")
        found = {
            f"tok_s_b{r['batch']}": r["tok_s"]
            for r in json.loads(Path(file).read_text())["results"]
            if r.get("path") == ckpt
        }
        if not found:
            p.error(f"--speed {item!r}: no result for checkpoint {ckpt!r} in {file}")
        speeds[label] = (Path(file).name, found)
    tput = json.loads(Path(args.throughput_json).read_text()) if args.throughput_json else None
    rows = []
    for label, rate in rates.items():
        row = {"label": label, "rate": rate}
        if label in series:
            row["series"] = series[label]
        if label in ppl:
            row["ppl"] = ppl[label]["ppl"]
            row["ppl_windows"] = ppl[label]["windows"]
        if label in zs:
            tasks = zs[label]["tasks"]
            row["zeroshot"] = {
                t: (r["acc_norm"] if r.get("acc_norm") is not None else r["acc"]) for t, r in tasks.items()
            }
            row["average"] = sum(row["zeroshot"].values()) / len(tasks)
            row["zeroshot_n"] = {t: r["n"] for t, r in tasks.items()}
        if label in speeds:
            source, found = speeds[label]
            row.update(found, speed_source=source)
        elif tput:
            for r in tput["results"]:
                if r["impl"].startswith("modegpt_rt") and abs(r["rate"] - rate) < 1e-9:
                    row[f"tok_s_b{r['batch']}"] = r["tok_s"]
        rows.append(row)
    out = {
        "kind": "quality",
        "title": args.title,
        "rows": rows,
        "metric_note": "zero-shot: acc_norm where lm-eval reports it (ARC, PIQA, HellaSwag), acc for WinoGrande",
    }
    Path(args.json).write_text(json.dumps(out, indent=2))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
