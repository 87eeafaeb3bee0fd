"""Zero-shot multiple-choice accuracy, matching lm-evaluation-harness (lm-eval) prompts and metrics.

Tasks: ``arc_easy``, ``arc_challenge``, ``piqa``, ``winogrande``, ``hellaswag``, read from local files
(``shared/data``; see each task's ``SOURCE.md``).  Everything is zero-shot, exactly as lm-eval builds it:

* every choice ``i`` of a document becomes one log-likelihood request ``(context_i, continuation_i)``;
  the continuation starts with lm-eval's ``target_delimiter`` (a single space);
* ``acc``: ``argmax_i loglik_i == gold``;
* ``acc_norm``: ``argmax_i loglik_i / len(choice_i) == gold``, ``len`` in *characters* of the ``doc_to_choice``
  string (no delimiter) -- lm-eval's ``completion_len = [float(len(i)) for i in choices]``;
* ties go to the lowest index (``np.argmax``).

Prompt formats (lm-eval task YAMLs):

========== ======================================= =================================== ============
task       context (doc_to_text)                    continuation (" " + doc_to_choice)  metrics
========== ======================================= =================================== ============
arc_*      ``"Question: {stem}\\nAnswer:"``          ``" {choice text}"``               acc, acc_norm
piqa       ``"Question: {goal}\\nAnswer:"``          ``" {sol1}"`` / ``" {sol2}"``      acc, acc_norm
hellaswag  ``preprocess(label + ": " + ctx)``       ``" " + preprocess(ending)``       acc, acc_norm
winogrande ``sentence[:blank] + option``             ``" " + sentence[blank+1:].strip()`` acc
========== ======================================= =================================== ============

Winogrande is lm-eval's "partial scoring" (``multiple_inputs``): the *context* differs per option and the
continuation (the rest of the sentence after ``_``) is the same; the continuation's log-likelihoods are compared.

HellaSwag: lm-eval builds ``ctx = ctx_a + " " + ctx_b.capitalize()`` and then ``preprocess``es (strip,
``" [title]" -> ". "``, drop every ``[...]`` tag, ``"  " -> " "``).  The local file is klosax's 6-line text
extraction, which keeps the original ``ctx`` (``ctx_b`` not capitalised) and has no ``ctx_a``/``ctx_b`` split.
We recover lm-eval's text as follows: for ActivityNet items (activity label not one of the WikiHow categories;
WikiHow items have an empty ``ctx_b``) the part after the last sentence end (``[.!?]`` + whitespace) is taken
as ``ctx_b`` and ``.capitalize()``-d; then lm-eval's ``preprocess`` is applied to the query and to each ending
(idempotent on text klosax already cleaned, and it removes the few ``[...]`` tags klosax kept).  On this file
the ActivityNet rule selects exactly the 3,243 ActivityNet items of the validation split.  Known residual
differences: a ``ctx_b`` that itself contains a sentence end would be capitalised only after it, and 25 items
(29 strings) where klosax's tag removal left an unmatched ``[`` or ``]`` (lm-eval's regex would have removed text
up to a later tag).

Tokenisation (lm-eval ``HFLM._encode_pair``): trailing whitespace of the context is moved to the front of the
continuation; ``whole = encode(context + continuation)``, ``ctx = encode(context)``,
``cont = whole[len(ctx):]``; both encoded with ``add_special_tokens=False``.  **BOS**: by default
(``add_bos=False``) no BOS is added, which is lm-eval's default for causal LMs (``add_bos_token=False``).
``add_bos=None`` follows the tokenizer's default (prepend BOS iff ``tokenizer.encode`` adds one by default);
``add_bos=True`` always prepends ``bos_token_id`` to the context.  SmolLM2's tokenizer adds none by default,
so the first two agree there (``add_bos=True`` would prepend its ``<|im_start|>``).  An empty context is
replaced by one BOS (or EOS) token, as lm-eval does.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modegpt_rt.data import find_data_dir

TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag")
TARGET_DELIMITER = " "

# Relative file locations under the data directory.
_TASK_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc-easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc-challenge/ARC-Challenge-Test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
}

# WikiHow category labels of the HellaSwag validation split (ActivityNet labels are activity names).
HELLASWAG_WIKIHOW_LABELS = frozenset(
    {
        "Arts and Entertainment",
        "Cars & Other Vehicles",
        "Computers and Electronics",
        "Education and Communications",
        "Family Life",
        "Finance and Business",
        "Food and Entertaining",
        "Health",
        "Hobbies and Crafts",
        "Holidays and Traditions",
        "Home and Garden",
        "Home,Categories",
        "Personal Care and Style",
        "Pets and Animals",
        "Philosophy and Religion",
        "Relationships",
        "Sports and Fitness",
        "Travel",
        "Uncategorized",
        "Work World",
        "Youth",
    }
)


@dataclass(frozen=True)
class Doc:
    """One multiple-choice item, already formatted like lm-eval.

    ``contexts[i]``/``continuations[i]`` form the log-likelihood request of choice ``i``; ``choices[i]`` is the
    ``doc_to_choice`` string whose character length normalises ``acc_norm``.
    """

    task: str
    index: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int
    metrics: tuple[str, ...] = field(default=("acc", "acc_norm"))

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))

    @property
    def context(self) -> str:
        """The shared context (single-context tasks); for winogrande the context of choice 0."""
        return self.contexts[0]


# ----------------------------------------------------------------------------------------------- data location


def _resolve(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir) if data_dir is not None else find_data_dir()


# ----------------------------------------------------------------------------------------------- loaders


def _iter_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _read_labels(path: Path) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [int(x) for x in f.read().split()]


def _label(labels: list[int], i: int, task: str, labels_path: Path) -> int:
    if i >= len(labels):
        raise ValueError(f"{task}: {labels_path} has {len(labels)} labels, fewer than the task's items")
    return labels[i]


def _check_label_count(task: str, n_items: int, labels: list[int], labels_path: Path, limit: int | None) -> None:
    if limit is None and n_items != len(labels):
        raise ValueError(f"{task}: {n_items} items but {len(labels)} labels in {labels_path}")


def _mc_doc(task: str, index: int, context: str, choices: Sequence[str], gold: int, metrics) -> Doc:
    choices = tuple(choices)
    if not 0 <= gold < len(choices):
        raise ValueError(f"{task} item {index}: gold answer {gold} is not one of its {len(choices)} choices")
    return Doc(
        task=task,
        index=index,
        contexts=(context,) * len(choices),
        continuations=tuple(TARGET_DELIMITER + c for c in choices),
        choices=choices,
        gold=gold,
        metrics=metrics,
    )


def _load_arc(task: str, path: Path, limit: int | None) -> list[Doc]:
    docs = []
    for i, d in enumerate(_iter_jsonl(path)):
        if limit is not None and i >= limit:
            break
        q = d["question"]
        texts = [c["text"] for c in q["choices"]]
        labels = [c["label"] for c in q["choices"]]
        ctx = f"Question: {q['stem']}\nAnswer:"
        if d["answerKey"] not in labels:
            raise ValueError(f"{task} item {i}: answerKey {d['answerKey']!r} is not one of its labels {labels}")
        docs.append(_mc_doc(task, i, ctx, texts, labels.index(d["answerKey"]), ("acc", "acc_norm")))
    return docs


def _load_piqa(path: Path, labels_path: Path, limit: int | None) -> list[Doc]:
    labels = _read_labels(labels_path)
    docs = []
    for i, d in enumerate(_iter_jsonl(path)):
        if limit is not None and i >= limit:
            break
        ctx = f"Question: {d['goal']}\nAnswer:"
        gold = _label(labels, i, "piqa", labels_path)
        docs.append(_mc_doc("piqa", i, ctx, [d["sol1"], d["sol2"]], gold, ("acc", "acc_norm")))
    _check_label_count("piqa", len(docs), labels, labels_path, limit)
    return docs


def _load_winogrande(path: Path, labels_path: Path, limit: int | None) -> list[Doc]:
    labels = _read_labels(labels_path)
    docs = []
    for i, d in enumerate(_iter_jsonl(path)):
        if limit is not None and i >= limit:
            break
        s = d["sentence"]
        blank = s.index("_")
        options = (d["option1"], d["option2"])
        contexts = tuple(s[:blank] + opt for opt in options)  # lm-eval partial_context / doc_to_choice
        target = s[blank + 1 :].strip()  # lm-eval partial_target / doc_to_target
        gold = _label(labels, i, "winogrande", labels_path) - 1  # labels are 1/2
        if gold not in (0, 1):
            raise ValueError(f"winogrande item {i}: label {gold + 1} in {labels_path} is not 1 or 2")
        if "answer" in d and str(d["answer"]).strip() and int(d["answer"]) - 1 != gold:
            raise ValueError(f"winogrande item {i}: answer field {d['answer']!r} != label {labels[i]}")
        docs.append(
            Doc(
                task="winogrande",
                index=i,
                contexts=contexts,
                continuations=(TARGET_DELIMITER + target,) * 2,
                choices=contexts,
                gold=gold,
                metrics=("acc",),
            )
        )
    _check_label_count("winogrande", len(docs), labels, labels_path, limit)
    return docs


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag/utils.py::preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


_SENTENCE_END = re.compile(r"[.!?]\s")


def hellaswag_query(line: str) -> str:
    """``"label: ctx"`` line of the klosax file -> lm-eval's ``query`` (see module docstring)."""
    label, sep, ctx = line.partition(": ")
    if not sep:
        return hellaswag_preprocess(line)
    if label not in HELLASWAG_WIKIHOW_LABELS:
        ends = list(_SENTENCE_END.finditer(ctx))
        if ends:
            cut = ends[-1].end()
            ctx = ctx[:cut] + ctx[cut:].capitalize()
    return hellaswag_preprocess(label + ": " + ctx)


def _load_hellaswag(path: Path, limit: int | None) -> list[Doc]:
    docs = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of 6")
    for i in range(len(lines) // 6):
        if limit is not None and i >= limit:
            break
        block = lines[6 * i : 6 * i + 6]
        query = hellaswag_query(block[0])
        endings = [hellaswag_preprocess(e) for e in block[2:6]]
        docs.append(_mc_doc("hellaswag", i, query, endings, int(block[1]), ("acc", "acc_norm")))
    return docs


def load_task(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Doc]:
    """Load and format one task; ``limit`` keeps the first ``limit`` documents (file order)."""
    if name not in _TASK_FILES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    paths = _task_paths(name, _resolve(data_dir))
    if name in ("arc_easy", "arc_challenge"):
        docs = _load_arc(name, paths[0], limit)
    elif name == "piqa":
        docs = _load_piqa(paths[0], paths[1], limit)
    elif name == "winogrande":
        docs = _load_winogrande(paths[0], paths[1], limit)
    else:
        docs = _load_hellaswag(paths[0], limit)
    if not docs and limit != 0:
        raise ValueError(f"task {name!r}: no items in {paths[0]}")
    return docs


def _task_paths(name: str, root: Path) -> list[Path]:
    paths = [root / p for p in _TASK_FILES[name]]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"task {name!r}: missing data file {p}")
    return paths


def check_tasks(tasks: str | Iterable[str], data_dir: str | os.PathLike | None = None) -> list[str]:
    """The task names of ``tasks`` (see ``evaluate``), each checked to be known and to have its data files,
    before any model is loaded. Raises ValueError / FileNotFoundError."""
    names = _task_list(tasks)
    if not names:
        raise ValueError(f"no task given; known tasks: {', '.join(TASKS)}")
    root = _resolve(data_dir)
    for name in names:
        _task_paths(name, root)
    return names


# ----------------------------------------------------------------------------------------------- scoring


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(x) for x in out]


def _resolve_bos(tokenizer, add_bos: bool | None) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        if bos is None:
            return []
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        return [bos] if len(with_special) > 0 and with_special[0] == bos else []
    if add_bos:
        if bos is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        return [bos]
    return []


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], add_bos: bool | None = False):
    """lm-eval ``_encode_pair`` for each ``(context, continuation)`` -> list of ``(context_ids, cont_ids)``."""
    prefix = _resolve_bos(tokenizer, add_bos)
    # lm-eval scores an empty context after a single prefix token (BOS, else EOS)
    specials = (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
    empty_ctx = prefix or [t for t in specials if t is not None][:1]
    moved = []
    for ctx, cont in pairs:
        n = len(ctx) - len(ctx.rstrip())
        if n > 0:
            cont = ctx[-n:] + cont
            ctx = ctx[:-n]
        moved.append((ctx, cont))
    ctx_texts = sorted({c for c, _ in moved if c})
    ctx_ids = dict(zip(ctx_texts, _encode_batch(tokenizer, ctx_texts)))
    whole_ids = _encode_batch(tokenizer, [c + k if c else k for c, k in moved])
    out = []
    for (ctx, _), whole in zip(moved, whole_ids):
        if not ctx:
            if not empty_ctx:
                raise ValueError("empty context needs a tokenizer with a bos or eos token")
            out.append((list(empty_ctx), whole))
            continue
        c = ctx_ids[ctx]
        out.append((prefix + c, whole[len(c) :]))
    return out


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    fwd = getattr(model, "forward", None)
    if fwd is None:
        return False
    try:
        return "logits_to_keep" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


def _default_max_length(model) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def loglikelihoods(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    add_bos: bool | None = False,
    device=None,
    progress: bool = False,
    desc: str = "loglikelihood",
    use_logits_to_keep: bool = True,
    pack: bool = True,
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context, like lm-eval ``loglikelihood``.

    ``model(input_ids)`` must accept a LongTensor ``[B, T]`` and return an object with ``.logits`` ``[B, T, V]``.
    Identical pairs are scored once; requests are sorted by total token length (longest first) so each batch
    has similar lengths, right-padded (no attention mask is needed: the model is causal and only positions
    before the padding are read), and log-softmax is computed only at the continuation positions.  Inputs longer
    than ``max_length + 1`` tokens are truncated from the left (lm-eval); ``max_length`` defaults to the model
    config's ``max_position_embeddings`` (else 2048).  Results come back in the order of ``pairs``.
    If ``model.forward`` has a ``logits_to_keep`` parameter (transformers causal LMs) and
    ``use_logits_to_keep`` is true, it is passed so that the LM head only runs on the trailing positions that
    contain continuations; otherwise ``model(input_ids)`` is called with no other argument.

    With ``pack`` (default) and a model that has ``hidden_states(ids, positions, mask)`` and ``logits(h)``
    (modegpt_rt's ``Model``), the requests that share a context are scored in one packed row instead: the
    context is computed once (see ``_packed_loglikelihoods``): 89 s instead of 168 s for the five tasks at
    ``limit=200`` on a 30% SmolLM2.
    """
    import torch

    pairs = [(str(c), str(k)) for c, k in pairs]
    if not pairs:
        return []
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    max_length = int(max_length) if max_length is not None else _default_max_length(model)
    if device is None:
        device = _model_device(model) or torch.device("cpu")

    uniq: dict[tuple[str, str], int] = {}
    order = [uniq.setdefault(p, len(uniq)) for p in pairs]
    uniq_pairs = list(uniq)
    encoded = encode_pairs(tokenizer, uniq_pairs, add_bos=add_bos)
    for pair, (_, cont) in zip(uniq_pairs, encoded):
        if len(cont) == 0:
            raise ValueError(f"empty continuation after tokenisation for request {pair!r}")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={max_length}")

    results = [0.0] * len(encoded)
    todo = list(range(len(encoded)))
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(encoded), desc=desc, unit="req")
    try:
        if pack and hasattr(model, "hidden_states") and hasattr(model, "logits"):
            todo = _packed_loglikelihoods(model, encoded, results, batch_size, max_length, pbar)
        _padded_loglikelihoods(
            model, encoded, todo, results, batch_size, max_length, device, tokenizer, use_logits_to_keep, pbar
        )
    finally:
        if pbar is not None:
            pbar.close()
    return [results[j] for j in order]


def _packed_loglikelihoods(model, encoded, results, batch_size, max_length, pbar) -> list[int]:
    """Score the requests that share a context in one packed row: the context once, then each continuation
    (but its last token) at the positions it would have after the context, attending to the context and to
    itself only.  Needs a model with ``hidden_states(ids, positions, mask)`` and ``logits(h)`` (modegpt_rt's).
    ``batch_size`` counts requests per forward.  Returns the requests left for the padded path (a context
    and continuation longer than ``max_length``).
    """
    import torch

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(encoded):
        groups.setdefault(tuple(ctx), []).append(i)
    rest, packs = [], []
    for ctx, members in groups.items():
        if len(ctx) + max(len(encoded[i][1]) for i in members) - 1 > max_length:
            rest.extend(members)
        else:
            packs.append((ctx, members, len(ctx) + sum(len(encoded[i][1]) - 1 for i in members)))
    packs.sort(key=lambda p: (-p[2], p[0]))
    batches, cur, n_req = [], [], 0
    for p in packs:
        cur.append(p)
        n_req += len(p[1])
        if n_req >= batch_size:
            batches.append(cur)
            cur, n_req = [], 0
    if cur:
        batches.append(cur)
    with torch.inference_mode():
        for batch in batches:
            T = batch[0][2]
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            pos = torch.zeros(len(batch), T, dtype=torch.long)
            seg = torch.full((len(batch), T), -1, dtype=torch.long)  # 0: context, j+1: continuation j, -1: pad
            rows, cols, tgts, reqs = [], [], [], []
            for r, (ctx, members, _) in enumerate(batch):
                c = len(ctx)
                ids[r, :c] = torch.tensor(ctx)
                pos[r, :c] = torch.arange(c)
                seg[r, :c] = 0
                start = c
                for j, i in enumerate(members):
                    cont = encoded[i][1]
                    n = len(cont) - 1
                    ids[r, start : start + n] = torch.tensor(cont[:-1], dtype=torch.long)
                    pos[r, start : start + n] = torch.arange(c, c + n)
                    seg[r, start : start + n] = j + 1
                    # token t of the continuation is predicted at the context's last position (t = 0),
                    # else at the continuation's own token t - 1
                    rows += [r] * len(cont)
                    cols += [c - 1] + list(range(start, start + n))
                    tgts += cont
                    reqs += [i] * len(cont)
                    start += n
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            sq, sk = seg[:, :, None], seg[:, None, :]
            mask = causal & ((sk == 0) | (sk == sq))  # pads (-1) see the context and earlier pads
            h = model.hidden_states(ids, pos, mask[:, None])
            dev = h.device
            sel = model.logits(h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]).float()
            tgt = torch.tensor(tgts, dtype=torch.long, device=dev)
            tok_lp = torch.log_softmax(sel, dim=-1).gather(1, tgt[:, None]).squeeze(1)
            uniq = sorted(set(reqs))
            where = {i: k for k, i in enumerate(uniq)}
            sums = torch.zeros(len(uniq), dtype=torch.float64, device=dev)
            sums.index_add_(0, torch.tensor([where[i] for i in reqs], device=dev), tok_lp.double())
            for k, i in enumerate(uniq):
                results[i] = float(sums[k])
            if pbar is not None:
                pbar.update(len(uniq))
    return rest


def _padded_loglikelihoods(
    model, encoded, todo, results, batch_size, max_length, device, tokenizer, use_logits_to_keep, pbar
):
    """One right-padded row per request (any model with ``model(ids).logits``), longest first."""
    import torch

    keep_kw = use_logits_to_keep and _accepts_logits_to_keep(model)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0

    # lm-eval's Collator key: longest first, ties broken by the token tuple (deterministic).
    sorted_idx = sorted(
        todo, key=lambda i: (-len(encoded[i][0]) - len(encoded[i][1]), tuple(encoded[i][0] + encoded[i][1]))
    )
    with torch.inference_mode():
        for b0 in range(0, len(sorted_idx), batch_size):
            chunk = sorted_idx[b0 : b0 + batch_size]
            inps, conts, lens = [], [], []
            for i in chunk:
                ctx, cont = encoded[i]
                inp = (ctx + cont)[-(max_length + 1) :][:-1]
                inps.append(inp)
                conts.append(cont)
                lens.append(len(inp))
            T = max(lens)
            batch = torch.full((len(chunk), T), int(pad_id), dtype=torch.long)
            for r, inp in enumerate(inps):
                batch[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            # only positions >= first_pos are read; a model that takes `logits_to_keep` (transformers)
            # then projects just the last T - first_pos positions through the LM head
            first_pos = min(L - len(c) for L, c in zip(lens, conts))
            if keep_kw and first_pos > 0:
                logits = model(batch.to(device), logits_to_keep=T - first_pos).logits
                offset = T - logits.shape[1]
            else:
                logits = model(batch.to(device)).logits
                offset = 0
            rows = torch.cat([torch.full((len(c),), r, dtype=torch.long) for r, c in enumerate(conts)])
            cols = torch.cat([torch.arange(L - len(c), L, dtype=torch.long) for L, c in zip(lens, conts)])
            cols = cols - offset
            tgt = torch.tensor([t for c in conts for t in c], dtype=torch.long)
            rows_d, cols_d, tgt_d = rows.to(logits.device), cols.to(logits.device), tgt.to(logits.device)
            sel = logits[rows_d, cols_d].float()  # [n_cont_tokens, V]
            tok_lp = torch.log_softmax(sel, dim=-1).gather(1, tgt_d[:, None]).squeeze(1)
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=tok_lp.device)
            sums.index_add_(0, rows_d, tok_lp.double())
            for r, i in enumerate(chunk):
                results[i] = float(sums[r])
            del logits, sel, tok_lp
            if pbar is not None:
                pbar.update(len(chunk))


# ----------------------------------------------------------------------------------------------- evaluation


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def _mean_stderr(vals: Sequence[float]) -> tuple[float, float]:
    """Mean and lm-eval's mean_stderr (sample std with ddof=1, over sqrt(n)); NaN where undefined."""
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


def score_docs(docs: Sequence[Doc], lls: Sequence[float]) -> dict:
    """Per-task metrics from per-request log-likelihoods (concatenated in ``doc.requests`` order)."""
    out: dict = {}
    pos = 0
    per_task: dict[str, dict[str, list[float]]] = {}
    for d in docs:
        k = len(d.contexts)
        ll = list(lls[pos : pos + k])
        pos += k
        m = per_task.setdefault(d.task, {})
        m.setdefault("acc", []).append(float(_argmax(ll) == d.gold))
        if "acc_norm" in d.metrics:
            normed = [x / float(len(c)) if len(c) else x for x, c in zip(ll, d.choices)]
            m.setdefault("acc_norm", []).append(float(_argmax(normed) == d.gold))
    if pos != len(lls):
        raise ValueError(f"{len(lls)} log-likelihoods for {pos} requests")
    for task, m in per_task.items():
        res: dict = {}
        for metric, vals in m.items():
            res[metric], res[f"{metric}_stderr"] = _mean_stderr(vals)
        res["n"] = len(m["acc"])
        # per item, in file order ('1' = right): paired comparisons between models on the same items
        res["items"] = {metric: "".join("1" if v else "0" for v in vals) for metric, vals in m.items()}
        out[task] = res
    return out


def paired_difference(a: dict, b: dict) -> dict:
    """Per task, the accuracy of ``b`` minus that of ``a`` (two ``evaluate`` results, e.g. compressed vs dense)
    on the items both scored, with the standard error of the paired difference.  Items are matched by their
    position in the task's file: a result's ``indices`` (``sample``) or else its first n items (``limit`` keeps
    a prefix).  Uses acc_norm where the task reports it, else acc; needs the ``items`` field."""
    for name, r in (("base", a), ("other", b)):
        if not isinstance(r, dict) or not isinstance(r.get("tasks"), dict):
            raise ValueError(f"the {name} file is not a zero-shot result (no 'tasks' object)")
    out = {}
    for task in a["tasks"].keys() & b["tasks"].keys():
        ra, rb = a["tasks"][task], b["tasks"][task]
        items = ra.get("items") if isinstance(ra, dict) else None
        metric = "acc_norm" if isinstance(items, dict) and "acc_norm" in items else "acc"
        xa, xb = (_scored_items(name, task, r, metric) for name, r in (("base", ra), ("other", rb)))
        common = sorted(xa.keys() & xb.keys())
        if not common:
            raise ValueError(f"{task}: the two results scored no item in common")
        n = len(common)
        mean, se = _mean_stderr([xb[i] - xa[i] for i in common])
        (acc_a, se_a), (acc_b, se_b) = (_mean_stderr([x[i] for i in common]) for x in (xa, xb))
        # covariance of the two means (sample covariance, ddof=1, over n): what the ratio's error needs
        cov = sum((xa[i] - acc_a) * (xb[i] - acc_b) for i in common) / (n - 1) / n if n > 1 else math.nan
        out[task] = {
            "metric": metric,
            "n": n,
            "a": acc_a,
            "b": acc_b,
            "diff": mean,
            "diff_stderr": se,
            "a_stderr": se_a,
            "b_stderr": se_b,
            "cov": cov,
        }
    return dict(sorted(out.items()))


def _scored_items(name: str, task: str, r, metric: str) -> dict[int, int]:
    """One result's right (1) / wrong (0) answers for `metric`, keyed by the item's position in the task file;
    a clear error for anything `evaluate` would not have written."""
    where = f"{task} in the {name} file"
    if not isinstance(r, dict) or not isinstance(r.get("items"), dict) or metric not in r["items"]:
        raise ValueError(f"{where}: per-item results ('items.{metric}') missing (written by an older version?)")
    marks = r["items"][metric]
    if not isinstance(marks, str) or set(marks) - {"0", "1"}:
        raise ValueError(f"{where}: 'items.{metric}' must be a string of 0s and 1s")
    indices = r.get("indices")
    if indices is None:
        return {i: int(c) for i, c in enumerate(marks)}
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{where}: 'indices' must be a list of item positions")
    if len(indices) != len(marks) or len(set(indices)) != len(indices):
        raise ValueError(f"{where}: {len(indices)} indices ({len(set(indices))} distinct) for {len(marks)} items")
    return {i: int(c) for i, c in zip(indices, marks)}


def paired_average(diffs: dict) -> dict:
    """The task average of ``paired_difference``'s result for each model, the paired difference of the averages
    with its standard error, and the ratio other / base with its delta-method standard error:
    Var(B / A) ≈ (Var B − 2 R Cov(A, B) + R² Var A) / A², each term summed over the tasks (independent items)
    and divided by the number of tasks squared. ``ratio`` and ``ratio_stderr`` are None when the base
    average is 0."""
    if not diffs:
        raise ValueError("no task in common")
    T = len(diffs)
    avg_a = sum(d["a"] for d in diffs.values()) / T
    avg_b = sum(d["b"] for d in diffs.values()) / T
    out = {
        "average_base": avg_a,
        "average_other": avg_b,
        "diff_stderr": math.sqrt(sum(d["diff_stderr"] ** 2 for d in diffs.values())) / T,
        "ratio": None,
        "ratio_stderr": None,
    }
    if avg_a > 0:
        r = avg_b / avg_a
        var = sum(d["b_stderr"] ** 2 - 2 * r * d["cov"] + r * r * d["a_stderr"] ** 2 for d in diffs.values())
        out.update(ratio=r, ratio_stderr=math.sqrt(max(var, 0.0)) / T / avg_a)
    return out


def _task_list(tasks: str | Iterable[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = list(TASKS) if tasks.strip() in ("all", "") else [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    for t in tasks:
        if t not in _TASK_FILES:
            raise ValueError(f"unknown task {t!r}; known tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def evaluate(
    model,
    tokenizer,
    tasks: str | Iterable[str] = TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    data_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    add_bos: bool | None = False,
    device=None,
    use_logits_to_keep: bool = True,
    pack: bool = True,
    sample: int | None = None,
    seed: int = 0,
) -> dict:
    """Zero-shot evaluation of ``model`` on ``tasks`` (names, a comma-separated string, or ``"all"``).

    ``limit`` scores the first N items of each task (lm-eval's ``--limit``); ``sample`` scores N items drawn
    at random (``seed``) from the whole task instead, kept in file order, with their file positions in the
    task's ``indices``. A prefix can be unrepresentative: HellaSwag's file holds its 3,243 ActivityNet items
    before its 6,799 WikiHow items.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n", "n_requests"}},
    "average": mean over tasks of acc, "average_norm": mean over tasks of (acc_norm if the task reports it else
    acc -- i.e. acc for winogrande), "seconds": wall time of the scoring}``.
    """
    names = _task_list(tasks)
    if sample is not None and limit is not None:
        raise ValueError("give limit (the first N items) or sample (N random items), not both")
    if sample is not None and sample < 1:
        raise ValueError("sample must be >= 1")
    docs: list[Doc] = []
    n_req: dict[str, int] = {}
    picked: dict[str, list[int]] = {}
    for name in names:
        td = load_task(name, data_dir=data_dir, limit=limit)
        if sample is not None:
            picked[name] = sorted(random.Random(f"{seed}:{name}").sample(range(len(td)), min(sample, len(td))))
            td = [td[i] for i in picked[name]]
        docs.extend(td)
        n_req[name] = sum(len(d.contexts) for d in td)
    pairs = [p for d in docs for p in d.requests]
    t0 = time.perf_counter()
    lls = loglikelihoods(
        model,
        tokenizer,
        pairs,
        batch_size=batch_size,
        max_length=max_length,
        add_bos=add_bos,
        device=device,
        progress=progress,
        desc="zero-shot " + ",".join(names),
        use_logits_to_keep=use_logits_to_keep,
        pack=pack,
    )
    seconds = time.perf_counter() - t0
    per_task = score_docs(docs, lls)
    results: dict = {}
    for name in names:
        r = per_task.get(name, {"n": 0})
        r["n_requests"] = n_req[name]
        if name in picked:
            r["indices"], r["sample_seed"] = picked[name], seed
        results[name] = r
    scored = [results[n] for n in names if results[n]["n"] > 0]
    average = sum(r["acc"] for r in scored) / len(scored) if scored else float("nan")
    average_norm = sum(r.get("acc_norm", r["acc"]) for r in scored) / len(scored) if scored else float("nan")
    return {"tasks": results, "average": average, "average_norm": average_norm, "seconds": seconds}


def format_results(res: dict) -> str:
    """A small text table of ``evaluate``'s output."""
    lines = [f"{'task':<14} {'n':>6} {'acc':>7} {'acc_norm':>9}"]
    for name, r in res["tasks"].items():
        an = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
        lines.append(f"{name:<14} {r['n']:>6} {r.get('acc', float('nan')):>7.4f} {an:>9}")
    lines.append(
        f"{'average':<14} {'':>6} {res['average']:>7.4f} {res['average_norm']:>9.4f}  (acc / acc_norm-else-acc)"
    )
    return "\n".join(lines)
