"""Serving under load: serve.py's OpenAI-compatible server (Server, in this process, on a free loopback port) and C
client threads that each send R streaming chat completions of distinct prompts one after another, for C in --clients;
side by side at every C the same prompts against a second server that decodes one row at a time (max_rows=1: requests
queue, no continuous batching), so the table shows the batching gain as a ratio measured in this run. Then, at the
largest C, the batched server's load again beside hostile clients (--hostile H of them, each sending as many requests
as a normal one, in turn: bad JSON, a prompt past the context, a body over the size limit, an unknown model, and a
poisoned sampler: a request whose draws raise, as a sampling bug would): a second table shows that the normal
requests' throughput, errors and replies stay as they were, and what each hostile request got.

    python bench/serve_bench.py                          # the latest checkpoint of runs/cpu, 1 / 4 / 16 clients
    python bench/serve_bench.py --checkpoint runs/cpu/ckpt_000150 --clients 1,8 --requests-per-client 4
    python bench/serve_bench.py --quick --data-dir DIR   # smoke run: a tiny random model, 1 and 2 clients, 1 request each
    python bench/serve_bench.py --hostile 0              # no hostile mix

Greedy (temperature 0) and, unless --natural-stops, the engine's stop tokens off: every reply runs to --max-tokens,
so both servers do the same work per request (a trained model's replies would otherwise end at different lengths).
Per request: time to first token (the first chunk with content), latency to [DONE], tokens generated (the stream's
usage); per row: requests/s and generated tok/s over the wall time of the whole load, TTFT and latency percentiles,
errors (429s among them) and the slowest client's time over the fastest's. The clients run in this process (threads
under one GIL with the server's event loop and decode thread): on 2 cores they take a share of the CPU a remote
client would not. Prints a table and a last summary line; timings vary +-30% on shared machines: run on idle cores.
"""
import argparse
import collections
import importlib.util
import json
import os
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_stack import load_stack  # noqa: E402

TOPICS = ["the sea", "a small town", "a red bicycle", "the moon", "a lost key", "an old library", "a storm",
          "a garden", "a train", "a cat", "the mountains", "a market", "a river", "a clock", "a lighthouse", "snow"]
TEMPLATES = ["What is {a} plus {b}?", "Tell me a story about {t} in {a} words.", "What is {a} times {b}?",
             "Write two sentences about {t} and the number {a}.", "If I have {a} apples and buy {b} more, how many "
             "do I have?", "Describe {t} and {a} birds."]


def plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def ratio(a, b):
    return a / b if b else float("nan")


def prompt(k):
    """The k-th of the bench's distinct user messages."""
    return TEMPLATES[k % len(TEMPLATES)].format(a=2 + k, b=3 + k * 13 % 89, t=TOPICS[k % len(TOPICS)])  # a: distinct


def tiny_model(stack, vocab_size):
    """A small random model (test_serve.py's shape), every parameter nonzero."""
    torch.manual_seed(0)
    cfg = stack.Config(n_layers=2, model_dim=64, n_heads=2, head_dim=32, long_window_layers="1", value_embed_layers="0,1")
    model = stack.GPT(stack.ModelConfig.of(cfg, vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def one_request(http, url, text, max_tokens):
    """One streaming chat completion: dict(status, ttft, latency, tokens, text, error)."""
    body = {"messages": [{"role": "user", "content": text}], "stream": True, "temperature": 0,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    out = dict(status=0, ttft=None, latency=None, tokens=0, text="", error=None)
    t0 = time.perf_counter()
    try:
        with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                r.read()
                out["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return out
            done = False
            for line in r.iter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    out["error"] = f"not an SSE data line: {line[:80]!r}"
                    break
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    out["error"] = f"in the stream: {event['error'].get('message', '')[:200]}"
                if event.get("usage"):
                    out["tokens"] = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if out["ttft"] is None and (piece or choice.get("finish_reason")):
                        out["ttft"] = time.perf_counter() - t0
                    out["text"] += piece or ""
            if not done and out["error"] is None:
                out["error"] = "the stream ended without data: [DONE]"
    except Exception as e:  # a refused or broken connection, a timeout: counted, the client goes on
        out["error"] = f"{type(e).__name__}: {e}"
    out["latency"] = time.perf_counter() - t0
    return out


POISON_SEED = 666  # a hostile request's seed: its sampler raises (poisoned_sampling)
HOSTILE = ("bad JSON", "past the context", "over the size limit", "unknown model", "poisoned sampler")


def hostile_request(http, url, k, context):
    """The k-th hostile request (HOSTILE[k % 5]): (its kind, the status it got: 0 if the connection failed)."""
    kind, user = HOSTILE[k % len(HOSTILE)], [{"role": "user", "content": "Hello"}]
    body = {"bad JSON": b'{"messages": [{"role": "user", "content": "Hel',
            "past the context": {"messages": [{"role": "user", "content": "word " * context}]},
            "over the size limit": {"messages": [{"role": "user", "content": "x" * (2 << 20)}]},
            "unknown model": {"messages": user, "model": "gpt-4o"},
            "poisoned sampler": {"messages": user, "seed": POISON_SEED, "temperature": 1.0, "stream": True}}[kind]
    try:
        if isinstance(body, bytes):
            r = http.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(f"{url}/v1/chat/completions", json=body)
        failed_in_stream = r.status_code == 200 and '"error"' in r.text  # a failure after the first token
        return kind, 500 if failed_in_stream else r.status_code
    except Exception:  # e.g. the server closed a connection whose body it refused unread
        return kind, 0


def poisoned_sampling(stack):
    """The stack's sample_next, raising for a generator seeded POISON_SEED; sample_next is put back when done."""
    draw = stack.sample_next

    def sample_next(logits, generator, *args, **kwargs):
        if generator is not None and generator.initial_seed() == POISON_SEED:
            raise RuntimeError("a poisoned sampler (serve_bench's hostile mix)")
        return draw(logits, generator, *args, **kwargs)

    stack.sample_next = sample_next
    return lambda: setattr(stack, "sample_next", draw)


def run_load(url, prompts, max_tokens, hostile=0, context=0):
    """prompts[c]: client c's messages, sent one after another; all clients start together, with `hostile` clients
    sending as many hostile requests each (at least one of each kind in all). (results[c] per request, wall seconds of the normal clients' load,
    spans[c]: client c's seconds, [(kind, status)] of the hostile requests)."""
    import httpx
    start = threading.Barrier(len(prompts) + hostile + 1)
    results, spans, refused = [[] for _ in prompts], [0.0] * len(prompts), []

    def client(c):
        with httpx.Client(timeout=httpx.Timeout(600.0)) as http:  # one keep-alive connection per client
            start.wait()
            t0 = time.perf_counter()
            for text in prompts[c]:
                results[c].append(one_request(http, url, text, max_tokens))
            spans[c] = time.perf_counter() - t0

    def hostile_client(h):
        with httpx.Client(timeout=httpx.Timeout(600.0)) as http:
            start.wait()
            for r in range(max(len(prompts[0]), -(-len(HOSTILE) // hostile))):  # every kind at least once
                refused.append(hostile_request(http, url, h + r * hostile, context))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(len(prompts))]
    threads += [threading.Thread(target=hostile_client, args=(h,), daemon=True) for h in range(hostile)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads[:len(prompts)]:
        t.join()
    wall = time.perf_counter() - t0
    for t in threads[len(prompts):]:
        t.join()
    return results, wall, spans, refused


def row_stats(results, wall, spans):
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if r["error"] is None]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")
    ttft, latency = [r["ttft"] for r in ok if r["ttft"] is not None], [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return dict(requests=len(flat), ok=len(ok), errors=len(flat) - len(ok), busy=sum(r["status"] == 429 for r in flat),
                req_s=len(ok) / wall, tok_s=tokens / wall, tok_per=tokens / max(len(ok), 1), wall=wall,
                ttft50=pct(ttft, 50), ttft95=pct(ttft, 95), lat50=pct(latency, 50), lat95=pct(latency, 95),
                spread=ratio(max(spans), min(spans)),
                first_error=next((r["error"] for r in flat if r["error"]), None))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="runs/data", help="a prepared data directory: its tokenizer")
    ap.add_argument("--checkpoint", default="", help="a checkpoint directory (default: the latest in runs/cpu; "
                    "none there: a tiny random model)")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients, one row of each server per value")
    ap.add_argument("--requests-per-client", type=int, default=8, help="requests each client sends, one after "
                    "another (the defaults: ~1 minute on 2 idle cores)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    ap.add_argument("--max-rows", type=int, default=32, help="the batched server's rows (the stack's --serve-max-rows)")
    ap.add_argument("--decode-compile", action="store_true", help="torch.compile'd decode steps (Engine compile=True)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    ap.add_argument("--natural-stops", action="store_true", help="keep the engine's stop tokens: replies may end early")
    ap.add_argument("--hostile", type=int, default=-1, help="hostile clients beside the largest --clients load on the "
                    "batched server (-1: half as many as its normal ones, at least 1; 0: no hostile mix)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny random model (unless --checkpoint), "
                    "clients 1,2, 1 request per client, 8 tokens")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests_per_client, args.max_tokens = "1,2", 1, 8
    clients = [int(c) for c in args.clients.split(",")]
    hostile = max(1, max(clients) // 2) if args.hostile < 0 else args.hostile
    if not clients or min(clients) < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        sys.exit("error: --clients, --requests-per-client and --max-tokens must be positive")
    torch.set_num_threads(args.threads or os.cpu_count())
    stack = load_stack()
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:  # the server's and the clients' dependencies
        sys.exit(f"error: serving needs fastapi, uvicorn and httpx; missing: {', '.join(missing)}")
    import serve  # serve.py beside the stack
    t_begin, load_begin = time.time(), os.getloadavg()
    tok = stack.data_tokenizer(args.data_dir)
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    path = args.checkpoint or ("" if args.quick else stack.latest_checkpoint("runs/cpu") or "")
    if path:
        model, state = stack.load_model(path)
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"
        what = f"checkpoint {path} (phase {state.get('phase', 'pt')})"
    else:
        model, name = tiny_model(stack, tok.vocab_size), "tiny-random"
        what = ("a tiny random model (--quick)" if args.quick else
                "NOTE: no checkpoint in runs/cpu (pass --checkpoint): a tiny random model; its numbers say nothing "
                "about the cpu preset")
    model.eval()
    windows, context = model.windows(), model.cfg.max_doc_len
    prompts = {c: [[prompt(sum(clients[:i]) * args.requests_per_client + c_i * args.requests_per_client + r)
                    for r in range(args.requests_per_client)] for c_i in range(c)] for i, c in enumerate(clients)}
    longest = max(len(serve.chat_prompt(tok, [{"role": "user", "content": t}])) for ps in prompts.values()
                  for p in ps for t in p)
    if longest + args.max_tokens > context:
        sys.exit(f"error: {longest} prompt + {args.max_tokens} reply tokens exceed the model's context of {context}")

    servers, stops = {}, []
    for kind, rows in (("batched", args.max_rows), ("one row", 1)):
        engine = stack.Engine(model, tok, windows, rt, compile=args.decode_compile)
        if not args.natural_stops:
            engine.stops = set()
        server = serve.Server(engine, tok, name, context, max_rows=rows, max_queue=max(clients), timeout=600.0)
        url, stop = serve.start(server)
        servers[kind] = (url, server)
        stops.append(stop)
    print(f"{what}, {sum(p.numel() for p in model.parameters()):,} parameters, context {context}; "
          f"{torch.get_num_threads()} torch threads, {'compiled' if args.decode_compile else 'eager'} decode steps; "
          f"batched server {args.max_rows} rows, the other 1; {plural(args.requests_per_client, 'request')} per client, "
          f"{plural(args.max_tokens, 'token')} per reply, greedy, "
          f"{'stop tokens on (replies may end early)' if args.natural_stops else 'stop tokens off (every reply runs to max tokens)'}; "
          f"load average {load_begin[0]:.2f} at the start")
    try:
        t0 = time.perf_counter()  # warm-up, not measured: first calls, and a compiled step's batch sizes
        warm = [prompt(10_000 + k) for k in range(max(clients))]
        run_load(servers["batched"][0], [[t] for t in warm], args.max_tokens)
        run_load(servers["one row"][0], [warm[:1]], args.max_tokens)
        print(f"warm-up {time.perf_counter() - t0:.1f} s (apart)")
        stats, same, clean = {}, {}, None
        for c in clients:  # the two servers one after the other at each C: the same prompts, the same machine state
            outputs = {}
            for kind in ("batched", "one row"):
                results, wall, spans, _ = run_load(servers[kind][0], prompts[c], args.max_tokens)
                stats[c, kind], outputs[kind] = row_stats(results, wall, spans), results
            pairs = [(a, b) for ra, rb in zip(outputs["batched"], outputs["one row"]) for a, b in zip(ra, rb)
                     if a["error"] is None and b["error"] is None]
            same[c] = (sum(a["text"] == b["text"] for a, b in pairs), len(pairs))
            clean = outputs["batched"] if c == max(clients) else clean
        if hostile:  # the largest load again, beside hostile clients: the clean run is the batched row just measured
            top, put_back = max(clients), poisoned_sampling(stack)
            try:
                results, wall, spans, refused = run_load(servers["batched"][0], prompts[top], args.max_tokens,
                                                         hostile, context)
            finally:
                put_back()
            stats["mix"] = row_stats(results, wall, spans)
            pairs = [(a, b) for ra, rb in zip(results, clean) for a, b in zip(ra, rb)
                     if a["error"] is None and b["error"] is None]
            same["mix"] = (sum(a["text"] == b["text"] for a, b in pairs), len(pairs))
        failed = {kind: server.failures for kind, (_, server) in servers.items()}
    finally:
        for stop in stops:
            stop()

    print("\n| clients | server | requests | errors (429) | req/s | gen tok/s | tok/request | TTFT p50 s | TTFT p95 s | "
          "latency p50 s | latency p95 s | slowest/fastest client | vs one row | same reply as one row |")
    print("| --- " * 14 + "|")
    for c in clients:
        for kind in ("batched", "one row"):
            s = stats[c, kind]
            gain = f"{ratio(s['req_s'], stats[c, 'one row']['req_s']):.2f}x" if kind == "batched" else "1x"
            agree = f"{same[c][0]}/{same[c][1]}" if kind == "batched" else ""
            print(f"| {c} | {kind} | {s['requests']} | {s['errors']} ({s['busy']}) | {s['req_s']:.2f} | {s['tok_s']:.0f} | "
                  f"{s['tok_per']:.1f} | {s['ttft50']:.3f} | {s['ttft95']:.3f} | {s['lat50']:.2f} | {s['lat95']:.2f} | "
                  f"{s['spread']:.2f} | {gain} | {agree} |")
    mix = ""
    if hostile:
        top = max(clients)
        got = {kind: collections.Counter(status for k, status in refused if k == kind) for kind in HOSTILE}
        print(f"\nthe batched server at {plural(top, 'client')}, alone and beside {plural(hostile, 'hostile client')} "
              f"({plural(len(refused), 'hostile request')}):\n")
        print("| load | normal requests | normal errors | req/s | gen tok/s | TTFT p50 s | latency p50 s | same reply as "
              "alone | " + " | ".join(HOSTILE) + " |")
        print("| --- " * (8 + len(HOSTILE)) + "|")
        for name, s in (("alone", stats[top, "batched"]), ("hostile mix", stats["mix"])):
            mixed = name != "alone"
            statuses = [" ".join(f"{n}x{code}" for code, n in sorted(got[kind].items())) if mixed else "" for kind in HOSTILE]
            agree = f"{same['mix'][0]}/{same['mix'][1]}" if mixed else ""
            print(f"| {name} | {s['requests']} | {s['errors']} | {s['req_s']:.2f} | {s['tok_s']:.0f} | {s['ttft50']:.3f} | "
                  f"{s['lat50']:.2f} | {agree} | " + " | ".join(statuses) + " |")
        mix = (f"; beside {plural(len(refused), 'hostile request')}: {ratio(stats['mix']['req_s'], stats[top, 'batched']['req_s']):.2f}x "
               f"the req/s, {stats['mix']['errors']} normal errors, {same['mix'][0]}/{same['mix'][1]} replies the same")
    errors = sum(s["errors"] for s in stats.values())
    first = next((s["first_error"] for s in stats.values() if s["first_error"]), None)
    if errors or any(failed.values()):
        print(f"\n{errors} failed requests (first: {first}); failed decode steps: {failed}")
    load_end = os.getloadavg()
    print(f"\n{time.time() - t_begin:.0f} s in all; load average {load_end[0]:.2f} at the end")
    top, low = max(clients), min(clients)
    b, one = stats[top, "batched"], stats[top, "one row"]
    at_top = f", {b['ttft50']:.3f} s at {top}" if top != low else ""
    print(f"serve_bench: {top} client{'s' * (top > 1)}: {b['req_s']:.2f} req/s batched vs {one['req_s']:.2f} one at a "
          f"time ({ratio(b['req_s'], one['req_s']):.1f}x), {b['tok_s']:.0f} vs {one['tok_s']:.0f} tok/s; TTFT p50 "
          f"{stats[low, 'batched']['ttft50']:.3f} s at {plural(low, 'client')}{at_top}{mix}; {errors} errors")


if __name__ == "__main__":
    main()
