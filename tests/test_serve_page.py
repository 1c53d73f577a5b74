"""The chat page the server serves at GET /, driven in a real headless Chromium (selenium): the model id from
/v1/models, the settings in the request, a streamed reply that grows visibly and equals the server's own
non-streaming reply, a multi-turn conversation, Stop, New chat (also mid-reply), an HTTP error in a "msg error", and
(with canned streams) SSE split across reads, mid-stream error chunks and calculator calls rendered escaped.
Skips when selenium, chromium or chromedriver is missing (CHROMIUM / CHROMEDRIVER name other binaries)."""
import json
import os
import shutil
import time

import pytest
import torch

from conftest import ROOT
from test_serve import serving, tiny_model

TOKEN_DELAY = 0.03  # seconds per decode step: a reply of 40 tokens streams over > 1 s, which the polls below see
MAX_TOKENS = 40

# Every request the page makes to the chat endpoint, recorded in the page (its fetch, wrapped).
RECORD_REQUESTS = """
window.__requests = [];
const realFetch = window.fetch.bind(window);
window.fetch = (url, opts) => {
  if (String(url).includes("/v1/chat/completions") && opts && opts.body) window.__requests.push(JSON.parse(opts.body));
  return realFetch(url, opts);
};"""
TEXTS = "[...document.querySelectorAll('#messages .msg.assistant')].map((m) => m.textContent)"  # assistant bubbles' text
BUSY = "[document.getElementById('send').disabled, document.getElementById('stop').disabled]"


def binary(env, *names):
    """$env if set, else the first of names on PATH; None unless it is an executable file."""
    path = os.environ.get(env) or next((p for p in map(shutil.which, names) if p), None)
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service
    chromium = binary("CHROMIUM", "chromium", "chromium-browser")
    driver_path = binary("CHROMEDRIVER", "chromedriver")
    if not chromium or not driver_path:
        pytest.skip(f"the headless browser test needs chromium and chromedriver (found: {chromium}, {driver_path}; Debian: "
                    "apt-get install chromium chromium-driver, or set CHROMIUM and CHROMEDRIVER)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=420,860"]:
        options.add_argument(arg)  # a phone-like width: the page must fit it
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(stack, tok_dir):
    """A tiny random model behind the stack's server, decoding slowed so streaming is observable: its base url."""
    tok = stack.Tokenizer(tok_dir)
    model = tiny_model(stack, tok.vocab_size)
    decode, special = model.decode, list(tok.special_tokens.values())

    def slow_plain_decode(*args, **kwargs):  # never a special token: each turn's text re-encodes to ~ as many tokens
        time.sleep(TOKEN_DELAY)
        logits = decode(*args, **kwargs).clone()
        logits[..., special] = float("-inf")
        return logits

    model.decode = slow_plain_decode
    engine = stack.Engine(model, tok, model.windows(), stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa"))
    engine.stops = set()  # a random model may sample a stop token: always generate max_tokens
    server = serving.Server(engine, tok, model_name="tiny", max_context=1024, chat=True, max_rows=8, max_queue=16, timeout=60.0)
    url, stop = serving.start(server, "127.0.0.1", 0)
    yield url
    stop()


def wait(driver, condition, timeout=20, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: condition(d), what)


def by_id(driver, element_id):
    return driver.find_element("id", element_id)


def set_value(driver, element_id, value):
    el = by_id(driver, element_id)
    el.clear()
    el.send_keys(str(value))


def texts(driver):
    return driver.execute_script(f"return {TEXTS}")


def busy(driver):
    return driver.execute_script(f"return {BUSY}")


def streaming(driver, n):
    """Wait for the n-th assistant bubble to show text; its text."""
    def shown(d):
        no_error(d)
        m = texts(d)
        return len(m) == n and m[-1]
    return wait(driver, shown, what=f"text in assistant bubble {n}")


def no_error(driver):
    errors = driver.find_elements("css selector", "#messages .msg.error")
    assert not errors, errors[0].get_attribute("textContent")


def watch_reply(driver, n, timeout=30):
    """Poll assistant bubble n until Send is enabled again: (final text, the texts seen while streaming)."""
    wait(driver, lambda d: no_error(d) or len(texts(d)) == n, what=f"assistant bubble {n}")
    seen, deadline = [], time.time() + timeout
    while True:
        bubbles, (send_disabled, stop_disabled) = driver.execute_script(f"return [{TEXTS}, {BUSY}]")  # in one read
        text = bubbles[n - 1]
        if not send_disabled:
            no_error(driver)
            return text, seen
        assert not stop_disabled, "Stop must be enabled while a reply streams"
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        assert time.time() < deadline, f"no end of the reply after {timeout} s; seen {seen[-1:]!r}"
        time.sleep(0.02)


def reference(url, request):
    """The server's own non-streaming answer to the page's request: (status, body)."""
    import httpx
    r = httpx.post(url + "/v1/chat/completions", json={**request, "stream": False}, timeout=60)
    return r.status_code, r.json()


def requests_made(driver):
    return driver.execute_script("return window.__requests")


def test_chat_page_streams_multi_turn_stops_and_shows_errors(browser, served):
    from selenium.webdriver.common.keys import Keys
    url, d = served, browser
    d.get(url + "/")
    wait(d, lambda d: by_id(d, "model").text == "tiny", what="the model id from /v1/models in the header")
    d.execute_script(RECORD_REQUESTS)
    assert [by_id(d, i).get_attribute("value") for i in ("temperature", "top-k", "top-p", "max-tokens")] == ["0.8", "50", "1.0", "256"]
    d.find_element("css selector", "#settings summary").click()
    set_value(d, "max-tokens", MAX_TOKENS)
    set_value(d, "temperature", 0)

    # turn 1: Enter sends; the reply streams (the bubble grows while Send is disabled) and ends as the server's own
    by_id(d, "input").send_keys("Hello there, how are you?", Keys.ENTER)
    text1, seen = watch_reply(d, 1)
    assert len(seen) >= 2 and all(b.startswith(a) and len(b) > len(a) for a, b in zip(seen, seen[1:])), seen
    (req1,) = requests_made(d)
    assert req1 == {"model": "tiny", "messages": [{"role": "user", "content": "Hello there, how are you?"}], "stream": True,
                    "max_tokens": MAX_TOKENS, "temperature": 0, "top_k": 50, "top_p": 1}
    status, ref1 = reference(url, req1)
    assert status == 200, ref1
    reply1 = ref1["choices"][0]["message"]["content"]
    assert reply1 and (text1 == reply1 or "<<" in reply1)  # calculator calls render differently (below)
    os.makedirs(os.path.join(ROOT, "runs", "artifacts"), exist_ok=True)
    d.save_screenshot(os.path.join(ROOT, "runs", "artifacts", "chat_page.png"))

    # turn 2: Shift+Enter is a newline, the button sends; the request carries the whole conversation (3 messages)
    by_id(d, "input").send_keys("And a", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line")
    by_id(d, "send").click()
    text2, _ = watch_reply(d, 2)
    req2 = requests_made(d)[1]
    assert req2["messages"] == [{"role": "user", "content": "Hello there, how are you?"},
                                {"role": "assistant", "content": reply1},  # the streamed text, as the server has it
                                {"role": "user", "content": "And a\nsecond line"}]
    status, ref2 = reference(url, req2)
    assert status == 200, ref2
    reply2 = ref2["choices"][0]["message"]["content"]
    assert text2 == reply2 or "<<" in reply2
    classes = [e.get_attribute("class") for e in d.find_elements("css selector", "#messages .msg")]
    assert classes == ["msg user", "msg assistant"] * 2

    # Stop mid-reply: the partial reply stays, Send comes back
    by_id(d, "input").send_keys("Third", Keys.ENTER)
    streaming(d, 3)
    by_id(d, "stop").click()
    wait(d, lambda d: busy(d) == [False, True], what="Send enabled after Stop")
    partial = texts(d)[-1]
    time.sleep(0.2)
    assert partial and texts(d)[-1] == partial  # nothing more arrives after Stop
    assert len(d.find_elements("css selector", "#messages .msg")) == 6

    # New chat mid-reply: everything cleared at once, and the aborted reply does not come back
    by_id(d, "input").send_keys("Fourth", Keys.ENTER)
    streaming(d, 4)
    by_id(d, "new-chat").click()
    assert d.find_elements("css selector", "#messages > *") == [] and busy(d) == [False, True]
    time.sleep(0.3)
    assert d.find_elements("css selector", "#messages > *") == []

    # an HTTP error (more tokens than the context holds) shows the server's message; the new chat starts from 1 message
    set_value(d, "max-tokens", 100000)
    by_id(d, "input").send_keys("hi", Keys.ENTER)
    error = wait(d, lambda d: d.find_elements("css selector", "#messages .msg.error"), what="a msg error")[0]
    req5 = requests_made(d)[-1]
    assert req5["messages"] == [{"role": "user", "content": "hi"}] and req5["max_tokens"] == 100000
    status, body = reference(url, req5)
    assert status == 400 and set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert error.get_attribute("textContent") == body["error"]["message"]
    assert busy(d) == [False, True] and by_id(d, "input").get_attribute("value") == "hi"  # the failed turn is given back


CANNED = """
const [chunks] = arguments;
const enc = new TextEncoder();
window.fetch = async (url, opts) => new Response(new ReadableStream({
  async start(c) { for (const s of chunks) { c.enqueue(enc.encode(s)); await new Promise(r => setTimeout(r, 5)); } c.close(); }
}), {status: 200, headers: {"Content-Type": "text/event-stream"}});
"""


def sse(obj):
    return "data: " + json.dumps(obj) + "\n\n"


def delta(content):
    return sse({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


def test_chat_page_renders_calculator_calls_escaped_and_stream_errors(browser, served):
    """Canned streams (the page's fetch replaced): events split across reads, calculator markup as a 'calc:' span,
    model text never parsed as HTML, and an error chunk mid-stream (CRLF-separated events) shown as a msg error after
    the partial reply."""
    from selenium.webdriver.common.keys import Keys
    d = browser
    d.get(served + "/")
    wait(d, lambda d: by_id(d, "model").text == "tiny", what="the model id")
    stream = sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
    stream += delta("So <b>2+2</b> is ") + delta("<<2+") + delta("2=") + delta("4>>")  # a call streaming in
    stream += delta(", and <<os.system(1)=>> was refused.") + "data: [DONE]\n\n"
    d.execute_script(CANNED, [stream[i:i + 37] for i in range(0, len(stream), 37)])  # split mid-event
    by_id(d, "input").send_keys("calc", Keys.ENTER)
    watch_reply(d, 1)
    bubble = d.find_elements("css selector", "#messages .msg.assistant")[-1]
    assert bubble.find_elements("css selector", "b") == []
    assert [s.text for s in bubble.find_elements("css selector", ".calc")] == ["calc: 2+2 = 4", "calc: os.system(1)"]
    assert bubble.get_attribute("textContent") == "So <b>2+2</b> is calc: 2+2 = 4, and calc: os.system(1) was refused."

    by_id(d, "new-chat").click()
    crlf = [e.replace("\n", "\r\n") for e in (delta("partial "), sse({"error": {"message": "engine fell over"}}))]
    d.execute_script(CANNED, [crlf[0][:-1], crlf[0][-1:] + crlf[1]])  # CRLF line ends, one split inside a CRLF
    by_id(d, "input").send_keys("boom", Keys.ENTER)
    error = wait(d, lambda d: d.find_elements("css selector", "#messages .msg.error"), what="the error chunk's message")[0]
    assert error.get_attribute("textContent") == "engine fell over"
    assert [e.get_attribute("class") for e in d.find_elements("css selector", "#messages .msg")] == ["msg user", "msg assistant", "msg error"]
    assert texts(d) == ["partial "] and busy(d) == [False, True]
