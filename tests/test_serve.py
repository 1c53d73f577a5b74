"""The OpenAI-compatible server (serve.py): started on a free loopback port, exercised with a real HTTP client
(httpx) and the openai client; replies against the engine's tokens for the same seed, streaming against
non-streaming, concurrent clients against each served alone, every bad request, the 429 bound, disconnects,
timeouts, a failing decode step, and serve.py's command line."""
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, STACK_PATH, TINY_ARGS

SERVE = os.path.join(ROOT, "serve.py")

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import serve as serving  # noqa: E402  serve.py beside the stack; it needs the packages checked above

CONTEXT = 256


@pytest.fixture(scope="module")
def tok(stack, tok_dir):
    return stack.Tokenizer(tok_dir)


def tiny_model(stack, vocab_size):
    """A small random model over vocab_size tokens, every parameter nonzero."""
    torch.manual_seed(0)
    cfg = stack.Config(n_layers=2, model_dim=64, n_heads=2, head_dim=32, long_window_layers="1", value_embed_layers="0,1")
    model = stack.GPT(stack.ModelConfig.of(cfg, vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model(stack, tok):
    return tiny_model(stack, tok.vocab_size)


def cpu_rt(stack):
    return stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")


def make_engine(stack, model, tok):
    engine = stack.Engine(model, tok, [16, 64], cpu_rt(stack))
    engine.stops = set()  # a random model may emit a stop token anywhere: every reply runs to max_tokens
    return engine


@pytest.fixture
def serve(stack, model, tok):
    """serve(**Server options) -> (base url, engine); every server started is stopped after the test."""
    stops = []

    def start(**options):
        engine = make_engine(stack, model, tok)
        options = {"model_name": "tiny", "max_context": CONTEXT, "max_rows": 8, "max_queue": 8, "timeout": 60.0, **options}
        server = serving.Server(engine, tok, **options)
        url, stop = serving.start(server)
        stops.append(stop)
        return url, engine, server

    yield start
    for stop in stops:
        stop()


def slow(engine, seconds):
    """Each decode step of the engine takes at least `seconds` (so a test can act while a request is decoding)."""
    decode = engine._decode

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return decode(*args, **kwargs)

    engine._decode = slowed


def chat(url, messages, **fields):
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **fields}, timeout=60)


def events(response):
    """The JSON objects of a server-sent event stream, checking it ends with data: [DONE]."""
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def stream_chat(url, messages, **fields):
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": messages, "stream": True, **fields},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return events(r)


def streamed_text(chunks, index=0):
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if c["choices"] and c["choices"][0]["index"] == index)


TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the sum of two and two?"},
         {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And <|bos|> of three?"}]


# ---- the prompt: our chat format, held together with data/tokenizer.py's --------------------------------------------

def test_chat_prompt_equals_the_data_side_rendering(stack, tok, tok_dir):
    import tokenizer as data_tokenizer
    ours = data_tokenizer.Tokenizer.load(tok_dir)
    for messages in (TURNS, TURNS[1:2], [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]}]):
        flat = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m for m in messages]
        assert serving.chat_prompt(tok, messages) == ours.render_for_completion(flat + [{"role": "assistant", "content": ""}])
    # user text is always ordinary text; an assistant turn's calculator calls, as replies show them (GSM8K's
    # <<expr=result>>), become the tool tokens it generated: those SFT's data renders from the same notation
    from sft_shards import gsm8k_parts
    assert tok.bos_id not in serving.chat_prompt(tok, TURNS)[1:]
    x, y, answer = {"role": "user", "content": "x"}, {"role": "user", "content": "y"}, "a<<1+1=2>>b, and <<c>> d"
    ids = serving.chat_prompt(tok, [x, {"role": "assistant", "content": answer}, y])
    assert [t for t in ids if t in {tok.special(n) for n in serving.TOOL_TOKENS}] == [tok.special(n) for n in serving.TOOL_TOKENS]
    reply = {"role": "assistant", "content": gsm8k_parts(answer.replace("<<c>>", "c"))[:3] + [{"type": "text", "text": "b, and <<c>> d"}]}
    assert ids == ours.render_for_completion([x, reply, y, {"role": "assistant", "content": ""}])
    sp, start = tok.special, ids.index(tok.special("<|assistant_start|>"))
    assert serving.annotated_text(tok, ids[start + 1:ids.index(sp("<|assistant_end|>"))]) == answer
    refused = [sp("<|python_start|>"), *tok.encode("os.system(1)"), sp("<|python_end|>"), *tok.encode(" no")]
    cut = refused.index(sp("<|python_end|>")) + 1  # streamed: the >> comes with the token after python_end
    assert [serving.annotated_text(tok, refused[:k]) for k in (cut, len(refused))] == ["<<os.system(1)=", "<<os.system(1)=>> no"]
    assert serving.encode_reply(tok, "<<os.system(1)=>> no") == refused


def test_reply_text_holds_back_what_may_begin_a_stop_sequence(stack, tok):
    ids = tok.encode("hello world, and more")
    text = serving.ReplyText(tok, set(), ["d, a"])
    pieces = [text.push(t) for t in ids]
    assert "".join(pieces) == "hello worl" and text.finish == "stop"  # cut before the stop sequence, never sent
    text = serving.ReplyText(tok, set(), [])
    assert "".join(text.push(t) for t in tok.encode("añb€c")) + text.rest() == "añb€c"
    partial, euro = serving.ReplyText(tok, set(), []), tok.encode("x€")
    assert len(euro) > 2  # the 1024-token vocabulary splits the euro sign's 3 bytes: none is sent half
    assert [partial.push(t) for t in euro] == ["x"] + [""] * (len(euro) - 2) + ["€"]


# ---- replies ---------------------------------------------------------------------------------------------------------

def test_calculator_calls_reach_clients_in_gsm8k_notation(stack, serve, tok, monkeypatch):
    """A reply that calls the calculator (a scripted sampler: the model plays its tokens, the engine forces the
    calculator's output) shows each call as GSM8K's <<expr=result>>, a refused one as <<expr=>>, streamed or not; sent
    back as history, that text is the tokens the model generated."""
    sp = tok.special
    script = [*tok.encode("So "), sp("<|python_start|>"), *tok.encode("12+3"), sp("<|python_end|>"),
              sp("<|output_start|>"), *tok.encode("15"), sp("<|output_end|>"),  # forced by the engine: draws ignored
              *tok.encode(" and "), sp("<|python_start|>"), *tok.encode("os.system(1)"), sp("<|python_end|>"),
              *tok.encode(" done")]
    step = []

    def scripted(logits, *args):
        step.append(1)
        return torch.full((len(logits),), script[len(step) - 1])

    url, _, _ = serve()
    monkeypatch.setattr(stack, "sample_next", scripted)
    want = "So <<12+3=15>> and <<os.system(1)=>> done"
    assert chat(url, TURNS, max_tokens=len(script)).json()["choices"][0]["message"]["content"] == want
    step.clear()
    assert streamed_text(stream_chat(url, TURNS, max_tokens=len(script))) == want
    prompt = serving.chat_prompt(tok, TURNS)
    again = serving.chat_prompt(tok, TURNS + [{"role": "assistant", "content": want}, {"role": "user", "content": "ok"}])
    assert again[len(prompt):len(prompt) + len(script)] == script


def test_a_stream_that_fails_ends_alone(stack, tok, model, monkeypatch):
    """Eight streams decoding together beside two that fail inside the shared step (one's sampler raises, the other's
    callback): the two end, failed (stopped None, the error kept), and the eight get the tokens each gets alone."""
    engine = make_engine(stack, model, tok)
    poison = torch.Generator().manual_seed(99)
    real = stack.sample_next

    def sample_next(logits, generator, *args, **kw):
        if generator is poison:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, generator, *args, **kw)

    monkeypatch.setattr(stack, "sample_next", sample_next)
    prompts = [[1, 2, 3 + i] for i in range(8)]
    streams = [serving.ServedStream(p, stack.Sampling(1.0, 20, generator=torch.Generator().manual_seed(i)), 10)
               for i, p in enumerate(prompts)]
    poisoned = serving.ServedStream([1, 2], stack.Sampling(1.0, generator=poison), 10)

    def callback(token):
        raise ValueError("a client's callback")

    raising = serving.ServedStream([1, 3], stack.Sampling(temperature=0), 10, on_token=callback)
    batch = engine.batch(20, 10, serving.ServedBatch)
    for s in streams[:4] + [poisoned, raising] + streams[4:]:
        batch.add(s)
    while batch.step():
        pass
    assert poisoned.sample.stopped is None and "inf, nan" in str(poisoned.error) and poisoned.sample.tokens == []
    assert raising.sample.stopped is None and isinstance(raising.error, ValueError) and len(raising.sample.tokens) == 1
    for i, s in enumerate(streams):
        alone = engine.generate([prompts[i]], 1, 10, temperature=1.0, top_k=20, seed=i)[0][0]
        assert s.error is None and s.sample.tokens == alone.tokens and len(alone.tokens) == 10
    # generate (RL, chat eval, the terminal chat) has no one to hand a failed sample to: the failure is its error
    with pytest.raises(ValueError, match="a client's callback"):
        engine.generate([prompts[0], prompts[1]], 1, 10, temperature=0, on_token=lambda s, t: callback(t) if s else None)


def test_models_health_and_page(serve):
    url, _, _ = serve()
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny" and models["data"][0]["max_context"] == CONTEXT
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0 and health["max_rows"] == 8
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "<html" in page.text.lower()


def test_models_retrieve_the_developer_role_and_http_details(serve):
    """client.models.retrieve's GET /v1/models/{id} (ids hold a slash: RUN_DIR/CHECKPOINT); "developer", OpenAI's newer
    name for "system", renders as system does; 405 says which methods are allowed; a body that json.loads cannot read
    for any reason (an int past 4,300 digits, nesting past the recursion limit) is a 400 in OpenAI's shape."""
    from openai import OpenAI
    url, _, _ = serve()
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"
    missing = httpx.get(f"{url}/v1/models/run%2Fckpt_000001")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    said = {role: chat(url, [{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}], max_tokens=5,
                       temperature=0).json()["choices"][0]["message"]["content"] for role in ("system", "developer")}
    assert said["system"] == said["developer"]
    wrong = httpx.get(f"{url}/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and wrong.json()["error"]["message"]
    for body in ('{"messages": [], "max_tokens": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000):
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text[:300]
    assert chat(url, [{"role": "user", "content": "hi"}], max_tokens=2).status_code == 200


def test_huge_and_trickled_bodies_are_refused_and_health_stays_quick(serve, monkeypatch):
    """A body over MAX_BODY is a 413 on its Content-Length, unread (an 8 MB body stalled /health 0.7 s while it was
    tokenized on the event loop), or as it streams in without one; a body trickled in past BODY_TIMEOUT is a 408.
    /health answers within a second meanwhile."""
    monkeypatch.setattr(serving, "BODY_TIMEOUT", 1.0)
    url, _, _ = serve()
    big = json.dumps({"messages": [{"role": "user", "content": "word " * (3 << 20)}]}).encode()

    def chunked():
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    def trickled():
        yield b'{"messages": [{"role": "user", '
        time.sleep(2.5)
        yield b'"content": "hi"}]}'

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sent = pool.submit(httpx.post, f"{url}/v1/chat/completions", content=big, timeout=30,
                           headers={"content-type": "application/json"})
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200 and time.monotonic() - t0 < 1.0
        r = sent.result()
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{url}/v1/chat/completions", content=chunked(), timeout=30)
    assert r.status_code == 413 and "over 1,048,576 bytes" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", content=trickled(), timeout=30)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    assert chat(url, [{"role": "user", "content": "hi"}], max_tokens=2).status_code == 200


def test_replies_equal_the_engines_tokens_for_the_same_seed(stack, serve, tok, model):
    url, _, _ = serve()
    options = dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    want = make_engine(stack, model, tok).generate([serving.chat_prompt(tok, TURNS)], 1, 24, options["temperature"],
                                                   options["top_k"], options["top_p"], seed=options["seed"])[0][0]
    r = chat(url, TURNS, max_tokens=24, **options)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": tok.decode(want.tokens)}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(serving.chat_prompt(tok, TURNS)), "completion_tokens": 24,
                             "total_tokens": len(serving.chat_prompt(tok, TURNS)) + 24}
    chunks = stream_chat(url, TURNS, max_tokens=24, stream_options={"include_usage": True}, **options)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert streamed_text(chunks) == tok.decode(want.tokens) and len(chunks) > 5  # it streamed, piece by piece
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    again = chat(url, TURNS, max_tokens=24, **options).json()["choices"][0]["message"]["content"]
    other = chat(url, TURNS, max_tokens=24, **{**options, "seed": 12}).json()["choices"][0]["message"]["content"]
    assert again == tok.decode(want.tokens) and other != again


def test_completions_n_choices_and_stop_sequences(stack, serve, tok, model):
    url, _, _ = serve()
    text = "The quick brown fox"
    prompt = [tok.bos_id, *tok.encode(text)]
    greedy = tok.decode(make_engine(stack, model, tok).generate([prompt], 1, 30, temperature=0)[0][0].tokens)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": text, "max_tokens": 30, "temperature": 0}).json()
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == greedy
    ids = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 30, "temperature": 0}).json()
    assert ids["choices"][0]["text"] == greedy  # a prompt of token ids
    stop = greedy[12:15]
    cut = httpx.post(f"{url}/v1/completions", json={"prompt": text, "max_tokens": 30, "temperature": 0, "stop": [stop, "\x00"]}).json()
    assert cut["choices"][0]["text"] == greedy[:greedy.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    chunks = stream_chat(url, [{"role": "user", "content": text}], max_tokens=30, temperature=0)
    full = streamed_text(chunks)
    stopped = stream_chat(url, [{"role": "user", "content": text}], max_tokens=30, temperature=0, stop=full[10:13])
    assert streamed_text(stopped) == full[:full.index(full[10:13])] and stopped[-1]["choices"][0]["finish_reason"] == "stop"
    three = chat(url, TURNS, max_tokens=10, n=3, temperature=1.0, seed=5).json()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2] and len({c["message"]["content"] for c in three["choices"]}) > 1
    streamed = stream_chat(url, TURNS, max_tokens=10, n=3, temperature=1.0, seed=5)
    assert [streamed_text(streamed, j) for j in range(3)] == [c["message"]["content"] for c in three["choices"]]
    assert three["usage"]["completion_tokens"] == 30


def test_the_openai_client(serve, tok):
    openai = pytest.importorskip("openai")
    url, _, _ = serve()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=TURNS, max_tokens=16, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 16
    stream = client.chat.completions.create(model="tiny", messages=TURNS, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    text = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0)
    assert text.choices[0].finish_reason == "length" and isinstance(text.choices[0].text, str)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=TURNS, max_tokens=10 ** 6)
    assert e.value.body["param"] == "max_tokens" and str(CONTEXT) in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=TURNS)


def test_concurrent_streaming_clients_equal_each_served_alone(serve, tok):
    """8 clients at once, greedy, prompts and lengths of their own: they share the batch (steps decode several rows)
    and each gets what it gets alone."""
    url, engine, _ = serve()
    requests = [([{"role": "user", "content": f"Question {i}: " + "why " * i}], 8 + 3 * i) for i in range(8)]
    alone = [chat(url, m, max_tokens=n, temperature=0).json()["choices"][0]["message"]["content"] for m, n in requests]
    sizes, decode = [], engine._decode
    engine._decode = lambda ids, *a, **k: sizes.append(len(ids)) or decode(ids, *a, **k)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: streamed_text(stream_chat(url, r[0], max_tokens=r[1], temperature=0)), requests))
    assert together == alone
    assert max(sizes) >= 4  # the requests decoded together, joining and leaving between steps
    assert httpx.get(f"{url}/health").json()["in_flight"] == 0


# ---- bad requests: OpenAI error bodies, 4xx, and the server keeps serving ------------------------------------------

BAD = [  # (body or raw text, status, param or None, a word of the message)
    ("{not json", 400, None, "JSON"),
    ("[1, 2]", 400, None, "object"),
    ({"messages": []}, 400, "messages", "non-empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages", "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages", "last"),
    ({"messages": [{"role": "tool", "content": "a"}]}, 400, "messages", "role"),
    ({"messages": [{"role": "user", "content": 7}]}, 400, "messages", "content"),
    ({"messages": [{"role": "system", "content": "a"}]}, 400, "messages", "system"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages", str(CONTEXT)),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400, "max_tokens", str(CONTEXT)),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", "positive"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", "between"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature", "between"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 2.5}, 400, "top_k", "0"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream", "bool"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 100}, 400, "n", "at most 8"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": True}, 400, "n", "positive"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, 400, "logprobs", "boolean"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs", "'logprobs': true"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model", "tiny"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(serve):
    url, _, _ = serve()
    for body, status, param, word in BAD:
        kwargs = {"content": body} if isinstance(body, str) else {"json": body}
        for stream in (False, True):
            if stream and (not isinstance(body, dict) or "stream" in body):
                continue
            r = httpx.post(f"{url}/v1/chat/completions", **kwargs, timeout=30) if not stream else \
                httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and word in error["message"], error
    r = httpx.post(f"{url}/v1/completions", json={"prompt": {"text": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [10 ** 6]})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405
    assert chat(url, [{"role": "user", "content": "still there?"}], max_tokens=4).status_code == 200
    assert httpx.get(f"{url}/health").json()["in_flight"] == 0


def test_beyond_the_rows_and_the_queue_a_request_gets_429(serve):
    url, engine, _ = serve(max_rows=1, max_queue=1)
    slow(engine, 0.01)
    hi = [{"role": "user", "content": "hi"}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(chat, url, hi, max_tokens=150) for _ in range(2)]  # one decoding, one queued
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").json()["in_flight"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        r = chat(url, hi, max_tokens=5)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert "retry" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"  # as OpenAI's 429 says when to retry
        assert [f.result().status_code for f in busy] == [200, 200]
    wait_idle(url)
    assert chat(url, hi, max_tokens=3).status_code == 200


def wait_idle(url, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        health = httpx.get(f"{url}/health").json()
        if health["in_flight"] == 0 and health["rows_live"] == 0:
            return health
        time.sleep(0.02)
    raise AssertionError(f"still busy: {health}")


def test_a_client_that_disconnects_frees_its_row(serve):
    url, engine, _ = serve()
    slow(engine, 0.02)
    steps, decode = [], engine._decode
    engine._decode = lambda *a, **k: steps.append(1) or decode(*a, **k)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 240, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            assert httpx.get(f"{url}/health").json()["rows_live"] == 1
    wait_idle(url)
    assert len(steps) < 240 / 2  # freed well before its 240 tokens were decoded
    # a non-streaming client that gives up frees its row too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 240},
                   timeout=0.3)
    wait_idle(url)
    assert len(steps) < 240


def test_a_request_past_the_timeout_is_cancelled(serve):
    url, engine, _ = serve(timeout=0.3)
    slow(engine, 0.02)
    r = chat(url, [{"role": "user", "content": "hi"}], max_tokens=200)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    chunks = stream_chat(url, [{"role": "user", "content": "hi"}], max_tokens=200)
    assert "timeout" in chunks[-1]["error"]["message"] and len(chunks) > 2  # it had streamed, then says why it ended
    wait_idle(url)


@pytest.mark.parametrize("failing_call", [1, 3], ids=["prefill", "step"])
def test_a_failing_decode_step_fails_its_requests_and_not_the_server(serve, failing_call):
    url, engine, server = serve()
    decode, calls = engine._decode, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("CUDA out of memory (simulated)")
        return decode(*args, **kwargs)

    engine._decode = failing
    r = chat(url, [{"role": "user", "content": "hi"}], max_tokens=10)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert chat(url, [{"role": "user", "content": "again"}], max_tokens=10).status_code == 200
    health = httpx.get(f"{url}/health").json()
    assert health["failed_steps"] == 1 and health["in_flight"] == 0


# ---- serve.py -----------------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_py_serves_a_checkpoint_until_interrupted(pretrained_run):
    data, run = pretrained_run
    port = free_port()
    proc = subprocess.Popen([sys.executable, SERVE, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run),
                             "--port", str(port), "--served-model-name", "tiny-pt"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow start"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-pt", "prompt": "The", "max_tokens": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny-pt"
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["chat"] is False  # a pretraining checkpoint
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"as 'tiny-pt' at http://127.0.0.1:{port}" in out


def test_the_stacks_old_serve_phase_prints_the_new_command(tiny_data, tmp_path):
    """--phases serve left the stack (serve.py imports it); the old command says what to run instead, changing nothing."""
    r = subprocess.run([sys.executable, STACK_PATH, "--preset", "cpu", "--run-dir", str(tmp_path / "run"), "--phases",
                        "serve", "--port", "9001"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == ("error: --phases serve moved beside the stack (it imports it); run "
                                                      "the other phases first, then: python serve.py --preset cpu "
                                                      f"--run-dir {tmp_path / 'run'} --port 9001")
    assert not (tmp_path / "run").exists()


def test_serve_py_refuses_a_run_without_a_checkpoint(tiny_data, tmp_path):
    r = subprocess.run([sys.executable, SERVE, *TINY_ARGS, "--data-dir", tiny_data, "--run-dir", str(tmp_path / "none"),
                        "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "no checkpoint" in r.stderr


def test_serve_py_on_a_taken_port_is_one_error(pretrained_run):
    data, run = pretrained_run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, SERVE, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run), "--port",
                            str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == f"error: the server did not start on 127.0.0.1:{port}"


def test_a_near_zero_temperature_among_eight_requests_fails_none(serve):
    """temperature 1e-300 passed the range check, then divided the logits into NaN and every request in that decode
    step got a 500 (schemathesis found it). Below the stack's MIN_TEMPERATURE a draw is greedy: the nine requests
    decode together and each gets what it gets alone, the tiny temperature the greedy reply."""
    url, _, _ = serve()
    requests = [([{"role": "user", "content": f"Question {i}: " + "why " * i}], 6 + 2 * i, 0) for i in range(8)]
    requests.append(([{"role": "user", "content": "Question 0: "}], 12, 1e-300))
    alone = [chat(url, m, max_tokens=n, temperature=0).json()["choices"][0]["message"]["content"] for m, n, _ in requests]
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        together = list(pool.map(lambda r: chat(url, r[0], max_tokens=r[1], temperature=r[2]), requests))
    assert [r.status_code for r in together] == [200] * 9
    assert [r.json()["choices"][0]["message"]["content"] for r in together] == alone
    assert httpx.get(f"{url}/health").json()["failed_steps"] == 0


def test_extreme_sampling_values_and_long_serving_do_not_fail_the_batch(serve):
    """A temperature or top_p just above 0 samples the top token instead of crashing the step; a free row beside
    recycled ones never fills the cache (capacity CONTEXT: more steps than that pass here)."""
    url, _, _ = serve(max_rows=3)
    hi = [{"role": "user", "content": "hi"}]
    for extreme in ({"temperature": 1e-39}, {"top_p": 1e-300}):
        r = chat(url, hi, max_tokens=4, **extreme)
        assert r.status_code == 200, r.text
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        long = pool.submit(chat, url, hi, max_tokens=CONTEXT - 20)
        short = [pool.submit(chat, url, hi, max_tokens=40) for _ in range(2 * CONTEXT // 40)]
        assert [f.result().status_code for f in short] == [200] * len(short) and long.result().status_code == 200
    assert httpx.get(f"{url}/health").json()["failed_steps"] == 0


def own_logprobs(stack, model, ids, windows):
    """log p(ids[t] | ids[:t]) for t >= 1 by the stack's own forward: the reference for the server's echo."""
    h, _, _ = stack.packed_hidden(model, [np.asarray(ids)], cpu_rt(stack), windows)
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(h[:-1]), -1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_echo_scores_prompts_as_the_stack_and_core_do(stack, serve, tok, model):
    """lm-eval's loglikelihood request (local-completions: prompt a list of id lists, echo, logprobs 1, max_tokens 1,
    temperature 0): every prompt token's logprob, the first null, equals the stack's own log-softmax (1e-5, fp32),
    and the sum over a continuation is what CORE scores for it (minus its mean loss times its length)."""
    url, engine, _ = serve()
    ids = [tok.bos_id, *tok.encode("The quick brown fox jumps over the lazy dog")]
    other = [tok.bos_id, *tok.encode("A second prompt, scored beside the first")]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [ids, other], "max_tokens": 1, "logprobs": 1, "echo": True,
                                                  "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for choice, prompt in zip(choices, (ids, other)):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(prompt)]),
                                   torch.tensor(own_logprobs(stack, model, prompt, engine.windows)), atol=1e-5, rtol=0)
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:]) and lp["top_logprobs"][0] is None
        assert lp["tokens"][:len(prompt)] == [tok.decode([t]) for t in prompt]
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:k])) for k in range(len(lp["tokens"]))]
        assert choice["text"].startswith("".join(lp["tokens"][:len(prompt)]))
    cont = len(ids) - 4  # the last four tokens as a continuation, as CORE scores a choice
    (mean_loss, _), = stack.core_scores_packed(model, [(np.asarray(ids), cont, len(ids))], cpu_rt(stack), engine.windows)
    assert sum(choices[0]["logprobs"]["token_logprobs"][cont:len(ids)]) == pytest.approx(-4 * mean_loss, abs=1e-4)


def test_completions_prompt_forms_and_echo_alone(serve, tok):
    """A text, a list of texts, ids and a list of id lists; max_tokens 0 with echo scores the prompt and generates
    nothing (a text prompt's <|bos|> is ours: not echoed); streaming does not take echo; chat still refuses logprobs."""
    url, _, _ = serve()
    post = lambda **body: httpx.post(f"{url}/v1/completions", json={"temperature": 0, **body})
    one = post(prompt="The cat", max_tokens=3).json()["choices"]
    two = post(prompt=["The cat", "A dog"], max_tokens=3).json()["choices"]
    assert [c["index"] for c in two] == [0, 1] and two[0]["text"] == one[0]["text"]
    assert two[1]["text"] == post(prompt="A dog", max_tokens=3).json()["choices"][0]["text"]
    ids = [tok.bos_id, *tok.encode("The cat")]
    assert post(prompt=[ids], max_tokens=3).json()["choices"][0]["text"] == one[0]["text"]
    echo = post(prompt="The cat", max_tokens=0, echo=True, logprobs=2).json()
    choice = echo["choices"][0]
    assert choice["text"] == "The cat" and echo["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["tokens"] == [tok.decode([t]) for t in ids[1:]]
    assert None not in choice["logprobs"]["token_logprobs"] and all(len(t) == 2 for t in choice["logprobs"]["top_logprobs"])
    plain = post(prompt="The cat", max_tokens=2, logprobs=0).json()["choices"][0]
    assert len(plain["logprobs"]["token_logprobs"]) == 2 and plain["logprobs"]["top_logprobs"] is None
    assert post(prompt="x", max_tokens=2, echo=True, stream=True).status_code == 400
    assert post(prompt="x", max_tokens=0).status_code == 400  # max_tokens 0 only with echo
    assert post(prompt="x", logprobs=9).status_code == 400
    # vLLM's tokenizer endpoints (lm-eval's remote tokenizer): special-token names are their tokens
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "<|bos|>The cat", "add_special_tokens": False}).json()["tokens"]
    assert tokens == ids and httpx.get(f"{url}/tokenizer_info").json()["bos_token"] == "<|bos|>"
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids[1:]}).json()["prompt"] == "The cat"
    assert httpx.post(f"{url}/detokenize", json={"tokens": [-1]}).status_code == 400


def test_chat_logprobs_are_the_models_own(stack, serve, tok, model):
    """logprobs: true, top_logprobs: 2 on a chat reply: OpenAI's choices[].logprobs.content, one entry per reply token
    (text, bytes, logprob, two alternatives), the logprobs the stack's own for the prompt and the greedy reply."""
    url, engine, _ = serve()
    messages = [{"role": "user", "content": "Tell me about cats"}]
    r = chat(url, messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    prompt = serving.chat_prompt(tok, messages)
    reply = engine.generate([prompt], 1, 5, temperature=0)[0][0].tokens
    assert [e["token"] for e in content] == [tok.decode([t]) for t in reply]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    assert all(e["bytes"] == list(e["token"].encode()) and len(e["top_logprobs"]) == 2 for e in content)
    own = own_logprobs(stack, model, prompt + reply, engine.windows)[len(prompt) - 1:]
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in content]), torch.tensor(own), atol=1e-5, rtol=0)
    assert all(e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"]) for e in content)  # greedy: the top one
    assert chat(url, messages, logprobs=True, stream=True).status_code == 400
    assert chat(url, messages, max_tokens=2).json()["choices"][0]["logprobs"] is None


LM_EVAL_TASKS = {  # lm-eval task configs the test writes: a multiple-choice task and a generate_until one, local json
    "tiny_mc": dict(output_type="multiple_choice", doc_to_text="Question: {{question}}\nAnswer:",
                    doc_to_choice="{{choices}}", doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}]),
    "tiny_gen": dict(output_type="generate_until", doc_to_text="{{question}}", doc_to_target="{{answer}}",
                     generation_kwargs={"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False},
                     metric_list=[{"metric": "exact_match"}]),
}
LM_EVAL_DOCS = {
    "tiny_mc": [{"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
                {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
                {"question": "Which is a fruit?", "choices": ["carrot", "potato", "apple"], "answer": 2}],
    "tiny_gen": [{"question": "What is 2+2?", "answer": "4"}, {"question": "Say hi.", "answer": "hi"}],
}


def test_lm_eval_runs_against_the_server(stack, serve, tok, model, tmp_path):
    """EleutherAI's lm-evaluation-harness as the client: local-completions finds the tokenizer endpoints by itself
    (its remote backend), scores a multiple-choice task through echo + logprobs, and each choice's loglikelihood is
    the sum of the stack's own logprobs over the continuation, tokenized as lm-eval does; local-chat-completions runs
    a generate_until task whose replies are the server's greedy ones. Local task files, no download."""
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    url, engine, _ = serve()
    for name, config in LM_EVAL_TASKS.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in LM_EVAL_DOCS[name]))
        files = {"data_files": {"test": str(tmp_path / f"{name}.jsonl")}, "cache_dir": str(tmp_path / "hf")}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, "dataset_path": "json", "test_split": "test",
                                                               "dataset_kwargs": files, **config}))
    tasks, common = TaskManager(include_path=str(tmp_path)), "model=tiny,num_concurrent=1,max_retries=1"
    scored = simple_evaluate(model="local-completions", model_args=f"base_url={url}/v1/completions,{common},"
                             "tokenized_requests=True", tasks=["tiny_mc"], task_manager=tasks, log_samples=True)
    encode = lambda text: tok.enc.encode(text, allowed_special="all")  # the server's /tokenize
    samples = scored["samples"]["tiny_mc"]
    assert len(samples) == 3 and 0 <= scored["results"]["tiny_mc"]["acc,none"] <= 1
    for sample in samples:
        assert len(sample["arguments"]) == len(sample["filtered_resps"]) == 3
        for (context, continuation), (loglikelihood, _) in zip(sample["arguments"], sample["filtered_resps"]):
            spaces = len(context) - len(context.rstrip())  # lm-eval moves them to the continuation
            context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            whole, n_context = encode(context + continuation), len(encode(context))
            own = own_logprobs(stack, model, whole, engine.windows)
            assert float(loglikelihood) == pytest.approx(sum(own[n_context - 1:]), abs=1e-4)
    generated = simple_evaluate(model="local-chat-completions", model_args=f"base_url={url}/v1/chat/completions,{common}",
                                tasks=["tiny_gen"], task_manager=tasks, log_samples=True, apply_chat_template=True)
    for sample, doc in zip(generated["samples"]["tiny_gen"], LM_EVAL_DOCS["tiny_gen"]):
        want = chat(url, [{"role": "user", "content": doc["question"]}], max_tokens=8, temperature=0, stop=["\n\n"])
        assert sample["resps"][0][0] == want.json()["choices"][0]["message"]["content"]


SCHEMA_CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
                 "response_headers_conformance", "response_schema_conformance", "negative_data_rejection")


def test_the_openapi_schema_holds_under_schemathesis(serve, tok, tmp_path):
    """/openapi.json describes every endpoint's body and reply with this server's limits in it; schemathesis, run
    against it for a bounded number of generated requests (valid ones and ones the schema forbids), finds no 5xx, no
    reply outside its schema (status, content type, headers, body) and no forbidden request accepted. Not checked:
    that every request the schema allows is accepted (it cannot say that turns alternate, or that a prompt leaves
    room for its reply: those are 400s)."""
    url, _, _ = serve(max_context=48, max_rows=4, max_queue=4)
    schema = httpx.get(f"{url}/openapi.json", timeout=10).json()
    assert set(schema["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}",
                                    "/tokenizer_info", "/tokenize", "/detokenize", "/health"}
    chat_request = schema["components"]["schemas"]["ChatCompletionRequest"]
    bounds = {name: next(a for a in chat_request["properties"][name]["anyOf"] if a["type"] != "null")
              for name in ("n", "max_tokens", "top_logprobs")}
    assert bounds["n"]["maximum"] == 4 and bounds["max_tokens"]["maximum"] == 47
    assert bounds["top_logprobs"]["maximum"] == serving.MAX_TOP_LOGPROBS
    ids = schema["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert ids["exclusiveMaximum"] == tok.vocab_size
    st = os.path.join(os.path.dirname(sys.executable), "st")
    if not os.path.isfile(st):
        pytest.skip("schemathesis is not installed (requirements.txt)")
    r = subprocess.run([st, "run", f"{url}/openapi.json", "--checks", ",".join(SCHEMA_CHECKS), "--max-examples", "50",
                        "--seed", "0", "--workers", "1", "--request-timeout", "30", "--no-color",
                        "--suppress-health-check", "all", "--phases", "examples,coverage,fuzzing"],
                       capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    generated = int(re.search(r"(\d+) generated", r.stdout).group(1))
    assert generated >= 8 * 50 and "8 selected / 8 total" in r.stdout
    assert httpx.get(f"{url}/health", timeout=5).json()["failed_steps"] == 0
