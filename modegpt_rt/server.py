"""An HTTP server for a loaded model: OpenAI-style `/v1/completions` and `/v1/chat/completions` (through the
tokenizer's chat template), with concurrent requests batched.

    modegpt serve out/smollm2-0.3 --port 8000
    curl -s localhost:8000/v1/completions -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'
    curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi!"}]}'

One worker thread owns the model. With continuous batching (the default on CPU) a request joins the running
batch at the next decode step, whatever the others' sampling settings, and leaves it the moment its sequence
ends (`ContinuousBatch`); with static batching (the default on a GPU, where `generate` replays its decode step
from a CUDA graph) requests that arrive within `batch_wait` seconds of each other and share their sampling
settings run as one `generate` batch. Either way at most `max_batch` sequences run at once, and a request with a
`seed` and temperature > 0 runs alone, so its sample is the one `generate(..., seed=...)` gives. Streaming
(`"stream": true`) sends server-sent events, one per token. Only the standard library is used (`http.server`),
so this serves a few clients well, not a fleet.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from modegpt_rt.generate import ContinuousBatch, _check_args, _is_int, chat_prompts, encode_prompts, generate

MAX_BODY = 8 << 20  # bytes of JSON accepted per request
UNSUPPORTED = ("logprobs", "echo", "best_of", "suffix", "logit_bias", "frequency_penalty", "presence_penalty")
CHAT_UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "tools",
    "functions",
    "function_call",
    "audio",
    "modalities",
)
CHAT_MAX_TOKENS = 512  # a chat request's default max_tokens (OpenAI's default is the rest of the context)


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and this message."""


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class LockedTokenizer:
    """Fast tokenizers must not be used from two threads at once: handlers encode, the worker decodes."""

    def __init__(self, tokenizer):
        self._tok, self._lock = tokenizer, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tok(*args, **kwargs)

    def decode(self, *args, **kwargs):
        with self._lock:
            return self._tok.decode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        with self._lock:
            return self._tok.apply_chat_template(*args, **kwargs)

    @property
    def chat_template(self):
        return getattr(self._tok, "chat_template", None)


@dataclass(eq=False)  # compared and hashed by identity: the scheduler keeps sets of requests
class Request:
    prompts: list[list[int]]
    limits: list[int]
    sampling: dict  # temperature, top_k, top_p, seed, stop, ignore_eos: shared by a batch
    stream: bool = False
    chat: bool = False  # answered in the chat API's form
    usage: bool = False  # a streamed answer ends with a chunk of token counts (stream_options.include_usage)
    # ("token", j, delta) | ("done", j, GenerationResult) | ("error", message), j = the prompt's index
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False  # the client left: continuous batching drops its sequences at the next step

    @property
    def alone(self) -> bool:
        """A seeded sample runs alone: in a batch its logits could differ from `generate`'s in the last bits."""
        return self.sampling["temperature"] > 0 and self.sampling["seed"] is not None

    def batch_key(self):
        s = self.sampling
        return (id(self) if self.alone else None, s["temperature"], s["top_k"], s["top_p"], s["stop"], s["ignore_eos"])


def _clean(body, unsupported) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # clients send null for "the default"
    for k in unsupported:
        if body.get(k) not in (None, False, 0, "", {}, []):
            raise RequestError(f"{k!r} is not supported")
    if body.get("n", 1) != 1:
        raise RequestError("only n = 1 is supported (send the prompt several times, or a list of prompts)")
    for k in ("stream", "ignore_eos"):
        if not isinstance(body.get(k, False), bool):
            raise RequestError(f"{k!r} must be true or false, got {body[k]!r}")
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options' must be an object like {\"include_usage\": true}")
    if options and not body.get("stream"):
        raise RequestError("'stream_options' is only allowed with \"stream\": true")
    return body


def parse_completion(body: dict, tokenizer, max_positions: int, vocab_size: int) -> Request:
    """Validate an OpenAI-style completion request into token-id prompts and sampling settings."""
    body = _clean(body, UNSUPPORTED)
    if "prompt" not in body:
        raise RequestError("missing 'prompt'")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]  # one prompt of token ids
    elif isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("'prompt' must be a string, a list of strings, or token ids")
    return _request(body, lambda: encode_prompts(prompt, tokenizer, vocab_size), 16, tokenizer, max_positions)


def parse_chat(body: dict, tokenizer, max_positions: int, vocab_size: int | None = None) -> Request:
    """Validate an OpenAI-style chat request: its messages through the tokenizer's chat template
    (`chat_prompts`), the sampling settings as for completions. `max_tokens` (or `max_completion_tokens`)
    defaults to CHAT_MAX_TOKENS, or what is left of the context if less."""
    body = _clean(body, CHAT_UNSUPPORTED)
    if "messages" not in body:
        raise RequestError("missing 'messages'")
    if "max_completion_tokens" in body:  # OpenAI's newer name for max_tokens
        if "max_tokens" in body and body["max_tokens"] != body["max_completion_tokens"]:
            raise RequestError("'max_tokens' and 'max_completion_tokens' differ; send one of them")
        body["max_tokens"] = body["max_completion_tokens"]
    if body.get("tool_choice", "none") != "none":  # "none" asks for no tool call: what this server does
        raise RequestError("'tool_choice' is not supported")
    if body.get("response_format", {"type": "text"}) != {"type": "text"}:
        raise RequestError("only the text response format is supported ('response_format')")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError('\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects')
    # the template's ids are checked as a prompt of ids is: a tokenizer may hold more ids than the model
    encode = lambda: encode_prompts(chat_prompts([messages], tokenizer), None, vocab_size)  # noqa: E731
    return _request(body, encode, CHAT_MAX_TOKENS, tokenizer, max_positions, chat=True)


def _request(body: dict, encode, default_max: int, tokenizer, max_positions: int, chat: bool = False) -> Request:
    """The sampling settings and limits shared by both endpoints; `encode()` gives the token-id prompts.
    `max_tokens` defaults to `default_max`; for chat, to what is left of the context if that is less."""
    temperature = body.get("temperature", 1.0)
    top_k, top_p, seed = body.get("top_k"), body.get("top_p"), body.get("seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings")
    max_tokens = body.get("max_tokens", None if chat else default_max)
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):  # one limit for all prompts
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise RequestError(f"{name!r} must be a positive integer, got {max_tokens!r}")
    try:  # types and ranges of the sampling settings, as generate() checks them
        _check_args(max_tokens or 1, temperature, top_k, top_p, seed)
        ids = encode()  # first: chat says it needs a tokenizer
        if (stop or body.get("stream")) and tokenizer is None:
            raise ValueError("stop strings and streaming need a tokenizer; this model was loaded without one")
    except ValueError as e:
        raise RequestError(str(e)) from None
    if max_tokens is None:  # chat: the default, or what is left of the context if less
        room = max_positions - len(ids[0])
        if room < 1:
            raise RequestError(
                f"the conversation has {len(ids[0])} tokens and leaves no room for an answer in the context of "
                f"{max_positions} tokens"
            )
        max_tokens = min(default_max, room)
    for i, p in enumerate(ids):
        if len(p) + max_tokens > max_positions:
            what = "the conversation" if chat else f"prompt {i}"
            raise RequestError(
                f"{what} has {len(p)} tokens; with max_tokens={max_tokens} it exceeds the context of "
                f"{max_positions} tokens"
            )
    sampling = dict(
        temperature=float(temperature),
        top_k=top_k,
        top_p=None if top_p is None else float(top_p),
        seed=seed,
        stop=tuple(stop),
        ignore_eos=body.get("ignore_eos", False),
    )
    usage = body.get("stream_options", {}).get("include_usage", False)
    return Request(ids, [max_tokens] * len(ids), sampling, stream=body.get("stream", False), chat=chat, usage=usage)


BATCHING = ("auto", "continuous", "static")


class Scheduler:
    """Owns the model: runs queued requests in batches on one worker thread (module docstring)."""

    def __init__(
        self,
        model,
        tokenizer=None,
        max_batch: int = 8,
        batch_wait: float = 0.005,
        max_queue: int = 256,
        worker_thread: bool = True,
        batching: str = "auto",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_wait < 0:
            raise ValueError(f"batch_wait must be >= 0, got {batch_wait}")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        if batching == "auto":
            batching = "static" if model.device.type == "cuda" else "continuous"
        self.model, self.tokenizer, self.batching = model, tokenizer, batching
        self.max_batch, self.batch_wait, self.max_queue = max_batch, batch_wait, max_queue
        self.ctx = model.config.max_position_embeddings
        self.pending: list[Request] = []
        self.cond = threading.Condition()
        # sequences per generate call (static) or per decode step (continuous): for tests and benchmarks
        self.batch_sizes: deque[int] = deque(maxlen=100_000)
        self.closed = False
        self.batch: ContinuousBatch | None = None  # the running batch (continuous batching)
        self.worker = None
        if worker_thread:  # else the caller runs `run()` (on the main thread: see `modegpt serve`)
            self.worker = threading.Thread(target=self.run, name="modegpt-scheduler", daemon=True)
            self.worker.start()

    def submit(self, req: Request):
        if len(req.prompts) > self.max_batch:  # a batch holds whole requests: one this large would never fit
            raise RequestError(
                f"{len(req.prompts)} prompts in one request; this server runs at most {self.max_batch} sequences "
                "at once (--max-batch): send them in several requests"
            )
        with self.cond:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise OverflowError(f"{len(self.pending)} requests queued; try again later")
            self.pending.append(req)
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            for r in self.pending:
                r.events.put(("error", "the server shut down before this request ran"))
            self.pending.clear()
            self.cond.notify()
        if self.worker is not None and self.worker is not threading.current_thread():
            self.worker.join(timeout=60)

    def _take_batch(self) -> list[Request]:
        """The oldest request and the compatible ones that arrive within batch_wait of it."""
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return []
            first = self.pending[0]  # static batching runs a request whose client left all the same
        if self.batch_wait and len(first.prompts) < self.max_batch:  # room left: give others a moment to join
            time.sleep(self.batch_wait)
        with self.cond:
            key, group, seqs, longest, most = first.batch_key(), [], 0, 0, 0
            for r in list(self.pending):
                lp, lm = max(map(len, r.prompts)), max(r.limits)
                fits = seqs + len(r.prompts) <= self.max_batch and max(longest, lp) + max(most, lm) <= self.ctx
                if r is first or (r.batch_key() == key and fits):
                    group.append(r)
                    self.pending.remove(r)
                    seqs, longest, most = seqs + len(r.prompts), max(longest, lp), max(most, lm)
            return group

    def run(self):
        """Serve queued requests until `close()`. The C++ CPU kernels' OpenMP regions start slower from a
        thread other than the main one (a decode step of SmolLM2 took 22.2–26.5 ms there against
        16.7–20.5 ms on the main thread: `python -m modegpt_rt.bench.decode_thread`; `--probe` shows why: a
        second thread's libgomp pool is throttled and wakes its worker through the kernel for every region),
        so `modegpt serve` runs this on the main thread."""
        if self.batching == "continuous":
            return self._run_continuous()
        while group := self._take_batch():
            self._run(group)

    def _admit(self, running: int) -> tuple[list[Request], Request | None]:
        """Continuous batching: the queued requests that fit beside `running` sequences, in arrival order (a
        request that does not fit yet holds back the ones behind it), or a seeded request to run alone once
        nothing runs. Waits while there is nothing to do; returns ([], None) once closed and idle."""
        with self.cond:
            while not self.pending and not running and not self.closed:
                self.cond.wait()
            if not running and self.pending and self.batch_wait and not self.pending[0].alone:
                deadline = time.monotonic() + self.batch_wait  # idle: let requests sent together start together
                while (left := deadline - time.monotonic()) > 0 and not self.closed:
                    self.cond.wait(left)
            take = []
            self.pending = [r for r in self.pending if not r.cancelled]
            while self.pending and not self.closed:
                r = self.pending[0]
                if r.alone:
                    if running or take:
                        break
                    return [], self.pending.pop(0)
                if running + len(r.prompts) > self.max_batch:
                    break
                take.append(self.pending.pop(0))
                running += len(r.prompts)
            return take, None

    def _run_continuous(self):
        batch = self.batch = ContinuousBatch(self.model, self.tokenizer, self.max_batch)
        generator = torch.Generator(device=self.model.device)  # unseeded sampling shares one stream
        generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        while True:
            take, alone = self._admit(len(batch))
            if alone is not None:
                self._run([alone])
                continue
            if not take and not len(batch):
                if self.closed:
                    return
                continue  # every queued request was cancelled: wait again
            for r in take:
                s = r.sampling
                stream = self._on_token if r.stream and self.tokenizer is not None else None
                try:
                    for j, prompt in enumerate(r.prompts):
                        batch.add(
                            prompt,
                            r.limits[j],
                            s["temperature"],
                            s["top_k"],
                            s["top_p"],
                            generator,
                            list(s["stop"]),
                            s["ignore_eos"],
                            stream=stream,
                            on_finish=self._on_finish,
                            index=(r, j),
                        )
                except Exception as e:  # noqa: BLE001 — the client gets the reason; the batch runs on
                    r.cancelled = True  # its prompts added before the failure stop at the next step
                    r.events.put(("error", f"{type(e).__name__}: {e}"))
            try:
                batch.cancel(lambda index: index[0].cancelled)  # may prefill: inside the try
                if len(batch):
                    self.batch_sizes.append(len(batch))
                    batch.step()
            except Exception as e:  # noqa: BLE001 — every running request gets the reason; the server runs on
                for r in {seq.index[0] for seq in batch.seqs}:
                    r.events.put(("error", f"{type(e).__name__}: {e}"))
                batch = self.batch = ContinuousBatch(self.model, self.tokenizer, self.max_batch)

    @staticmethod
    def _on_token(index, token, delta):
        r, j = index  # the request and its prompt's position in it
        if r.stream and delta:  # a token whose text is held back (a possible stop string) sends nothing yet
            r.events.put(("token", j, delta))

    @staticmethod
    def _on_finish(index, result):
        r, j = index
        r.events.put(("done", j, result))

    def _run(self, group: list[Request]):
        owners = [(r, j) for r in group for j in range(len(r.prompts))]
        self.batch_sizes.append(len(owners))
        try:
            generate(
                self.model,
                [p for r in group for p in r.prompts],
                max_new_tokens=[m for r in group for m in r.limits],
                tokenizer=self.tokenizer,
                stream=(lambda i, t, d: self._on_token(owners[i], t, d)) if self.tokenizer is not None else None,
                on_finish=lambda i, result: self._on_finish(owners[i], result),
                **{k: (list(v) if k == "stop" else v) for k, v in group[0].sampling.items()},
            )
        except Exception as e:  # noqa: BLE001 — every waiting client gets the reason
            for r in group:
                r.events.put(("error", f"{type(e).__name__}: {e}"))


class Handler(BaseHTTPRequestHandler):
    server: CompletionServer
    protocol_version = "HTTP/1.0"  # close-delimited bodies: streaming needs no chunked encoding

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _json(self, status: int, obj: dict, headers: dict | None = None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        self._json(status, {"error": {"message": message, "type": kind}}, headers)

    def _not_allowed(self):
        """Any other method (OPTIONS, PUT, DELETE, ...): 405 in the API's JSON error form, not http.server's
        HTML 501 page."""
        allow = "POST" if urlsplit(self.path).path in ENDPOINTS else "GET"
        self._error(405, f"{self.command} is not served; use {allow}", "not_allowed", {"Allow": allow})

    do_OPTIONS = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def do_GET(self):
        srv = self.server
        path = urlsplit(self.path).path
        if path in ("/health", "/"):
            self._json(200, {"status": "ok", "model": srv.model_name, "backend": srv.model.backend})
        elif path == "/v1/models":
            card = {"id": srv.model_name, "object": "model", "owned_by": "modegpt-rt"}
            self._json(200, {"object": "list", "data": [card]})
        elif path in ENDPOINTS:
            self._not_allowed()
        else:
            self._error(404, f"no such endpoint: GET {self.path}", "not_found")

    def do_POST(self):
        path = urlsplit(self.path).path
        if path not in ENDPOINTS:
            return self._error(404, f"no such endpoint: POST {self.path}", "not_found")
        srv = self.server
        try:
            n = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            why = f"send a JSON body with a Content-Length of at most {MAX_BODY} bytes"
            return self._error(411 if n < 0 else 413, why)
        try:
            body = json.loads(self.rfile.read(n) or b"null")
            if path == "/v1/chat/completions":
                req = parse_chat(body, srv.scheduler.tokenizer, srv.scheduler.ctx, srv.model.config.vocab_size)
            else:
                req = parse_completion(body, srv.scheduler.tokenizer, srv.scheduler.ctx, srv.model.config.vocab_size)
            srv.scheduler.submit(req)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._error(400, f"the body is not valid JSON in UTF-8: {e}")
        except RequestError as e:
            return self._error(400, str(e))
        except OverflowError as e:
            return self._error(503, str(e), "overloaded")
        except RuntimeError as e:
            return self._error(503, str(e), "unavailable")
        kind = "chat.completion" if req.chat else "text_completion"
        head = {"id": f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind}
        head.update(created=int(time.time()), model=srv.model_name)
        try:
            if req.stream:
                self._stream(req, head)
            else:
                self._complete(req, head)
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            req.cancelled = True  # the client left: continuous batching stops its sequences

    def _client_gone(self) -> bool:
        """The client closed its end (the socket reads as end-of-file) while its answer is being made. A client
        that only half-closes (shuts down its sending side and waits to read) looks the same and is taken as
        gone too, as ASGI servers do; only continuous batching asks (static batching cannot stop a sequence)."""
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # nothing to read: still connected
        except OSError:
            return True

    def _wait(self, req: Request):
        """Yields ("token", j, delta) and ("done", j, result) events until every prompt is done; raises
        ClientGone when the client disconnects meanwhile."""
        left = len(req.prompts)
        while left:
            try:
                ev = req.events.get(timeout=0.25)
            except queue.Empty:
                if self.server.scheduler.batching == "continuous" and self._client_gone():
                    raise ClientGone from None
                continue
            if ev[0] == "error":
                raise RuntimeError(ev[1])
            left -= ev[0] == "done"
            yield ev

    def _complete(self, req: Request, head: dict):
        results = {}
        try:
            for ev in self._wait(req):
                if ev[0] == "done":
                    results[ev[1]] = ev[2]
        except RuntimeError as e:
            return self._error(500, str(e), "server_error")
        choices = [_choice(j, results[j].text, results[j], req.chat) for j in range(len(req.prompts))]
        self._json(200, {**head, "choices": choices, "usage": _usage(req, results.values())})

    def _stream(self, req: Request, head: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def send(obj):
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()

        if req.chat:  # the chat API's chunks: the role first, then content deltas, then the finish reason
            head = {**head, "object": "chat.completion.chunk"}
            opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            send({**head, "choices": [opening]})
        results = []
        try:
            for ev in self._wait(req):
                if ev[0] == "token":
                    piece = {"delta": {"content": ev[2]}} if req.chat else {"text": ev[2]}
                    send({**head, "choices": [{"index": ev[1], **piece, "finish_reason": None}]})
                else:
                    results.append(ev[2])
                    send({**head, "choices": [_choice(ev[1], "", ev[2], req.chat, delta=True)]})
        except RuntimeError as e:
            send({"error": {"message": str(e), "type": "server_error"}})
        else:
            if req.usage:  # stream_options.include_usage: one more chunk, with no choices
                send({**head, "choices": [], "usage": _usage(req, results)})
        send(b"[DONE]")


ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def _choice(index: int, text: str, result, chat: bool = False, delta: bool = False) -> dict:
    """OpenAI's finish reasons: "stop" (end of sequence or a stop string) or "length". A chat choice holds the
    assistant's message (or, streamed, an empty delta); `token_ids` is ours, not OpenAI's."""
    reason = "length" if result.finish_reason == "length" else "stop"
    if not chat:
        body = {"text": text}
    elif delta:
        body = {"delta": {}}
    else:
        body = {"message": {"role": "assistant", "content": text}}
    return {"index": index, **body, "finish_reason": reason, "token_ids": result.token_ids, "logprobs": None}


def _usage(req: Request, results) -> dict:
    done = sum(len(r.token_ids) for r in results)
    prompt = sum(map(len, req.prompts))
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: socketserver's 5 reset clients that connect together

    def __init__(self, model, host="127.0.0.1", port=8000, model_name=None, verbose=False, **scheduler_kw):
        """`scheduler_kw` go to `Scheduler`; with `worker_thread=False` call `scheduler.run()` yourself."""
        tok = getattr(model, "tokenizer", None)
        self.model = model
        self.model_name = model_name or str(getattr(model, "source", "model"))
        self.verbose = verbose
        self.scheduler = Scheduler(model, LockedTokenizer(tok) if tok is not None else None, **scheduler_kw)
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self):
        super().server_close()
        self.scheduler.close()


def make_server(model, host: str = "127.0.0.1", port: int = 8000, **kw) -> CompletionServer:
    """An HTTP server for `model` (call `.serve_forever()`; `port=0` picks a free port, see `.url`)."""
    return CompletionServer(model, host, port, **kw)
