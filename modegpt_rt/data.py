"""Text sources for calibration and perplexity: WikiText-2 from shared/data, any text file, any jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

WIKITEXT_FILES = {"valid": "wiki.valid.raw", "test": "wiki.test.raw"}


def find_data_dir(start: str | os.PathLike | None = None) -> Path:
    """Locate the task data: ``$MODEGPT_DATA`` if set, else the nearest ``shared/data`` directory found by
    walking up from ``start`` (default: the current directory) and from this file's location."""
    env = os.environ.get("MODEGPT_DATA")
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p
        raise FileNotFoundError(f"MODEGPT_DATA={env!r} is not a directory")
    roots = [Path(start) if start is not None else Path.cwd(), Path(__file__).resolve().parent]
    searched: list[str] = []
    for root in roots:
        root = root.resolve()
        for d in (root, *root.parents):
            cand = d / "shared" / "data"
            searched.append(str(cand))
            if cand.is_dir():
                return cand
    raise FileNotFoundError(
        "data (WikiText-2, zero-shot tasks) not found: set MODEGPT_DATA or create a 'shared/data' directory; searched "
        + ", ".join(dict.fromkeys(searched))
    )


WIKITEXT_JOINS = ("file", "rows")


def wikitext_rows_joined(text: str) -> str:
    r"""The text as SliceGPT and MoDeGPT feed WikiText-2 to the tokenizer: ``"\n\n".join`` of the rows of HF
    ``datasets``' wikitext-2-raw-v1, which are the file's lines with their newline kept and blank lines
    (a single space in the raw file) as empty strings. The file begins `` \n = Robert Boulter = \n \n``, the
    joined text ``\n\n = Robert Boulter = \n\n\n\n\n``."""
    parts = text.split("\n")
    rows = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return "\n\n".join(r if r.strip() else "" for r in rows)


def read_text(source: str, split: str = "test", join: str = "file", tokenizer=None) -> str:
    r"""`wikitext2` (the given split), a .jsonl file, or any text file. For WikiText-2, join="file" gives the
    raw file as it is, join="rows" the paper's "\n\n"-joined dataset rows (`wikitext_rows_joined`). A jsonl
    row holds a "text" string or a "messages" conversation (OpenAI's chat format), which `tokenizer`'s chat
    template writes out; rows are joined by blank lines."""
    if join not in WIKITEXT_JOINS:
        raise ValueError(f"join must be one of {', '.join(WIKITEXT_JOINS)}, got {join!r}")
    if source in ("wikitext2", "wikitext-2"):
        path = find_data_dir() / "wikitext-2-raw" / WIKITEXT_FILES[split]
        if not path.exists():
            raise FileNotFoundError(f"WikiText-2 {split} split not found at {path}")
        text = path.read_text(encoding="utf-8")
        return wikitext_rows_joined(text) if join == "rows" else text
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text source {source!r} is neither 'wikitext2' nor a readable file")
    try:
        return _read_text_file(path, tokenizer)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_text_file(path: Path, tokenizer=None) -> str:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    texts.append(row["text"])
                elif isinstance(row, dict) and "messages" in row:
                    from modegpt_rt.generate import chat_texts

                    try:
                        texts += chat_texts([row["messages"]], tokenizer, add_generation_prompt=False)
                    except ValueError as e:
                        raise ValueError(f"{path}:{n}: {e}") from None
                else:
                    raise ValueError(f"{path}:{n}: each jsonl row needs a string field 'text' or a 'messages' list")
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream [n] (no special tokens)."""
    import transformers.utils.logging as hf_logging

    if tokenizer is None:
        raise ValueError("text needs a tokenizer, and this model has none (no tokenizer files beside its weights)")

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than the model's maximum"
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`samples` non-overlapping windows of `seqlen` tokens chosen at random (seeded): [samples, seqlen]."""
    if samples < 1 or seqlen < 2:
        raise ValueError(f"need samples >= 1 and seqlen >= 2, got {samples} x {seqlen}")
    available = tokens.numel() // seqlen
    if tokens.numel() == 0:
        raise ValueError("the calibration text is empty")
    if available < samples:
        raise ValueError(
            f"calibration text has {tokens.numel()} tokens: {available} windows of {seqlen}, "
            f"but {samples} were asked for ({samples * seqlen} tokens); use fewer --samples or a shorter --seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=g)[:samples].sort().values * seqlen
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows covering the text (the tail shorter than seqlen is dropped): [n, seqlen]."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


def generated_calibration(
    model, samples: int, seqlen: int, seed: int = 0, batch_size: int = 16, progress: bool = True
) -> torch.Tensor:
    """Data-free calibration: `samples` sequences of `seqlen` tokens sampled from the model itself.

    Each sequence starts from one token drawn uniformly from the vocabulary (special tokens
    excluded when the tokenizer names them) and continues by plain sampling (temperature 1, no
    top-k/top-p), through end-of-sequence tokens, so every window is exactly `seqlen` tokens.
    Seeded: the same model, seed and sizes give the same windows. Returns [samples, seqlen].
    """
    if samples < 1 or seqlen < 2:
        raise ValueError(f"need samples >= 1 and seqlen >= 2, got {samples} x {seqlen}")
    if seqlen > model.config.max_position_embeddings:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context of {model.config.max_position_embeddings}")
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    tok = getattr(model, "tokenizer", None)
    special = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    allowed = torch.tensor([t for t in range(model.config.vocab_size) if t not in special])
    starts = allowed[torch.randint(0, allowed.numel(), (samples,), generator=g)]
    backend = model.backend
    from modegpt_rt import kernels

    fast = kernels.resolve_backend("auto", model.device, model.dtype)
    if fast in ("cpu", "triton"):  # the C++ or Triton decode step: several times faster than the torch modules
        model.set_backend(fast)
    rows = []
    try:
        for b0 in tqdm(range(0, samples, batch_size), desc="generate calibration", unit="batch", disable=not progress):
            prompts = [[int(t)] for t in starts[b0 : b0 + batch_size]]
            outs = model.generate(
                prompts, max_new_tokens=seqlen - 1, temperature=1.0, seed=seed + b0, ignore_eos=True, tokenizer=None
            )
            rows += [p + o.token_ids for p, o in zip(prompts, outs)]
    finally:
        model.set_backend(backend)
    return torch.tensor(rows, dtype=torch.long)
