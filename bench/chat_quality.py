"""How well a (compressed) chat model still chats, on held-out conversations through its chat template.

    python bench/sharegpt_calib.py runs/sharegpt_chat.jsonl --chat-template --holdout runs/sharegpt_holdout.jsonl
    python -m modegpt_rt.bench.chat_quality dense out/smollm2-0.3 --conversations runs/sharegpt_holdout.jsonl \
        --json bench/results/chat_quality_smollm2.json

Each conversation's first exchange (a user's message and the reference answer, ChatGPT's in ShareGPT) is
scored two ways:
- teacher-forced, after the chat template's prompt: the mean negative log-likelihood per token of the answer
  (`answer_nll`), and of the end-of-turn token that follows it (`end_nll`: does the model know when its turn
  ends?);
- generated, greedy, at most `--new` tokens: the share of answers that end their turn (`ends_turn`, the model's
  EOS), their length, the share of each answer's 4-grams that are distinct (`distinct4`: loops score low), and
  the share of answers that repeat 8 tokens in a row of their prompt (`copies_prompt`: the system message or the
  question echoed back instead of an answer).
The first model is the base of the paired differences (mean and standard error over the same conversations).
`dense` names the default model (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import modegpt_rt
from modegpt_rt.generate import chat_prompts, chat_texts
from modegpt_rt.zeroshot import _mean_stderr as mean_se


def read_conversations(path: str) -> list[list[dict]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def first_exchanges(convs, tokenizer, n: int, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids ending with the end-of-turn token) of the first `n` conversations whose first
    exchange fits `max_tokens`; the same for every model, since they share the tokenizer."""
    eos = tokenizer.eos_token_id
    out = []
    for conv in convs:
        user, answer = conv[0], conv[1]
        prompt = chat_prompts([[user]], tokenizer)[0]
        text = chat_texts([[user, answer]], tokenizer, add_generation_prompt=False)[0]
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if full[: len(prompt)] != prompt or eos not in full[len(prompt) :]:
            continue  # the template's prompt does not tokenize as a prefix of the whole: skip it
        end = full.index(eos, len(prompt))
        if end + 1 <= max_tokens and end > len(prompt):
            out.append((prompt, full[len(prompt) : end + 1]))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def teacher_forced(model, exchanges, batch: int = 4) -> tuple[list[float], list[float]]:
    """Per exchange: the answer's mean NLL per token (end-of-turn token excluded), and the end-of-turn NLL."""
    answer_nll, end_nll = [0.0] * len(exchanges), [0.0] * len(exchanges)
    order = sorted(range(len(exchanges)), key=lambda i: -sum(map(len, exchanges[i])))
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        seqs = [exchanges[i][0] + exchanges[i][1] for i in idx]
        width = max(map(len, seqs)) - 1
        ids = torch.zeros(len(seqs), width, dtype=torch.long)  # right-padded: causal, so padding changes nothing
        for r, s in enumerate(seqs):
            ids[r, : len(s) - 1] = torch.tensor(s[:-1])
        logp = model(ids).logits.float().log_softmax(-1)
        for r, i in enumerate(idx):
            prompt, answer = exchanges[i]
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
            nll = -logp[r, pos, torch.tensor(answer)]
            answer_nll[i], end_nll[i] = nll[:-1].mean().item(), nll[-1].item()
    return answer_nll, end_nll


COPY_SPAN = 8


def distinct4(ids: list[int]) -> float:
    grams = [tuple(ids[k : k + 4]) for k in range(len(ids) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def copies(answer: list[int], prompt: list[int], span: int = COPY_SPAN) -> bool:
    """Whether the answer repeats `span` tokens in a row of its prompt (the system message, the question)."""
    grams = {tuple(prompt[k : k + span]) for k in range(len(prompt) - span + 1)}
    return any(tuple(answer[k : k + span]) in grams for k in range(len(answer) - span + 1))


def generated(model, prompts, new: int, batch: int = 16) -> list[dict]:
    out = []
    for b in range(0, len(prompts), batch):
        group = prompts[b : b + batch]
        for prompt, r in zip(group, model.generate(group, max_new_tokens=new, temperature=0)):
            out.append(
                {
                    "ends_turn": r.finish_reason == "eos",
                    "tokens": len(r.token_ids),
                    "distinct4": distinct4(r.token_ids),
                    "copies_prompt": copies(r.token_ids, prompt),
                    "text": r.text,
                }
            )
    return out


KEYS = ("answer_nll", "end_nll", "ends_turn", "gen_tokens", "distinct4", "copies_prompt")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="checkpoints or HF folders or .gguf files; `dense` = the default model")
    p.add_argument("--conversations", required=True, help="jsonl of {'messages': [...]} (sharegpt_calib.py --holdout)")
    p.add_argument("--n", type=int, default=200, help="conversations scored teacher-forced (default 200)")
    p.add_argument("--max-tokens", type=int, default=1024, help="longest first exchange scored (default 1024)")
    p.add_argument("--gen-n", type=int, default=100, help="first user messages answered (default 100)")
    p.add_argument("--new", type=int, default=128, help="new tokens at most per answer (default 128)")
    p.add_argument("--bf16-weights", action="store_true", help="bfloat16 matrices, float32 arithmetic")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    convs = read_conversations(args.conversations)
    results, exchanges = {}, None
    for name in args.models:
        t0 = time.time()
        model = modegpt_rt.load(
            None if name == "dense" else name, weight_dtype=torch.bfloat16 if args.bf16_weights else None
        )
        if exchanges is None:
            exchanges = first_exchanges(convs, model.tokenizer, args.n, args.max_tokens)
        answer_nll, end_nll = teacher_forced(model, exchanges)
        gen = generated(model, [pr for pr, _ in exchanges[: args.gen_n]], args.new)
        results[name] = {
            "answer_nll": answer_nll,
            "end_nll": end_nll,
            "ends_turn": [g["ends_turn"] for g in gen],
            "gen_tokens": [g["tokens"] for g in gen],
            "distinct4": [g["distinct4"] for g in gen],
            "copies_prompt": [g["copies_prompt"] for g in gen],
            "answers": [g["text"] for g in gen[:10]],
            "seconds": round(time.time() - t0, 1),
        }
        print(f"{name}: {results[name]['seconds']} s", flush=True)
    base = args.models[0]
    summary = {}
    for name, r in results.items():
        row = {}
        for key in KEYS:
            xs = [float(x) for x in r[key]]
            row[key] = mean_se(xs)
            if name != base:
                row[key + "_vs_base"] = mean_se([x - float(y) for x, y in zip(xs, results[base][key])])
        summary[name] = row
    print(f"{len(exchanges)} exchanges teacher-forced, {len(results[base]['ends_turn'])} answered (base: {base})")
    print(
        "| model | answer NLL/token | end-of-turn NLL | ends its turn | answer tokens | distinct 4-grams "
        "| copies 8 prompt tokens |"
    )
    print("|---|---|---|---|---|---|---|")
    formats = (".3f", ".2f", ".0%", ".0f", ".2f", ".0%")
    for name, row in summary.items():
        cells = []
        for key, fmt in zip(KEYS, formats):
            m, se = row[key]
            cell = f"{m:{fmt}}"
            if key + "_vs_base" in row:
                d, dse = row[key + "_vs_base"]
                cell += f" ({d:+{fmt}} ± {dse:{fmt}})"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        out = {
            "conversations": args.conversations,
            "n_teacher_forced": len(exchanges),
            "n_generated": len(results[base]["ends_turn"]),
            "new_tokens": args.new,
            "bf16_weights": args.bf16_weights,
            "summary": summary,
            "models": results,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
