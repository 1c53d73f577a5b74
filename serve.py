"""An OpenAI-compatible HTTP server for a DecoderStack checkpoint, and a chat page (chat.html) at /.

    python serve.py --preset cpu                       # the run's latest checkpoint at http://127.0.0.1:8000
    python serve.py --preset cpu --init-from runs/cpu/sft_ckpt_000040 --port 9000 --temperature 0

It takes the stack's flags (--preset, --data-dir, --run-dir, --init-from, --dtype, the sampling defaults
--temperature, --top-k, --top-p, --min-p, --max-new-tokens, --decode-compile) and its own below (--help lists them).
Each choice of each request is a ServedStream of a ServedBatch (the stack's DecodeBatch), stepped by one thread: it joins
between decode steps and leaves when done; the HTTP side is asyncio (FastAPI + uvicorn). README: "Serve it".
"""
import asyncio
import dataclasses
import json
import os
import queue
import re
import signal
import sys
import threading
import time
from typing import Annotated, Literal, Optional, Union

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from load_stack import load_stack

ds = load_stack()
CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")  # plain HTML + JS, served as it is
SHUTDOWN_GRACE = 5  # seconds stop() gives open requests before it closes their connections


@dataclasses.dataclass
class ServeConfig:
    """serving (serve.py): where it listens, the model's name, its bounds"""
    host: str = "127.0.0.1"          # 0.0.0.0 to serve other machines (there is no authentication: see README)
    port: int = 8000                 # the port to listen on
    served_model_name: str = ""      # the API's model id ("": the run directory's and checkpoint's names)
    serve_max_rows: int = 32         # choices decoding at once (continuous batching); also the largest n
    serve_max_queue: int = 64        # choices waiting beyond those; more get 429
    serve_timeout: float = 300.0     # seconds per request; longer ones are cancelled (504)


SERVE_MAX_STOPS = 4  # stop sequences per request (OpenAI's limit)
RETRY_AFTER = 1  # seconds a 429 tells the client to wait: rows free as fast as replies finish
MAX_BODY = 1 << 20  # bytes of a request body: a whole context of text or ids is a few tens of KB; beyond, 413 unread
BODY_TIMEOUT = 30.0  # seconds to send a request body (a client trickling one in holds a connection, not the server)
MAX_CONNECTIONS = 256  # open connections uvicorn takes; beyond, 503
# message roles as our chat format has them: "developer" is OpenAI's newer name for "system"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
# how replies show the calculator's calls: GSM8K's notation (<<48/2=24>>), from which SFT's data taught them
CALL_MARKS = ("<<", "=", "", ">>")  # what each of TOOL_TOKENS shows as
CALCULATOR_CALL = re.compile(r"<<([^>]*)>>")  # as data/sft_shards.py reads GSM8K


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI error body naming the parameter at fault."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def token_ids(values, vocab):
    """Whether every value is a token id of the vocabulary (an int, not a bool, in [0, vocab))."""
    return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in values)


def annotated_text(tokenizer, tokens):
    """A reply's text, its calculator calls in GSM8K's notation: <|python_start|>expr<|python_end|><|output_start|>
    result<|output_end|> shows as <<expr=result>>, a call the calculator refused (no output) as <<expr=>>. As tokens
    come, each text is the one before it and more (a refused call's >> comes with the token after its python_end)."""
    marks = {tokenizer.special(name): mark for name, mark in zip(TOOL_TOKENS, CALL_MARKS)}
    python_end, output_start = (tokenizer.special(name) for name in TOOL_TOKENS[1:3])
    pieces, run = [], []
    for k, token in enumerate(tokens):
        if token not in marks:
            run.append(token)
            continue
        pieces += [tokenizer.decode(run), marks[token]]
        run = []
        if token == python_end and k + 1 < len(tokens) and tokens[k + 1] != output_start:
            pieces.append(CALL_MARKS[-1])
    return "".join(pieces) + tokenizer.decode(run)


def encode_reply(tokenizer, text):
    """An assistant turn's text as the model wrote it: its calculator calls, shown as <<expr=result>> (annotated_text),
    become the tool's tokens again (a user turn's text is always ordinary text)."""
    sp, ids, at = tokenizer.special, [], 0
    for call in CALCULATOR_CALL.finditer(text):
        expr, eq, result = call.group(1).rpartition("=")
        if eq:  # a call; without "=" the text only looks like one
            ids += [*tokenizer.encode(text[at:call.start()]), sp(TOOL_TOKENS[0]), *tokenizer.encode(expr), sp(TOOL_TOKENS[1])]
            ids += [sp(TOOL_TOKENS[2]), *tokenizer.encode(result), sp(TOOL_TOKENS[3])] if result else []
            at = call.end()
    return ids + tokenizer.encode(text[at:])


def chat_prompt(tokenizer, messages):
    """The prompt of an OpenAI `messages` list in our chat format (data/tokenizer.py's render_conversation): <|bos|>,
    then user and assistant turns alternating from a user turn (a leading system message is merged into it:
    system + blank line + user), ending on a user turn, then <|assistant_start|>."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    turns = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)  # OpenAI's content parts: text ones only
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES or not isinstance(content, str):
            raise RequestError(400, f"messages[{i}] must be {{role: system|developer|user|assistant, content: text}}",
                               "messages")
        turns.append((i, ROLES[m["role"]], content))
    if turns[0][1] == "system":
        if len(turns) < 2 or turns[1][1] != "user":
            raise RequestError(400, "a system message must be followed by a user message", "messages")
        turns = [(1, "user", turns[0][2] + "\n\n" + turns[1][2])] + turns[2:]
    for k, (i, role, _) in enumerate(turns):
        if role != ("user", "assistant")[k % 2]:
            raise RequestError(400, f"messages[{i}] is {role!r}: turns must alternate user, assistant, ... after an "
                               "optional first system message", "messages")
    if turns[-1][1] != "user":
        raise RequestError(400, "the last message must be the user's (the reply is the assistant's)", "messages")
    sp, ids = tokenizer.special, [tokenizer.bos_id]
    for _, role, text in turns:
        ids += ([sp("<|user_start|>"), *tokenizer.encode(text), sp("<|user_end|>")] if role == "user" else
                [sp("<|assistant_start|>"), *encode_reply(tokenizer, text), sp("<|assistant_end|>")])
    return ids + [sp("<|assistant_start|>")]


class ReplyText:
    """One choice's text as its tokens come: all of it decoded each time (a token may end mid-character: a trailing
    replacement character waits for the next token), cut before the first stop sequence, holding back a tail that
    could still begin one."""

    def __init__(self, tokenizer, stop_tokens, stop):
        self.tokenizer, self.stop_tokens, self.stop = tokenizer, stop_tokens, stop
        self.tokens, self.text, self.sent, self.finish = [], "", 0, None

    def push(self, token):
        """The text now safe to send; sets finish = "stop" at a stop token or sequence."""
        if token in self.stop_tokens:
            self.finish = "stop"
            return self.rest()
        self.tokens.append(token)
        self.text = annotated_text(self.tokenizer, self.tokens)
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.finish = self.text[:min(cuts)], "stop"
            return self.rest()
        hold = len(self.text) - len(self.text.rstrip("\ufffd"))
        for s in self.stop:
            hold = max(hold, next((n for n in range(min(len(s) - 1, len(self.text)), 0, -1) if self.text.endswith(s[:n])), 0))
        piece = self.text[self.sent:len(self.text) - hold]
        self.sent += len(piece)
        return piece

    def rest(self):
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


# the sampling fields of a request: (type, check, message when the check fails)
REQUEST_FIELDS = {
    "temperature": ((int, float), lambda v: 0 <= v <= 2, "between 0 and 2"),
    "top_p": ((int, float), lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "0 (off) or more"),
    "min_p": ((int, float), lambda v: 0 <= v <= 1, "between 0 and 1"),
    "seed": (int, lambda v: True, ""),
    "stream": (bool, lambda v: True, ""),
    "model": (str, lambda v: True, ""),
}
MAX_LOGPROBS = 5  # top alternatives per token that `logprobs` may ask for (OpenAI's legacy completions limit)
MAX_TOP_LOGPROBS = 20  # chat completions' top_logprobs limit (OpenAI's)
SCORED = {"text": ("logprobs", "echo"), "chat": ("logprobs", "top_logprobs")}  # taken where the endpoint scores
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "tools": (None, []),
               "functions": (None, []), "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}  # fields accepted only at their off value


# -- the API's schema, served at /openapi.json: pydantic models of every body, this server's own limits in them. The
# handlers read the raw body and check it themselves (a size and time bound before parsing, OpenAI-shaped 400s naming
# the field): these models state what those checks accept, and tests/test_serve.py holds the two together with
# schemathesis. What a schema cannot say is a 400: turns that alternate, a prompt that leaves room in the context for
# its reply, max_tokens 0 without echo, top_logprobs without logprobs, logprobs or echo while streaming.

Stop = Union[Annotated[str, Field(min_length=1)],
             Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=SERVE_MAX_STOPS)], None]


class Error(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: Error


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's text in UTF-8


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[ChatLogprobs]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]  # the first token of a prompt has no context: null
    top_logprobs: Optional[list[Optional[dict[str, float]]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_context: int  # tokens, prompt and reply together
    chat: bool  # an SFT/RL checkpoint (chat completions), else a base model (completions)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    rows_live: int
    rows: int
    waiting: int
    in_flight: int
    max_rows: int
    max_queue: int
    failed_steps: int


class TokenizerInfo(BaseModel):
    bos_token: str
    eos_token: str
    pad_token: Optional[str]
    max_model_len: int
    vocab_size: int


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class Text(BaseModel):
    prompt: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal[tuple(ROLES)]
    content: Union[str, list[TextPart]]


def request_models(max_context, max_rows, vocab_size):
    """The request bodies' models with this server's bounds: its context, its rows (the largest n), its vocabulary."""
    TokenId = Annotated[int, Field(ge=0, lt=vocab_size)]
    Ids = Annotated[list[TokenId], Field(min_length=1)]

    class Sampling(BaseModel):
        model: Optional[str] = None
        temperature: Optional[float] = Field(None, ge=0, le=2, description=f"below {ds.MIN_TEMPERATURE:g}: greedy")
        top_p: Optional[float] = Field(None, gt=0, le=1)
        top_k: Optional[int] = Field(None, ge=0, description="0: off")
        min_p: Optional[float] = Field(None, ge=0, le=1)
        seed: Optional[int] = None
        n: Optional[int] = Field(None, ge=1, le=max_rows)
        max_tokens: Optional[int] = Field(None, ge=1, le=max_context - 1, description="with the prompt, at most the "
                                          f"context of {max_context} tokens")
        max_completion_tokens: Optional[int] = Field(None, ge=1, le=max_context - 1)
        stop: Stop = None
        stream: Optional[bool] = None
        stream_options: Optional[StreamOptions] = None

    class ChatCompletionRequest(Sampling):
        model_config = ConfigDict(json_schema_extra={"examples": [
            {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8, "temperature": 0}]})
        messages: Annotated[list[Message], Field(min_length=1)]
        logprobs: Optional[bool] = None
        top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: true")

    class CompletionRequest(Sampling):
        model_config = ConfigDict(json_schema_extra={"examples": [
            {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
            {"prompt": [[1, 2, 3]], "echo": True, "logprobs": 1, "max_tokens": 0}]})
        prompt: Union[str, Annotated[list[str], Field(min_length=1)], Ids, Annotated[list[Ids], Field(min_length=1)]]
        max_tokens: Optional[int] = Field(None, ge=0, le=max_context - 1, description="0: with echo, the prompt "
                                          "scored alone")
        echo: Optional[bool] = None
        logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    class TokenizeRequest(BaseModel):
        prompt: str

    class DetokenizeRequest(BaseModel):
        tokens: list[TokenId]

    return ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest


@dataclasses.dataclass(eq=False)
class ServedStream(ds.Stream):
    """A choice of a request: a Stream that the HTTP side may cancel and whose failure is its own."""
    cancelled: bool = False  # any thread may set it: the batch frees the row at its next step
    error: Exception = None  # what ended it, if its step failed for it (sample.stopped is then None)


class ServedBatch(ds.DecodeBatch):
    """The stack's DecodeBatch for many clients: each request's streams draw with its own Sampling (greedy ones all
    together), a cancelled stream leaves at the next step, and a failure (a sampler's, a callback's) ends the streams
    it touched, never their batch-mates."""

    @property
    def live(self):
        return sum(s is not None for s in self.slots)

    def _end(self, stream):
        if stream in self.slots:
            return super()._end(stream)
        self.waiting.remove(stream)  # cancelled before it had a row
        if stream.on_done:
            stream.on_done()

    def _arrange(self):
        for stream in [s for s in [*self.slots, *self.waiting] if s is not None and s.cancelled]:
            self._end(stream)
        super()._arrange()

    def step(self):
        self.failed = {}  # stream -> the exception that ended it this step
        busy = super().step()
        for s, e in self.failed.items():
            s.sample.stopped, s.error = None, e
            if s in self.slots:
                self._end(s)
        return busy

    def _draw(self, logits):
        greedy, groups = ds.Sampling(temperature=0), {}  # greedy rows draw together, every other Sampling its own
        for row, s in enumerate(self.slots):
            if s is not None:
                groups.setdefault(greedy if s.sampling.temperature < ds.MIN_TEMPERATURE else s.sampling, []).append(row)
        tokens = torch.zeros(len(self.slots), dtype=torch.long, device=logits.device)
        for g, rows in groups.items():  # one group: every row in one call, free ones too, as the stack's draw
            index = slice(None) if len(groups) == 1 else torch.tensor(rows, device=logits.device)
            try:
                tokens[index] = ds.sample_next(logits[index], g.generator, g.temperature, g.top_k, g.top_p, g.min_p)
            except Exception as e:
                self.failed.update((self.slots[row], e) for row in rows)
        return tokens

    def _advance(self, row, s, sampled):
        if s not in self.failed:
            try:
                super()._advance(row, s, sampled)
            except Exception as e:  # e.g. a client's callback
                self.failed[s] = e


class Server:
    """The OpenAI-compatible server of one Engine: POST /v1/chat/completions, POST /v1/completions (text in, text
    out: for base models), GET /v1/models, GET /health, the chat page at /. Each of a request's n choices is a
    ServedStream of the engine's ServedBatch, stepped by one thread; the choices of a request draw from one generator
    (its seed), so a request's tokens do not depend on the others in the batch. At most max_rows choices decode at
    once and max_queue more wait; beyond that a request gets 429. A request that runs past `timeout` seconds, or
    whose client disconnects, is cancelled (its rows freed at the next step). Omitted sampling fields take
    `defaults` (the run's --temperature, --top-k, --top-p, --min-p, --max-new-tokens)."""

    def __init__(self, engine, tokenizer, model_name, max_context, chat=True, max_rows=32, max_queue=64,
                 timeout=300.0, defaults=None):
        self.engine, self.tokenizer, self.model_name, self.chat = engine, tokenizer, model_name, chat
        self.max_context, self.max_rows, self.max_queue, self.timeout = max_context, max_rows, max_queue, timeout
        self.defaults = {**dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=256), **(defaults or {})}
        self.batch = engine.batch(max_context, max_rows, ServedBatch)
        self.inbox = queue.Queue()  # Streams from the HTTP side, added to the batch by its thread
        self.outbox, self.http_loop = [], None  # (asyncio queue, item) from the decode thread, delivered per step
        self.lock, self.in_flight = threading.Lock(), 0  # choices accepted and not yet done
        self.created, self.thread, self.closed = int(time.time()), None, threading.Event()
        self.failures, self.model_lock = 0, threading.Lock()
        with open(CHAT_PAGE, encoding="utf-8") as f:
            self.page = f.read()
        self.app = self._app()

    # -- the decode thread --
    def start(self):
        self.thread = threading.Thread(target=self._loop, name="decode", daemon=True)
        self.thread.start()

    def close(self):
        self.closed.set()
        if self.thread is not None:
            self.thread.join()

    def _loop(self):
        while not self.closed.is_set():
            idle = not self.batch.slots and not self.batch.waiting
            try:
                while True:  # everything that arrived; wait for something only when idle
                    stream = self.inbox.get(timeout=0.05) if idle else self.inbox.get_nowait()
                    self.batch.add(stream)
                    idle = False
            except queue.Empty:
                pass
            try:
                with self.model_lock:  # prompt scoring (_logprobs) runs the model from the HTTP side
                    self.batch.step()
            except Exception as e:  # e.g. out of memory: fail the requests in the batch, keep serving
                self.failures += 1
                print(f"serve: a decode step failed ({type(e).__name__}: {e}); its requests get a 500", flush=True)
                streams = [s for s in self.batch.slots if s is not None] + list(self.batch.waiting)
                self.batch = self.engine.batch(self.max_context, self.max_rows, ServedBatch)
                for s in streams:
                    s.sample.stopped, s.cancelled = None, True  # None: failed
                    s.on_done()
            self._deliver()

    def _deliver(self):
        """Hand the step's tokens to the HTTP side: one wake-up of its event loop per step, not one per token."""
        if self.outbox:
            items, self.outbox = self.outbox, []
            self.http_loop.call_soon_threadsafe(lambda: [out.put_nowait(item) for out, item in items])

    def _done(self):
        with self.lock:
            self.in_flight -= 1

    # -- requests --
    def _params(self, body, n_prompt, prompt_field, kind):
        """The request's sampling settings and n, max_tokens, stop, checked; RequestError on the first bad one. kind:
        "text" (/v1/completions: echo and logprobs, max_tokens 0 with echo) or "chat" (logprobs, top_logprobs)."""
        scoring = kind == "text"
        if self.max_context - n_prompt < 1:
            raise RequestError(400, f"the prompt is {n_prompt} tokens; this model's context is {self.max_context} "
                               "tokens, prompt and reply together", prompt_field, "context_length_exceeded")
        for name, (off_none, off) in UNSUPPORTED.items():
            if body.get(name, off_none) not in (off_none, off) and name not in SCORED[kind]:
                raise RequestError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
        p = {}
        for name, (kind, ok, want) in REQUEST_FIELDS.items():
            if body.get(name) is None:
                continue
            value = body[name]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or not ok(value):
                raise RequestError(400, f"'{name}' must be {want or kind.__name__}, got {json.dumps(value)[:40]}", name)
            p[name] = value
        if "model" in p and p["model"] != self.model_name:
            raise RequestError(404, f"model {p['model']!r} does not exist; this server serves {self.model_name!r}",
                               "model", "model_not_found")
        limit = self.max_context - n_prompt
        for name in ("max_tokens", "max_completion_tokens", "n"):
            value, echo_only = body.get(name), scoring and body.get("echo") is True and name == "max_tokens"
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1 - echo_only):
                raise RequestError(400, f"'{name}' must be a positive integer{' (or 0 with echo)' if scoring else ''}, "
                                   f"got {json.dumps(value)[:40]}", name)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and max_tokens > limit:
            raise RequestError(400, f"'max_tokens' {max_tokens} + the prompt's {n_prompt} tokens exceed this model's "
                               f"context of {self.max_context} tokens (at most {limit} here)", "max_tokens",
                               "context_length_exceeded")
        p["max_tokens"] = max_tokens or min(self.defaults["max_tokens"], limit)
        if scoring and body.get("max_tokens") == 0:  # echo alone: the prompt scored, nothing generated
            p["max_tokens"] = 0
        p["n"] = body.get("n") or 1
        if p["n"] > self.max_rows:
            raise RequestError(400, f"'n' is {p['n']}; this server decodes at most {self.max_rows} choices at once", "n")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and len(stop) <= SERVE_MAX_STOPS
                                     and all(isinstance(s, str) and s for s in stop)):
            raise RequestError(400, f"'stop' must be a text or a list of at most {SERVE_MAX_STOPS} non-empty texts", "stop")
        p["stop"] = stop or []
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
            raise RequestError(400, "'stream_options' must be {include_usage: boolean}", "stream_options")
        p["include_usage"] = bool((options or {}).get("include_usage"))
        return {**{k: v for k, v in self.defaults.items() if k != "max_tokens"}, **p}

    def _submit(self, prompt, p):
        """The request's n Streams, queued for the decode thread; tokens arrive as (choice, token) in the returned
        asyncio queue, (choice, None) when a choice is done."""
        with self.lock:
            if self.in_flight + p["n"] > self.max_rows + self.max_queue:
                raise RequestError(429, f"server busy: {self.in_flight} choices decoding or queued (at most "
                                   f"{self.max_rows} + {self.max_queue}); retry later", None, "server_busy",
                                   "rate_limit_error")
            self.in_flight += p["n"]
        self.http_loop, out = asyncio.get_running_loop(), asyncio.Queue()
        seed = p["seed"] if "seed" in p else int.from_bytes(os.urandom(8), "little") >> 1
        generator = torch.Generator(device=self.engine.rt.device).manual_seed(seed % (1 << 63))
        sampling = ds.Sampling(p["temperature"], p["top_k"], p["top_p"], p["min_p"], generator)
        streams = []
        for j in range(p["n"]):
            def on_token(token, j=j):
                self.outbox.append((out, (j, token)))

            def on_done(j=j):
                self._done()
                if (e := streams[j].error) is not None:  # its own failure: its request gets a 500, the batch goes on
                    print(f"serve: a choice failed in its decode step ({type(e).__name__}: {e}); its request gets a "
                          "500, the rest of the batch decodes on", flush=True)
                self.outbox.append((out, (j, None)))

            streams.append(ServedStream(prompt, sampling, p["max_tokens"], on_token, on_done))
        for s in streams:
            self.inbox.put(s)
        return streams, out

    async def _choices(self, request, streams, out, p):
        """Yields (choice, text piece, finish_reason or None) as the request's choices (_submit's) decode; cancels
        them when the client goes away, the request times out or the generator is closed."""
        texts = [ReplyText(self.tokenizer, self.engine.stops, p["stop"]) for _ in streams]
        deadline, open_choices, check = time.monotonic() + self.timeout, len(streams), 0.0
        try:
            while open_choices:
                if time.monotonic() > check:  # a few times a second: is the client still there, is there time left?
                    if await request.is_disconnected():
                        return
                    if time.monotonic() > deadline:
                        raise RequestError(504, f"the request ran past the server's timeout of {self.timeout:g} s",
                                           None, "timeout", "timeout_error")
                    check = time.monotonic() + 0.2
                try:
                    j, token = await asyncio.wait_for(out.get(), timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                text, stream = texts[j], streams[j]
                if token is None:
                    open_choices -= 1
                    if stream.sample.stopped is None:
                        raise RequestError(500, "decoding failed on the server (its log says why)", None,
                                           "decode_failed", "server_error")
                    if text.finish is None:  # ran into max_tokens
                        text.finish = "stop" if stream.sample.stopped else "length"
                        yield j, text.rest(), text.finish
                    continue
                if text.finish is not None:
                    continue  # after a stop sequence: the row is being freed
                piece = text.push(token)
                if text.finish is not None:
                    stream.cancelled = True
                    yield j, piece, text.finish
                elif piece:
                    yield j, piece, None
        finally:
            for s in streams:
                s.cancelled = True  # a no-op for finished ones

    def _prompts(self, value):
        """[(token ids, the first of them a client sent)] of a completions `prompt`: a text (after <|bos|>, which is
        ours), a list of texts, token ids (as given), or a list of id lists: one prompt each, in order."""
        vocab = self.tokenizer.vocab_size
        is_ids = lambda x: isinstance(x, list) and x and token_ids(x, vocab)
        items = [value] if isinstance(value, str) or is_ids(value) else value
        if not (isinstance(items, list) and items and all(isinstance(x, str) or is_ids(x) for x in items)):
            raise RequestError(400, f"'prompt' must be a text, a list of texts, a non-empty list of token ids below "
                               f"{vocab}, or a list of such lists", "prompt")
        return [([self.tokenizer.bos_id, *self.tokenizer.encode(x)], 1) if isinstance(x, str) else (list(x), 0)
                for x in items]

    def _logprobs(self, ids, top):
        """Per token of `ids`: (text, log-probability, {text: log-probability} of the `top` likeliest), from one
        forward: the model's own log-softmax of its softcapped logits in fp32, whatever the sampling settings. The
        first token has no context: None, None."""
        model, rt = self.engine.model, self.engine.rt
        texts = [self.tokenizer.decode([t]) for t in ids]
        if len(ids) < 2:
            return texts, [None], [None]
        with self.model_lock, torch.no_grad():
            h, _, _ = ds.packed_hidden(model, [np.asarray(ids)], rt, self.engine.windows)
            logp = torch.cat([torch.log_softmax(model.logits(h[rows]), -1)
                              for rows in torch.split(torch.arange(len(ids) - 1, device=h.device), ds.LOGITS_CHUNK)])
            picked = logp.gather(1, torch.tensor(ids[1:], device=h.device)[:, None])[:, 0].tolist()
            best = logp.topk(top, -1) if top else None
        alternatives = [None] + ([{self.tokenizer.decode([t]): v for t, v in zip(i, lp)}
                                  for i, lp in zip(best.indices.tolist(), best.values.tolist())] if top else
                                 [{} for _ in ids[1:]])
        return texts, [None] + picked, alternatives

    async def _scored(self, request, prompts, p, echo, top):
        """Completions of several prompts, or with echo and logprobs (not streamed): prompt i's choice j is choice
        i * n + j; logprobs from one forward of each choice's tokens (_logprobs): the prompt's with echo, then the
        reply's; max_tokens 0 (with echo) scores the prompt alone."""
        submitted = []
        try:
            for ids, _ in prompts:
                submitted.append(self._submit(ids, p) if p["max_tokens"] else ([], None))
        except RequestError:  # 429 for a later prompt: the earlier ones' choices are not wanted either
            for streams, _ in submitted:
                for s in streams:
                    s.cancelled = True
            raise
        try:
            return await self._scored_choices(request, prompts, submitted, p, echo, top)
        finally:
            for streams, _ in submitted:  # a no-op for finished ones; a failure or a timeout leaves none decoding
                for s in streams:
                    s.cancelled = True

    async def _scored_choices(self, request, prompts, submitted, p, echo, top):
        choices, used = [], 0
        for (ids, first), (streams, out) in zip(prompts, submitted):
            replies = [("", None)] * p["n"]
            if streams:
                texts, finishes = [""] * p["n"], [None] * p["n"]
                async for j, piece, finish in self._choices(request, streams, out, p):
                    texts[j] += piece
                    finishes[j] = finish or finishes[j]
                replies = list(zip(texts, finishes))
            for j, (text, finish) in enumerate(replies):
                reply = streams[j].sample if streams else None
                tokens = reply.tokens[:-1] if reply and reply.stopped else (reply.tokens if reply else [])
                used += len(reply.tokens) if reply else 0
                start = first if echo else len(ids)
                logprobs = None
                if top is not None or echo:
                    texts_, lps, tops = await asyncio.to_thread(self._logprobs, ids + tokens, top or 0)
                    if echo:
                        text = "".join(texts_[first:len(ids)]) + text
                    if top is not None:
                        offsets = [sum(len(t) for t in texts_[start:k]) for k in range(start, len(ids) + len(tokens))]
                        logprobs = {"tokens": texts_[start:], "token_logprobs": lps[start:],
                                    "top_logprobs": tops[start:] if top else None, "text_offset": offsets}
                choices.append({"index": len(choices), "text": text, "logprobs": logprobs,
                                "finish_reason": finish or "length"})
        n_prompt = sum(len(ids) for ids, _ in prompts)
        return JSONResponse({"id": "cmpl-" + os.urandom(12).hex(), "object": "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": choices,
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": used,
                                       "total_tokens": n_prompt + used}})

    async def _chat_logprobs(self, prompt, stream, p):
        """OpenAI's choices[].logprobs of a chat reply: {content: [{token, logprob, bytes, top_logprobs}]} per reply
        token (the stop token that ended it not included), from one forward of prompt and reply (_logprobs)."""
        reply = stream.sample.tokens[:-1] if stream.sample.stopped else stream.sample.tokens
        texts, lps, tops = await asyncio.to_thread(self._logprobs, prompt + reply, p["top_logprobs"])
        entry = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**entry(texts[k], lps[k]), "top_logprobs": [entry(t, v) for t, v in tops[k].items()]}
                            for k in range(len(prompt), len(prompt) + len(reply))]}

    async def _respond(self, request, kind, prompt, p):
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + os.urandom(12).hex()
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        streams, out = self._submit(prompt, p)  # 429 here, before any response
        choices = self._choices(request, streams, out, p)
        generated = lambda: sum(len(s.sample.tokens) for s in streams)
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": generated(),
                         "total_tokens": len(prompt) + generated()}
        if not p.get("stream"):
            texts, finishes = [""] * p["n"], [None] * p["n"]
            async for j, piece, finish in choices:
                texts[j] += piece
                finishes[j] = finish or finishes[j]
            choices = [{"index": j, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                        "logprobs": await self._chat_logprobs(prompt, streams[j], p) if p.get("logprobs") else None}
                       if kind == "chat" else {"index": j, "text": t, "logprobs": None, "finish_reason": f}
                       for j, (t, f) in enumerate(zip(texts, finishes))]
            return JSONResponse({**head, "choices": choices, "usage": usage()})

        chunk_head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
        event = lambda obj: f"data: {json.dumps(obj)}\n\n"

        def chunk(j, piece, finish, first=False):
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                return event({**chunk_head, "choices": [{"index": j, "delta": delta, "finish_reason": finish}]})
            return event({**chunk_head, "choices": [{"index": j, "text": piece, "logprobs": None, "finish_reason": finish}]})

        try:  # the first token before the response starts: errors up to then are plain error responses
            first = await choices.__anext__()
        except StopAsyncIteration:
            first = None

        async def events():
            try:
                for j in range(p["n"] if kind == "chat" else 0):
                    yield chunk(j, "", None, first=True)
                if first:
                    yield chunk(*first)
                async for item in choices:
                    yield chunk(*item)
            except RequestError as e:  # a timeout or a failed step after streaming began: said in the stream
                yield event(e.body())
            finally:
                await choices.aclose()
            if p["include_usage"]:
                yield event({**chunk_head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _app(self):
        app = FastAPI(title="DecoderStack", docs_url=None, redoc_url=None)
        requests = request_models(self.max_context, self.max_rows, self.tokenizer.vocab_size)

        def openapi():
            """FastAPI's schema of the routes, with the request models their bodies refer to."""
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version="1", routes=app.routes, description=(
                    f"OpenAI-compatible: serving {self.model_name}, {self.max_context} tokens of context, {self.max_rows} "
                    f"choices decoding at once and {self.max_queue} waiting (more: 429); bodies up to {MAX_BODY:,} bytes "
                    f"(more: 413) sent within {BODY_TIMEOUT:g} s (else 408); errors in OpenAI's shape."))
                _, defs = models_json_schema([(m, "validation") for m in requests], ref_template=REF)
                schema["components"]["schemas"].update(defs["$defs"])
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi

        @app.exception_handler(RequestError)
        async def refused(request, e):  # 429 says when to retry, as OpenAI's does
            headers = {"Retry-After": str(RETRY_AFTER)} if e.status == 429 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)

        @app.exception_handler(HTTPException)
        async def http_error(request, e):  # unknown paths and methods, in OpenAI's error shape too (405 keeps Allow)
            return JSONResponse(RequestError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                                status_code=e.status_code, headers=getattr(e, "headers", None))

        async def body_of(request):
            """The request's JSON object, read within MAX_BODY bytes (413 beyond, on its Content-Length before any
            byte) and BODY_TIMEOUT seconds (408): a huge or trickled body never reaches the tokenizer."""
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY:
                raise RequestError(413, f"the request body is over {MAX_BODY:,} bytes", None, "request_too_large")

            async def read():
                chunks, size = [], 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise RequestError(413, f"the request body is over {MAX_BODY:,} bytes", None, "request_too_large")
                    chunks.append(chunk)
                return b"".join(chunks)
            try:
                raw = await asyncio.wait_for(read(), BODY_TIMEOUT)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the request body took over {BODY_TIMEOUT:g} s to arrive", None,
                                   "request_timeout") from None
            except ClientDisconnect:  # one line, not a traceback
                print(f"serve: a client went away while sending {request.url.path}", flush=True)
                raise RequestError(400, "the client disconnected while sending the body") from None
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, an int past 4,300 digits, nested too deep
                raise RequestError(400, f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            return body

        @app.post("/v1/chat/completions", **api(requests[0], ChatCompletion, streams=True))
        async def chat_completions(request: Request):
            body = await body_of(request)
            prompt = chat_prompt(self.tokenizer, body.get("messages"))
            logprobs, top = body.get("logprobs"), body.get("top_logprobs")
            logprobs = False if logprobs is None else logprobs
            if not isinstance(logprobs, bool):
                raise RequestError(400, "'logprobs' must be a boolean", "logprobs")
            if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS
                                    or not logprobs):
                raise RequestError(400, f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, with "
                                   "'logprobs': true", "top_logprobs")
            p = {**self._params(body, len(prompt), "messages", "chat"), "logprobs": logprobs, "top_logprobs": top or 0}
            if logprobs and p.get("stream"):
                raise RequestError(400, "'logprobs' is not supported when streaming", "logprobs")
            return await self._respond(request, "chat", prompt, p)

        @app.post("/v1/completions", **api(requests[1], Completion, streams=True))
        async def completions(request: Request):
            body = await body_of(request)
            prompts, echo, top = self._prompts(body.get("prompt")), body.get("echo"), body.get("logprobs")
            echo = False if echo is None else echo
            if not isinstance(echo, bool):
                raise RequestError(400, "'echo' must be a boolean", "echo")
            if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS):
                raise RequestError(400, f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS}", "logprobs")
            p = self._params(body, max(len(ids) for ids, _ in prompts), "prompt", "text")
            if len(prompts) == 1 and not echo and top is None:
                return await self._respond(request, "text", prompts[0][0], p)
            if p.get("stream"):
                raise RequestError(400, "'stream' is not supported with 'echo', 'logprobs' or several prompts", "stream")
            return await self._scored(request, prompts, p, echo, top)

        def model_card():
            return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "decoderstack",
                    "max_context": self.max_context, "chat": self.chat}

        @app.get("/v1/models", **api(None, ModelList))
        async def models():
            return {"object": "list", "data": [model_card()]}

        @app.get("/v1/models/{model_id:path}", **api(None, ModelCard, 404))  # the id holds a slash: RUN/CHECKPOINT
        async def model(model_id: str):
            if model_id != self.model_name:
                raise RequestError(404, f"model {model_id!r} does not exist; this server serves {self.model_name!r}",
                                   "model", "model_not_found")
            return model_card()

        # vLLM's tokenizer endpoints, which lm-eval's "remote" tokenizer backend reads (it finds them by itself):
        # a harness then tokenizes with the served model's own tokenizer, special-token names as their tokens
        @app.get("/tokenizer_info", **api(None, TokenizerInfo))
        async def tokenizer_info():
            return {"bos_token": "<|bos|>", "eos_token": "<|bos|>", "pad_token": None,
                    "max_model_len": self.max_context, "vocab_size": self.tokenizer.vocab_size}

        @app.post("/tokenize", **api(requests[2], Tokens))
        async def tokenize(request: Request):
            body = await body_of(request)
            if not isinstance(body.get("prompt"), str):
                raise RequestError(400, "'prompt' must be a text", "prompt")
            tokens = self.tokenizer.enc.encode(body["prompt"], allowed_special="all")
            return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_context}

        @app.post("/detokenize", **api(requests[3], Text))
        async def detokenize(request: Request):
            body, vocab = await body_of(request), self.tokenizer.vocab_size
            tokens = body.get("tokens")
            if not (isinstance(tokens, list) and token_ids(tokens, vocab)):
                raise RequestError(400, f"'tokens' must be a list of token ids below {vocab}", "tokens")
            return {"prompt": self.tokenizer.decode(tokens)}

        @app.get("/health", **api(None, Health))
        async def health():
            return {"status": "ok", "model": self.model_name, "rows_live": self.batch.live, "rows": len(self.batch.slots),
                    "waiting": len(self.batch.waiting) + self.inbox.qsize(), "in_flight": self.in_flight,
                    "max_rows": self.max_rows, "max_queue": self.max_queue, "failed_steps": self.failures}

        @app.get("/", include_in_schema=False)
        async def page():
            return HTMLResponse(self.page)

        return app


REF = "#/components/schemas/{model}"
BODY_ERRORS = (400, 404, 408, 413, 429, 500, 504)  # what a POST may answer besides 200


def api(request, response, *errors, streams=False):
    """A route's OpenAPI entry: its body's model (the handler reads the raw body: the schema says what it accepts),
    its reply's (JSON, or server-sent events where it streams), its errors' in OpenAI's shape (429 with Retry-After)."""
    ok = {"model": response, "description": "the reply" + (", or server-sent events of its chunks with stream: true"
                                                           if streams else "")}
    if streams:
        ok["content"] = {"text/event-stream": {"schema": {  # one event: a JSON chunk (or an error), then "[DONE]"
            "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}
    errors = {code: {"model": ErrorResponse, "description": "an error"} for code in (BODY_ERRORS if request else errors)}
    if 429 in errors:
        errors[429]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    body = {} if request is None else {"openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=request.__name__)}}}}}}
    return {"responses": {200: ok, **errors}, **body}


def start(server, host="127.0.0.1", port=0, log_level="warning"):
    """Start `server` (its decode thread and uvicorn) in the background: (base url, stop()). port 0: a free one."""
    http = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=SHUTDOWN_GRACE, limit_concurrency=MAX_CONNECTIONS))
    thread = threading.Thread(target=http.run, name="http", daemon=True)
    server.start()
    thread.start()
    while not http.started:
        if not thread.is_alive():
            server.close()
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    port = http.servers[0].sockets[0].getsockname()[1]

    def stop():
        http.should_exit = True
        thread.join()
        server.close()

    return f"http://{host}:{port}", stop


def main(argv=None):
    """Serve the latest checkpoint of --run-dir (or --init-from) on --host:--port until Ctrl-C or SIGTERM (open requests
    then get SHUTDOWN_GRACE seconds)."""
    cfg, serve = ds.parse_flags(argv, [ds.Config, ServeConfig], prog="serve.py", description=__doc__.split("\n\n")[0])
    rt = ds.init_runtime(cfg)
    if rt.world_size > 1:
        sys.exit("error: the server runs in one process: run it without torchrun")
    try:
        engine, state, path, _ = ds.trained_engine(cfg, rt)
    except ds.DataFormatError as e:
        sys.exit(f"error: {e}")
    name = serve.served_model_name or f"{os.path.basename(os.path.abspath(cfg.run_dir))}/{os.path.basename(path)}"
    sample = cfg.sample
    server = Server(engine, engine.tokenizer, name, engine.model.cfg.max_doc_len, state.get("phase", "pt") != "pt",
                    serve.serve_max_rows, serve.serve_max_queue, serve.serve_timeout,
                    dict(temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p, min_p=sample.min_p,
                         max_tokens=sample.max_new_tokens))
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        url, stop = start(server, serve.host, serve.port, log_level="info")
    except RuntimeError as e:  # e.g. the port is taken: uvicorn said why above
        sys.exit(f"error: {e}")
    print(f"serving {path} as {name!r} at {url} (chat page at /, API at /v1; context {engine.model.cfg.max_doc_len} "
          f"tokens, {serve.serve_max_rows} rows, device {rt.device}); Ctrl-C stops it", flush=True)
    while not stopping.wait(0.5):
        pass
    stop()


if __name__ == "__main__":
    main()
