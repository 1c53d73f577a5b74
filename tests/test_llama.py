"""The llama peer (models/llama/train_llama.py): the same bits per byte as the main stack, every val target once per
source, bad data refused in one line, a whole tiny run with CORE and a checkpoint; and the recipe it claims (grouped-
query attention, causality, SwiGLU's size, the LR schedule, weight decay on matrices only, clipping at 1.0, parallel
blocks)."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, edit_json, load_module
from test_core_eval import one_thread  # noqa: F401  its autouse fixture: one torch thread here too
from test_models import core_data, two_source_data  # noqa: F401  fixtures: a small CORE file, two val sources
from test_models import check_cropped_scores, check_full_val_in_run, check_val_score, direct_row_sums, run_stack
from test_models import uniform_main_stack, val_shard

LLAMA_PATH = os.path.join(ROOT, "models", "llama", "train_llama.py")
# 4 query heads of 16 sharing 2 key/value heads: grouping is exercised; SwiGLU hidden floor(8/3 x 64) = 170 -> 192
LLAMA_TINY = ["--preset", "cpu", "--n-layers", "2", "--model-dim", "64", "--n-heads", "4", "--n-kv-heads", "2", "--seq-len", "128"]


@pytest.fixture(scope="module")
def llama():
    return load_module(LLAMA_PATH, "train_llama")


def tiny_model(llama, vocab_size, extra=(), seed=0):
    """The tiny model with its weights drawn wider than the init (std 0.1), so every block visibly does something."""
    torch.manual_seed(seed)
    model = llama.Llama(llama.parse_config(LLAMA_TINY + ["--data-dir", "x", *extra]), vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model.eval()


# --- the same bits per byte, every val target once ----------------------------------------------------------------


def test_uniform_predictor_has_the_same_bpb_as_the_main_stack(llama, stack, tiny_data):
    """A model that gives every token probability 1/V scores log2(V) bits per counted target; both stacks must count
    the same targets and bytes, over val tokens 1..N and over all of them, per source too."""
    N, V = 1024, 1024
    val = val_shard(tiny_data)
    tok_bytes = np.load(os.path.join(tiny_data, "tokenizer", "token_bytes.npy"), allow_pickle=False)
    w = tok_bytes[val[1:N + 1]]
    assert (w == 0).sum() > 1  # BOS targets are present, so excluding them matters

    tok = llama.load_tokenizer(os.path.join(tiny_data, "tokenizer"))
    model = llama.Llama(llama.parse_config(LLAMA_TINY + ["--data-dir", tiny_data]), tok.vocab_size)
    with torch.no_grad():
        model.output.weight.zero_()  # logits 0 for every token (tied: the embedding is 0 too, which changes nothing)
    stream = llama.load_split(tiny_data, "val", tok)
    score = llama.evaluate_bpb(model, stream, tok.token_bytes, 128, 3, torch.device("cpu"), rows=range(N // 128))

    out_main, full_main = uniform_main_stack(stack, tiny_data, N)

    assert score.bpb == pytest.approx(math.log2(V) * (w > 0).sum() / w.sum(), abs=1e-5)
    assert score.bpb == pytest.approx(out_main["bpb"], abs=1e-5) and score.loss == pytest.approx(math.log(V), abs=1e-5)
    full = llama.evaluate_bpb(model, stream, tok.token_bytes, 128, 3, torch.device("cpu"))
    w = tok_bytes[val[1:]]
    assert full.bpb == pytest.approx(math.log2(V) * (w > 0).sum() / w.sum(), abs=1e-5)
    assert full.bpb == pytest.approx(full_main["bpb"], abs=1e-5) and full.targets == full_main["targets"] == (w > 0).sum()
    assert full.bpb_by_source() == pytest.approx(full_main["by_source"], abs=1e-5)


@torch.no_grad()
def test_final_eval_scores_every_val_target_once_per_source(llama, two_source_data):
    """Every target 1 .. n_val - 1 predicted once in rows of seq_len (the last partial and padded), equal to each
    row forwarded alone, unpadded, per source; the periodic subset is rows spread from the first to the last."""
    data = two_source_data
    tok = llama.load_tokenizer(os.path.join(data, "tokenizer"))
    stream = llama.load_split(data, "val", tok)
    model, T = tiny_model(llama, tok.vocab_size), 128
    row_nats = lambda t: F.cross_entropy(model(torch.from_numpy(t[:-1])[None])[0], torch.from_numpy(t[1:]), reduction="none").double().numpy()
    val = val_shard(data)
    n = len(val) - 1
    assert n % T  # a partial last row
    names, sums = direct_row_sums(row_nats, data, T)
    score = llama.evaluate_bpb(model, stream, tok.token_bytes, T, 3, "cpu")
    assert score.scored == score.total == n and names == ["first.jsonl", "second.jsonl"]
    assert score.targets == (tok.token_bytes[val[1:]] > 0).sum()
    check_val_score(score, names, sums.sum(0))
    assert sums[:, :, 1].sum(0).min() > 0.2 * sums[:, :, 1].sum()  # both sources weigh in
    by = score.bpb_by_source()
    assert score.describe().endswith(f"(every val token: {n:,} targets, {score.targets:,} with bytes; by source: "
                                     f"first.jsonl {by['first.jsonl']:.4f}, second.jsonl {by['second.jsonl']:.4f})")

    rows = llama.spread_rows(n + 1, T, 2048)
    assert len(rows) == 2048 // T and rows[0] == 0 and rows[-1] == -(-n // T) - 1
    sub = llama.evaluate_bpb(model, stream, tok.token_bytes, T, 3, "cpu", rows)
    check_val_score(sub, names, sums[rows].sum(0))
    scored = sum(min(T, n - r * T) for r in rows)
    assert sub.describe().endswith(f"(subset: {scored:,} of {n:,} targets, spread over the stream)")


# --- bad data: one line, nothing written ----------------------------------------------------------------------------


def truncate_val(data):
    shard = data / "pretrain" / "val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    return f"{shard}: header says"


def drop_core_examples(data):
    (data / "core" / "examples.npy").unlink()
    return f"{data / 'core' / 'examples.npy'}: missing"


def miscount_val_sources(data):
    manifest = data / "pretrain" / "manifest.json"
    edit_json(str(manifest), lambda m: m["val_sources"][0].update(n_docs=41))
    return f"{manifest}: val_sources count 41 documents, the val shards hold 40 (<|bos|> tokens)"


@pytest.mark.parametrize("damage", [truncate_val, drop_core_examples, miscount_val_sources])
def test_cli_reports_bad_data_in_one_line_and_writes_nothing(damage, core_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(core_data, data)
    message = damage(data)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, LLAMA_PATH, "--preset", "cpu", "--data-dir", str(data), "--run-dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {message}")
    assert not run.exists()


# --- whole runs ---------------------------------------------------------------------------------------------------


def test_run_writes_metrics_log_core_and_checkpoint(llama, core_data, tmp_path):
    run = tmp_path / "run"
    metrics = run_stack(LLAMA_PATH, LLAMA_TINY + ["--batch-tokens", "1024", "--train-tokens", "16384", "--lr", "3e-3"], core_data, run)
    assert metrics["stack"] == "llama" and metrics["train_tokens"] == 16384
    d, L, V, T, kv, hidden = 64, 2, 1024, 128, 32, 192
    assert metrics["params_matrix"] == L * (2 * d * d + 2 * d * kv + 3 * d * hidden)
    # tied: the embedding once; per block its matrices and two RMSNorm gains; the final RMSNorm; no biases
    assert metrics["params"] == V * d + metrics["params_matrix"] + L * 2 * d + d
    log = (run / "log.txt").read_text()
    assert "llama: 4 query heads of 16 sharing 2 key/value heads, SwiGLU hidden 192, sequential blocks, tied embeddings" in log

    # the checkpoint holds the trained model: reloaded, it scores the same val bpb
    from safetensors.torch import load_file, load_model
    state = load_file(str(run / "model.safetensors"))
    assert len({"output.weight", "tok_embeddings.weight"} & set(state)) == 1  # tied: the matrix stored once
    model = llama.Llama(llama.parse_config(LLAMA_TINY + ["--data-dir", core_data]), V)
    load_model(model, str(run / "model.safetensors"))
    tok = llama.load_tokenizer(os.path.join(core_data, "tokenizer"))
    score = llama.evaluate_bpb(model, llama.load_split(core_data, "val", tok), tok.token_bytes, T, 4, torch.device("cpu"))
    assert score.bpb == pytest.approx(metrics["val_bpb"], rel=1e-5) and score.loss == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert metrics["val_bpb_by_source"] == pytest.approx(score.bpb_by_source(), rel=1e-5)
    check_full_val_in_run(metrics, run, core_data, T)
    record = load_module(os.path.join(ROOT, "baselines", "record.py"), "record")  # records read the log's lines
    assert record.final_metric(str(run), "val_bpb") == pytest.approx(metrics["val_bpb"], abs=1e-4)


def test_parallel_untied_run_and_its_checkpoint(llama, tiny_data, tmp_path):
    """--parallel-blocks --no-tie-embeddings: one norm per block, a separate output matrix, both in the checkpoint."""
    run = tmp_path / "run"
    args = LLAMA_TINY + ["--parallel-blocks", "--no-tie-embeddings", "--n-kv-heads", "1", "--batch-tokens", "512",
                         "--train-tokens", "2048", "--val-tokens", "1024", "--core-max-per-task", "0"]
    proc = subprocess.run([sys.executable, LLAMA_PATH, *args, "--data-dir", tiny_data, "--run-dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    d, L, V, kv, hidden = 64, 2, 1024, 16, 192
    assert metrics["params_matrix"] == L * (2 * d * d + 2 * d * kv + 3 * d * hidden) and "core" not in metrics
    assert metrics["params"] == 2 * V * d + metrics["params_matrix"] + L * d + d
    from safetensors.torch import load_file, load_model
    state = load_file(str(run / "model.safetensors"))
    assert "output.weight" in state and "tok_embeddings.weight" in state and "layers.0.ffn_norm.weight" not in state
    model = llama.Llama(llama.parse_config(args + ["--data-dir", tiny_data]), V)
    load_model(model, str(run / "model.safetensors"))
    assert not torch.equal(model.output.weight, model.tok_embeddings.weight)


# --- the recipe -----------------------------------------------------------------------------------------------------


def rotate_reference(x, position, theta):
    """RoPE by hand: dim i and dim i + D/2 as one complex number, turned by position * theta^(-2i/D)."""
    D = x.numel() // 2
    freqs = theta ** -(torch.arange(D, dtype=torch.float64) * 2 / (2 * D))
    z = torch.complex(x[:D].double(), x[D:].double()) * torch.polar(torch.ones(D, dtype=torch.float64), position * freqs)
    return torch.cat([z.real, z.imag]).float()


@torch.no_grad()
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_attention_equals_a_reference_with_repeated_kv_heads(llama, n_kv_heads):
    """Query head h attends with key/value head h // (H / n_kv_heads) (Llama's repeat_kv), keys and queries rotated
    by their positions, causally; written out with the key/value heads repeated and a masked softmax."""
    model = tiny_model(llama, 64, ["--n-kv-heads", str(n_kv_heads)])
    attn, H, D, T = model.layers[0].attention, 4, 16, 9
    assert attn.wk.weight.shape == (n_kv_heads * D, 64)
    x = torch.randn(2, T, 64)
    out = attn(x, model.rope_cos[:T], model.rope_sin[:T])

    q = (x @ attn.wq.weight.T).view(2, T, H, D)
    k = (x @ attn.wk.weight.T).view(2, T, n_kv_heads, D).repeat_interleave(H // n_kv_heads, dim=2)
    v = (x @ attn.wv.weight.T).view(2, T, n_kv_heads, D).repeat_interleave(H // n_kv_heads, dim=2)
    rot = lambda t: torch.stack([torch.stack([torch.stack([rotate_reference(t[b, i, h], i, 10000.0) for h in range(H)])
                                              for i in range(T)]) for b in range(2)])
    q, k = rot(q), rot(k)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(2, T, H * D)
    torch.testing.assert_close(out, y @ attn.wo.weight.T, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_rotary_scores_depend_on_the_relative_position_only(llama):
    model = tiny_model(llama, 64)
    q, k = (v.expand(1, 128, 1, 16) for v in torch.randn(2, 16))  # one query and one key vector at every position
    rq, rk = llama.apply_rotary(q, model.rope_cos, model.rope_sin)[0, :, 0], llama.apply_rotary(k, model.rope_cos, model.rope_sin)[0, :, 0]
    assert torch.allclose(rq[10] @ rk[3], rq[100] @ rk[93], atol=1e-4)  # the same offset 7
    assert not torch.allclose(rq[10] @ rk[3], rq[10] @ rk[9], atol=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("extra", [[], ["--parallel-blocks", "--no-tie-embeddings"]], ids=["sequential", "parallel"])
def test_a_later_token_never_changes_an_earlier_logit(llama, extra):
    model = tiny_model(llama, 64, extra)
    idx = torch.randint(0, 64, (2, 40))
    logits = model(idx)
    for t in (0, 17, 39):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, 62, changed[:, t:].shape)) % 64
        new = model(changed)
        torch.testing.assert_close(new[:, :t], logits[:, :t], atol=1e-6, rtol=1e-6)
        assert (new[:, t] - logits[:, t]).abs().max() > 1e-3  # position t reads its own token


@pytest.mark.parametrize("dim, multiple, hidden", [
    (192, 64, 512),      # the cpu preset: 8/3 x 192 exactly
    (768, 64, 2048),     # the gpu preset
    (64, 64, 192),       # floor(170.67) = 170 rounded up
    (100, 64, 320),      # floor(266.67) = 266 rounded up
    (4096, 256, 11008),  # Llama 7B
    (5120, 256, 13824),  # Llama 13B
])
def test_swiglu_hidden_size(llama, dim, multiple, hidden):
    assert llama.swiglu_hidden(dim, multiple) == hidden
    if dim <= 192:
        cfg = llama.parse_config(["--preset", "cpu", "--data-dir", "x", "--model-dim", str(dim), "--n-heads", "2",
                                  "--n-kv-heads", "2", "--n-layers", "1", "--ffn-multiple", str(multiple)])
        ff = llama.Llama(cfg, 64).layers[0].feed_forward
        assert ff.w1.weight.shape == ff.w3.weight.shape == (hidden, dim) and ff.w2.weight.shape == (dim, hidden)


def test_cpu_preset_has_the_other_stacks_block_matrices(llama):
    """3 heads sharing 3 key/value heads and SwiGLU 512: 12 x 192^2 per layer, as every other stack's cpu preset."""
    cfg = llama.parse_config(["--preset", "cpu", "--data-dir", "x"])
    model = llama.Llama(cfg, 8192)
    assert llama.matrix_params(model) == 4 * 12 * 192 ** 2 == 1_769_472
    assert sum(p.numel() for p in model.parameters()) == 8192 * 192 + 1_769_472 + 9 * 192  # tied, 9 RMSNorm gains
    gpu = llama.parse_config(["--data-dir", "x"])
    assert (gpu.n_heads, gpu.n_kv_heads, gpu.grad_clip, gpu.weight_decay, gpu.betas) == (12, 4, 1.0, 0.1, (0.9, 0.95))


@pytest.mark.parametrize("total", [150, 1000])
def test_lr_schedule_warms_up_3_percent_then_cosine_to_10_percent(llama, total):
    cfg = llama.parse_config(["--preset", "cpu", "--data-dir", "x", "--lr", "1e-3"])
    lrs = np.array([llama.lr_at(cfg, s, total) for s in range(total)])
    warmup = llama.warmup_steps(cfg, total)
    assert warmup == round(0.03 * total) and warmup > 0
    np.testing.assert_allclose(lrs[:warmup], 1e-3 * np.arange(1, warmup + 1) / warmup)  # linear, reaching the peak
    assert lrs.max() == pytest.approx(1e-3) and lrs[warmup] == pytest.approx(1e-3)
    assert (np.diff(lrs[warmup:]) < 0).all() and lrs[-1] == pytest.approx(1e-4)  # cosine down to 10% at the last step
    # a cosine from the peak to 10%: steps equally far from the ends of the decay add up to 110% of the peak
    np.testing.assert_allclose(lrs[warmup:] + lrs[warmup:][::-1], 1.1e-3)


def test_weight_decay_is_on_matrices_only(llama):
    """The decayed group is every 2D weight (the blocks' Linear weights and the embedding / head), the other the
    RMSNorm gains; with zero gradients one AdamW step shrinks exactly the matrices, by lr x weight decay."""
    for extra in ([], ["--no-tie-embeddings"]):
        model = tiny_model(llama, 64, extra)
        cfg = llama.parse_config(LLAMA_TINY + ["--data-dir", "x", *extra])
        opt = llama.make_optimizer(model, cfg)
        decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        matrices = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
        gains = {id(m.weight) for m in model.modules() if isinstance(m, llama.RMSNorm)}
        assert decay == matrices and no_decay == gains and len(gains) == 2 * 2 + 1
        assert len(decay) + len(no_decay) == len(list(model.parameters()))  # each once (a tied matrix once)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for group in opt.param_groups:
            group["lr"] = 0.01
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.01 * 0.1) if p.dim() == 2 else before[n], rtol=1e-6, atol=0)


def test_gradients_are_clipped_to_norm_1(llama):
    """optimizer_step clips the global gradient norm to --grad-clip (1.0) before the optimizer sees it, and leaves a
    smaller gradient alone."""
    model = tiny_model(llama, 64)
    cfg = llama.parse_config(LLAMA_TINY + ["--data-dir", "x"])
    assert cfg.grad_clip == 1.0

    class Recorder:
        def step(self):
            self.norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()

        def zero_grad(self, set_to_none):
            for p in model.parameters():
                p.grad = None

    for scale, expected in ((1000.0, 1.0), (1e-4, None)):
        idx = torch.randint(0, 64, (2, 16))
        (model(idx).square().mean() * scale).backward()
        raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
        opt = Recorder()
        returned = llama.optimizer_step(model, opt, cfg.grad_clip)
        assert float(returned) == pytest.approx(raw, rel=1e-5)
        assert opt.norm == pytest.approx(expected or raw, rel=1e-4) and (expected is None) == (raw < 1.0)
        assert all(p.grad is None for p in model.parameters())


@torch.no_grad()
def test_parallel_block_is_x_plus_attention_plus_mlp_of_one_norm(llama):
    model = tiny_model(llama, 64, ["--parallel-blocks"])
    block, T = model.layers[0], 12
    assert block.ffn_norm is None
    block.attention_norm.weight.normal_(1, 0.3)
    x = torch.randn(2, T, 64)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    h = block.attention_norm(x)
    torch.testing.assert_close(block(x, cos, sin), x + block.attention(h, cos, sin) + block.feed_forward(h))
    torch.testing.assert_close(h, F.rms_norm(x, (64,), eps=1e-5) * block.attention_norm.weight)
    # sequential (the default): the MLP reads the stream after attention, through its own norm
    seq = tiny_model(llama, 64).layers[0]
    x1 = x + seq.attention(seq.attention_norm(x), cos, sin)
    torch.testing.assert_close(seq(x, cos, sin), x1 + seq.feed_forward(seq.ffn_norm(x1)))
    ff = seq.feed_forward
    torch.testing.assert_close(ff(x), (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T)  # SwiGLU


@torch.no_grad()
def test_core_crops_to_its_context_and_padding_is_invisible(llama, core_data):
    """A CORE sequence longer than seq_len is scored on its last seq_len tokens; batched, cropped and padded rows score
    exactly as each cropped sequence forwarded alone."""
    tok = llama.load_tokenizer(os.path.join(core_data, "tokenizer"))
    core = llama.load_core(core_data, tok)
    T = 96
    torch.manual_seed(0)
    model = llama.Llama(llama.parse_config(LLAMA_TINY + ["--seq-len", str(T), "--batch-tokens", "960", "--data-dir", core_data]),
                        tok.vocab_size).eval()
    seqs = [core.sequence(i) for i in range(len(core.sequences))]
    assert sum(len(t) > T for t, _, _ in seqs) > 5 and sum(len(t) <= T for t, _, _ in seqs) > 5
    check_cropped_scores(llama, model, seqs, tok.bos_id, T)
