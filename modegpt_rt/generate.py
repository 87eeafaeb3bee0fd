"""Batched, KV-cached generation: prefill once, then one token per sequence per step."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int = 0
    stats: dict = field(default_factory=dict, repr=False)


MAX_SEED = 2**63 - 1


def _is_int(v) -> bool:  # Python or NumPy integers, not bools
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_args(max_new_tokens, temperature, top_k, top_p, seed=None):
    limits = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens]
    if not limits or any(not _is_int(m) or m <= 0 for m in limits):
        raise ValueError(f"max_new_tokens must be a positive integer (or one per prompt), got {max_new_tokens!r}")
    if not _is_real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")


def encode_prompts(prompts, tokenizer, vocab_size: int | None = None, no_tokenizer: str = "") -> list[list[int]]:
    """Strings (through `tokenizer`), token-id lists, or an integer tensor [T] / [B, T] -> token-id lists.
    Token ids must be integers in [0, vocab_size) when `vocab_size` is given. `no_tokenizer` says why there
    is no tokenizer, for the error a string prompt then gets."""
    if isinstance(prompts, torch.Tensor):  # [T] or [B, T] token ids (no padding)
        if prompts.dtype.is_floating_point or prompts.dim() not in (1, 2):
            what = f"{prompts.dtype} {list(prompts.shape)}"
            raise ValueError(f"a tensor prompt must hold integer token ids [T] or [B, T], got {what}")
        prompts = prompts.tolist()
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and _is_int(prompts[0])):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(
            f"prompts must be a string, a list of strings or of token-id lists, or an integer tensor; "
            f"got {type(prompts).__name__}"
        )
    if not prompts:
        raise ValueError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if tokenizer is None:
                why = f" ({no_tokenizer})" if no_tokenizer else ""
                raise ValueError(f"string prompts need a tokenizer, and this model has none{why}; pass token ids")
            ids = tokenizer(p)["input_ids"]
        elif isinstance(p, (list, tuple)):
            if not all(_is_int(t) for t in p):
                raise ValueError(f"prompt {i}: token ids must be integers")
            ids = [int(t) for t in p]
        else:
            raise ValueError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if vocab_size is not None and not all(0 <= t < vocab_size for t in ids):
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


def _stable_end(text: str, stop_strs) -> int:
    """How much of a growing decoded text can be streamed now: not a trailing replacement character (a
    multi-byte character split across tokens), nor a tail that is the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stop_strs:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text.endswith(s[:k], 0, end):
                hold = k
                break
    return end - hold


def sample(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts,
    max_new_tokens: int | list[int] = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop=None,
    ignore_eos: bool = False,
    stream: Callable | None = None,
    tokenizer=None,
    cuda_graph: bool | None = None,
    on_finish: Callable | None = None,
) -> list[GenerationResult]:
    """Generate continuations of `prompts` (strings, or token-id lists of different lengths).

    temperature=0 is greedy. `stop`: token ids (int) and/or strings that end a sequence.
    `stream(index, token_id, text_delta)` is called for every new token as it comes. A delta holds back
    what may still change: an incomplete multi-byte character, or a tail that could begin a stop string; it
    comes with a later token, or in one last call with the end-of-sequence token's id. The deltas of a
    sequence always add up to its final text.
    `max_new_tokens` may be a list, one limit per prompt.
    `on_finish(index, result)` is called with a sequence's `GenerationResult` as soon as it ends (the
    batch may run on); the list returned at the end holds the same results.
    `cuda_graph`: replay the decode step from a CUDA graph (`decode_graph.py`); default: on a CUDA device.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p, seed)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    vocab = getattr(model.config, "vocab_size", None)
    ids = encode_prompts(prompts, tokenizer, vocab, getattr(model, "tokenizer_error", ""))
    if isinstance(max_new_tokens, (list, tuple)):
        if len(max_new_tokens) != len(ids):
            raise ValueError(f"{len(max_new_tokens)} max_new_tokens limits for {len(ids)} prompts")
        limits = list(max_new_tokens)
    else:
        limits = [max_new_tokens] * len(ids)
    ctx = model.config.max_position_embeddings
    for i, (p, m) in enumerate(zip(ids, limits)):
        if len(p) + m > ctx:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={m} it exceeds the context of {ctx} tokens"
            )
    # the batch steps together: a sequence that ended keeps taking (ignored) tokens while others run
    longest, most = max(map(len, ids)), max(limits)
    if longest + most > ctx:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus the largest max_new_tokens ({most}) exceeds the context "
            f"of {ctx} tokens; generate these prompts in separate calls"
        )
    stop = [stop] if isinstance(stop, (str, int)) else list(stop or [])
    stop_ids = {s for s in stop if isinstance(s, int)}
    stop_strs = [s for s in stop if isinstance(s, str) and s]
    if not ignore_eos:
        stop_ids |= set(model.config.eos_ids)
    need_text = bool(stream or stop_strs)
    if need_text and tokenizer is None:
        raise ValueError("streaming and stop strings need a tokenizer")

    B, dev = len(ids), model.device
    lens = torch.tensor([len(p) for p in ids], dtype=torch.int32, device=dev)
    batch = torch.zeros(B, int(lens.max()), dtype=torch.long, device=dev)
    for i, p in enumerate(ids):
        batch[i, : len(p)] = torch.tensor(p)
    cache = model.new_cache(B, longest + most)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))

    t0 = time.perf_counter()
    logits = model.step(batch, cache, lens)
    t_prefill = time.perf_counter() - t0
    new = [[] for _ in range(B)]
    texts = [""] * B
    emitted = [0] * B  # characters of texts[i] already streamed
    reason: list[str | None] = [None] * B
    results: list[GenerationResult | None] = [None] * B

    def finish(i, why):
        reason[i] = why
        if need_text:
            text = texts[i]
        else:
            text = tokenizer.decode(new[i], skip_special_tokens=True) if tokenizer else ""
        stats = {"prefill_seconds": t_prefill, "total_seconds": time.perf_counter() - t0}
        results[i] = GenerationResult(text, new[i], why, len(ids[i]), stats)
        if on_finish:
            on_finish(i, results[i])

    ones = torch.ones(B, dtype=torch.int32, device=dev)
    if cuda_graph is None:
        cuda_graph = dev.type == "cuda" and not model._fused
    elif cuda_graph and dev.type != "cuda":
        raise ValueError("cuda_graph=True needs a model on a CUDA device")
    decode = None
    while True:
        tokens = sample(logits, temperature, top_k, top_p, generator)
        host = tokens.tolist()
        for i, t in enumerate(host):
            if reason[i] is not None:
                continue
            if t in stop_ids:
                if stream and len(texts[i]) > emitted[i]:  # flush what was held back
                    stream(i, t, texts[i][emitted[i] :])
                finish(i, "eos" if t in model.config.eos_ids and not ignore_eos else "stop")
                continue
            new[i].append(t)
            hit = None
            if need_text:
                text = tokenizer.decode(new[i], skip_special_tokens=True)
                hit = next((s for s in stop_strs if s in text), None)
                if hit is not None:
                    text = text[: text.index(hit)]
                texts[i] = text
                if stream:
                    last = hit is not None or len(new[i]) >= limits[i]
                    end = len(text) if last else _stable_end(text, stop_strs)
                    stream(i, t, text[emitted[i] : max(end, emitted[i])])
                    emitted[i] = max(end, emitted[i])
            if hit is not None:
                finish(i, "stop")
            elif len(new[i]) >= limits[i]:
                finish(i, "length")
        if all(r is not None for r in reason):
            break
        if cuda_graph:
            if decode is None:
                from modegpt_rt.decode_graph import DecodeGraph

                decode = DecodeGraph(model, cache)
            logits = decode(tokens)
        else:
            logits = model.step(tokens[:, None], cache, ones)
    return results
