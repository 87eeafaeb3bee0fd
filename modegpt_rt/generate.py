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
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: what Python makes of bytes that are not UTF-8
                raise ValueError(f"prompt {i} is not valid UTF-8 text (at character {e.start})") from None
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


def _message_text(content, where: str, role: str) -> str:
    """A message's content: a string, or OpenAI's list of parts, of which only text parts are read (joined by
    newlines, as vLLM does); an assistant's null content (a turn that only called tools) is empty."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, (list, tuple)):
        if not content:
            raise ValueError(f"{where}: 'content' is an empty list of parts")
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{where}: content part {k} is {kind!r}; only text parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{where}: 'content' must be a string or a list of text parts, got {type(content).__name__}")


def _message(m, where: str) -> dict:
    """One checked message: a role (a non-empty string) and its content as text, both valid UTF-8."""
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise ValueError(f"{where}: 'role' must be a non-empty string, got {role!r}")
    if "content" not in m:
        raise ValueError(f"{where}: missing 'content'")
    text = _message_text(m["content"], where, role)
    for name, value in (("role", role), ("content", text)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: its {name} is not valid UTF-8 text (at character {e.start})") from None
    return {"role": role, "content": text}


def chat_prompts(conversations, tokenizer, no_tokenizer: str = "") -> list[list[int]]:
    """Conversations -> token-id prompts, through the tokenizer's chat template with the assistant's turn
    opened (`add_generation_prompt`). A conversation is a list of messages `{"role": ..., "content": ...}`,
    as in OpenAI's chat API; one conversation or a list of them. The template's text is encoded without the
    tokenizer's own special tokens: a template that starts with the BOS token writes it itself."""
    texts = chat_texts(conversations, tokenizer, no_tokenizer=no_tokenizer)
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def chat_texts(conversations, tokenizer, add_generation_prompt: bool = True, no_tokenizer: str = "") -> list[str]:
    """Conversations (as in `chat_prompts`) rendered by the tokenizer's chat template, each message checked;
    without `add_generation_prompt` a conversation is written as it is (calibration or evaluation text)."""
    if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
        conversations = [conversations]  # one conversation
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("no conversation given: pass a list of messages {'role': ..., 'content': ...}")
    if tokenizer is None:
        why = f" ({no_tokenizer})" if no_tokenizer else ""
        raise ValueError(f"chat needs a tokenizer with a chat template, and this model has none{why}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template (a base model?): prompt it with plain text instead"
        )
    out = []
    for i, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"conversation {i} must be a non-empty list of messages")
        where = f"conversation {i}, message " if len(conversations) > 1 else "message "
        messages = [_message(m, f"{where}{j}") for j, m in enumerate(conv)]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as e:  # noqa: BLE001 — a template may refuse (roles that must alternate, ...)
            raise ValueError(f"the chat template refused conversation {i}: {e}") from None
        if not isinstance(text, str) or not text:
            raise ValueError(f"the chat template rendered conversation {i} as nothing")
        out.append(text)
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
    `cuda_graph`: replay the decode step from a CUDA graph (`decode_graph.py`); default: on a CUDA device with
    the Triton backend.
    A graph replays a fixed batch: every row steps until the last sequence ends, and the longest prompt plus
    the largest limit must fit the context. Without one, the prompts run as a `ContinuousBatch`: a sequence
    that ends leaves the batch, the later steps compute only the rows still running, and each prompt needs
    only its own length plus its own limit to fit.
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
    _Ends(model, stop, ignore_eos).check(tokenizer, stream)
    dev = model.device
    from modegpt_rt.decode_graph import graph_capturable

    if cuda_graph is None:
        cuda_graph = graph_capturable(model)
    elif cuda_graph and not graph_capturable(model):
        raise ValueError(
            f"cuda_graph=True needs a model on a CUDA device with the triton backend (this one: {dev.type}, "
            f"{model.backend}; the torch reference reads sizes on the host, which a graph cannot record)"
        )
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    run = _generate_static if cuda_graph else _generate_compacting
    return run(
        model, ids, limits, (temperature, top_k, top_p, generator), (stop, ignore_eos), tokenizer, stream, on_finish
    )


def _generate_compacting(model, ids, limits, sampling, ends, tokenizer, stream, on_finish):
    """`generate` without a CUDA graph: the prompts run as one `ContinuousBatch` that nobody joins, so a
    sequence that ended leaves the batch and the decode steps after it compute only the rows still running."""
    stop, ignore_eos = ends
    need = max(len(p) + m for p, m in zip(ids, limits))
    run = ContinuousBatch(model, tokenizer, max_batch=len(ids), min_capacity=need)
    for i, (p, m) in enumerate(zip(ids, limits)):
        run.add(p, m, *sampling, stop=stop, ignore_eos=ignore_eos, stream=stream, on_finish=on_finish, index=i)
    results = [None] * len(ids)
    while len(run):
        for seq in run.step():
            results[seq.index] = seq.result
    return results


def _generate_static(model, ids, limits, sampling, ends, tokenizer, stream, on_finish, cuda_graph: bool = True):
    """`generate` as one fixed batch: every row steps until the last sequence ends (a sequence that ended
    takes ignored tokens), the shape a CUDA graph replays. `cuda_graph=False` runs the same loop with plain
    steps (bench/generate_ragged.py compares it with `_generate_compacting`)."""
    # the batch steps together, so the longest prompt and the largest limit must fit the context together
    ctx = model.config.max_position_embeddings
    longest, most = max(map(len, ids)), max(limits)
    if longest + most > ctx:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus the largest max_new_tokens ({most}) exceeds the context "
            f"of {ctx} tokens; generate these prompts in separate calls, or without a CUDA graph"
        )
    temperature, top_k, top_p, generator = sampling
    ends = _Ends(model, *ends)
    B, dev = len(ids), model.device
    batch, lens = _right_padded(ids, dev)
    cache = model.new_cache(B, longest + most)

    t0 = time.perf_counter()
    logits = model.step(batch, cache, lens)
    t_prefill = time.perf_counter() - t0
    seqs = [
        _Sequence(i, len(p), m, ends, tokenizer, stream, on_finish, t0, t_prefill)
        for i, (p, m) in enumerate(zip(ids, limits))
    ]

    ones = torch.ones(B, dtype=torch.int32, device=dev)
    decode = None
    while True:
        tokens = sample(logits, temperature, top_k, top_p, generator)
        for seq, t in zip(seqs, tokens.tolist()):
            if seq.result is None:
                seq.take(t)
        if all(seq.result is not None for seq in seqs):
            break
        if cuda_graph:
            if decode is None:
                from modegpt_rt.decode_graph import DecodeGraph

                decode = DecodeGraph(model, cache)
            logits = decode(tokens)
        else:
            logits = model.step(tokens[:, None], cache, ones)
    return [seq.result for seq in seqs]


def _right_padded(ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> a right-padded batch [B, T] and the lengths [B] (int32), as `Model.step` takes them."""
    lens = torch.tensor([len(p) for p in ids], dtype=torch.int32, device=device)
    batch = torch.zeros(len(ids), int(lens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(ids):
        batch[i, : len(p)] = torch.tensor(p)
    return batch, lens


class _Ends:
    """What ends a sequence: stop token ids (the model's end-of-sequence ids unless `ignore_eos`) and stop strings."""

    def __init__(self, model, stop, ignore_eos: bool):
        stop = [stop] if isinstance(stop, str) or _is_int(stop) else list(stop or [])
        bad = [s for s in stop if not (isinstance(s, str) or (_is_int(s) and s >= 0))]
        if bad:
            raise ValueError(f"stop must hold strings and non-negative integer token ids, got {bad[0]!r}")
        self.ids = {int(s) for s in stop if not isinstance(s, str)}
        self.strs = [s for s in stop if isinstance(s, str) and s]
        self.eos = set(model.config.eos_ids)
        self.ignore_eos = ignore_eos
        if not ignore_eos:
            self.ids |= self.eos

    def check(self, tokenizer, stream):
        if (stream or self.strs) and tokenizer is None:
            raise ValueError("streaming and stop strings need a tokenizer")


class _Sequence:
    """One sequence's new tokens, text and end, fed one sampled token at a time (`take`): the bookkeeping
    `generate` and `ContinuousBatch` share. `stream(index, token, delta)` and `on_finish(index, result)` as in
    `generate`; `result` is set when the sequence ends."""

    def __init__(self, index, prompt_len, limit, ends: _Ends, tokenizer, stream, on_finish, t0, t_prefill):
        self.index, self.prompt_len, self.limit, self.ends = index, prompt_len, limit, ends
        self.tokenizer, self.stream, self.on_finish = tokenizer, stream, on_finish
        self.t0, self.t_prefill = t0, t_prefill
        self.need_text = bool(stream or ends.strs)
        self.new: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already streamed
        self.result: GenerationResult | None = None

    def take(self, t: int):
        ends = self.ends
        if t in ends.ids:
            if self.stream and len(self.text) > self.emitted:  # flush what was held back
                self.stream(self.index, t, self.text[self.emitted :])
            self._finish("eos" if t in ends.eos and not ends.ignore_eos else "stop")
            return
        self.new.append(t)
        hit = None
        if self.need_text:
            text = self.tokenizer.decode(self.new, skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in ends.strs) if i >= 0]
            hit = min(cuts) if cuts else None  # the stop string that starts first, whatever the list's order
            if hit is not None:
                text = text[:hit]
            self.text = text
            if self.stream:
                last = hit is not None or len(self.new) >= self.limit
                end = len(text) if last else _stable_end(text, ends.strs)
                self.stream(self.index, t, text[self.emitted : max(end, self.emitted)])
                self.emitted = max(end, self.emitted)
        if hit is not None:
            self._finish("stop")
        elif len(self.new) >= self.limit:
            self._finish("length")

    def _finish(self, why: str):
        if self.need_text:
            text = self.text
        else:
            text = self.tokenizer.decode(self.new, skip_special_tokens=True) if self.tokenizer else ""
        stats = {"prefill_seconds": self.t_prefill, "total_seconds": time.perf_counter() - self.t0}
        self.result = GenerationResult(text, self.new, why, self.prompt_len, stats)
        if self.on_finish:
            self.on_finish(self.index, self.result)


class ContinuousBatch:
    """Continuous batching: sequences join a running batch and leave it between decode steps.

    `add` gives a prompt a free row of a shared KV cache; `step` prefills the prompts added since the last
    step (together, in one batched step), samples the next token of every running sequence (each with its
    own sampling settings and end conditions), drops the sequences that ended, and runs one decode step for
    the others. The running sequences always sit in rows 0..n-1 of the cache (an ended sequence's row is
    refilled with the last one's), so a step computes only the live rows, and one sequence alone decodes as
    fast as `generate` with one prompt. The cache grows when a new sequence needs more positions than it
    has. No CUDA graph: `generate` remains the fastest way to run a fixed batch on a GPU.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 8, min_capacity: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.min_capacity = model, max_batch, min_capacity
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.seqs: list[_Sequence] = []  # running, in cache-row order
        self.logits: torch.Tensor | None = None  # next-token logits [rows prefilled, V], in cache-row order
        self.sampling: list[tuple] = []  # (temperature, top_k, top_p, generator) per running sequence
        self.cache = None
        self._views: dict[tuple, object] = {}  # (0, n) -> KVCache over the first n rows (keeps its C++ plan)
        self._new: list[list[int]] = []  # prompts added since the last step, not yet prefilled
        self.steps = 0
        self.allocations = 0  # caches made (the first, then one each time a longer sequence arrived)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        stop=None,
        ignore_eos: bool = False,
        stream: Callable | None = None,
        on_finish: Callable | None = None,
        index=0,
    ) -> None:
        """Run `prompt` (token ids, or a string when there is a tokenizer) from the next `step` on, which
        prefills it. `stream(index, token, delta)` and `on_finish(index, result)` as in `generate`, called
        with `index`. Sampling with temperature > 0 draws from `generator` (one made at random if None)."""
        if not _is_int(max_new_tokens):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        _check_args(max_new_tokens, temperature, top_k, top_p)
        model, ctx = self.model, self.model.config.max_position_embeddings
        (ids,) = encode_prompts([prompt], self.tokenizer, model.config.vocab_size)
        if len(ids) + max_new_tokens > ctx:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the context "
                f"of {ctx} tokens"
            )
        if len(self.seqs) >= self.max_batch:
            raise RuntimeError(f"the batch is full ({self.max_batch} sequences)")
        ends = _Ends(model, stop, ignore_eos)
        ends.check(self.tokenizer, stream)
        if temperature > 0 and generator is None:
            generator = torch.Generator(device=model.device)
            generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self._reserve(len(ids) + max_new_tokens)
        self.cache.lens[len(self.seqs)] = 0
        seq = _Sequence(index, len(ids), max_new_tokens, ends, self.tokenizer, stream, on_finish, None, 0.0)
        self.seqs.append(seq)
        self.sampling.append((temperature, top_k, top_p, generator))
        self._new.append(ids)

    def _prefill(self):
        """The prompts added since the last step, in one batched step (they sit in the last rows)."""
        ids, self._new = self._new, []
        start = len(self.seqs) - len(ids)
        batch, lens = _right_padded(ids, self.model.device)
        t0 = time.perf_counter()
        logits = self.model.step(batch, self._rows(start, len(self.seqs)), lens)
        t_prefill = time.perf_counter() - t0
        for seq in self.seqs[start:]:
            seq.t0, seq.t_prefill = t0, t_prefill
        self.logits = torch.cat([self.logits[:start], logits]) if start else logits

    @torch.no_grad()
    def step(self) -> list[_Sequence]:
        """Sample one token for every running sequence, then decode the ones that go on. Returns the sequences
        that ended in this step (their `result` set, `on_finish` called)."""
        if not self.seqs:
            return []
        if self._new:
            self._prefill()
        tokens = [0] * len(self.seqs)
        groups: dict[tuple, list[int]] = {}
        for i, (temperature, top_k, top_p, gen) in enumerate(self.sampling):
            groups.setdefault((temperature, top_k, top_p, id(gen) if temperature > 0 else None), []).append(i)
        for rows in groups.values():
            temperature, top_k, top_p, gen = self.sampling[rows[0]]
            logits = self.logits if len(rows) == len(tokens) else self.logits[rows]  # one group: all, in order
            picked = sample(logits, temperature, top_k, top_p, gen)
            for i, t in zip(rows, picked.tolist()):
                tokens[i] = t
        for seq, t in zip(self.seqs, tokens):
            seq.take(t)
        ended = [row for row, seq in enumerate(self.seqs) if seq.result is not None]
        ended_seqs = [self.seqs[row] for row in ended]
        self.logits = None  # used; the decode step below gives the next ones
        for row in reversed(ended):
            self._drop(row, tokens)
        if self.seqs:
            n = len(self.seqs)
            ids = torch.tensor(tokens, device=self.model.device)[:, None]
            logits = self.model.step(ids, self._rows(0, n), torch.ones(n, dtype=torch.int32, device=ids.device))
            self.logits = logits
            self.steps += 1
        return ended_seqs

    def cancel(self, which: Callable) -> int:
        """Remove the running sequences whose `index` satisfies `which(index)` (their `on_finish` is not
        called): a client that left. Returns how many were removed."""
        rows = [row for row, seq in enumerate(self.seqs) if which(seq.index)]
        if rows and self._new:  # the unprefilled rows must stay last: prefill them first
            self._prefill()
        for row in reversed(rows):
            self._drop(row)
        return len(rows)

    def _drop(self, row: int, *more: list):
        """Remove the sequence in `row`; the last running sequence moves into it (its cached keys and values,
        fill level, logits, sampling settings, and its entry of each list in `more`)."""
        last = len(self.seqs) - 1
        lists = (self.seqs, self.sampling, *more)
        if row != last:
            cache, n = self.cache, int(self.cache.lens[last])
            for t in cache.k + cache.v:
                t[row, :, :n] = t[last, :, :n]
            cache.lens[row] = cache.lens[last]
            for lst in lists:
                lst[row] = lst[last]
            if self.logits is not None:
                self.logits[row] = self.logits[last]
        for lst in lists:
            del lst[last]
        if self.logits is not None:
            self.logits = self.logits[:last]

    def _reserve(self, positions: int):
        """A cache of `max_batch` rows with at least `positions` positions, keeping the running sequences."""
        cache = self.cache
        if cache is not None and cache.capacity >= positions:
            return
        ctx = self.model.config.max_position_embeddings
        capacity = min(ctx, max(positions, self.min_capacity, 2 * cache.capacity if cache else 0))
        new = self.model.new_cache(self.max_batch, capacity)
        if cache is not None:
            cache.copy_rows(new, len(self.seqs))
        self.cache, self._views = new, {}
        self.allocations += 1

    def _rows(self, start: int, stop: int):
        """A KVCache over rows start..stop-1 of the shared cache (views: what a step writes lands there)."""
        key = (start, stop)
        view = self._views.get(key)
        if view is None:
            c = self.cache
            view = type(c)(
                [k[start:stop] for k in c.k],
                [v[start:stop] for v in c.v],
                c.lens[start:stop],
                layers=c.layers,
            )
            if start == 0:  # the decode views are reused every step (and keep their C++ plan)
                self._views[key] = view
        return view
