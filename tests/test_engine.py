"""The KV-cache engine: cached decoding reproduces the training forward (every feature, batch > 1), window-limited
cache reads, FA's flash_attn_with_kvcache through stand-ins with its exact signatures, sampling filters, batched
generation with per-row stops and calculator tool use, and the generate phase's CLI."""
import inspect
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, STACK_PATH, TINY_ARGS

VOCAB = 300


def make_model(stack, perturb=True, **overrides):
    """A small model whose every gate, lambda and table is nonzero, so a feature the cache mishandles shows."""
    cfg = dict(n_layers=4, model_dim=64, n_heads=2, head_dim=32, long_window_layers="3", value_embed_layers="0,2,3",
               bigram_rows_per_vocab=2.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(stack.Config(**cfg), VOCAB))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def forward_logits(stack, model, ids, windows):
    """The training forward of one document: logits (L, vocab)."""
    L = len(ids)
    cu = torch.full((128,), L, dtype=torch.int32)
    cu[0] = 0
    prev = torch.cat([torch.tensor([-1]), ids[:-1]])
    with torch.no_grad():
        return model.logits(model.hidden(stack.Batch(ids, prev, torch.arange(L), None, cu, L), windows, "sdpa"))


def cpu_rt(stack):
    return stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")


# ---- the cache reproduces the training forward --------------------------------------------------------------------

CASES = {
    "tied, short windows": dict(windows=[3, 7, 5, 20]),
    "untied, YaRN-grown, short windows": dict(windows=[4, 9, 3, 40], untie=True, yarn=True),
    "full causal windows": dict(windows=[None, None, None, None], untie=True),
    "no value embeddings": dict(windows=[6, 6, 6, 30], value_embed_layers=""),
}


@pytest.mark.parametrize("static", [False, True], ids=["sliced", "static"])  # static: the engine's compiled steps' reads
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_equals_training_forward(stack, case, static):
    spec = dict(CASES[case])
    windows = spec.pop("windows")
    model = make_model(stack, **({"value_embed_layers": spec.pop("value_embed_layers")} if "value_embed_layers" in spec else {}))
    if spec.get("yarn"):
        model.grow_window(16, 48)
        assert model.scale != stack.Config().attn_scale
    if spec.get("untie"):
        model.untie()
        with torch.no_grad():
            model.embed.add_(torch.randn_like(model.embed) * 0.05)  # different from lm_head, so using the wrong one shows
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (70,))
    ref = forward_logits(stack, model, ids, windows)
    cache = stack.KVCache(model, 1, 70, "cpu", torch.float32, static=static)
    with torch.no_grad():
        got = [model.decode(ids[None, :1], cache, windows)[0], model.decode(ids[None, 1:18], cache, windows)[0]]
        got += [model.decode(ids[None, t:t + 1], cache, windows)[0] for t in range(18, 70)]
    torch.testing.assert_close(torch.cat(got), ref, atol=2e-5, rtol=1e-5)
    assert cache.host_lengths == [70] and cache.lengths.tolist() == [70] and cache.last_ids.tolist() == [int(ids[-1])]


def test_features_are_active_so_the_comparison_can_fail(stack):
    """Dropping the previous token (smear, bigram) or a position error (RoPE is relative: a jump, not a shift) changes
    the logits: the equality above is not vacuous."""
    model = make_model(stack)
    windows = [3, 7, 5, 20]
    ids = torch.randint(0, VOCAB, (30,))
    L = len(ids)
    cu = torch.full((128,), L, dtype=torch.int32)
    cu[0] = 0
    prev = torch.cat([torch.tensor([-1]), ids[:-1]])
    with torch.no_grad():
        base = model.hidden(stack.Batch(ids, prev, torch.arange(L), None, cu, L), windows, "sdpa")
        no_prev = model.hidden(stack.Batch(ids, torch.full_like(prev, -1), torch.arange(L), None, cu, L), windows, "sdpa")
        jump = model.hidden(stack.Batch(ids, prev, torch.arange(L) + 5 * (torch.arange(L) >= 15), None, cu, L), windows, "sdpa")
    assert (base - no_prev).abs().max() > 1e-2 and (base[15:] - jump[15:]).abs().max() > 1e-3


def test_batch_rows_of_different_lengths_equal_their_own_forward(stack):
    """Rows prefilled alone, then decoded together (rows leave as they end); each row's logits equal its own training
    forward and the packed forward of all rows."""
    model = make_model(stack)
    model.untie()
    windows = [4, 9, 3, 40]
    torch.manual_seed(2)
    prompts, totals = [5, 23, 40], [60, 45, 70]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in totals]
    cache = stack.KVCache(model, 3, max(totals), "cpu", torch.float32)
    got = [[] for _ in seqs]
    with torch.no_grad():
        for row, (seq, p) in enumerate(zip(seqs, prompts)):
            alone = stack.KVCache(model, 1, p, "cpu", torch.float32)
            got[row].append(model.decode(seq[None, :p], alone, windows)[0])
            cache.put(row, alone)
        rows = [0, 1, 2]
        while rows:
            feed = torch.stack([seqs[r][cache.host_lengths[i]] for i, r in enumerate(rows)])[:, None]
            logits = model.decode(feed, cache, windows)
            for i, r in enumerate(rows):
                got[r].append(logits[i])
            keep = [i for i, r in enumerate(rows) if cache.host_lengths[i] < totals[r]]
            if len(keep) < len(rows):
                cache.keep(keep)
                rows = [rows[i] for i in keep]
        h, _, starts = stack.packed_hidden(model, [s.numpy() for s in seqs], cpu_rt(stack), windows)
        packed = model.logits(h)
    for r, seq in enumerate(seqs):
        ref = forward_logits(stack, model, seq, windows)
        torch.testing.assert_close(torch.cat(got[r]), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(packed[starts[r]:starts[r + 1]], ref, atol=2e-5, rtol=1e-5)


def test_cache_reads_only_the_window(stack):
    """Entries older than every layer's window are never read: NaN there leaves decoding exact."""
    model = make_model(stack)
    windows = [4, 6, 4, 8]
    ids = torch.randint(0, VOCAB, (60,))
    cache = stack.KVCache(model, 1, 60, "cpu", torch.float32)
    with torch.no_grad():
        model.decode(ids[None, :50], cache, windows)
        for layer in cache.k + cache.v:
            layer[:, :50 - 9] = float("nan")
        got = torch.cat([model.decode(ids[None, t:t + 1], cache, windows)[0] for t in range(50, 60)])
    torch.testing.assert_close(got, forward_logits(stack, model, ids, windows)[50:], atol=2e-5, rtol=1e-5)


def test_full_cache_is_an_error(stack):
    model = make_model(stack, perturb=False)
    cache = stack.KVCache(model, 1, 4, "cpu", torch.float32)
    with torch.no_grad():
        model.decode(torch.zeros(1, 4, dtype=torch.long), cache, [None] * 4)
        with pytest.raises(ValueError, match="KV cache full"):
            model.decode(torch.zeros(1, 1, dtype=torch.long), cache, [None] * 4)


# ---- FlashAttention's flash_attn_with_kvcache through stand-ins with its exact signatures ---------------------------
E = inspect.Parameter.empty
# Dao-AILab/flash-attention flash_attn/flash_attn_interface.py (FA2) and hopper/flash_attn_interface.py (FA3)
FA2_KVCACHE = [("q", E), ("k_cache", E), ("v_cache", E), ("k", None), ("v", None), ("rotary_cos", None),
               ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
               ("block_table", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
               ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
               ("return_softmax_lse", False)]
FA3_KVCACHE = [("q", E), ("k_cache", E), ("v_cache", E), ("k", None), ("v", None), ("qv", None), ("rotary_cos", None),
               ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
               ("page_table", None), ("cu_seqlens_q", None), ("cu_seqlens_k_new", None), ("max_seqlen_q", None),
               ("rotary_seqlens", None), ("q_descale", None), ("k_descale", None), ("v_descale", None),
               ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("attention_chunk", 0),
               ("softcap", 0.0), ("rotary_interleaved", True), ("scheduler_metadata", None), ("num_splits", 0),
               ("pack_gqa", None), ("sm_margin", 0), ("return_softmax_lse", False)]


def kvcache_answer(calls, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, num_splits):
    """What FA requires and the answer it gives (by explicit per-row attention). We call it read-only (k, v None: the
    new keys are in the cache, cache_seqlens counting them): its op declares no mutation of the cache. Traced (a
    compiled step), FA3's fake implementation refuses num_splits <= 0; these stand-ins refuse it for both."""
    B, S, H, D = q.shape
    assert k is None and v is None, "an append inside FA's op would be lost under CUDA graphs (mutates_args=())"
    if torch.compiler.is_compiling() and num_splits <= 0:
        raise RuntimeError("tracing (torch.compile/torch.export) with num_splits <= 0 not supported")
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (torch.bfloat16, torch.float16)
    assert k_cache.shape[0] == B and k_cache.shape[2:] == (H, D)
    assert q.is_contiguous() and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (B,)
    assert causal is True and softmax_scale is not None
    assert isinstance(window_size, tuple) and window_size[1] == 0 and window_size[0] >= -1
    calls.append(window_size)
    out = torch.empty_like(q)
    for b in range(B):
        n = int(cache_seqlens[b]) - S  # keys before the new tokens (the causal mask aligns to the bottom right)
        i = n + torch.arange(S)[:, None]
        j = torch.arange(n + S)[None, :]
        allowed = (j <= i) & ((i - j <= window_size[0]) if window_size[0] >= 0 else True)
        scores = torch.einsum("shd,thd->hst", q[b].float(), k_cache[b, :n + S].float()) * softmax_scale
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[b] = torch.einsum("hst,thd->shd", p, v_cache[b, :n + S].float()).to(q.dtype)
    return out


def kvcache_standins(calls):
    def fa2(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
            return_softmax_lse=False):
        assert rotary_cos is None and cache_batch_idx is None and block_table is None and softcap == 0.0
        return kvcache_answer(calls, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size,
                              num_splits)

    def fa3(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
            cache_batch_idx=None, cache_leftpad=None, page_table=None, cu_seqlens_q=None, cu_seqlens_k_new=None,
            max_seqlen_q=None, rotary_seqlens=None, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
            causal=False, window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
            scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0, return_softmax_lse=False):
        assert qv is None and rotary_cos is None and page_table is None and cu_seqlens_q is None and softcap == 0.0
        return kvcache_answer(calls, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size,
                              num_splits)

    return {"fa2": fa2, "fa3": fa3}


def test_kvcache_standins_have_fas_exact_signatures():
    for name, params in (("fa2", FA2_KVCACHE), ("fa3", FA3_KVCACHE)):
        got = [(p.name, p.default) for p in inspect.signature(kvcache_standins([])[name]).parameters.values()]
        assert got == params, name


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_flash_kvcache_decoding_matches_sdpa(stack, monkeypatch, backend):
    calls = []
    monkeypatch.setitem(stack._FLASH, backend, types.SimpleNamespace(flash_attn_with_kvcache=kvcache_standins(calls)[backend]))
    model = make_model(stack)
    windows = [4, None, 3, 20]
    ids = torch.randint(0, VOCAB, (2, 30))
    outs = {}
    for name, dtype in ((backend, torch.bfloat16), ("sdpa", torch.float32)):
        cache = stack.KVCache(model, 2, 30, "cpu", dtype, name)
        with torch.no_grad():
            outs[name] = torch.cat([model.decode(ids[:, :12], cache, windows)] +
                                   [model.decode(ids[:, t:t + 1], cache, windows) for t in range(12, 30)], dim=1)
    assert set(calls) == {(4, 0), (-1, 0), (3, 0), (20, 0)}
    torch.testing.assert_close(outs[backend], outs["sdpa"], atol=0.1, rtol=0.02)  # bf16 keys/values
    assert (outs[backend] - outs["sdpa"]).abs().mean() < 0.01


# ---- sampling --------------------------------------------------------------------------------------------------------

def draws(stack, logits, n=2000, **kw):
    g = torch.Generator().manual_seed(0)
    return torch.stack([stack.sample_next(logits, g, **kw) for _ in range(n // len(logits))]).flatten()


def test_sampling_filters(stack):
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]])
    logits = probs.log()
    assert stack.sample_next(logits, None, temperature=0).tolist() == [0]
    assert set(draws(stack, logits, top_k=1).tolist()) == {0}
    assert set(draws(stack, logits, top_k=3).tolist()) == {0, 1, 2}
    assert set(draws(stack, logits, min_p=0.4).tolist()) == {0, 1}  # keeps p >= 0.4 * 0.5
    assert set(draws(stack, logits, top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.75
    assert set(draws(stack, logits, top_p=0.5).tolist()) == {0}
    counts = torch.bincount(draws(stack, logits, n=20000), minlength=5) / 20000
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)
    sharp = torch.bincount(draws(stack, logits, n=20000, temperature=0.5), minlength=5) / 20000
    assert sharp[0] > 0.6  # p^2 renormalised: 0.25 / 0.3594 = 0.70


def test_no_accepted_sampling_value_fails(stack):
    """A temperature between 0 and fp32's smallest divided the logits into inf - inf (a NaN draw that failed the
    whole step): below MIN_TEMPERATURE a draw is greedy. min_p 1 and a tiny top_p keep the most likely token."""
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-300, 1e-46, 1e-45, stack.MIN_TEMPERATURE / 2):
        assert torch.equal(stack.sample_next(logits, g, temperature=temperature), logits.argmax(-1))
    assert torch.equal(stack.sample_next(logits, g, min_p=1.0), logits.argmax(-1))
    assert torch.equal(stack.sample_next(logits, g, top_p=1e-9, top_k=5), logits.argmax(-1))


def test_sampling_is_seeded_and_per_row(stack):
    logits = torch.zeros(8, 50)
    a = stack.sample_next(logits, torch.Generator().manual_seed(3))
    b = stack.sample_next(logits, torch.Generator().manual_seed(3))
    c = stack.sample_next(logits, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and len(set(a.tolist())) > 1


# ---- the engine ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(stack, tok_dir):
    return stack.Tokenizer(tok_dir)


def test_greedy_generation_equals_argmax_of_the_full_forward(stack, tok):
    """Batched greedy decoding of prompts of different lengths: every token is the argmax of the training forward
    over its prompt and the tokens before it."""
    model = make_model(stack)
    engine = stack.Engine(model, tok, [4, 9, 3, 40], cpu_rt(stack))
    engine.stops = set()  # a random model may hit a stop token early: generate the full length
    prompts = [[tok.bos_id, *tok.encode("The quick brown fox")], [tok.bos_id, 5], [tok.bos_id, *tok.encode("import os and sys and json")]]
    prompts = [[t % VOCAB for t in p] for p in prompts]  # our tiny model's vocab
    out = engine.generate(prompts, 1, max_new_tokens=12, temperature=0)
    for prompt, (sample,) in zip(prompts, out):
        assert len(sample.tokens) == 12 and sample.mask == [1] * 12
        seq = torch.tensor(prompt + sample.tokens)
        logits = forward_logits(stack, model, seq, [4, 9, 3, 40])
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == sample.tokens


@pytest.mark.parametrize("max_rows", [0, 3, 1])
def test_continuous_batching_decodes_each_sample_as_alone(stack, tok, monkeypatch, max_rows):
    """Five prompts, two samples each, greedy, with stops: with every sample in its own row from the start (0),
    three rows (samples join as others stop) or one, every sample is the argmax continuation of its own prompt,
    stopping where the model first emits a stop token. With three rows a sample starts while another is mid-sample."""
    model = make_model(stack)
    windows = [4, 9, 3, 40]
    engine = stack.Engine(model, tok, windows, cpu_rt(stack))
    torch.manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 17, 1, 9, 30)]
    greedy = []
    for prompt in prompts:  # each prompt's greedy continuation from the training forward, one token at a time
        seq = list(prompt)
        while len(seq) < len(prompt) + 10:
            seq.append(int(forward_logits(stack, model, torch.tensor(seq), windows)[-1].argmax()))
        greedy.append(seq[len(prompt):])
    engine.stops = {greedy[0][3], greedy[1][1], greedy[3][6]} - set(greedy[4])  # some stop early, one runs to the end
    sizes, steps = [], {}  # batch size of every step; sample -> (step of its first token, step of its last)
    sample_next = stack.sample_next
    monkeypatch.setattr(stack, "sample_next", lambda logits, *a: sizes.append(len(logits)) or sample_next(logits, *a))
    record = lambda i, t: steps.__setitem__(i, (steps.get(i, (len(sizes),))[0], len(sizes)))
    out = engine.generate(prompts, 2, max_new_tokens=10, temperature=0, max_rows=max_rows, on_token=record)
    for prompt, want, pair in zip(prompts, greedy, out):
        stop = next((k for k, t in enumerate(want) if t in engine.stops), None)
        expected = want if stop is None else want[:stop + 1]
        for sample in pair:
            assert sample.tokens == expected and sample.stopped == (stop is not None)
    lengths = [len(s.tokens) for pair in out for s in pair]
    assert min(lengths) < 5 and max(lengths) == 10
    assert sizes[0] == (max_rows or 10) and sizes == sorted(sizes, reverse=True)  # the cache only shrinks,
    assert all(n & (n - 1) == 0 for n in sizes if n != sizes[0]) and (len(set(sizes)) > 1 or max_rows)  # to powers of 2
    if max_rows == 3:
        joined = [i for i in range(2, 10) if any(steps[j][0] < steps[i][0] <= steps[j][1] for j in range(10) if j != i)]
        assert joined and sorted(steps, key=lambda i: steps[i][0]) == list(range(10))


def test_compiled_step_decodes_the_same_tokens(stack, tok):
    """torch.compile'd decode steps (static shapes, one graph per batch size) sample exactly the eager tokens."""
    model = make_model(stack)
    prompts = [[1, 2, 3], [4] * 20, [5, 6]]
    runs = []
    for compile in (False, True):
        engine = stack.Engine(model, tok, [4, 9, 3, 40], cpu_rt(stack), compile=compile)
        engine.stops = {7, 9}
        runs.append([[s.tokens for s in pair] for pair in engine.generate(prompts, 3, 12, temperature=1.0, top_k=20, seed=3)])
    assert runs[0] == runs[1] and len({len(t) for pair in runs[0] for t in pair}) > 1


def traced_mutations(stack, model, cache, windows, ids):
    """(inputs the compiled decode step mutates, those of them static) as inductor sees them before it builds a CUDA
    graph (cudagraph_utils.check_for_mutation reads the same fw_metadata): an AOT backend records them."""
    from torch._dynamo.backends.common import aot_autograd
    seen = []

    def forward(gm, example_inputs):
        meta = torch._guards.TracingContext.get().fw_metadata
        mutated = {i for i, info in enumerate(meta.input_info) if info.mutates_data or info.mutates_metadata}
        seen.append((mutated, mutated & set(meta.static_input_indices)))
        return gm

    torch._dynamo.reset()
    step = torch.compile(stack.decode_logits, backend=aot_autograd(fw_compiler=forward))
    with torch.no_grad():
        logits = model.decode(ids, cache, windows, last_only=True, step=step)
    return seen, logits


def test_compiled_decode_step_mutates_only_static_inputs(stack):
    """The compiled step writes each layer's keys and values into the cache; CUDA graphs (reduce-overhead) apply only
    if every mutated input has a static address. Checked for a fresh static cache and after it grows and shrinks
    (new tensors, marked again); the step's logits are the eager step's."""
    model = make_model(stack)
    windows = [4, None, 3, 20]
    cache = stack.KVCache(model, 2, 32, "cpu", torch.float32, "sdpa", static=True)
    eager = stack.KVCache(model, 2, 32, "cpu", torch.float32, "sdpa")
    with torch.no_grad():
        for c in (cache, eager):
            model.decode(torch.tensor([[1, 2, 3], [4, 5, 6]]), c, windows)
    for resize in (None, lambda c: c.grow(2), lambda c: c.keep([0, 2])):
        if resize:
            resize(cache)
            resize(eager)
        ids = torch.arange(len(cache.host_lengths))[:, None] + 7
        seen, logits = traced_mutations(stack, model, cache, windows, ids)
        assert seen and all(len(mutated) == 2 * 4 and static == mutated for mutated, static in seen), seen
        with torch.no_grad():
            torch.testing.assert_close(logits, model.decode(ids, eager, windows, last_only=True))
    plain = stack.KVCache(model, 2, 32, "cpu", torch.float32, "sdpa")  # a cache for eager steps marks nothing
    seen, _ = traced_mutations(stack, model, plain, windows, torch.tensor([[1], [2]]))
    assert seen and all(static == set() for _, static in seen)


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_compiled_flash_decoding_reads_the_cache_with_one_split(stack, monkeypatch, backend):
    """Traced, FA3's fake refuses num_splits <= 0 (its heuristic; so do the stand-ins): a compiled step calls FA
    read-only with num_splits 1 and gives the eager step's logits; a call with 0 under compile is refused."""
    calls = []
    standin = kvcache_standins(calls)[backend]
    monkeypatch.setitem(stack._FLASH, backend, types.SimpleNamespace(flash_attn_with_kvcache=standin))
    model = make_model(stack)
    windows = [4, None, 3, 20]
    rt = stack.Runtime(torch.device("cpu"), torch.bfloat16, 0, 1, backend)
    caches = [stack.KVCache(model, 2, 16, "cpu", torch.bfloat16, backend, static=s) for s in (False, True)]
    torch._dynamo.reset()
    step = torch.compile(stack.decode_logits)
    out = []
    with torch.no_grad(), stack.autocast(rt):
        for cache, fn in zip(caches, (None, step)):
            model.decode(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache, windows)
            out.append(model.decode(torch.tensor([[7], [8]]), cache, windows, last_only=True, step=fn))
    torch.testing.assert_close(out[1], out[0], atol=0.05, rtol=0.02)  # bf16, compiled vs eager
    assert calls and set(calls) == {(4, 0), (-1, 0), (3, 0), (20, 0)}

    def zero_splits(q, k_cache, v_cache, lengths):
        return standin(q, k_cache, v_cache, cache_seqlens=lengths, softmax_scale=1.0, causal=True, window_size=(-1, 0),
                       num_splits=0)

    q = torch.zeros(1, 1, 2, 32, dtype=torch.bfloat16)
    cache = torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16)
    zero_splits(q, cache, cache, torch.tensor([1], dtype=torch.int32))  # eager: the heuristic is fine
    torch._dynamo.reset()
    with pytest.raises(Exception, match="num_splits <= 0 not supported"):
        torch.compile(zero_splits, fullgraph=True)(q, cache, cache, torch.tensor([1], dtype=torch.int32))


def test_each_sample_draws_its_own_tokens_and_seeds_repeat(stack, tok):
    model = make_model(stack)
    engine = stack.Engine(model, tok, [None] * 4, cpu_rt(stack))
    engine.stops = set()
    run = lambda seed: [s.tokens for s in engine.generate([[1, 2, 3]], 8, max_new_tokens=5, temperature=1.0, seed=seed)[0]]
    first = run(0)
    assert len({t[0] for t in first}) > 1  # rows share the prefill but not the first draw
    assert run(0) == first and run(1) != first


def test_engine_tool_use_and_per_row_stops(stack, tok, monkeypatch):
    """Three rows decode together: A calls the calculator (its result is forced, mask 0, and fed to the model) then
    ends with <|assistant_end|>; B makes a refused call (nothing forced) and ends with <|bos|>; C never stops and runs
    into max_new_tokens. Each row's script is keyed by its prompt's first token and indexed by position. A finished
    row stays in the batch (masked) until at most half the rows are live, then the cache shrinks to a power of two."""
    sp = tok.special
    call = [sp("<|python_start|>"), *tok.encode("12+3"), sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *tok.encode("15"), sp("<|output_end|>")]
    answer = [*tok.encode(" so 15"), sp("<|assistant_end|>")]
    refused = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>"), tok.bos_id]
    a_full = call + forced + answer  # what row A's sequence holds after the prompt (forced tokens included)
    prompts = [[1, 5], [2, 5], [3, 5]]
    scripts = {1: a_full, 2: refused, 3: [42] * 100}

    class Model:  # records what it is fed; its logits are ignored: sample_next below plays the scripts
        cfg = stack.Config(n_layers=1, n_heads=1, head_dim=2)
        fed = []

        def decode(self, ids, cache, windows, last_only=False, step=None):
            cache.advance(ids)
            self.fed.append(ids[:, -1].tolist())
            return torch.zeros(len(ids), 1, tok.vocab_size)

    model = Model()
    engine = stack.Engine(model, tok, [None], cpu_rt(stack))
    step, active, sizes = [0], [0, 1, 2], []  # decode steps so far; which prompt each cache row serves
    keep = stack.KVCache.keep

    def tracked_keep(cache, rows):
        active[:] = [active[i] for i in rows]
        keep(cache, rows)

    def scripted_sample(logits, generator, *args):
        assert len(logits) == len(active)
        sizes.append(len(active))
        step[0] += 1
        # a finished row's draw is ignored (it decodes junk until the batch shrinks)
        return torch.tensor([(scripts[prompts[r][0]] + [0] * 100)[step[0] - 1] for r in active])

    monkeypatch.setattr(stack.KVCache, "keep", tracked_keep)
    monkeypatch.setattr(stack, "sample_next", scripted_sample)
    out = engine.generate(prompts, 1, max_new_tokens=len(a_full) + 3)
    (a,), (b,), (c,) = out
    assert a.tokens == a_full and a.stopped
    assert a.mask == [1] * len(call) + [0] * len(forced) + [1] * len(answer)
    assert b.tokens == refused and b.stopped and b.mask == [1] * len(refused)
    assert c.tokens == [42] * (len(a_full) + 3) and not c.stopped
    # the prompts but their last tokens are prefilled (one row each), then every step feeds every row: first the
    # prompts' last tokens, then what each row sampled or was forced
    assert model.fed[:4] == [[1], [2], [3], [5, 5, 5]]
    fed_a = [step_fed[0] for step_fed in model.fed[4:4 + len(a_full) - 1]]
    assert fed_a == a_full[:-1]  # forced tokens go through the model like sampled ones; the stop token does not:
    assert model.fed[4 + len(a_full) - 1] == [42]  # after it only C is left
    # B stopped first and stayed (masked) while two rows were live; one live row (C) is one row
    assert sizes == [3] * len(a_full) + [1] * 3 and active == [2]
