"""Chat: conversations through the tokenizer's chat template, in Python (`model.chat`), on the command line
(`modegpt generate --chat`, `modegpt chat`) and over HTTP (`/v1/chat/completions`)."""

import copy
import io
import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest

import modegpt_rt
from modegpt_rt import cli
from modegpt_rt.generate import chat_prompts

WORDS = ["<unk>", "<s>", "</s>", "[", "]", "user", "assistant", "system"] + [f"w{i}" for i in range(89)]
# a LLaMA-like template: it writes the BOS token itself, and the tokenizer also adds one to plain text
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def word_tokenizer():
    """A word-level fast tokenizer over the tiny model's 97 ids (w0..w88 at ids 8..96), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    return tok


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.replace("[", " [ ").replace("]", " ] ").split()]


@pytest.fixture(scope="module")
def tiny_chat_dir(tiny_hf_dir, tmp_path_factory):
    """The tiny random LLaMA with the word tokenizer saved beside it."""
    path = tmp_path_factory.mktemp("tiny_chat") / "model"
    shutil.copytree(tiny_hf_dir, path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_chat(tiny_chat_dir):
    return modegpt_rt.load(tiny_chat_dir, backend="torch")


def test_chat_prompts_render_the_template_once_with_one_bos():
    tok = word_tokenizer()
    conv = [
        {"role": "system", "content": "w1"},
        {"role": "user", "content": [{"type": "text", "text": "w2 "}, {"type": "text", "text": "w3"}]},
    ]
    want = [1] + ids("[system] w1 </s> [user] w2 w3 </s> [assistant]")
    assert chat_prompts(conv, tok) == [want]  # one conversation
    assert chat_prompts([conv, conv[1:]], tok) == [want, [1] + ids("[user] w2 w3 </s> [assistant]")]
    assert tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))["input_ids"][:2] == [1, 1]

    bad = [
        ([], "no conversation"),
        ([[]], "non-empty list of messages"),
        ([["w1"]], "must be an object"),
        ([{"content": "w1"}], "'role' must be a non-empty string"),
        ([{"role": "user"}], "missing 'content'"),
        ([{"role": "user", "content": 3}], "'content' must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "'image_url'; only text parts"),
        ([{"role": "user", "content": "w1\udcff"}], "message 0: its content is not valid UTF-8"),
        ([{"role": "\udcff", "content": "w1"}], "message 0: its role is not valid UTF-8"),
        ([{"role": "user", "content": []}], "an empty list of parts"),
        ([{"role": "user", "content": None}], "got NoneType"),
    ]
    for conv, fragment in bad:
        with pytest.raises(ValueError, match=fragment):
            chat_prompts(conv, tok)
    with pytest.raises(ValueError, match="has none \\(no files\\)"):
        chat_prompts([{"role": "user", "content": "w1"}], None, "no files")
    # an assistant turn that only called tools has null content
    (got,) = chat_prompts([{"role": "assistant", "content": None}, {"role": "user", "content": "w1"}], tok)
    assert got == [1] + ids("[assistant] </s> [user] w1 </s> [assistant]")
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompts([{"role": "user", "content": "w1"}], plain)
    strict = copy.deepcopy(tok)
    strict.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('users first') }}{% endif %}x"
    with pytest.raises(ValueError, match="the chat template refused conversation 0: users first"):
        chat_prompts([{"role": "assistant", "content": "w1"}], strict)
    strict.chat_template = "{% if false %}x{% endif %}"
    with pytest.raises(ValueError, match="rendered conversation 0 as nothing"):
        chat_prompts([{"role": "user", "content": "w1"}], strict)


def test_model_chat_is_generate_on_the_template(tiny_chat):
    conv = [{"role": "user", "content": "w5 w6"}]
    got = tiny_chat.chat(conv, max_new_tokens=6, temperature=0, ignore_eos=True)
    want = tiny_chat.generate(
        [chat_prompts(conv, tiny_chat.tokenizer)[0]], max_new_tokens=6, temperature=0, ignore_eos=True
    )
    assert [r.token_ids for r in got] == [r.token_ids for r in want] and len(got[0].token_ids) == 6
    assert got[0].prompt_tokens == len(ids("[user] w5 w6 </s> [assistant]")) + 1
    no_tok = modegpt_rt.load(tiny_chat.source, backend="torch", tokenizer=False)
    with pytest.raises(ValueError, match="chat needs a tokenizer.*loaded with tokenizer=False"):
        no_tok.chat(conv)


def test_smollm2_answers_a_chat_question_and_stops_at_the_end_of_its_turn(smollm2, smollm2_hf):
    """The real template: the same ids as transformers' own `apply_chat_template`, and the instruct model
    answers in its assistant turn and ends it with <|im_end|> (its EOS), which an unopened turn would not."""
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    (prompt,) = chat_prompts(conv, smollm2.tokenizer)
    theirs = smollm2.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    assert prompt == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    (res,) = smollm2.chat(conv, max_new_tokens=24, temperature=0)
    assert res.finish_reason == "eos" and "Paris" in res.text, res
    import torch

    hf = smollm2_hf.generate(torch.tensor([prompt]), max_new_tokens=len(res.token_ids) + 1, do_sample=False)
    assert hf[0, len(prompt) :].tolist() == res.token_ids + [smollm2.tokenizer.eos_token_id]


# --------------------------------------------------------------------------- HTTP
@pytest.fixture
def chat_server(tiny_chat, serve):
    return lambda model=tiny_chat, **kw: serve(model, **kw)


def _post(srv, body, path="/v1/chat/completions"):
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _events(text: str) -> list:
    lines = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_server_chat_answers_like_model_chat_whole_and_streamed(tiny_chat, chat_server, batching):
    srv = chat_server(batching=batching)
    conv = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}]
    want = tiny_chat.chat(conv, max_new_tokens=5, temperature=0, ignore_eos=True)[0]
    body = {"messages": conv, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    status, text = _post(srv, body)
    assert status == 200, text
    out = json.loads(text)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["token_ids"] == want.token_ids and choice["finish_reason"] == "length"
    assert out["usage"] == {
        "prompt_tokens": want.prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": want.prompt_tokens + 5,
    }

    body.update(stream=True, stream_options={"include_usage": True}, max_tokens=None, max_completion_tokens=5)
    status, text = _post(srv, body)
    assert status == 200, text
    events = _events(text)
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[1:-1]]
    assert "".join(deltas) == want.text
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["choices"][0]["delta"] == {}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5

    # the default limit: the rest of the 128-token context (less than CHAT_MAX_TOKENS)
    status, text = _post(srv, {"messages": conv, "temperature": 0, "ignore_eos": True})
    assert status == 200, text
    assert json.loads(text)["usage"]["total_tokens"] == tiny_chat.config.max_position_embeddings
    # the completions endpoint is unchanged beside it, and takes the usage chunk too
    status, text = _post(
        srv,
        {
            "prompt": [5, 6],
            "max_tokens": 2,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        "/v1/completions",
    )
    assert status == 200 and _events(text)[-1]["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
    }


def test_server_chat_rejects_bad_requests_clearly(tiny_chat, tiny_hf_dir, chat_server):
    srv = chat_server()
    msg = [{"role": "user", "content": "w1"}]
    bad = [
        ({}, "missing 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": "w1"}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "message 0: missing 'content'"),
        ({"messages": msg, "tools": [{"type": "function"}]}, "'tools' is not supported"),
        ({"messages": msg, "n": 2}, "only n = 1"),
        ({"messages": msg, "max_tokens": 0}, "'max_tokens' must be a positive integer"),
        ({"messages": msg, "max_tokens": 3, "max_completion_tokens": 4}, "differ"),
        ({"messages": msg, "max_tokens": 500}, "the conversation has 9 tokens; with max_tokens=500 it exceeds"),
        ({"messages": msg, "response_format": {"type": "json_object"}}, "only the text response format"),
        ({"messages": msg, "stream_options": {"include_usage": True}}, 'only allowed with "stream": true'),
        ({"messages": msg, "stream": True, "stream_options": {"include_usage": 1}}, "'stream_options' must be"),
        ({"messages": msg, "temperature": -1}, "temperature must be"),
        ({"messages": msg, "max_completion_tokens": 0}, "'max_completion_tokens' must be a positive integer"),
        ({"messages": msg, "tool_choice": "auto"}, "'tool_choice' is not supported"),
        ({"messages": [{"role": "user", "content": "w1 " * 130}]}, "leaves no room for an answer"),
        ({"messages": [{"role": "user\udcff", "content": "w1"}]}, "its role is not valid UTF-8"),
    ]
    for body, fragment in bad:
        status, text = _post(srv, body)
        assert status == 400 and fragment in json.loads(text)["error"]["message"], (body, text)
    status, text = _post(
        srv, {"messages": msg, "response_format": {"type": "text"}, "tool_choice": "none", "max_tokens": 1}
    )
    assert status == 200, text
    # the completions endpoint keeps its default of 16 tokens, and refuses a prompt that leaves less room
    status, text = _post(srv, {"prompt": [5] * 100, "ignore_eos": True}, "/v1/completions")
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 16, text
    status, text = _post(srv, {"prompt": [5] * 120}, "/v1/completions")
    assert status == 400 and "with max_tokens=16 it exceeds" in text
    plain = chat_server(modegpt_rt.load(tiny_hf_dir, backend="torch"))  # no tokenizer files
    status, text = _post(plain, {"messages": msg})
    assert status == 400 and "chat needs a tokenizer" in text
    req = urllib.request.Request(srv.url + "/v1/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405 and e.value.headers["Allow"] == "POST"


def test_server_chat_checks_the_template_ids_against_the_vocabulary(tiny_hf_dir, tmp_path, chat_server):
    """A tokenizer may hold ids the model has not (an added token): a chat request gets 400, not a failed step."""
    path = tmp_path / "extra"
    shutil.copytree(tiny_hf_dir, path)
    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<turn>"]})  # id 97, beyond the model's 97 ids
    tok.chat_template = "<turn>" + TEMPLATE
    tok.save_pretrained(path)
    srv = chat_server(modegpt_rt.load(path, backend="torch"))
    status, text = _post(srv, {"messages": [{"role": "user", "content": "w1"}]})
    assert status == 400 and "outside the vocabulary [0, 97)" in text, text


def test_server_takes_many_clients_connecting_at_once(tiny_chat, chat_server):
    """More clients than socketserver's default listen backlog of 5, all at once, while the model runs."""
    srv = chat_server()
    n, codes, barrier = 32, [], threading.Barrier(32)

    def ask(i):
        barrier.wait()
        body = {"messages": [{"role": "user", "content": f"w{i}"}], "max_tokens": 4, "stream": i % 2 == 0}
        codes.append(_post(srv, body)[0])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * n


# --------------------------------------------------------------------------- command line
def test_cli_generate_chat_and_system(tiny_chat, tiny_chat_dir, capsys):
    common = [str(tiny_chat_dir), "--max-new-tokens", "4", "--backend", "torch"]
    assert cli.main(["generate", *common[:1], "w5 w6", "--chat", *common[1:]]) == 0
    conv = [{"role": "user", "content": "w5 w6"}]
    want = tiny_chat.chat(conv, max_new_tokens=4, temperature=0)[0]
    assert capsys.readouterr().out == want.text + "\n"
    assert cli.main(["generate", *common[:1], "w5 w6", "--system", "w9", *common[1:]]) == 0
    want = tiny_chat.chat([{"role": "system", "content": "w9"}, *conv], max_new_tokens=4, temperature=0)[0]
    assert capsys.readouterr().out == want.text + "\n"


def test_cli_chat_keeps_the_conversation_and_drops_old_turns_to_fit(tiny_chat, tiny_chat_dir, monkeypatch, capsys):
    turns = ["w10 w11", "w12", "/reset", "", "/help", "w13 " * 30, "w14 " * 30, "w1 " * 200, "w15 " * 30]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n/exit\nw16\n"))
    argv = ["chat", str(tiny_chat_dir), "--max-new-tokens", "6", "--backend", "torch", "--system", "w2"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    answers = captured.out.split("\n")[:-1]
    assert len(answers) == 5, captured  # none to the empty line, the too-long one, or after /exit

    # replay the conversation through the Python API: the same answers, from the same kept history
    system, history, want = [{"role": "system", "content": "w2"}], [], []
    ctx = tiny_chat.config.max_position_embeddings
    for line in ["w10 w11", "w12", None, "w13 " * 30, "w14 " * 30, "w15 " * 30]:
        if line is None:
            history = []
            continue
        history.append({"role": "user", "content": line.strip()})
        while len(chat_prompts([system + history], tiny_chat.tokenizer)[0]) + 6 > ctx:
            del history[:2]
        res = tiny_chat.chat(system + history, max_new_tokens=6, temperature=0)[0]
        history.append({"role": "assistant", "content": res.text})
        want.append(res.text)
    assert answers == want
    assert len(history) < 6  # the context of 128 forced old turns out
    assert "[conversation cleared]" in captured.err and "does not fit the context of 128" in captured.err
    assert "[unknown command /help" in captured.err and "oldest exchanges left the context]" in captured.err


def test_cli_chat_refuses_a_model_without_a_chat_template(tiny_hf_dir, tmp_path, capsys):
    path = tmp_path / "plain"
    shutil.copytree(tiny_hf_dir, path)
    tok = word_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(path)
    assert cli.main(["chat", str(path), "--backend", "torch"]) == 2
    assert "no chat template" in capsys.readouterr().err


# --------------------------------------------------------------------------- chat quality bench
def test_chat_quality_scores_answers_by_hand_and_reads_sharegpt_turns(tiny_chat):
    import torch
    from modegpt_rt.bench.chat_quality import copies, first_exchanges, teacher_forced
    from modegpt_rt.bench.sharegpt_calib import chat_messages

    record = {
        "conversations": [
            {"from": "gpt", "value": "w1"},  # cut before its question: dropped
            {"from": "human", "value": " w2 w3 "},
            {"from": "gpt", "value": "w4 w5 w6"},
            {"from": "human", "value": "w7"},  # no answer: dropped
        ]
    }
    conv = chat_messages(record)
    assert conv == [{"role": "user", "content": "w2 w3"}, {"role": "assistant", "content": "w4 w5 w6"}]
    assert chat_messages({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}) is None
    convs = [conv, [{"role": "user", "content": "w9"}, {"role": "assistant", "content": "w10 " * 40}], conv]
    ex = first_exchanges(convs, tiny_chat.tokenizer, n=5, max_tokens=40)
    assert len(ex) == 2  # the 40-word answer does not fit 40 tokens
    assert ex[0] == ([1] + ids("[user] w2 w3 </s> [assistant]"), ids("w4 w5 w6 </s>"))
    got_answer, got_end = teacher_forced(tiny_chat, ex + [ex[0][:1] + (ids("w7 </s>"),)], batch=2)
    for (prompt, answer), a, e in zip(ex + [ex[0][:1] + (ids("w7 </s>"),)], got_answer, got_end):
        logp = tiny_chat(torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
        nll = [-logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(answer)]
        assert a == pytest.approx(sum(nll[:-1]) / (len(nll) - 1), rel=1e-4) and e == pytest.approx(nll[-1], rel=1e-4)
    assert copies(ids("w1 w2 w3 w4 w5 w6 w7 w8 w9"), ids("[system] w1 w2 w3 w4 w5 w6 w7 w8 </s>"))
    assert not copies(ids("w1 w2 w3 w4 w5 w6 w7 w9"), ids("[system] w1 w2 w3 w4 w5 w6 w7 w8 </s>"))


def test_jsonl_conversations_are_written_out_by_the_chat_template(tiny_chat, tiny_chat_dir, tmp_path, capsys):
    """`--calib` / `--data` jsonl rows may hold OpenAI-style `messages` beside plain `text` rows."""
    from modegpt_rt import data

    conv = [{"role": "user", "content": "w2 w3"}, {"role": "assistant", "content": "w4"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"text": "w1 w1"}) + "\n" + json.dumps({"messages": conv}) + "\n")
    text = data.read_text(str(path), tokenizer=tiny_chat.tokenizer)
    assert text == "w1 w1\n\n" + "<s>[user] w2 w3 </s> [assistant] w4 </s> "
    with pytest.raises(ValueError, match=r"chat.jsonl:2: chat needs a tokenizer"):
        data.read_text(str(path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: message 0: missing 'content'"):
        data.read_text(str(bad), tokenizer=tiny_chat.tokenizer)
    bad.write_text(json.dumps({"prompt": "w1"}) + "\n")
    with pytest.raises(ValueError, match=r"needs a string field 'text' or a 'messages' list"):
        data.read_text(str(bad), tokenizer=tiny_chat.tokenizer)
    # through the command line: perplexity on the conversations (the tokenizer reaches the reader)
    path.write_text((json.dumps({"messages": conv}) + "\n") * 8)
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", str(tiny_chat_dir), "--data", str(path), "--seqlen", "32", "--quiet", "--json", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    per_row = len(ids("<s> [user] w2 w3 </s> [assistant] w4 </s>"))  # rows joined by blank lines, no tokens
    assert result["windows"] == 8 * per_row // 32 and result["ppl"] > 1
