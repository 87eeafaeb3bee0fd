"""`modegpt serve`: OpenAI-style completions over HTTP, batched across concurrent requests."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

import modegpt_rt


def _post(srv, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(srv.url + "/v1/completions", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _complete(srv, body):
    status, text = _post(srv, body)
    assert status == 200, text
    return json.loads(text)


def _slow(model, seconds: float):
    """Make every `model.step` take `seconds` longer, so a test can act while a request runs."""
    step = model.step

    def slowed(*a, **kw):
        time.sleep(seconds)
        return step(*a, **kw)

    model.step = slowed
    return model


def test_server_token_ids_match_generate_and_reject_bad_requests(tiny_hf_dir, serve):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False)
    srv = serve(model)
    body = {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 5, "temperature": 0, "ignore_eos": True, "top_p": None}
    out = _complete(srv, body)  # null means the default, as OpenAI clients send it
    want = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=5, temperature=0, ignore_eos=True)
    assert [c["token_ids"] for c in out["choices"]] == [r.token_ids for r in want]
    assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}
    seeded = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0.9, "seed": 4, "ignore_eos": True}
    again = model.generate([[5, 6, 7]], max_new_tokens=6, temperature=0.9, seed=4, ignore_eos=True)[0]
    assert _complete(srv, seeded)["choices"][0]["token_ids"] == again.token_ids

    bad = {
        "prompt": [],
        "max_tokens": 0,
        "temperature": -1,
        "top_p": 2,
        "n": 2,
        "logprobs": 3,
        "stop": [3],
        "seed": "x",
        "frequency_penalty": 0.5,
    }
    bad2 = [  # each dropped the connection or answered 500 before
        ("max_tokens", [3]),
        ("temperature", float("nan")),
        ("seed", 2**64),
        ("stream", "false"),
        ("ignore_eos", "yes"),
    ]
    for key, value in [*bad.items(), *bad2]:
        status, text = _post(srv, {"prompt": [5, 6], key: value})
        assert status == 400, (key, text)
        assert json.loads(text)["error"]["type"] == "invalid_request_error"
    for body, fragment in [
        ({"max_tokens": 3}, "missing 'prompt'"),
        ({"prompt": [5], "max_tokens": 0}, "'max_tokens' must be a positive integer"),
        ({"prompt": "text"}, "tokenizer"),  # this model has none
        ({"prompt": [5, 97]}, "outside the vocabulary"),
        ({"prompt": [1] * 120, "max_tokens": 20}, "context"),
        ({"prompt": [5], "stream": True}, "streaming need a tokenizer"),
    ]:
        status, text = _post(srv, body)
        assert status == 400 and fragment in json.loads(text)["error"]["message"], text
    status, text = _post(srv, None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in text
    status, text = _post(srv, None, raw=b'{"prompt": "\xff\xfe hi"}')  # not UTF-8
    assert status == 400 and "not valid JSON" in text
    status, text = _post(srv, None, raw=b'{"prompt": "\\udcff hi"}')  # valid JSON, a lone surrogate: not text
    assert status == 400 and "not valid UTF-8" in json.loads(text)["error"]["message"], text
    status, text = _post(srv, {"prompt": [[5]] * 9, "max_tokens": 2})  # more sequences than --max-batch (8)
    assert status == 400 and "at most 8 sequences" in text
    with urllib.request.urlopen(srv.url + "/health?verbose=1", timeout=30) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.url + "/nowhere", timeout=30)
    assert e.value.code == 404
    with urllib.request.urlopen(srv.url + "/health", timeout=30) as r:
        assert json.loads(r.read())["backend"] == model.backend
    for method, path, allow in [("OPTIONS", "/v1/completions", "POST"), ("DELETE", "/health", "GET")]:
        with pytest.raises(urllib.error.HTTPError) as e:  # http.server's HTML 501 page before
            urllib.request.urlopen(urllib.request.Request(srv.url + path, method=method), timeout=30)
        assert e.value.code == 405 and e.value.headers["Allow"] == allow
        assert json.loads(e.value.read())["error"]["message"] == f"{method} is not served; use {allow}"
    # after all that, the server still answers
    assert _complete(srv, {"prompt": [8, 9], "max_tokens": 2, "temperature": 0})["choices"][0]["token_ids"]


def test_server_model_on_the_calling_thread(tiny_hf_dir, serve):
    """As `modegpt serve` runs it: HTTP on a thread, the scheduler on the main thread until closed; a request
    still queued at close gets an error, not a hang."""
    model = modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False)
    srv = serve(model, worker_thread=False)
    got = {}

    def client():
        got["out"] = _complete(srv, {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        srv.scheduler.close()

    t = threading.Thread(target=client)
    t.start()
    srv.scheduler.run()  # returns once the client closed it
    t.join()
    want = model.generate([[5, 6, 7]], max_new_tokens=4, temperature=0, ignore_eos=True)[0].token_ids
    assert got["out"]["choices"][0]["token_ids"] == want
    status, text = _post(srv, {"prompt": [5, 6], "max_tokens": 2})
    assert status == 503 and "shutting down" in text


def test_server_batches_concurrent_requests_and_streams(smollm2, serve):
    srv = serve(smollm2, batch_wait=0.5, max_batch=8)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    limits = [12, 5, 8]
    out = [None] * 3

    def ask(i):
        out[i] = _complete(srv, {"prompt": prompts[i], "max_tokens": limits[i], "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(srv.scheduler.batch_sizes) > 1  # at least two requests shared a generate call
    for p, m, o in zip(prompts, limits, out):
        alone = smollm2.generate([p], max_new_tokens=m, temperature=0)[0]
        choice = o["choices"][0]
        assert choice["token_ids"] == alone.token_ids and choice["text"] == alone.text

    status, body = _post(srv, {"prompt": prompts[0], "max_tokens": 12, "temperature": 0, "stream": True})
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == out[0]["choices"][0]["text"]
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]

    word = out[0]["choices"][0]["text"].split()[1]
    stopped = _complete(srv, {"prompt": prompts[0], "max_tokens": 12, "temperature": 0, "stop": word})
    assert stopped["choices"][0]["finish_reason"] == "stop" and word not in stopped["choices"][0]["text"]
    body = {"prompt": prompts[0], "max_tokens": 12, "temperature": 0, "stop": word, "stream": True}
    status, text = _post(srv, body)
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == stopped["choices"][0]["text"]
    assert all(c["text"] for c in chunks[:-1])  # no empty events while a possible stop string is held back


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_server_continuous_batching_lets_a_short_request_finish_first(tiny_hf_dir, batching):
    """With continuous batching a short request sent while a long one runs joins it at the next step and is
    answered long before it; with static batching it waits for the long one. Both get generate's tokens."""

    from modegpt_rt.server import Request, Scheduler

    model = modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False)
    want_long = model.generate([[5, 6, 7]], max_new_tokens=100, temperature=0, ignore_eos=True)[0].token_ids
    want_short = model.generate([[8, 9]], max_new_tokens=3, temperature=0, ignore_eos=True)[0].token_ids
    _slow(model, 0.01)  # 100 steps take over a second: the short request surely arrives meanwhile
    sampling = dict(temperature=0.0, top_k=None, top_p=None, seed=None, stop=(), ignore_eos=True)
    sched = Scheduler(model, max_batch=4, batch_wait=0, batching=batching)
    try:
        long = Request([[5, 6, 7]], [100], dict(sampling))
        short = Request([[8, 9]], [3], dict(sampling))
        sched.submit(long)
        time.sleep(0.2)
        sched.submit(short)
        finished = []
        while len(finished) < 2:
            for name, r in (("long", long), ("short", short)):
                while not r.events.empty():
                    ev = r.events.get()
                    assert ev[0] == "done", ev
                    finished.append((name, ev[2].token_ids))
            time.sleep(0.005)
    finally:
        sched.close()
    assert dict(finished) == {"long": want_long, "short": want_short}
    first = "short" if batching == "continuous" else "long"
    assert finished[0][0] == first
    if batching == "continuous":
        assert max(sched.batch_sizes) == 2  # they shared decode steps


@pytest.mark.parametrize("stream", [False, True])
def test_server_continuous_batching_stops_the_sequences_of_a_client_that_left(tiny_hf_dir, request, serve, stream):
    """A client that disconnects while its request runs (waiting for the whole answer, or streaming it) has its
    sequence dropped from the running batch at once, instead of decoding to max_tokens."""
    import socket

    if stream:  # streaming needs a tokenizer
        model = request.getfixturevalue("smollm2")
    else:
        model = _slow(modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False), 0.02)  # 100 tokens: over 2 s
    srv = serve(model, batching="continuous", batch_wait=0)
    host, port = srv.server_address[:2]
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True, "stream": stream}).encode()
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while (srv.scheduler.batch is None or not len(srv.scheduler.batch)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(srv.scheduler.batch) == 1
        steps = srv.scheduler.batch.steps
    left = time.monotonic()  # the socket is closed
    while len(srv.scheduler.batch) and time.monotonic() - left < 10:
        time.sleep(0.01)
    assert len(srv.scheduler.batch) == 0 and time.monotonic() - left < 1.5
    assert srv.scheduler.batch.steps - steps < 90  # it did not run on to its 100 tokens
    out = _complete(srv, {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert len(out["choices"][0]["token_ids"]) == 3  # the server serves on


def test_server_continuous_batching_survives_a_failed_step_and_a_cancelled_queue(tiny_hf_dir):
    """A step that raises answers the running requests with the error and the server serves on; a queued
    request whose client left while a seeded request ran alone does not stop the worker either."""

    from modegpt_rt.server import Request, Scheduler

    model = modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False)
    real_step, fail = model.step, {"now": False}

    def step(*a, **kw):
        time.sleep(0.005)
        if fail["now"]:
            fail["now"] = False
            raise RuntimeError("injected fault")
        return real_step(*a, **kw)

    model.step = step
    greedy = dict(temperature=0.0, top_k=None, top_p=None, seed=None, stop=(), ignore_eos=True)
    sched = Scheduler(model, max_batch=4, batch_wait=0, batching="continuous")

    def answer(r, timeout=20):
        ev = r.events.get(timeout=timeout)
        return ev[0], ev[1] if ev[0] == "error" else ev[2].token_ids

    try:
        fail["now"] = True
        a = Request([[5, 6, 7], [8, 9]], [4, 4], dict(greedy))
        sched.submit(a)
        assert answer(a) == ("error", "RuntimeError: injected fault")
        b = Request([[5, 6, 7]], [4], dict(greedy))
        sched.submit(b)
        want = model.generate([[5, 6, 7]], max_new_tokens=4, temperature=0, ignore_eos=True)[0].token_ids
        assert answer(b) == ("done", want)

        seeded = Request([[5, 6]], [60], dict(greedy, temperature=0.9, seed=1))
        queued = Request([[8, 9]], [3], dict(greedy))
        sched.submit(seeded)
        time.sleep(0.05)
        sched.submit(queued)  # waits for the seeded request, which runs alone
        queued.cancelled = True
        assert answer(seeded)[0] == "done"
        time.sleep(0.3)  # the worker finds only the cancelled request queued
        later = Request([[5, 6, 7]], [4], dict(greedy))
        sched.submit(later)
        assert answer(later, timeout=5) == ("done", want)
        assert sched.worker.is_alive() and queued.events.empty()
    finally:
        sched.close()


def test_server_static_batching_answers_a_client_that_half_closed(tiny_hf_dir, serve):
    """Static batching cannot stop a sequence, so it does not look for departed clients: one that shut down its
    sending side after the request still gets the answer."""
    import socket

    model = modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False)
    _slow(model, 0.02)  # 30 tokens take well over the 0.25 s between checks for departed clients
    srv = serve(model, batching="static", batch_wait=0)
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 30, "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection(srv.server_address[:2]) as s:
        s.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and len(json.loads(payload)["choices"][0]["token_ids"]) == 30
