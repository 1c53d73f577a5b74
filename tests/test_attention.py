"""Attention over packed documents: every backend against the per-document reference, the document/causal/window
mask, the SDPA backward, the FlashAttention call (through stand-ins with FA's exact varlen signatures) and the
backend selection."""
import inspect
import types

import numpy as np
import pytest
import torch

WINDOWS = [None, -1, 0, 1, 7, 1000]
# (document lengths, padding entries, heads, head dim); 0-length documents and padding repeat the last offset
LAYOUTS = [
    ([5, 17, 1, 30, 11], 3, 3, 16),
    ([40], 2, 2, 32),
    ([64], 0, 1, 16),
    ([10, 0, 20], 1, 2, 16),
]
# the mask tests run flex_attention eagerly on purpose (fast on tiny inputs); torch warns that it isn't compiled
eager_flex = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def packed(lengths, pad, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=g).to(dtype) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist() + [T] * pad, dtype=torch.int32)
    return q, k, v, cu


@eager_flex
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"docs{l[0]}-pad{l[1]}-H{l[2]}-D{l[3]}")
def test_sdpa_and_flex_match_reference(stack, layout, window):
    q, k, v, cu = packed(*layout)
    scale = layout[3] ** -0.5
    ref = stack.attention_reference(q, k, v, cu, window, scale)
    max_seqlen = max(layout[0])
    sdpa = stack.attention(q, k, v, cu, max_seqlen, window, scale, "sdpa")
    assert sdpa.shape == q.shape and sdpa.is_contiguous()
    torch.testing.assert_close(sdpa, ref, atol=1e-5, rtol=0)
    # flex eagerly (its compiled form is the slow test below): the same block mask, the same mask_mod
    w = q.size(0) if window is None or window < 0 else window
    flex = stack._flex_attention(q, k, v, stack.flex_block_mask(cu, q.size(0), w), scale)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_flex_matches_reference(stack):
    q, k, v, cu = packed(*LAYOUTS[0])
    for window in (None, 7, 2):  # a new window recompiles once, then stays dynamic
        ref = stack.attention_reference(q, k, v, cu, window, 0.3)
        torch.testing.assert_close(stack.attention(q, k, v, cu, 30, window, 0.3, "flex"), ref, atol=1e-5, rtol=0)


def flex_hidden(stack, compiled, monkeypatch):
    """GPT.hidden of a packed batch over flex (eager or compiled) and over SDPA, counting create_block_mask calls."""
    from test_engine import make_model
    model, windows, calls = make_model(stack), [4, 9, 4, 9], []
    real = stack.create_block_mask
    monkeypatch.setattr(stack, "create_block_mask", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    if not compiled:
        monkeypatch.setattr(stack, "_compiled_flex", lambda: (stack.flex_block_mask, stack._flex_attention))
    torch._dynamo.reset()
    batch, _ = stack.pack_sequences([np.arange(1, 30) % 50, np.arange(5, 45) % 50, np.arange(7, 20)], "cpu")
    with torch.no_grad():
        return model.hidden(batch, windows, "flex"), model.hidden(batch, windows, "sdpa"), calls


@eager_flex
def test_flex_builds_one_block_mask_per_window_per_forward(stack, monkeypatch):
    """Four layers, two distinct windows: two BlockMasks per forward (built in every layer, flex evaluated the mask
    over every (query, key) pair four times), the layers' outputs those of SDPA."""
    flex, sdpa, calls = flex_hidden(stack, False, monkeypatch)
    assert len(calls) == 2
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_flex_hidden_equals_eager(stack, monkeypatch):
    flex, sdpa, _ = flex_hidden(stack, True, monkeypatch)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


def test_reference_mask_by_hand(stack):
    q, k, v, cu = packed([4, 6], 1, 2, 16)
    # window 0: each query sees only itself, so the output is its own value
    torch.testing.assert_close(stack.attention_reference(q, k, v, cu, 0, 0.5), v, atol=1e-6, rtol=0)
    # window 1, second token of a document: softmax over itself and the token before
    out = stack.attention_reference(q, k, v, cu, 1, 0.5)
    s = torch.stack([(q[5] * k[4]).sum(-1), (q[5] * k[5]).sum(-1)]) * 0.5
    p = s.softmax(0)
    torch.testing.assert_close(out[5], p[0, :, None] * v[4] + p[1, :, None] * v[5], atol=1e-6, rtol=0)


@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_backward_matches_reference(stack, window):
    q, k, v, cu = packed([9, 14, 1, 8], 2, 2, 16, seed=1)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (lambda *a: stack.attention(*a[:4], 14, *a[4:], "sdpa"), stack.attention_reference):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        (fn(*leaves, cu, window, 0.25) * grad_out).sum().backward()
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads):
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window,block", [(None, 8), (0, 8), (3, 4), (7, 16), (25, 8)])
def test_banded_sdpa_matches_reference(stack, window, block):
    """The blocked path (queries in blocks that see only their band of keys), forward and backward, with documents
    crossing block edges, an empty document and padding; the band reach is the window or the longest document."""
    lengths = [5, 17, 1, 30, 0, 11, 26]
    q, k, v, cu = packed(lengths, 3, 2, 16, seed=3)
    T, max_seqlen = q.size(0), max(lengths)
    w = T if window is None else window
    reach = min(w, max_seqlen - 1)
    assert block + reach < T  # the banded path, not the dense one
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    results = []
    for fn in (lambda q, k, v: stack._sdpa_attention(q, k, v, cu, w, 0.25, reach, block=block),
               lambda q, k, v: stack.attention_reference(q, k, v, cu, window, 0.25)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        (out * grad_out).sum().backward()
        results.append([out] + [x.grad for x in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@eager_flex
@pytest.mark.parametrize("impl", ["sdpa", "flex", "reference"])
def test_no_leak_across_documents_or_from_the_future(stack, impl):
    lengths = [12, 15, 9]
    q, k, v, cu = packed(lengths, 2, 2, 16)
    window = 4
    run = {
        "sdpa": lambda k, v: stack.attention(q, k, v, cu, 15, window, 0.3, "sdpa"),
        "flex": lambda k, v: stack._flex_attention(q, k, v, stack.flex_block_mask(cu, q.size(0), window), 0.3),
        "reference": lambda k, v: stack.attention_reference(q, k, v, cu, window, 0.3),
    }[impl]
    base = run(k, v)
    k2, v2 = k.clone(), v.clone()
    k2[12:27] += 3.0  # every key and value of document 1
    v2[12:27] -= 2.0
    out = run(k2, v2)
    assert torch.equal(out[:12], base[:12]) and torch.equal(out[27:], base[27:])
    assert (out[12:27] - base[12:27]).abs().amax(dim=(1, 2)).min() > 1e-3  # every token of document 1 moved
    k3, v3 = k.clone(), v.clone()
    k3[20] += 3.0  # one token: only itself and the next `window` queries of its document can see it
    v3[20] -= 2.0
    changed = (run(k3, v3) - base).abs().amax(dim=(1, 2)) > 0
    assert changed.nonzero().flatten().tolist() == list(range(20, 20 + window + 1))


# ---- FlashAttention through stand-ins with FA's exact varlen signatures -------------------------------------------
E = inspect.Parameter.empty
# Dao-AILab/flash-attention flash_attn/flash_attn_interface.py (FA2) and hopper/flash_attn_interface.py (FA3)
FA2_PARAMS = [("q", E), ("k", E), ("v", E), ("cu_seqlens_q", E), ("cu_seqlens_k", E), ("max_seqlen_q", E),
              ("max_seqlen_k", E), ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
              ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
              ("return_attn_probs", False), ("block_table", None)]
FA3_PARAMS = [("q", E), ("k", E), ("v", E), ("cu_seqlens_q", E), ("cu_seqlens_k", E), ("max_seqlen_q", E),
              ("max_seqlen_k", E), ("seqused_q", None), ("seqused_k", None), ("softmax_scale", None),
              ("causal", False), ("qv", None), ("q_descale", None), ("k_descale", None), ("v_descale", None),
              ("window_size", (-1, -1)), ("attention_chunk", 0), ("softcap", 0.0), ("num_splits", 1),
              ("pack_gqa", None), ("deterministic", False), ("sm_margin", 0), ("return_attn_probs", False)]


def fa_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, window, scale):
    """FA's varlen answer when a sequence has more keys than queries (n > m): causal=True and the window are aligned
    to the bottom right, query i seeing keys i + n - m - window <= j <= i + n - m (FA2 >= 2.1, FA3)."""
    outs = []
    for (qa, qb), (ka, kb) in zip(zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()),
                                  zip(cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist())):
        if qb == qa:
            continue
        m, n = qb - qa, kb - ka
        i, j = torch.arange(m)[:, None] + n - m, torch.arange(n)[None, :]
        allowed = (j <= i) & ((i - j <= window) if window is not None else True)
        scores = torch.einsum("mhd,nhd->hmn", q[qa:qb].float(), k[ka:kb].float()) * scale
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hmn,nhd->mhd", p, v[ka:kb].float()))
    return torch.cat(outs)


def check_call(stack, calls, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               window_size):
    """What FA requires of its inputs, then the answer FA would give, computed by the reference. calls gets the
    window, or (window, "kv") for a call whose sequences have more keys than queries (branches of a prefix)."""
    for cu in (cu_seqlens_q, cu_seqlens_k):
        assert cu.dtype == torch.int32 and cu.is_contiguous() and cu.dim() == 1 and len(cu) == len(cu_seqlens_q)
    assert max_seqlen_q >= int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    assert max_seqlen_k >= int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    for x, cu in ((q, cu_seqlens_q), (k, cu_seqlens_k), (v, cu_seqlens_k)):
        assert x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 3 and x.is_contiguous()
        assert x.shape[1:] == q.shape[1:] and x.size(0) == int(cu[-1]) and x.dtype == q.dtype
    assert causal is True and softmax_scale is not None
    assert isinstance(window_size, tuple) and len(window_size) == 2 and window_size[1] == 0 and window_size[0] >= -1
    window = None if window_size[0] < 0 else window_size[0]
    if torch.equal(cu_seqlens_q, cu_seqlens_k):
        calls.append(window_size)
        return stack.attention_reference(q.float(), k.float(), v.float(), cu_seqlens_q, window, softmax_scale).to(q.dtype)
    calls.append((window_size, "kv"))
    return fa_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, window, softmax_scale).to(q.dtype)


def make_standins(stack, calls, fa3_returns_lse):
    def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                   deterministic=False, return_attn_probs=False, block_table=None):
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and not return_attn_probs
        assert block_table is None
        return check_call(stack, calls, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_size)

    def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
                   softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
                   window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                   deterministic=False, sm_margin=0, return_attn_probs=False):
        assert seqused_q is None and seqused_k is None and qv is None and attention_chunk == 0 and softcap == 0.0
        out = check_call(stack, calls, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, window_size)
        lse = torch.zeros(q.size(1), q.size(0))
        return (out, lse) if fa3_returns_lse else out  # older FA3 builds always return the log-sum-exp too

    return {"fa2": fa2_varlen, "fa3": fa3_varlen}


def test_standins_have_fas_exact_signatures(stack):
    standins = make_standins(stack, [], False)
    for name, params in (("fa2", FA2_PARAMS), ("fa3", FA3_PARAMS)):
        got = [(p.name, p.default) for p in inspect.signature(standins[name]).parameters.values()]
        assert got == params, name


@pytest.mark.parametrize("backend,fa3_returns_lse", [("fa2", False), ("fa3", False), ("fa3", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_backends_call_fa_correctly(stack, monkeypatch, backend, fa3_returns_lse, dtype):
    calls = []
    standin = make_standins(stack, calls, fa3_returns_lse)[backend]
    monkeypatch.setitem(stack._FLASH, backend, types.SimpleNamespace(flash_attn_varlen_func=standin))
    lengths = [5, 17, 1, 30, 11]
    q, k, v, cu = packed(lengths, 3, 2, 16, dtype=dtype)
    for window, passed in [(None, (-1, 0)), (-1, (-1, 0)), (0, (0, 0)), (7, (7, 0)), (1000, (-1, 0))]:
        out = stack.attention(q, k, v, cu, 30, window, 0.25, backend)
        assert calls[-1] == passed
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out, stack.attention_reference(q, k, v, cu, window, 0.25), atol=0, rtol=0)
    # non-contiguous inputs and int64 offsets are made FA-ready, not passed through
    q_strided = torch.cat([q, q], dim=-1)[..., :16]
    out = stack.attention(q_strided, k, v, cu.long(), 30, 3, 0.25, backend)
    torch.testing.assert_close(out, stack.attention_reference(q, k, v, cu, 3, 0.25), atol=0, rtol=0)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        stack.attention(q.float(), k.float(), v.float(), cu, 30, 3, 0.25, backend)


# ---- branches: sequences that share a prefix, packed with it once (CORE's choices) ------------------------------
def branch_layout(stack, seed=0):
    """Token sequences in groups that share prefixes of 40-90 tokens (and two plain ones), packed by pack_branches;
    q/k/v in the packed layout. Each sequence alone is its rows of the buffer (where[i]), in order."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n_choices, prefix_len in [(4, 90), (1, 60), (2, 40), (3, 70), (1, 30), (2, 85)]:
        prefix = torch.randint(0, 1000, (prefix_len,), generator=g)
        for _ in range(n_choices):
            seqs.append(torch.cat([prefix, torch.randint(1000, 2000, (int(torch.randint(1, 25, (), generator=g)),), generator=g)]).numpy())
    batch, where = stack.pack_branches(seqs, "cpu")
    T = batch.inputs.size(0)
    assert T < sum(map(len, seqs)) - 300 and batch.branches.branch.max() == 4
    return batch, where, seqs


@eager_flex
@pytest.mark.parametrize("window", [None, 0, 5, 50])
@pytest.mark.parametrize("impl", ["sdpa", "sdpa-dense", "sdpa-banded", "flex", "fa2", "fa3"])
def test_branches_attend_as_each_sequence_alone(stack, monkeypatch, impl, window):
    batch, where, seqs = branch_layout(stack)
    T, b = batch.inputs.size(0), batch.branches
    dtype = torch.bfloat16 if impl.startswith("fa") else torch.float32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, 2, 16, generator=g).to(dtype) for _ in range(3))
    w = T if window is None else window
    calls = []
    if impl.startswith("fa"):
        monkeypatch.setitem(stack._FLASH, impl, types.SimpleNamespace(flash_attn_varlen_func=make_standins(stack, calls, False)[impl]))
        out = stack.attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, window, 0.25, impl, b)
        assert calls == [(-1 if window is None else window, 0), ((-1 if window is None else window, 0), "kv")]
    elif impl == "flex":
        out = stack._flex_attention(q, k, v, stack.flex_block_mask(batch.cu_seqlens, T, w, b), 0.25)
    elif impl == "sdpa":  # attention()'s band: window + the most branch tokens of a segment, not the segment
        out = stack.attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, window, 0.25, "sdpa", b)
    else:  # the band must reach a branch's whole segment back, whatever the window
        block = 1024 if impl == "sdpa-dense" else 32
        assert (block + batch.max_seqlen - 1 >= T) == (impl == "sdpa-dense")
        out = stack._sdpa_attention(q, k, v, batch.cu_seqlens, w, 0.25, batch.max_seqlen - 1, block=block, branches=b)
    assert out.dtype == dtype and out.shape == q.shape
    for i, seq in enumerate(seqs):
        rows = torch.from_numpy(where[i])
        alone = stack.attention_reference(q[rows], k[rows], v[rows], torch.tensor([0, len(seq)], dtype=torch.int32), window, 0.25)
        torch.testing.assert_close(out[rows].float(), alone.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_branch_packing(stack):
    """Positions and previous tokens are each sequence's own; a group shares only the prefix common to all of it,
    and a sequence joins only when that saves at least the tokens its branch adds."""
    batch, where, seqs = branch_layout(stack)
    for i, seq in enumerate(seqs):
        rows = torch.from_numpy(where[i])
        assert batch.inputs[rows].tolist() == seq.tolist() and batch.positions[rows].tolist() == list(range(len(seq)))
        assert batch.prev_ids[rows].tolist() == [-1] + seq[:-1].tolist()
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]
    groups = lambda *s: stack.shared_prefix_groups([torch.tensor(x).numpy() for x in s])
    assert groups(a, b) == [(0, 2, 7)]
    assert groups(a, b, [1, 2, 9]) == [(0, 2, 7), (2, 1, 3)]  # sharing 2 of 3 tokens would lose 2 x 5 - 2
    assert groups(a, a, a) == [(0, 3, 7)]  # identical sequences: each branch keeps its last token
    assert groups([5, 1], a) == [(0, 1, 2), (1, 1, 8)]
    assert groups([1, 2, 3, 4], [1, 5, 6, 7]) == [(0, 1, 4), (1, 1, 4)]  # one shared token saves less than it costs


def test_flash_loading_failure_is_caught_once_and_reported(stack, monkeypatch):
    monkeypatch.setattr(stack, "_FLASH", {})
    tries = []

    def offline():
        tries.append(1)
        raise OSError("hub unreachable (offline)")

    monkeypatch.setattr(stack, "_load_fa3", offline)
    q, k, v, cu = packed([8], 0, 1, 16, dtype=torch.bfloat16)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="could not load fa3.*offline"):
            stack.attention(q, k, v, cu, 8, None, 0.25, "fa3")
    assert len(tries) == 1


def test_select_backend_on_cpu(stack):
    assert stack.select_attention_backend("cpu") == "sdpa"
    assert stack.select_attention_backend(torch.device("cpu"), "sdpa") == "sdpa"
    for name, why in [("fa3", "CUDA"), ("fa2", "CUDA"), ("flex", "no CPU backward")]:
        with pytest.raises(RuntimeError, match=f"'{name}'.*{why}"):
            stack.select_attention_backend("cpu", name)
    with pytest.raises(ValueError, match="unknown attention backend"):
        stack.select_attention_backend("cpu", "fa4")
    q, k, v, cu = packed([8], 0, 1, 16)
    with pytest.raises(ValueError, match="unknown attention backend"):
        stack.attention(q, k, v, cu, 8, None, 0.25, "fa4")
