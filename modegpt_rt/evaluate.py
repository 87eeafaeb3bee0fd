"""Perplexity over non-overlapping windows of a text (WikiText-2 test by default)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modegpt_rt import data


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    source: str = "wikitext2",
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    join: str = "file",
) -> dict:
    r"""exp(mean NLL) of every token but the first of each window; windows do not overlap. join="rows" reads
    WikiText-2 as the paper does ("\n\n"-joined dataset rows, `data.wikitext_rows_joined`), join="file" as
    the raw file is."""
    if seqlen > model.config.max_position_embeddings:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context {model.config.max_position_embeddings}")
    tokens = data.tokenize(tokenizer, data.read_text(source, split="test", join=join, tokenizer=tokenizer))
    windows = data.eval_windows(tokens, seqlen)
    if limit:
        windows = windows[:limit]
    t0 = time.time()
    nll, count = 0.0, 0
    for s in tqdm(
        range(0, windows.shape[0], batch_size),
        desc="ppl",
        unit="window",
        disable=not progress,
        total=math.ceil(windows.shape[0] / batch_size),
    ):
        w = windows[s : s + batch_size].to(model.device)
        logits = model(w).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
    return {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "windows": int(windows.shape[0]),
        "tokens_scored": count,
        "seqlen": seqlen,
        "data": source,
        "join": join if source in ("wikitext2", "wikitext-2") else None,
        "seconds": round(time.time() - t0, 1),
    }
