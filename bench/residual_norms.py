"""Residual-stream norms per layer of the dense model on calibration windows (massive activations).

    python -m modegpt_rt.bench.residual_norms [--model PATH] [--samples 2] [--seqlen 512] [--json OUT]

Prints, after each layer, the norm of the first token of each window, the median and the largest
norm of the other tokens, and the share of the sum of squares held by the largest `samples` tokens.
"""

from __future__ import annotations

import argparse
import json

import torch

import modegpt_rt
from modegpt_rt import data


@torch.no_grad()
def residual_norms(model, tokens: torch.Tensor) -> list[dict]:
    h = torch.nn.functional.embedding(tokens, model.embed)
    rows = []
    for i, layer in enumerate(model.layers):
        h = model.layer_forward(layer, h)
        n = h.norm(dim=-1)  # [N, L]
        sq = (n.double() ** 2).flatten().sort(descending=True).values
        rows.append(
            {
                "layer": i,
                "first_token_norm": n[:, 0].tolist(),
                "median_norm": n.median().item(),
                "max_other_norm": n[:, 1:].max().item(),
                "top_share": (sq[: tokens.shape[0]].sum() / sq.sum()).item(),
            }
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    model = modegpt_rt.load(args.model, backend="torch")
    text = data.read_text("wikitext2", "valid")
    tokens = data.calibration_windows(data.tokenize(model.tokenizer, text), args.samples, args.seqlen, args.seed)
    rows = residual_norms(model, tokens)
    for r in rows:
        first = ", ".join(f"{x:.0f}" for x in r["first_token_norm"])
        print(
            f"layer {r['layer']:2d}  first token {first:>16}  median {r['median_norm']:7.1f}  "
            f"max other {r['max_other_norm']:7.1f}  top-{args.samples} share {r['top_share']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": args.samples, "seqlen": args.seqlen, "layers": rows}, f, indent=1)


if __name__ == "__main__":
    main()
