"""The one-shot GPU check: what only a GPU can tell about the stack, in one command of a few minutes, offline.

    python bench/gpu_check.py                       # on a CUDA GPU: the h100x8 shapes, synthetic tokens
    python bench/gpu_check.py --data-dir runs/data  # train on prepared data instead of synthetic tokens
    python bench/gpu_check.py --only decode,fp8     # rerun some checks (the compile caches under OUT make it quick)
    python bench/gpu_check.py --device cpu          # a dry run of every check: small shapes, fp32, the interpreter
    python bench/gpu_check.py --stack medium        # the medium stack (nanochat's d24) at its h100x8 shapes

Checks, in the order of what their numbers are worth, each time-boxed (a check past its box is recorded as a timeout
and the next one starts), with the results rewritten to OUT/gpu_check.json after each. It runs offline
(HF_HUB_OFFLINE=1, for its children too) and keeps inductor's and Triton's caches under OUT/cache, so a rerun on the
same machine skips the compiles. A --budget below the boxes' sum shrinks the later checks, never the training run.
  environment  the modules every check needs (a missing one: its checks are skipped, naming it), torch / triton /
               python versions, device, compute capability, native bf16, FP8, the attention backend "auto" picks and
               why each other one can't run (FlashAttention may be absent: nothing needs it)
  train        a compiled run of the h100x8 model (the gpu1 preset: one GPU) on its last stage's shapes, two graphs
               (tied, then untied embeddings; medium: d24 at batch 131,072): tok/s, MFU, peak memory, loss falling,
               compile time
  kernels      every Triton kernel in bf16 against its fp32 PyTorch reference at the h100x8 shapes (Polar Express
               Gram matrices of the 8-rank shard, the ReLU^2 MLP forward and backward over 49,152 tokens, the
               softcapped cross-entropy over 49,152 x 50,304 > 2^31 logits), each timed against the reference
  fp8          the FP8 lm_head, eager and compiled, against the dequantised reference (sm89+)
  attention    SDPA, compiled flex_attention and FA3/FA2 where they load, outputs and gradients against the
               per-document reference over packed documents, windows 128 / 1664 / none, timed
  kv_cache     KV-cache prefill + decode of an h100x8-shaped model in bf16 against its packed forward; decode tok/s
  decode       CORE's shared-context forward against each sequence alone; the engine's compiled steps (CUDA graphs
               or not: inductor's counters) and the server's batched requests: their logits, step by step on forced
               tokens, against the eager / alone forward (greedy tokens' agreement reported, not asserted); tok/s
  warmup       where time remains: the full four-stage schedule's compile warm-up (every graph variant) and run
               (medium: one stage; a few steps of its real 2^20-token batch, 32 accumulated forwards)
The medium stack (--stack medium) has no FP8 (its check is skipped) and its own shapes (SHAPES).

The last lines are a table and a summary; the exit status is 1 if any check failed.
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOXES = dict(environment=30, train=300, kernels=90, fp8=60, attention=120, kv_cache=60, decode=120, warmup=300)  # seconds
RESERVED = ("environment", "train")  # their boxes whatever the --budget: the numbers the first GPU hour is for
NEEDS = dict(train=("tiktoken", "regex", "safetensors"), warmup=("tiktoken", "regex", "safetensors"))  # beyond torch
# Per stack, the h100x8 shapes the checks use: vocabulary (small: GPT-2's, as modded-nanogpt's record; medium:
# nanochat's), one rank's Polar Express banks of the 8-rank run (medium: 96 (1536, 1536) and 24 (1536, 6144) matrices
# over 8 ranks), one micro-batch's tokens x width, heads x head dim, windows.
SHAPES = {"small": dict(vocab=50257, polar=((6, 768, 768), (2, 768, 3072)), mlp=(49152, 768), heads=(6, 128),
                        windows=(128, 1664), fp8=True),
          "medium": dict(vocab=32768, polar=((12, 1536, 1536), (3, 1536, 6144)), mlp=(32768, 1536), heads=(12, 128),
                         windows=(768, 2048), fp8=False)}
# the dry run's tiny models (--device cpu), on the cpu preset
TINY_MODEL = {"small": ["--n-layers", "2", "--model-dim", "64", "--n-heads", "2", "--head-dim", "32",
                        "--long-window-layers", "1", "--value-embed-layers", "0,1"],
              "medium": ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-doc-len", "256",
                         "--long-window", "256", "--short-window", "64"]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run (small, fp32)")
    ap.add_argument("--stack", default="small", choices=list(SHAPES), help="which stack to check (default small)")
    ap.add_argument("--data-dir", default="", help="prepared data for the train check (default: synthetic tokens)")
    ap.add_argument("--out", default="runs/gpu_check", help="results (gpu_check.json), the runs, synthetic data, "
                    "compile caches")
    ap.add_argument("--only", default="", help="comma-separated checks to run (default: all, in the order above)")
    ap.add_argument("--train-steps", type=int, default=24, help="steps of the train check (its last-stage schedule)")
    ap.add_argument("--warmup-steps", type=int, default=48, help="steps of the warmup check's four-stage schedule")
    ap.add_argument("--budget", type=int, default=600, help="seconds for all checks: environment and train get their "
                    "boxes whatever it says, each later one at most its box and what is left (skipped under 10 s)")
    return ap.parse_args(argv)


# ---- running checks: time boxes, results file, table -----------------------------------------------------------


class Box(Exception):
    pass


def in_box(seconds, fn):
    """fn() with a wall-clock limit (SIGALRM: raised where Python next runs, e.g. between kernel launches). Box also
    when the alarm's exception came back wrapped in another (torch.compile wraps what its backend raises)."""
    expired = []

    def expire(signum, frame):
        expired.append(True)
        raise Box(f"timed out after {seconds}s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return fn()
    except Exception as e:
        if expired and not isinstance(e, Box):
            raise Box(f"timed out after {seconds}s (inside: {type(e).__name__})") from e
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Results:
    def __init__(self, path, device):
        self.path, self.rows, self.env, self.started = path, [], {}, time.time()
        self.device = device
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def add(self, check, item, status, detail="", **numbers):
        self.rows.append(dict(check=check, item=item, status=status, detail=detail, **numbers))
        self.save()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(device=self.device, env=self.env, rows=self.rows, seconds=time.time() - self.started), f,
                      indent=1, default=str)
        os.replace(tmp, self.path)

    def table(self):
        lines = [f"{'check':<12} {'item':<34} {'status':<8} {'error':>9} {'ms':>9} {'vs ref':>7}  detail"]
        for r in self.rows:
            err = f"{r['error']:.2e}" if isinstance(r.get("error"), float) else ""
            ms = f"{r['ms']:.3f}" if isinstance(r.get("ms"), float) else ""
            speed = f"{r['speedup']:.2f}x" if isinstance(r.get("speedup"), float) else ""
            lines.append(f"{r['check']:<12} {r['item']:<34} {r['status']:<8} {err:>9} {ms:>9} {speed:>7}  {r['detail']}")
        return "\n".join(lines)


def rel_error(got, want):
    """max |got - want| / max |want|, in fp32."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def timed_ms(torch, fn, device, reps=10):
    """Mean milliseconds of fn() after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1000 / reps


def verdict(error, tolerance):
    return "ok" if math.isfinite(error) and error <= tolerance else "FAIL"


# ---- the checks -------------------------------------------------------------------------------------------------


def check_environment(ctx, res):
    torch, stack, dev = ctx["torch"], ctx["stack"], ctx["device"]
    env = dict(python=platform.python_version(), torch=torch.__version__,
               triton=getattr(stack.triton, "__version__", None), device=str(dev))
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(name=props.name, capability=f"sm{props.major}{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                   peak_bf16_tflops=(stack.peak_flops(dev) or 0) / 1e12 or None)
    env.update(native_bf16=stack.native_bf16(dev), fp8=hasattr(stack, "fp8_supported") and stack.fp8_supported(dev),
               triton_kernels=stack.triton is not None and dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0),
               activations=stack.pick_dtype(dev)[1])
    reasons = {name: stack._unavailable(name, dev) for name in stack.ATTENTION_BACKENDS}
    env["attention_auto"] = stack.select_attention_backend(dev)
    env["attention_unavailable"] = {k: v for k, v in reasons.items() if v}
    needed = sorted({m for modules in NEEDS.values() for m in modules})
    env["missing"] = ctx["missing"]
    res.env = env
    res.add("environment", "modules the checks need", "ok", ("all there: " + ", ".join(needed)) if not env["missing"]
            else "missing " + ", ".join(env["missing"]) + ": " + ", ".join(
                name for name, modules in NEEDS.items() if set(modules) & set(env["missing"])) + " will be skipped")
    res.add("environment", "stack imports and runs here", "ok",
            f"torch {env['torch']}, triton {env['triton']}, {env.get('name', dev.type)} {env.get('capability', '')}")
    res.add("environment", "attention backend (auto)", "ok", env["attention_auto"] + "; " + "; ".join(
        f"{k}: {v}" for k, v in env["attention_unavailable"].items()))


def check_kernels(ctx, res):
    torch, stack, dev, small = ctx["torch"], ctx["stack"], ctx["device"], ctx["small"]
    if stack.triton is None or not (dev.type == "cpu" or stack._use_triton(torch.empty(1, device=dev))):
        res.add("kernels", "all", "skip", "no Triton on this device (the PyTorch references run instead)")
        return
    dt = torch.float32 if small else torch.bfloat16
    tol = 1e-4 if small else 2e-2  # bf16 outputs: 8 bits of mantissa
    g = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, device=dev, generator=g) * scale)
    # Polar Express on one rank's shard of the h100x8 NorMuon banks: 44 attention matrices (768, 768) over 8 ranks,
    # 11 MLP matrices iterated as (768, 3072)
    shapes = ctx["shapes"]
    for name, shape in (("attn bank", (2, 64, 64) if small else shapes["polar"][0]),
                        ("mlp bank", (2, 64, 192) if small else shapes["polar"][1])):
        A = rand(*shape).to(dt)
        err = rel_error(stack.xxt_triton(A), stack.xxt_reference(A.float()))
        ms, ref_ms = timed_ms(torch, lambda: stack.xxt_triton(A), dev), timed_ms(torch, lambda: stack.xxt_reference(A), dev)
        res.add("kernels", f"xxt {name} {tuple(shape)}", verdict(err, tol), error=err, ms=ms, speedup=ref_ms / ms)
        S = (stack.xxt_reference(A.float()) / shape[-1]).to(dt)
        b, c = stack.POLAR_EXPRESS_COEFFS[1][1:]
        err = rel_error(stack.ba_plus_caa_triton(S, b, c), stack.ba_plus_caa_reference(S.float(), b, c))
        ms, ref_ms = (timed_ms(torch, lambda: stack.ba_plus_caa_triton(S, b, c), dev),
                      timed_ms(torch, lambda: stack.ba_plus_caa_reference(S, b, c), dev))
        res.add("kernels", f"ba_plus_caa {name} {tuple(S.shape)}", verdict(err, tol), error=err, ms=ms, speedup=ref_ms / ms)
    # the ReLU^2 MLP of one h100x8 micro-batch: 49,152 tokens, 768 -> 3072 -> 768; fp32 weights as the model keeps
    T, dim = (256, 64) if small else shapes["mlp"]
    x = rand(T, dim).to(dt).requires_grad_()
    w_fc, w_proj = rand(4 * dim, dim, scale=dim ** -0.5).requires_grad_(), rand(dim, 4 * dim, scale=(4 * dim) ** -0.5).requires_grad_()
    grad = rand(T, dim).to(dt)
    out = stack.relu2_mlp_triton(x, w_fc, w_proj)
    got = torch.autograd.grad(out, (x, w_fc, w_proj), grad)
    leaves = [t.detach().float().requires_grad_() for t in (x, w_fc, w_proj)]
    ref = stack.relu2_mlp_reference(*leaves)
    want = torch.autograd.grad(ref, leaves, grad.float())
    errors = [rel_error(out, ref)] + [rel_error(a, b) for a, b in zip(got, want)]
    fwd_bwd = lambda fn: lambda: torch.autograd.grad(fn(x, w_fc, w_proj), (x, w_fc, w_proj), grad)
    with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):  # the reference as the model would run it
        ref_ms = timed_ms(torch, fwd_bwd(stack.relu2_mlp_reference), dev, reps=5)
    ms = timed_ms(torch, fwd_bwd(stack.relu2_mlp_triton), dev, reps=5)
    res.add("kernels", f"relu2_mlp fwd+bwd ({T}, {dim})", verdict(max(errors), tol), "out, dx, dw_fc, dw_proj: "
            + " ".join(f"{e:.1e}" for e in errors), error=max(errors), ms=ms, speedup=ref_ms / ms)
    del x, w_fc, w_proj, grad, out, got, leaves, ref, want
    # softcapped MTP cross-entropy over one micro-batch's logits: 49,152 x 50,304 = 2.47e9 elements, past 2^31
    n, v, k = (300, 1000, 3) if small else (shapes["mlp"][0], -(-shapes["vocab"] // 128) * 128, 3)
    logits = rand(n, v, scale=4.0).to(dt)
    targets = torch.randint(0, v, (n, k), device=dev, generator=g)
    targets[::7, 2] = -1
    targets[n - 1] = v - 1  # the last row and column: the offsets past 2^31
    weights = torch.tensor([1.0, 0.5, 0.25], device=dev)
    logits.requires_grad_()
    loss = stack.softcap_cross_entropy_triton(logits, targets, weights)
    (dz,) = torch.autograd.grad(loss.sum(), logits)
    worst = [0.0, 0.0]
    for rows in torch.split(torch.arange(n, device=dev), 4096):  # the reference in slices: bounded fp32 memory
        part = logits.detach()[rows].float().requires_grad_()
        ref_loss = stack.softcap_cross_entropy_reference(part, targets[rows], weights)
        (ref_dz,) = torch.autograd.grad(ref_loss.sum(), part)
        worst[0] = max(worst[0], rel_error(loss[rows], ref_loss))
        worst[1] = max(worst[1], rel_error(dz[rows], ref_dz))
    del dz, loss
    rows = slice(0, min(n, 8192))
    part, part_t = logits.detach()[rows].contiguous().requires_grad_(), targets[rows].contiguous()
    ms = timed_ms(torch, lambda: torch.autograd.grad(stack.softcap_cross_entropy_triton(part, part_t, weights).sum(), part), dev, reps=5)
    ref_ms = timed_ms(torch, lambda: torch.autograd.grad(stack.softcap_cross_entropy_reference(part, part_t, weights).sum(), part), dev, reps=5)
    res.add("kernels", f"softcap CE ({n}, {v}) x{k}: {n * v / 2**31:.2f}x2^31", verdict(max(worst), tol),
            f"loss {worst[0]:.1e}, dz {worst[1]:.1e}; timed fwd+bwd on {part.shape[0]} rows", error=max(worst), ms=ms,
            speedup=ref_ms / ms)


def check_fp8(ctx, res):
    torch, stack, dev, small = ctx["torch"], ctx["stack"], ctx["device"], ctx["small"]
    if not ctx["shapes"]["fp8"]:
        res.add("fp8", "lm_head", "skip", "this stack has no FP8")
        return
    if dev.type == "cuda" and not stack.fp8_supported(dev):
        res.add("fp8", "lm_head", "skip", "FP8 needs sm89+")
        return
    n, dim, v = (256, 64, 1024) if small else (49152, 768, 50304)
    dt = torch.float32 if small else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(n, dim, device=dev, generator=g).to(dt)
    w = torch.randn(v, dim, device=dev, generator=g) * 0.02
    grad = (torch.randn(n, v, device=dev, generator=g) / n).to(dt)
    x_scale, w_scale, g_scale = stack.FP8_SCALES
    scales = (x_scale, w_scale, g_scale / n)

    def dq(t, s, fmt):
        return stack.fp8_quantize(t.float(), s, fmt).float() * s

    xq, wq, gq = dq(x, scales[0], torch.float8_e4m3fn), dq(w, scales[1], torch.float8_e4m3fn), dq(grad, scales[2], torch.float8_e5m2)
    want = (xq @ wq.T, gq @ wq, gq.T @ xq)
    for name, fn in (("eager", stack.fp8_linear), ("compiled", torch.compile(stack.fp8_linear))):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xl, wl, *scales)
        out.backward(grad)
        errors = [rel_error(a, b) for a, b in zip((out, xl.grad, wl.grad), want)]
        ms = timed_ms(torch, lambda: fn(xl, wl, *scales).backward(grad), dev, reps=5)
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            ref_ms = timed_ms(torch, lambda: (xl @ wl.T).backward(grad), dev, reps=5)
        ok = verdict(max(errors), 2e-2) if out.dtype == x.dtype else "FAIL"
        res.add("fp8", f"lm_head {name} ({n}, {dim}) x ({v}, {dim})", ok, f"out {out.dtype}; out, dx, dw: "
                + " ".join(f"{e:.1e}" for e in errors), error=max(errors), ms=ms, speedup=ref_ms / ms)


def random_documents(torch, stack, dev, T, max_len, seed=2):
    """cu_seqlens of documents of random lengths up to max_len filling T tokens (a few short ones among them)."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < T:
        lengths.append(int(min(T - sum(lengths), rng.choice([rng.integers(1, 64), rng.integers(64, max_len + 1)]))))
    cu = np.full(stack.padded_length(len(lengths) + 1), T, dtype=np.int32)
    cu[:len(lengths)] = np.cumsum([0] + lengths[:-1])
    return torch.from_numpy(cu).to(dev), max(lengths)


def check_attention(ctx, res):
    torch, stack, dev, small = ctx["torch"], ctx["stack"], ctx["device"], ctx["small"]
    T, H, D, max_len = (768, 2, 32, 300) if small else (16384, *ctx["shapes"]["heads"], 2048)
    dt = torch.float32 if small else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(3)
    q, k, v = (torch.randn(T, H, D, device=dev, generator=g).to(dt) for _ in range(3))
    grad_out = torch.randn(T, H, D, device=dev, generator=g).to(dt)
    cu, _ = random_documents(torch, stack, dev, T, max_len)
    backends = ["sdpa"] + [b for b in ("flex", "fa3", "fa2") if stack._unavailable(b, dev) is None]
    skipped = {b: stack._unavailable(b, dev) for b in ("flex", "fa3", "fa2") if b not in backends}
    for window in (*ctx["shapes"]["windows"], None):
        w = None if window is None else min(window, max_len)
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = stack.attention_reference(*leaves, cu, w, D ** -0.5)
        ref_grads = torch.autograd.grad(ref, leaves, grad_out.float())
        times = {}
        for backend in backends:
            xs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = stack.attention(*xs, cu, max_len, w, D ** -0.5, backend)
            grads = torch.autograd.grad(out, xs, grad_out)
            errors = [rel_error(out, ref)] + [rel_error(a, b) for a, b in zip(grads, ref_grads)]
            times[backend] = timed_ms(torch, lambda: torch.autograd.grad(
                stack.attention(*xs, cu, max_len, w, D ** -0.5, backend), xs, grad_out), dev, reps=5)
            res.add("attention", f"{backend} window {window} T={T}", verdict(max(errors), 1e-4 if small else 3e-2),
                    "out, dq, dk, dv: " + " ".join(f"{e:.1e}" for e in errors), error=max(errors), ms=times[backend],
                    speedup=times["sdpa"] / times[backend])
    for b, why in skipped.items():
        res.add("attention", b, "skip", why)


def check_kv_cache(ctx, res):
    torch, stack, dev, small = ctx["torch"], ctx["stack"], ctx["device"], ctx["small"]
    cfg = stack.parse_config(["--preset", "cpu" if small else "h100x8"])
    rt = stack.Runtime(dev, torch.float32 if small else torch.bfloat16, 0, 1, stack.select_attention_backend(dev))
    # the packed forward it is checked against: FA's varlen kernel where FA decodes, else SDPA (flex decodes with
    # SDPA anyway, and compiling flex here would spend the box)
    packed_rt = stack.Runtime(dev, rt.dtype, 0, 1, rt.backend if rt.backend in ("fa3", "fa2") else "sdpa")
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, 1000 if small else ctx["shapes"]["vocab"])).to(dev)
    with torch.no_grad():  # off the zero init, so attention and the MLPs shape the logits
        for name, p in model.named_parameters():
            if name.endswith((".o", ".proj")) or name == "bigram_embed":
                p.normal_(0, 0.02)
    windows = model.windows()  # the last stage's, as a trained model is served
    lengths, new = ((40, 90), 16) if small else ((300, 1900), 64)
    seqs = [torch.randint(0, model.vocab_size, (n + new,), device=dev) for n in lengths]
    errors = []
    with torch.no_grad():
        for ids in seqs:
            n = len(ids) - new
            packed = stack.packed_hidden(model, [ids.cpu().numpy()], packed_rt, windows)[0]
            want = model.logits(packed)
            cache = stack.KVCache(model, 1, len(ids), dev, rt.dtype, rt.backend)
            with stack.autocast(rt):
                steps = [model.decode(ids[None, :n], cache, windows)] + [model.decode(ids[None, t:t + 1], cache, windows)
                                                                         for t in range(n, len(ids))]
            errors.append(logit_error(torch.cat(steps, dim=1)[0], want))
    worst = (max(e[0] for e in errors), max(e[1] for e in errors), min(e[2] for e in errors))
    res.add("kv_cache", f"prefill {list(lengths)} + {new} decode steps", "ok" if logits_close(worst, small) else "FAIL",
            f"softcapped logits: max |diff| {worst[1]:.3f}, mean {worst[0]:.4f}; argmax agrees {worst[2]:.1%}; "
            f"decode backend {rt.backend}, packed {packed_rt.backend}", error=worst[0])
    prompt = seqs[1][:lengths[1]]
    cache = stack.KVCache(model, 1, len(prompt) + 129, dev, rt.dtype, rt.backend)
    with torch.no_grad(), stack.autocast(rt):
        model.decode(prompt[None], cache, windows)
        token = prompt[None, -1:]
        ms = timed_ms(torch, lambda: model.decode(token, cache, windows, last_only=True), dev, reps=50)
    res.add("kv_cache", f"decode batch 1 after {len(prompt)} tokens", "ok", f"{1000 / ms:,.0f} tok/s (one token per forward)", ms=ms)


def logit_error(got, want):
    """(mean, max) |difference| of softcapped logits (fp32, bounded to (0, 23)) and the share of argmax agreeing."""
    diff = (got.float() - want.float()).abs()
    return float(diff.mean()), float(diff.max()), float((got.argmax(-1) == want.argmax(-1)).float().mean())


def logits_close(error, small):
    """bf16 on a GPU: a few hundredths on average, an outlier under 0.5 (as kv_cache); fp32 on the dry run: 1e-4."""
    mean, worst, _ = error
    return mean < (1e-4 if small else 0.02) and worst < (1e-3 if small else 0.5)


def full_forward_logits(torch, stack, model, rt, seq, start):
    """Logits (n, V) predicting seq[start + 1:], from one prefill of seq[:-1] into a fresh cache (the reference)."""
    cache = stack.KVCache(model, 1, len(seq), rt.device, rt.dtype, rt.backend)
    with torch.no_grad(), stack.autocast(rt):
        return model.decode(torch.tensor([seq[:-1]], device=rt.device), cache, model.windows())[0, start:].float()


def recorded_steps(engine, rows_of):
    """Wrap engine._decode so that each one-token step's logits are kept per stream: {id(stream): [logits (V,)]};
    rows_of(cache) -> the streams of the cache's rows (None: not a decode step's cache, e.g. a prefill's)."""
    seen, real = {}, engine._decode

    def decode(ids, cache, step=None):
        logits = real(ids, cache, step)
        for row, stream in enumerate(rows_of(cache) or []):
            if stream is not None:
                seen.setdefault(id(stream), []).append(logits[row].float())
        return logits

    engine._decode = decode
    return seen


def check_decode(ctx, res):
    """What evaluation and serving add to the cache: CORE's forward of choices sharing a context (on FA: its two
    varlen calls, the branches' with more keys than queries) against each sequence alone; the engine's compiled steps
    (CUDA graphs where inductor builds them) and the server's batched requests against one forward of the same tokens:
    logits step by step (a near-tie may flip a greedy token in bf16, so tokens are reported, not required); tok/s."""
    torch, stack, dev, small = ctx["torch"], ctx["stack"], ctx["device"], ctx["small"]
    cfg = stack.parse_config(["--preset", "cpu" if small else "h100x8"])
    rt = stack.Runtime(dev, torch.float32 if small else torch.bfloat16, 0, 1, stack.select_attention_backend(dev))
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, 1000 if small else ctx["shapes"]["vocab"])).to(dev).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".o", ".proj")) or name == "bigram_embed":
                p.normal_(0, 0.02)
    windows = model.windows()
    context = np.random.default_rng(0).integers(0, model.vocab_size, 60 if small else 900)
    seqs = [(np.concatenate([context, np.random.default_rng(n).integers(0, model.vocab_size, n)]), len(context),
             len(context) + n) for n in (5, 17, 40, 9)]
    shared = stack.core_scores_packed(model, seqs, rt, windows)
    alone = [stack.core_scores_packed(model, [seq], rt, windows)[0] for seq in seqs]
    error = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(shared, alone))
    res.add("decode", f"CORE shared context ({len(context)} tokens, {len(seqs)} choices)",
            verdict(error, 1e-5 if small else 2e-2), f"mean continuation loss rel. error {error:.1e}, backend {rt.backend}",
            error=error)
    tok = types.SimpleNamespace(special=lambda name: 0, bos_id=0, decode=lambda ids: "")
    engines, skips = {}, torch._dynamo.utils.counters["inductor"]
    for compile in (False, True):
        engines[compile] = stack.Engine(model, tok, windows, rt, compile=compile)
        engines[compile].stops, engines[compile].python_start = set(), -1  # every sample runs full length, no tool
    prompt, new = context[:256].tolist(), 16 if small else 64
    t0, skipped = time.time(), sum(v for k, v in skips.items() if k.startswith("cudagraph_skips"))
    for b in (1, 16):  # the graphs the timed calls need: each batch size (and CUDA graphs' recording)
        engines[True].generate([prompt], b, 8, temperature=0)
    compile_s = time.time() - t0
    skipped = sum(v for k, v in skips.items() if k.startswith("cudagraph_skips")) - skipped
    graphs = ("n/a (CPU)" if dev.type != "cuda" else "CUDA graphs used" if not skipped else
              f"CUDA graphs skipped {skipped} time(s) (inductor's cudagraph_skips)")
    # the compiled steps' logits on the eager run's greedy tokens, against one forward of the prompt and those tokens
    eager = engines[False].generate([prompt], 1, new, temperature=0)[0][0].tokens
    stream = stack.Stream(prompt, stack.Sampling(temperature=0), new, forced=list(eager))
    compiled = engines[True].batch(len(prompt) + new, 1)
    steps = recorded_steps(engines[True], lambda cache: compiled.slots if cache is compiled.cache else None)
    compiled.add(stream)
    while compiled.step():
        pass
    want = full_forward_logits(torch, stack, model, rt, prompt + eager, len(prompt) - 1)
    error = logit_error(torch.stack(steps[id(stream)]), want)
    res.add("decode", f"compiled steps == one forward (logits, {new} forced tokens)",
            "ok" if logits_close(error, small) else "FAIL", f"max |diff| {error[1]:.3f}, mean {error[0]:.4f}; greedy "
            f"tokens agree {error[2]:.0%}; {graphs}; compile {compile_s:.0f} s", error=error[0])
    rates = {}
    for c, e in engines.items():
        for b in (1, 16):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            e.generate([prompt], b, new, temperature=1.0, top_k=50)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rates[c, b] = b * new / (time.time() - t0)
    # the server's batch: four requests, each its own Sampling, joining one DecodeBatch; each one's logits step by step
    # against one forward of its prompt and the tokens it got
    streams = [stack.Stream(prompt[:len(prompt) * (4 - i) // 4], stack.Sampling(temperature=0), new) for i in range(4)]
    served = engines[False].batch(len(prompt) + new, len(streams))
    steps = recorded_steps(engines[False], lambda cache: served.slots if cache is served.cache else None)
    for s in streams:
        served.add(s)
    while served.step():
        pass
    errors = [logit_error(torch.stack(steps[id(s)]), full_forward_logits(torch, stack, model, rt, s.prompt + s.sample.tokens,
                                                                       len(s.prompt) - 1)) for s in streams]
    worst = (max(e[0] for e in errors), max(e[1] for e in errors), min(e[2] for e in errors))
    res.add("decode", "served requests together == one forward each (logits)",
            "ok" if logits_close(worst, small) else "FAIL", f"{len(streams)} x {new} steps: max |diff| {worst[1]:.3f}, "
            f"mean {worst[0]:.4f}; greedy tokens agree {worst[2]:.0%} at worst", error=worst[0])
    res.add("decode", "engine tok/s batch 1 / 16", "ok",
            f"eager {rates[False, 1]:,.0f} / {rates[False, 16]:,.0f}, compiled {rates[True, 1]:,.0f} / "
            f"{rates[True, 16]:,.0f}", tok_per_s=rates[True, 1], speedup=rates[True, 1] / rates[False, 1])


def synthetic_data(out, vocab_size, n_train, n_val, seed=0):
    """A data directory in the stack's formats (written by data/'s writers): a byte-level tokenizer of vocab_size
    tokens (256 bytes, then two-byte strings; nothing is encoded with it) and shards of a learnable stream: each
    token follows a fixed random permutation of its predecessor 90% of the time, documents of random lengths."""
    sys.path.insert(0, os.path.join(ROOT, "data"))
    from common import sha256_file, write_json, write_token_file
    from pretrain_shards import FORMAT_VERSION
    from tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
    if os.path.isfile(os.path.join(out, "pretrain", "manifest.json")):
        return out
    merged = vocab_size - len(SPECIAL_TOKENS)
    pieces = [bytes([i]) for i in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)][:merged - 256]
    tok = Tokenizer({p: i for i, p in enumerate(pieces)}, SPLIT_PATTERN,
                    {name: merged + i for i, name in enumerate(SPECIAL_TOKENS)})
    tok.save(os.path.join(out, "tokenizer"))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(merged)
    shards, directory = [], os.path.join(out, "pretrain")
    os.makedirs(directory, exist_ok=True)
    for split, n in (("val", n_val), ("train", n_train)):
        chains = 1024
        x = np.empty((chains, -(-n // chains)), dtype=np.int64)
        x[:, 0] = rng.integers(0, merged, chains)
        for i in range(1, x.shape[1]):
            x[:, i] = np.where(rng.random(chains) < 0.9, perm[x[:, i - 1]], rng.integers(0, merged, chains))
        tokens = x.reshape(-1)[:n]
        starts = np.cumsum(rng.integers(64, 2048, n // 64 + 1))
        tokens[0], tokens[starts[starts < n]] = tok.bos_id, tok.bos_id
        name = f"{split}_000000.bin"
        write_token_file(os.path.join(directory, name), tokens, tok.vocab_size, tok.bos_id)
        shards.append({"file": name, "split": split, "n_tokens": int(n), "n_docs": int((tokens == tok.bos_id).sum()),
                       "sha256": sha256_file(os.path.join(directory, name))})
    write_json(os.path.join(directory, "manifest.json"), {
        "format": "pretrain", "version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
        "tokenizer_sha256": tok.sha256, "shard_tokens": n_train, "seed": seed, "max_doc_chars": 0, "shards": shards,
        "val_sources": [{"name": "synthetic", "n_docs": shards[0]["n_docs"]}], "sources": {"synthetic": seed}})
    return out


def short_schedule(stages, steps):
    """The stages with their step counts scaled to about `steps` in all (at least 2 each: MTP horizons drop on a
    stage's last step), everything else as the preset has it."""
    total = sum(s.steps for s in stages)
    return [{**dataclasses.asdict(s), "steps": max(2, round(s.steps * steps / total))} for s in stages]


def last_stage_schedule(stages, steps):
    """The last stage alone for `steps` steps, its MTP weights fixed: two graph variants (tied embeddings, then
    untied at --untie-frac), the fewest compiles that still show the run's speed, memory and falling loss."""
    last = dataclasses.asdict(stages[-1])
    return [{**last, "steps": steps, "mtp_start": last["mtp_end"]}]


def run_pretraining(ctx, res, check, schedule, medium_steps):
    """The stack's pt phase on the preset's model (gpu1 on a GPU; a 2-layer cpu one in the dry run), compiled on a GPU,
    in a child process within the check's box; one row: loss, val bpb, tok/s, MFU, compile, memory. The small stack
    trains over schedule(its stages); the medium (one stage) for medium_steps = (steps, batch tokens)."""
    stack, small, args = ctx["stack"], ctx["small"], ctx["args"]
    run_dir = os.path.join(args.out, check)
    preset = "cpu" if small else "gpu1"
    cfg = stack.parse_config(["--preset", preset, *(TINY_MODEL[args.stack] if small else [])])
    if hasattr(cfg, "stages"):  # the small stack: its schedule as data
        stages = schedule(cfg.stages)
        steps, n_train = sum(s["steps"] for s in stages), sum(s["steps"] * s["batch_tokens"] for s in stages)
        flags = ["--stages", json.dumps(stages)]
    else:  # the medium: one stage, the steps and batch the check asks for
        steps, batch = medium_steps
        n_train, flags = steps * batch, ["--train-tokens", str(steps * batch), "--batch-tokens", str(batch),
                                         "--lr-warmup-steps", "2", "--momentum-warmup", str(steps)]
    data = args.data_dir or synthetic_data(os.path.join(args.out, "synthetic-data"),
                                           1024 if small else ctx["shapes"]["vocab"], n_train + (1 << 20),
                                           1 << (17 if small else 21))
    cmd = [sys.executable, stack.__file__, "--preset", preset, "--data-dir", data, "--run-dir", run_dir, "--phases",
           "pt", *flags, "--val-every", str(steps // 2), "--checkpoint-every", "0",
           "--val-tokens", str(1 << (15 if small else 20)), "--log-every", "4", "--wandb", "disabled"]
    if small:
        cmd += [*TINY_MODEL[args.stack], "--no-compile"]
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    left = max(10, ctx["box"] - 5 - int(time.time() - ctx["check_started"]))
    label = f"{preset} model, {steps} steps"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        res.add(check, label, "timeout", f"after {left}s; output: {(e.stdout or b'')[-300:]!r}")
        return
    if proc.returncode != 0:
        res.add(check, label, "FAIL", (proc.stderr or proc.stdout)[-600:].replace("\n", " | "))
        return
    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    log = open(os.path.join(run_dir, "log.txt")).read()
    losses = [float(x) for x in re.findall(r"^(?:\[[\d:]+\] )?step \d+/\d+ loss (\S+)", log, re.M)]  # [h:mm:ss]
    mfu = [float(x) for x in re.findall(r" mfu (\S+)%", log)]
    falling = len(losses) >= 2 and losses[-1] < losses[0] - 1.0
    res.add(check, f"{label}, {m['train_tokens']:,} tokens", "ok" if falling and math.isfinite(m["val_bpb"]) else "FAIL",
            f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, val bpb {m['val_bpb']:.3f}, {m['tok_per_s']:,.0f} tok/s"
            + (f", mfu {mfu[-1]:.1f}%" if mfu else "") + f", compile {m['pt_compile_time_s']:.0f}s for "
            f"{m['pt_compile_graphs']} graphs, peak memory "
            + (f"{m['peak_memory_gib']:.1f} GiB" if m["peak_memory_gib"] else "n/a") + f", backend {m['attn_backend']}",
            tok_per_s=m["tok_per_s"], compile_s=m["pt_compile_time_s"], graphs=m["pt_compile_graphs"],
            peak_memory_gib=m["peak_memory_gib"], mfu=mfu[-1] if mfu else None)


def check_train(ctx, res):
    steps = 16 if ctx["small"] else ctx["args"].train_steps
    run_pretraining(ctx, res, "train", lambda stages: last_stage_schedule(stages, steps),
                    (steps, 4096 if ctx["small"] else 131072))  # medium: 4 forwards of 32,768 tokens a step


def check_warmup(ctx, res):
    steps = 6 if ctx["small"] else ctx["args"].warmup_steps
    run_pretraining(ctx, res, "warmup", lambda stages: short_schedule(stages, steps),
                    (4, 8192) if ctx["small"] else (6, 1 << 20))  # medium: a few of the preset's real steps


CHECKS = dict(environment=check_environment, train=check_train, kernels=check_kernels, fp8=check_fp8,
              attention=check_attention, kv_cache=check_kv_cache, decode=check_decode, warmup=check_warmup)


def main(argv=None):
    args = parse_args(argv)
    small = args.device == "cpu"
    if small:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run interpreted
    # before torch, the stack or a child reads them: offline (kernels.get_kernel would otherwise resolve FA3 over the
    # network), compile caches kept under --out for a rerun on the same machine
    cache = os.path.abspath(os.path.join(args.out, "cache"))
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor")),
                        ("TRITON_CACHE_DIR", os.path.join(cache, "triton"))):
        os.environ.setdefault(name, value)
    res = Results(os.path.join(args.out, "gpu_check.json"), args.device)
    try:
        import torch
        sys.path.insert(0, ROOT)
        from load_stack import load_stack
        stack = load_stack(None if args.stack == "small" else args.stack)  # small: DECODERSTACK_STACK may name a copy
    except Exception as e:  # e.g. a torch or triton without something the stack uses
        res.add("environment", "import the stack", "FAIL", f"{type(e).__name__}: {e}")
        print(res.table())
        sys.exit(f"gpu_check: the stack does not import here: {type(e).__name__}: {e}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --device cpu for a dry run)")
    only = [c for c in args.only.split(",") if c]
    if unknown := set(only) - set(CHECKS):
        sys.exit(f"gpu_check: unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    missing = [m for m in sorted({m for modules in NEEDS.values() for m in modules}) if importlib.util.find_spec(m) is None]
    ctx = dict(torch=torch, stack=stack, device=device, small=small, args=args, missing=missing, shapes=SHAPES[args.stack])
    for name in [c for c in CHECKS if c in only or not only]:
        ctx["check_started"], before = time.time(), len(res.rows)
        left = int(args.budget - (time.time() - res.started))
        ctx["box"] = BOXES[name] if name in RESERVED else min(BOXES[name], left)
        if lacking := [m for m in NEEDS.get(name, ()) if m in missing]:
            res.add(name, "all", "skip", f"needs {', '.join(lacking)}, not installed here")
        elif ctx["box"] < 10:
            res.add(name, "all", "skip", f"out of the --budget of {args.budget}s")
        else:
            try:
                in_box(ctx["box"], lambda: CHECKS[name](ctx, res))
            except Box as e:  # a box the budget shrank is "cut": the check did not get its time
                res.add(name, "time box", "timeout" if ctx["box"] == BOXES[name] else "cut",
                        str(e) + ("" if ctx["box"] == BOXES[name] else f" (its box is {BOXES[name]}s; --budget left less)"))
            except Exception as e:
                res.add(name, "raised", "FAIL", f"{type(e).__name__}: {str(e)[:400]}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        print(f"[{time.time() - res.started:5.0f}s] {name}: " + ", ".join(f"{r['item']} {r['status']}"
                                                                       for r in res.rows[before:]), flush=True)
    print(res.table())
    counts = {s: sum(r["status"] == s for r in res.rows) for s in ("ok", "FAIL", "skip", "timeout", "cut")}
    print(f"gpu_check: {counts['ok']} ok, {counts['FAIL']} failed, {counts['timeout']} timed out, {counts['skip']} skipped, "
          f"{counts['cut']} cut by the budget in {time.time() - res.started:.0f}s on {res.env.get('name', args.device)} "
          f"(results: {res.path})")
    sys.exit(1 if counts["FAIL"] or counts["timeout"] else 0)


if __name__ == "__main__":
    main()
