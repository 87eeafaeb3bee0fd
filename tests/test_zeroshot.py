"""Tests for modegpt_rt.zeroshot: lm-eval prompt formats on the local data, and batched log-likelihood scoring
checked against a hand-written unbatched reference on a tiny random LLaMA with an offline byte-level BPE."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

try:
    from modegpt_rt import zeroshot
except Exception:  # package __init__ in flux: load the module file directly
    _p = Path(__file__).resolve().parents[1] / "modegpt_rt" / "zeroshot.py"
    _spec = importlib.util.spec_from_file_location("modegpt_rt_zeroshot_standalone", _p)
    zeroshot = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = zeroshot
    _spec.loader.exec_module(zeroshot)


def _data_dir():
    try:
        return zeroshot.find_data_dir()
    except FileNotFoundError as e:  # pragma: no cover - depends on the checkout
        pytest.skip(f"zero-shot data not available: {e}")


@pytest.fixture(scope="module")
def data_dir():
    return _data_dir()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy machine OpenMP spin-waiting makes
    these tests ~50x slower; restore the caller's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------- formats

ARC_E = [
    (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        [
            "Sunlight is the source of energy for nearly all ecosystems.",
            "Most ecosystems are found on land instead of in water.",
            "Carbon dioxide is more available than other gases.",
            "The producers in all ecosystems are plants.",
        ],
        0,
    ),
    (
        "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
        "system?\nAnswer:",
        ["safety goggles", "breathing mask", "rubber gloves", "lead apron"],
        1,
    ),
    (
        "Question: Meiosis is a type of cell division in which germ cells divide to produce haploid cells. "
        "Where does meiosis occur?\nAnswer:",
        ["brain cells", "bone cells", "muscle cells", "ovary cells"],
        3,
    ),
]

ARC_C = [
    (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:",
        [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
        2,
    ),
    (
        "Question: A group of engineers wanted to know how different building designs would respond during an "
        "earthquake. They made several models of buildings and tested each for its ability to withstand "
        "earthquake conditions. Which will most likely result from testing different building designs?\nAnswer:",
        [
            "buildings will be built faster",
            "buildings will be made safer",
            "building designs will look nicer",
            "building materials will be cheaper",
        ],
        1,
    ),
    (
        "Question: The end result in the process of photosynthesis is the production of sugar and oxygen. Which "
        "step signals the beginning of photosynthesis?\nAnswer:",
        [
            "Chemical energy is absorbed through the roots.",
            "Light energy is converted to chemical energy.",
            "Chlorophyll in the leaf captures light energy.",
            "Sunlight is converted into chlorophyll.",
        ],
        2,
    ),
]

PIQA = [
    (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        [
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
            "will also need to supply it with a water bottle and a food dish.",
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
            "will also need to supply it with a water bottle and a food dish.",
        ],
        0,
    ),
    # trailing space and double space are kept, as lm-eval keeps them
    ("Question: dresser\nAnswer:", ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "], 1),
    (
        "Question: To fight Ivan Drago in Rocky for sega master system.\nAnswer:",
        [
            "Drago isn't in this game because it was released before Rocky IV.",
            "You have to defeat Apollo Creed and Clubber Lang first.",
        ],
        1,
    ),
]

HELLASWAG = [
    (
        "Roof shingle removal: A man is sitting on a roof. He",
        [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        3,
    ),
    (
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
        [
            "swings and lands in her arms.",
            "pulls the barbell forward.",
            "pulls a rope attached to the barbell.",
            "stands and lifts the weight over her head.",
        ],
        3,
    ),
    (
        "Canoeing: Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
        "water, with other individuals visible in the background. The child and a different man",
        [
            "are then shown paddling down a river in a boat while a woman talks.",
            "are driving the canoe, they go down the river flowing side to side.",
            "sit in a canoe while the man paddles.",
            "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood.",
        ],
        2,
    ),
]

WINOGRANDE = [
    (
        ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"],
        " always got the easier cases.",
        1,
    ),
    (
        ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"],
        " always got the harder cases.",
        0,
    ),
    (
        [
            "They were worried the wine would ruin the bed and the blanket, but the blanket",
            "They were worried the wine would ruin the bed and the blanket, but the bed",
        ],
        " was't ruined.",
        1,
    ),
]


@pytest.mark.parametrize(
    "task,expected",
    [("arc_easy", ARC_E), ("arc_challenge", ARC_C), ("piqa", PIQA), ("hellaswag", HELLASWAG)],
)
def test_zeroshot_single_context_formats(data_dir, task, expected):
    docs = zeroshot.load_task(task, data_dir, limit=3)
    assert len(docs) == 3
    for doc, (ctx, choices, gold) in zip(docs, expected):
        assert doc.task == task
        assert doc.contexts == (ctx,) * len(choices)
        assert doc.choices == tuple(choices)
        assert doc.continuations == tuple(" " + c for c in choices)
        assert doc.requests == [(ctx, " " + c) for c in choices]
        assert doc.gold == gold
        assert doc.metrics == ("acc", "acc_norm")


def test_zeroshot_winogrande_format(data_dir):
    docs = zeroshot.load_task("winogrande", data_dir, limit=3)
    assert len(docs) == 3
    for doc, (contexts, cont, gold) in zip(docs, WINOGRANDE):
        assert doc.contexts == tuple(contexts)
        assert doc.choices == tuple(contexts)
        assert doc.continuations == (cont, cont)
        assert doc.gold == gold
        assert doc.metrics == ("acc",)


def test_zeroshot_full_task_sizes(data_dir):
    sizes = {"arc_easy": (2376, 9501), "arc_challenge": (1172, 4687), "piqa": (1838, 3676),
             "winogrande": (1267, 2534), "hellaswag": (10042, 40168)}  # fmt: skip
    for task, (n_docs, n_req) in sizes.items():
        docs = zeroshot.load_task(task, data_dir)
        assert len(docs) == n_docs
        assert sum(len(d.requests) for d in docs) == n_req
        assert all(0 <= d.gold < len(d.choices) for d in docs)
    hs = zeroshot.load_task("hellaswag", data_dir)
    # the ActivityNet rule capitalises ctx_b of exactly the 3,243 ActivityNet items
    anet = [d for d in hs if d.context.split(": ", 1)[0] not in zeroshot.HELLASWAG_WIKIHOW_LABELS]
    assert len(anet) == 3243
    assert sum(d.context.split(". ")[-1][:1].islower() for d in anet) == 0


def test_zeroshot_hellaswag_preprocess():
    pp = zeroshot.hellaswag_preprocess
    assert pp(" Home: [header] How to x [title] Do y. [step] Z  w ") == "Home: How to x. Do y. Z w"
    q = zeroshot.hellaswag_query
    assert q("Roof removal: A man is sitting on a roof. he") == "Roof removal: A man is sitting on a roof. He"
    # WikiHow items have an empty ctx_b: nothing is capitalised
    assert q("Family Life: How to x. Call u.s. citizens.") == "Family Life: How to x. Call u.s. citizens."


def test_zeroshot_limit_and_errors(data_dir, tmp_path, monkeypatch):
    a = zeroshot.load_task("piqa", data_dir, limit=5)
    b = zeroshot.load_task("piqa", data_dir, limit=5)
    assert a == b and len(a) == 5
    assert zeroshot.load_task("piqa", data_dir, limit=0) == []
    with pytest.raises(ValueError, match="arc_easy.*hellaswag"):
        zeroshot.load_task("boolq", data_dir)
    # env var wins
    monkeypatch.setenv("MODEGPT_DATA", str(data_dir))
    assert zeroshot.find_data_dir() == Path(data_dir)
    monkeypatch.setenv("MODEGPT_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="MODEGPT_DATA"):
        zeroshot.find_data_dir()
    monkeypatch.delenv("MODEGPT_DATA")
    # walking up from a start directory finds the nearest shared/data
    (tmp_path / "shared" / "data").mkdir(parents=True)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert zeroshot.find_data_dir(deep) == tmp_path / "shared" / "data"
    with pytest.raises(FileNotFoundError, match="missing data file"):
        zeroshot.load_task("arc_easy", tmp_path / "shared" / "data")


# ----------------------------------------------------------------------------------------------- scoring


def _all_docs(data_dir, limit=3):
    return [d for t in zeroshot.TASKS for d in zeroshot.load_task(t, data_dir, limit=limit)]


@pytest.fixture(scope="module")
def tiny(data_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = []
    for d in _all_docs(data_dir, limit=20):
        corpus.extend(c + k for c, k in d.requests)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits so the choices are well separated
        model.lm_head.weight.mul_(20.0)
    return model, tok


class _PlainModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids)


def _manual_ll(model, tok, context, continuation, max_length=None):
    """lm-eval's loglikelihood for one request, unbatched: move trailing spaces, encode, one forward."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    cont = whole[len(ctx) :]
    full = ctx + cont
    if max_length is not None:
        full = full[-(max_length + 1) :]
    inp = torch.tensor([full[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(inp).logits[0].double(), dim=-1)
    L = inp.shape[1]
    return sum(float(logp[L - len(cont) + j, t]) for j, t in enumerate(cont))


def test_zeroshot_encode_pairs_trailing_space(tiny):
    _, tok = tiny
    (c1, k1), (c2, k2) = zeroshot.encode_pairs(tok, [("Question: dresser\nAnswer: ", "x"), ("Answer:", " x")])
    assert c1 == tok.encode("Question: dresser\nAnswer:", add_special_tokens=False)
    whole = tok.encode("Question: dresser\nAnswer: x", add_special_tokens=False)
    assert k1 == whole[len(c1) :]
    assert tok.decode(k1) == " x" and tok.decode(k2) == " x"
    # no BOS by default (lm-eval default); add_bos=True prepends it when the tokenizer has one
    assert zeroshot.encode_pairs(tok, [("a", " b")], add_bos=None)[0][0] == tok.encode("a", add_special_tokens=False)
    with pytest.raises(ValueError, match="bos"):
        zeroshot.encode_pairs(tok, [("a", " b")], add_bos=True)
    # empty context -> one EOS token as context (lm-eval uses the prefix token)
    assert zeroshot.encode_pairs(tok, [("", "a b")])[0][0] == [tok.eos_token_id]


def test_zeroshot_loglikelihoods_match_manual(tiny, data_dir):
    model, tok = tiny
    pairs = [p for d in _all_docs(data_dir) for p in d.requests]
    pairs += [("Question: dresser\nAnswer: ", "replace"), ("Question: dresser\nAnswer:", " replace")]
    pairs += pairs[:5]  # duplicates
    expected = [_manual_ll(model, tok, c, k) for c, k in pairs]
    plain = _PlainModel(model)  # only model(input_ids) -> .logits, no logits_to_keep
    assert zeroshot._accepts_logits_to_keep(model) and not zeroshot._accepts_logits_to_keep(plain)
    for m, bs in ((model, 1), (model, 7), (model, 16), (plain, 16)):
        got = zeroshot.loglikelihoods(m, tok, pairs, batch_size=bs)
        assert len(got) == len(pairs)
        for g, e in zip(got, expected):
            assert abs(g - e) < 1e-5, (g, e)
    # trailing space moved onto the continuation: both spellings score identically
    assert abs(expected[-7] - expected[-6]) < 1e-9
    # left truncation to max_length
    enc = zeroshot.encode_pairs(tok, pairs)
    long_pairs = [p for p, (c, k) in zip(pairs, enc) if len(k) <= 24 < len(c) + len(k) - 1]
    assert len(long_pairs) >= 10
    got = zeroshot.loglikelihoods(model, tok, long_pairs, batch_size=5, max_length=24)
    for (c, k), g in zip(long_pairs, got):
        assert abs(g - _manual_ll(model, tok, c, k, max_length=24)) < 1e-5


def test_zeroshot_evaluate_limit3(tiny, data_dir):
    model, tok = tiny
    res = zeroshot.evaluate(model, tok, zeroshot.TASKS, limit=3, batch_size=6, progress=False, data_dir=data_dir)
    accs, norms = [], []
    for task in zeroshot.TASKS:
        docs = zeroshot.load_task(task, data_dir, limit=3)
        hits = hits_norm = 0
        items = items_norm = ""
        for d in docs:
            lls = [_manual_ll(model, tok, c, k) for c, k in d.requests]
            assert len(set(round(x, 4) for x in lls)) == len(lls)  # no near-ties: argmax is well defined
            right = max(range(len(lls)), key=lambda i: lls[i]) == d.gold
            normed = [x / len(c) for x, c in zip(lls, d.choices)]
            right_norm = max(range(len(normed)), key=lambda i: normed[i]) == d.gold
            hits, hits_norm = hits + right, hits_norm + right_norm
            items, items_norm = items + str(int(right)), items_norm + str(int(right_norm))
        r = res["tasks"][task]
        assert r["items"]["acc"] == items
        if task != "winogrande":
            assert r["items"]["acc_norm"] == items_norm
        assert r["n"] == 3
        assert r["n_requests"] == sum(len(d.requests) for d in docs)
        assert r["acc"] == pytest.approx(hits / 3)
        accs.append(hits / 3)
        if task == "winogrande":
            assert "acc_norm" not in r
            norms.append(hits / 3)
        else:
            assert r["acc_norm"] == pytest.approx(hits_norm / 3)
            norms.append(hits_norm / 3)
    assert res["average"] == pytest.approx(sum(accs) / len(accs))
    assert res["average_norm"] == pytest.approx(sum(norms) / len(norms))
    assert math.isfinite(res["seconds"])
    assert "average" in zeroshot.format_results(res)


def test_zeroshot_evaluate_sample(tiny, data_dir, tmp_path):
    """sample=N scores N items drawn from the whole task (seeded, file order, positions in `indices`); the
    answers equal those of the same items in a full run, and `paired_difference` matches items by position."""
    model, tok = tiny
    src, data_dir = Path(data_dir), tmp_path  # the first 30 items of two tasks: a "full run" stays quick
    for rel in ("piqa/valid.jsonl", "piqa/valid-labels.lst", "arc-easy/ARC-Easy-Test.jsonl"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("".join((src / rel).read_text().splitlines(keepends=True)[:30]))
    full = zeroshot.evaluate(model, tok, ["piqa", "arc_easy"], batch_size=6, progress=False, data_dir=data_dir)
    res = zeroshot.evaluate(model, tok, ["piqa", "arc_easy"], sample=3, seed=1, progress=False, data_dir=data_dir)
    again = zeroshot.evaluate(model, tok, ["piqa", "arc_easy"], sample=3, seed=1, progress=False, data_dir=data_dir)
    other = zeroshot.evaluate(model, tok, ["piqa"], sample=3, seed=2, progress=False, data_dir=data_dir)
    for task in ("piqa", "arc_easy"):
        r, f = res["tasks"][task], full["tasks"][task]
        assert r["n"] == 3 and r["sample_seed"] == 1 and r["indices"] == sorted(set(r["indices"]))
        assert 0 <= min(r["indices"]) and max(r["indices"]) < f["n"]
        for metric, got in r["items"].items():
            assert got == "".join(f["items"][metric][i] for i in r["indices"])
        assert again["tasks"][task]["indices"] == r["indices"]
        assert "indices" not in f
    assert other["tasks"]["piqa"]["indices"] != res["tasks"]["piqa"]["indices"]
    d = zeroshot.paired_difference(full, res)  # the sampled items against the same items of the full run
    assert (
        d["piqa"]["n"] == 3
        and d["piqa"]["diff"] == 0
        and d["piqa"]["a"] == pytest.approx(res["tasks"]["piqa"]["acc_norm"])
    )
    prefix = {"tasks": {"piqa": {"items": {"acc_norm": full["tasks"]["piqa"]["items"]["acc_norm"][:1]}}}}
    if res["tasks"]["piqa"]["indices"][0] == 0:
        assert zeroshot.paired_difference(prefix, res)["piqa"]["n"] == 1
    else:
        with pytest.raises(ValueError, match="no item in common"):
            zeroshot.paired_difference(prefix, res)
    with pytest.raises(ValueError, match="not both"):
        zeroshot.evaluate(model, tok, ["piqa"], limit=2, sample=2, progress=False, data_dir=data_dir)
    with pytest.raises(ValueError, match="sample"):
        zeroshot.evaluate(model, tok, ["piqa"], sample=0, progress=False, data_dir=data_dir)


def test_zeroshot_packed_rows_match_manual(tiny, data_dir, tmp_path):
    """modegpt_rt's model scores the choices of one context in one packed row (context once, each continuation
    masked to see the context and itself); the log-likelihoods equal the one-request-at-a-time reference."""
    import modegpt_rt

    hf, tok = tiny
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = modegpt_rt.load(tmp_path, backend="torch", tokenizer=False)
    docs = _all_docs(data_dir)
    pairs = [p for d in docs for p in d.requests]
    pairs += [("Question: dresser\nAnswer:", "x"), ("Question: dresser\nAnswer:", " y z")]  # 1- and 2-token conts
    expected = [_manual_ll(hf, tok, c, k) for c, k in pairs]
    calls = []
    inner = model.hidden_states

    def spy(ids, positions=None, mask=None):
        calls.append((tuple(ids.shape), mask is not None))
        return inner(ids, positions, mask)

    model.hidden_states = spy
    for bs in (1, 5, 64):
        calls.clear()
        got = zeroshot.loglikelihoods(model, tok, pairs, batch_size=bs)
        for g, e in zip(got, expected):
            assert abs(g - e) < 1e-4, (g, e)
        assert calls and all(packed for _, packed in calls)
        # shared contexts are packed: fewer rows than requests
        assert sum(shape[0] for shape, _ in calls) < len(set(pairs))
    # contexts too long for max_length fall back to left-truncated single rows
    enc = zeroshot.encode_pairs(tok, pairs)
    long_pairs = [p for p, (c, k) in zip(pairs, enc) if len(k) <= 24 < len(c) + len(k) - 1]
    short_pairs = [("Answer:", " yes"), ("Answer:", " no way"), ("Question: dresser", " drawer")]
    assert len(long_pairs) >= 10 and len(short_pairs) >= 2
    calls.clear()
    mixed = long_pairs + short_pairs
    got = zeroshot.loglikelihoods(model, tok, mixed, batch_size=5, max_length=24)
    for (c, k), g in zip(mixed, got):
        assert abs(g - _manual_ll(hf, tok, c, k, max_length=24)) < 1e-4
    assert any(packed for _, packed in calls) and any(not packed for _, packed in calls)


def test_zeroshot_paired_difference():
    """Paired differences on the shared prefix of items, with the paired standard error."""
    a = {"tasks": {"piqa": {"items": {"acc": "1100", "acc_norm": "1101"}}, "winogrande": {"items": {"acc": "10"}}}}
    b = {"tasks": {"piqa": {"items": {"acc": "0000", "acc_norm": "0111"}}, "winogrande": {"items": {"acc": "011"}}}}
    d = zeroshot.paired_difference(a, b)
    p = d["piqa"]  # acc_norm: per-item differences -1, 0, +1, 0
    assert p["metric"] == "acc_norm" and p["n"] == 4 and p["a"] == 0.75 and p["b"] == 0.75
    assert p["diff"] == 0 and p["diff_stderr"] == pytest.approx(math.sqrt(2 / 3 / 4))
    w = d["winogrande"]  # acc on the first 2 items: -1, +1
    assert w["metric"] == "acc" and w["n"] == 2 and w["diff"] == 0 and w["diff_stderr"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="per-item results .* missing"):
        zeroshot.paired_difference({"tasks": {"piqa": {"acc": 0.5}}}, b)
    # what evaluate would not have written is named, never a TypeError nor a silently wrong difference
    piqa = {"items": {"acc": "1100", "acc_norm": "1101"}}
    for bad, msg in [
        ([1], "per-item results"),
        ({"items": 3}, "per-item results"),
        ({"items": {"acc_norm": 7}}, "string of 0s and 1s"),
        ({"items": {"acc_norm": "1171"}}, "string of 0s and 1s"),
        ({**piqa, "indices": [0, 1]}, "2 indices .* for 4 items"),
        ({**piqa, "indices": [0, 0, 0, 0]}, r"4 indices \(1 distinct\)"),
        ({**piqa, "indices": [[0], [1], [2], [3]]}, "list of item positions"),
    ]:
        with pytest.raises(ValueError, match=msg):
            zeroshot.paired_difference(a, {"tasks": {"piqa": bad}})


def test_paired_average_ratio_stderr_matches_simulation():
    """The delta-method standard error of other / base matches the spread of the ratio over many simulated
    pairs of runs (correlated item by item, as a compressed model's answers are with dense's)."""
    import random

    rng = random.Random(0)

    def run_pair():
        res = {}
        for task, (p, n) in {"piqa": (0.65, 300), "arc_easy": (0.45, 200)}.items():
            a = [rng.random() < p for _ in range(n)]
            b = [(x and rng.random() > 0.2) or (not x and rng.random() < 0.1) for x in a]
            res[task] = ("".join("1" if v else "0" for v in a), "".join("1" if v else "0" for v in b))
        wrap = [{"tasks": {t: {"items": {"acc": ab[k]}} for t, ab in res.items()}} for k in (0, 1)]
        return zeroshot.paired_average(zeroshot.paired_difference(*wrap))

    runs = [run_pair() for _ in range(400)]
    ratios = [r["ratio"] for r in runs]
    mean = sum(ratios) / len(ratios)
    spread = math.sqrt(sum((x - mean) ** 2 for x in ratios) / (len(ratios) - 1))
    predicted = sorted(r["ratio_stderr"] for r in runs)[len(runs) // 2]
    assert predicted == pytest.approx(spread, rel=0.15)
    same = {"tasks": {"piqa": {"items": {"acc": "1101"}}}}
    assert zeroshot.paired_average(zeroshot.paired_difference(same, same))["ratio_stderr"] == 0
    zero = {"tasks": {"piqa": {"items": {"acc": "0000"}}}}
    assert zeroshot.paired_average(zeroshot.paired_difference(zero, same))["ratio"] is None


def test_cli_eval_paired(tmp_path, capsys):
    import json

    from modegpt_rt import cli

    a = {"tasks": {"piqa": {"items": {"acc": "1100", "acc_norm": "1101"}}, "arc_easy": {"items": {"acc_norm": "11"}}}}
    b = {"tasks": {"piqa": {"items": {"acc": "0000", "acc_norm": "0101"}}, "arc_easy": {"items": {"acc_norm": "10"}}}}
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "d.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    cli.main(["eval", "paired", str(pa), str(pb), "--json", str(out)])
    res = json.loads(out.read_text())
    # piqa acc_norm 0.75 -> 0.5, arc_easy 1.0 -> 0.5: averages 0.875 -> 0.5
    assert res["average_base"] == pytest.approx(0.875) and res["average_other"] == pytest.approx(0.5)
    assert res["ratio"] == pytest.approx(0.5 / 0.875) and res["tasks"]["piqa"]["diff"] == pytest.approx(-0.25)
    assert "other / base = 57.1%" in capsys.readouterr().out


def test_cpu_native_bfloat16_detection(monkeypatch):
    """`--dtype auto` picks bfloat16 only where /proc/cpuinfo lists AVX512-BF16 or AMX-BF16, or on a GPU of
    compute capability 8 or later (an emulating V100 or T4 gets float32), the GPU asked about."""
    import torch
    from modegpt_rt.kernels import cpu_has_native_bfloat16, fast_eval_dtype

    from modegpt_rt import kernels

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d: asked.append(d) or {0: (7, 0), 1: (9, 0)}[d.index]
    )
    assert fast_eval_dtype("cuda:0") == torch.float32 and fast_eval_dtype("cuda:1") == torch.bfloat16
    assert [d.index for d in asked] == [0, 1] and not kernels.has_native_bfloat16("meta")
    monkeypatch.undo()

    assert cpu_has_native_bfloat16("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bfloat16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bfloat16("flags : fpu sse2 avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bfloat16("model name : some cpu without a flags line\n")
    assert fast_eval_dtype() == (torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32)


def _copy_data(data_dir, dst):
    import shutil

    shutil.copytree(data_dir, dst)
    return dst


def test_zeroshot_bad_task_files_are_refused_clearly(data_dir, tmp_path):
    d = _copy_data(data_dir, tmp_path / "data")
    arc = d / zeroshot._TASK_FILES["arc_easy"][0]
    arc.write_text("")
    with pytest.raises(ValueError, match="no items in"):
        zeroshot.load_task("arc_easy", d)
    piqa_labels = d / zeroshot._TASK_FILES["piqa"][1]
    labels = piqa_labels.read_text().split()
    piqa_labels.write_text("\n".join(labels[:3]))
    with pytest.raises(ValueError, match="3 labels, fewer than"):
        zeroshot.load_task("piqa", d, limit=10)  # also under --limit
    wl = d / zeroshot._TASK_FILES["winogrande"][1]
    wlabels = wl.read_text().split()
    wl.write_text("\n".join(wlabels + ["1"]))
    with pytest.raises(ValueError, match="labels in"):
        zeroshot.load_task("winogrande", d)  # one label too many
    wl.write_text("\n".join(["3"] + wlabels[1:]))
    with pytest.raises(ValueError, match="not 1 or 2"):
        zeroshot.load_task("winogrande", d, limit=2)
    hs = d / zeroshot._TASK_FILES["hellaswag"][0]
    lines = hs.read_text().split("\n")
    lines[1] = "7"  # the first item's gold ending
    hs.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="gold answer 7"):
        zeroshot.load_task("hellaswag", d, limit=1)


def test_zeroshot_check_tasks_before_loading(data_dir, tmp_path):
    assert zeroshot.check_tasks("all", data_dir) == list(zeroshot.TASKS)
    assert zeroshot.check_tasks("piqa, arc_easy,piqa", data_dir) == ["piqa", "arc_easy"]
    with pytest.raises(ValueError, match="no task given"):
        zeroshot.check_tasks(",", data_dir)
    with pytest.raises(ValueError, match="unknown task 'boolq'"):
        zeroshot.check_tasks("piqa,boolq", data_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing data file"):
        zeroshot.check_tasks("piqa", tmp_path / "empty")


def test_cli_eval_zeroshot_refuses_bad_tasks_before_loading_a_model(capsys, monkeypatch):
    from modegpt_rt import cli

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli, "_load_for_eval", no_load)
    assert cli.main(["eval", "zeroshot", "--tasks", ","]) == 2
    assert "no task given" in capsys.readouterr().err
    assert cli.main(["eval", "zeroshot", "--tasks", "piqa,boolq"]) == 2
    assert "unknown task 'boolq'" in capsys.readouterr().err
    assert cli.main(["eval", "zeroshot", "--tasks", "piqa", "--seed", "3"]) == 2  # was silently ignored
    assert "modegpt eval zeroshot: error: --seed draws" in capsys.readouterr().err  # the subcommand named
    with pytest.raises(SystemExit):
        cli.main(["eval", "zeroshot", "--limit", "0"])
    err = capsys.readouterr().err
    assert err.startswith("usage: modegpt eval zeroshot") and "--limit must be at least 1" in err


def test_cli_eval_paired_with_a_zero_base_average(tmp_path, capsys):
    import json

    from modegpt_rt import cli

    a = {"tasks": {"piqa": {"items": {"acc": "00", "acc_norm": "00"}}}}
    b = {"tasks": {"piqa": {"items": {"acc": "11", "acc_norm": "10"}}}}
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "d.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert cli.main(["eval", "paired", str(pa), str(pb), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ratio"] is None and res["average_other"] == pytest.approx(0.5)
    assert "other / base" not in capsys.readouterr().out


def test_wikitext_rows_join_as_the_paper_reads_it(tiny, data_dir, monkeypatch):
    # HF datasets' wikitext rows are the file's lines with their newline, blank lines (" \n") as ""; SliceGPT
    # and MoDeGPT tokenise "\n\n".join(rows)
    from modegpt_rt import data
    from modegpt_rt.evaluate import perplexity

    assert data.wikitext_rows_joined(" \n = A = \n \n B c \n") == "\n\n = A = \n\n\n\n\n B c \n"
    assert data.wikitext_rows_joined("x\n\ny") == "x\n\n\n\n\ny"  # an empty line is a blank row too
    monkeypatch.setenv("MODEGPT_DATA", str(data_dir))
    raw = data.read_text("wikitext2", "test")
    rows = data.read_text("wikitext2", "test", join="rows")
    lines = raw.split("\n")[:-1]
    blank = sum(1 for x in lines if not x.strip())  # " " lines: each row loses its two characters
    assert raw.endswith("\n") and len(rows) == len(raw) + 2 * (len(lines) - 1) - 2 * blank
    assert rows.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    with pytest.raises(ValueError, match="join must be one of"):
        data.read_text("wikitext2", "test", join="lines")
    # perplexity reads the text it is told to, and reports which
    model, tok = tiny
    res = perplexity(model, tok, "wikitext2", seqlen=64, limit=2, progress=False, join="rows")
    w = data.eval_windows(data.tokenize(tok, rows), 64)[:2]
    with torch.no_grad():
        logp = torch.log_softmax(model(w).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, w[:, 1:, None]).mean().item()
    assert res["join"] == "rows" and res["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert perplexity(model, tok, "wikitext2", seqlen=64, limit=2, progress=False)["ppl"] != res["ppl"]


def test_cli_eval_paired_wrong_files_and_one_item(tmp_path, capsys):
    """A file of another kind is named in a one-line error; a task in one file only is named and left out;
    a standard error that is undefined (one item) is written as null, not NaN."""
    import json

    from modegpt_rt import cli

    zs = {"tasks": {"piqa": {"items": {"acc": "1", "acc_norm": "1"}}, "arc_easy": {"items": {"acc_norm": "1"}}}}
    other = {"tasks": {"piqa": {"items": {"acc": "0", "acc_norm": "0"}}}}
    files = {"zs": zs, "other": other, "ppl": {"ppl": 21.7}, "list": [1]}
    for name, obj in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    (tmp_path / "bad.json").write_bytes(b"\xff")
    for b, fragment in [("ppl", "not a zero-shot result"), ("list", "not a zero-shot result"), ("bad", "bad.json")]:
        assert cli.main(["eval", "paired", str(tmp_path / "zs.json"), str(tmp_path / f"{b}.json")]) == 2
        assert fragment in capsys.readouterr().err
    out = tmp_path / "d.json"
    assert (
        cli.main(["eval", "paired", str(tmp_path / "zs.json"), str(tmp_path / "other.json"), "--json", str(out)]) == 0
    )
    assert "left out of the average: arc_easy" in capsys.readouterr().err
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["tasks"]["piqa"]["diff_stderr"] is None
