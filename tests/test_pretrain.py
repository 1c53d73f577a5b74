"""Pretraining: batch packing, the sharded loader, the schedule, bits per byte, and whole runs (resume after
kill -9, two gloo ranks against one process, torch.compile, a diverging loss)."""
import json
import math
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

from conftest import ROOT, STACK_PATH, TINY_ARGS, unstamped

BOS = 1000


def test_make_batch_segments_targets_and_padding(stack):
    # documents: [BOS a b c d e f] [BOS g h] [BOS i ...] ; max_doc_len 4 splits the first document
    buf = np.array([BOS, 1, 2, 3, 4, 5, 6, BOS, 7, 8, BOS, 9, 10, 11], dtype=np.int64)
    b = stack.make_batch(buf, BOS, max_doc_len=4, n_targets=3, device="cpu")
    T = len(buf) - 3
    assert b.inputs.tolist() == buf[:T].tolist()
    assert b.cu_seqlens.dtype == torch.int32 and len(b.cu_seqlens) == 128
    assert b.cu_seqlens[:5].tolist() == [0, 4, 7, 10, T] and (b.cu_seqlens[5:] == T).all()
    assert b.max_seqlen == 4  # the bound, not the batch's longest segment
    assert b.prev_ids.tolist() == [-1, BOS, 1, 2, 3, 4, 5, -1, BOS, 7, -1]
    assert b.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0]
    assert b.targets[:, 0].tolist() == buf[1:T + 1].tolist()  # next token, BOS included (end of document)
    # 2 and 3 ahead stop at the next document: position 5 ('5') may predict '6' and BOS but not 'g'
    assert b.targets[5].tolist() == [6, BOS, -1]
    assert b.targets[6].tolist() == [BOS, -1, -1]
    assert b.targets[0].tolist() == [1, 2, 3]


def test_loader_ranks_split_the_single_process_stream(stack, tiny_data):
    tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    paths = stack.pretrain_shards(tiny_data, tok, "train")
    assert len(paths) >= 3
    total = sum(len(stack.read_token_file(p, tok.vocab_size)) for p in paths)
    stream = np.concatenate([np.asarray(stack.read_token_file(p, tok.vocab_size)) for p in paths])
    one = stack.PretrainLoader(paths, tok, 0, 1)
    two = [stack.PretrainLoader(paths, tok, r, 2) for r in range(2)]
    T = 700
    steps = total // (2 * T) + 3  # runs past the end: wraps into a new epoch
    for step in range(steps):
        a, b = one.next_batch(T, 128, 1, "cpu"), one.next_batch(T, 128, 1, "cpu")
        r0, r1 = (loader.next_batch(T, 128, 1, "cpu") for loader in two)
        assert torch.equal(a.inputs, r0.inputs) and torch.equal(b.inputs, r1.inputs)
        assert torch.equal(a.targets, r0.targets) and torch.equal(b.targets, r1.targets)
        start = (2 * T * step) % total
        expect = np.concatenate([stream, stream])[start:start + T]
        assert a.inputs.tolist() == expect.tolist()
    assert one.state == two[0].state and one.state["epoch"] == 1


def test_schedule_stages_lr_and_mtp(stack):
    cfg = stack.parse_config(TINY_ARGS[:2] + ["--stages", "[[10, 100, 64, 8, 16, 1.0, [1, 0.5], [1, 0]], [10, 200, 64, 8, 32, 2.0, [1], [1]]]",
                                              "--cooldown-frac", "0.5", "--final-lr", "0.1"])
    stages = stack.scaled_stages(cfg)
    plans = [stack.plan_step(cfg, stages, s) for s in range(20)]
    assert [p.stage for p in plans] == [0] * 10 + [1] * 10
    assert [p.long_window for p in (plans[9], plans[10])] == [16, 32]
    assert plans[0].mtp_weights == [1, 0.5] and plans[9].mtp_weights == [1]  # a zero weight drops its horizon
    assert plans[5].mtp_weights == pytest.approx([1, 0.5 * (1 - 5 / 9)])
    assert plans[9].lr_factor == pytest.approx(1.0) and plans[19].lr_factor == pytest.approx(0.1)
    assert plans[15].lr_factor == pytest.approx(2.0 * 4 / 9 + 0.1 * 5 / 9)
    warm = stack.dataclasses.replace(cfg, lr_warmup_steps=4)
    assert [stack.plan_step(warm, stages, s).lr_factor for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    rescaled = stack.scaled_stages(stack.dataclasses.replace(cfg, train_tokens=1500))
    assert [s.steps for s in rescaled] == [5, 5]  # half the tokens: half the steps of each stage


def direct_val_sums(stack, model, tok, val, windows, T, rows, source=None, n_sources=1):
    """Per source: nats, bytes, counted targets of rows of T targets of the val stream, by plain cross entropy."""
    sums = np.zeros((n_sources, 3))
    n = len(val) - 1
    for r in rows:
        buf = val[r * T:r * T + T + 1]
        real = len(buf) - 1
        buf = np.concatenate([buf, np.full(T + 1 - len(buf), tok.bos_id, buf.dtype)])
        b = stack.make_batch(buf, tok.bos_id, 128, 1, "cpu")
        with torch.no_grad():
            h = model.hidden(b, windows, "sdpa")
            losses = torch.nn.functional.cross_entropy(model.logits(h), b.targets[:, 0], reduction="none").numpy()
        w = tok.token_bytes[b.targets[:, 0].numpy()].astype(np.float64)
        w[real:] = 0  # padding
        src = np.zeros(T, np.int64) if source is None else np.concatenate([source[r * T + 1:r * T + 1 + real], np.zeros(T - real, np.int64)])
        for i in range(n_sources):
            m = (src == i) & (w > 0)
            sums[i] += [losses[m].sum(), w[m].sum(), m.sum()]
        assert r * T < n
    return sums


def tiny_bpb_setup(stack, tiny_data, *extra):
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data, *extra])
    tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, tok.vocab_size))
    with torch.no_grad():
        model.lm_head.normal_(0, 0.5)  # non-uniform predictions so the byte weighting matters
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    return cfg, tok, model, rt, model.windows(32, 64), stack.pretrain_data(tiny_data)


def test_bits_per_byte_weights_tokens_by_bytes(stack, tiny_data):
    """evaluate_bpb against a direct computation over every val target, once, with the same model."""
    cfg, tok, model, rt, windows, data = tiny_bpb_setup(stack, tiny_data)
    out = stack.evaluate_bpb(model, data, rt, windows, 128, 512)
    bpb, loss = out["bpb"], out["loss"]
    val = np.asarray(stack.read_token_file(stack.pretrain_shards(tiny_data, tok, "val")[0], tok.vocab_size))
    n = len(val) - 1
    assert n % 512 and n > 1024  # a partial last row, padded
    (nats, nbytes, count), = direct_val_sums(stack, model, tok, val, windows, 512, range(-(-n // 512)))
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    assert loss == pytest.approx(nats / count, rel=1e-6)
    assert (val == tok.bos_id).sum() > 1  # the val text has several documents, so BOS targets were excluded
    # every target with bytes counted once: all of the stream's but its BOS
    assert out["targets"] == count == (tok.token_bytes[val[1:]] > 0).sum() and out["of"] == n
    assert out["what"] == "every val token"


def test_val_bpb_by_source_recombines(stack, tiny_data, tmp_path):
    """Two val sources (the manifest's val_sources): each one's bpb is its own targets', and bytes-weighted they make
    the total; a val_sources that does not count the shard's documents is refused naming the shard."""
    import shutil
    data_dir = tmp_path / "d"
    shutil.copytree(tiny_data, data_dir)
    manifest_path = data_dir / "pretrain" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    n_docs = sum(s["n_docs"] for s in manifest["shards"] if s["split"] == "val")
    manifest["val_sources"] = [{"name": "first.txt", "n_docs": 5}, {"name": "rest.jsonl", "n_docs": n_docs - 5}]
    manifest_path.write_text(json.dumps(manifest))
    cfg, tok, model, rt, windows, data = tiny_bpb_setup(stack, str(data_dir))
    out = stack.evaluate_bpb(model, data, rt, windows, 128, 512)
    val, source = data.val_stream()
    assert source[0] == 0 and source[-1] == 1 and (np.diff(source) >= 0).all()
    n = len(val) - 1
    sums = direct_val_sums(stack, model, tok, val, windows, 512, range(-(-n // 512)), source, 2)
    assert set(out["by_source"]) == {"first.txt", "rest.jsonl"}
    for i, name in enumerate(["first.txt", "rest.jsonl"]):
        assert out["by_source"][name] == pytest.approx(sums[i, 0] / (math.log(2) * sums[i, 1]), rel=1e-6)
    weighted = sum(out["by_source"][name] * sums[i, 1] for i, name in enumerate(["first.txt", "rest.jsonl"])) / sums[:, 1].sum()
    assert out["bpb"] == pytest.approx(weighted, rel=1e-9)
    # a name in two runs is one source: its documents' targets together
    manifest["val_sources"] = [{"name": "first.txt", "n_docs": 2}, {"name": "rest.jsonl", "n_docs": n_docs - 5},
                               {"name": "first.txt", "n_docs": 3}]
    manifest_path.write_text(json.dumps(manifest))
    again = stack.evaluate_bpb(model, stack.pretrain_data(str(data_dir)), rt, windows, 128, 512)
    assert sorted(again["by_source"]) == ["first.txt", "rest.jsonl"] and again["bpb"] == pytest.approx(out["bpb"], rel=1e-9)
    manifest["val_sources"] = [{"name": "first.txt", "n_docs": 5}, {"name": "rest.jsonl", "n_docs": n_docs - 4}]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(stack.DataFormatError, match=f"val_000000.bin: {n_docs} documents, but the manifest's val_sources count {n_docs + 1}"):
        stack.pretrain_data(str(data_dir))
    manifest["val_sources"] = [{"name": "x", "n_docs": "5"}]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(stack.DataFormatError, match="manifest.json: 'val_sources' must be a list of"):
        stack.pretrain_data(str(data_dir))


def test_val_subset_spreads_over_the_stream_and_first_n(stack, tiny_data):
    """Evaluation during training: a fixed subset of rows from the start to the end of the stream, said as such;
    first=N: the rows of the first N targets (modded-nanogpt's rule), exactly N targets."""
    rows = stack.val_rows(10_000, 512, subset=2048)
    assert rows.tolist() == [0, 6, 13, 19]  # 4 rows of 20, first to last
    assert stack.val_rows(10_000, 512).tolist() == list(range(20)) and stack.val_rows(10_000, 512, first=1500).tolist() == [0, 1, 2]
    cfg, tok, model, rt, windows, data = tiny_bpb_setup(stack, tiny_data)
    val, _ = data.val_stream()
    n = len(val) - 1
    sub = stack.evaluate_bpb(model, data, rt, windows, 128, 512, subset=1024)
    picked = stack.val_rows(n, 512, subset=1024)
    assert picked[0] == 0 and picked[-1] == -(-n // 512) - 1
    (nats, nbytes, count), = direct_val_sums(stack, model, tok, val, windows, 512, picked)
    assert sub["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    scored = sum(min(512, n - r * 512) for r in picked)  # the last row's padding is not scored
    assert scored < 1024 and sub["what"] == f"subset: {scored:,} of {n:,} targets, spread over the stream"
    first = stack.evaluate_bpb(model, data, rt, windows, 128, 512, first=700)
    assert first["what"] == "the first 700 val tokens"
    assert first["targets"] == (tok.token_bytes[val[1:701]] > 0).sum()


def test_model_structure_changes(stack, tiny_data):
    cfg = stack.parse_config(TINY_ARGS)
    model = stack.GPT(stack.ModelConfig.of(cfg, 1024))
    freqs = model.rotary.freqs.clone()
    model.grow_window(512, 1024)
    assert model.scale == pytest.approx(0.1 * (0.2 * math.log(2) + 1))
    assert torch.equal(model.rotary.freqs[8:], freqs[8:])  # the non-rotating half stays at 0
    assert model.rotary.freqs[0] == freqs[0]  # turns 81 times in 512 tokens (> 32): kept
    assert model.rotary.freqs[7] == pytest.approx(freqs[7] * 0.5)  # turns < 1 time: stretched by old/new
    assert freqs[3] * 0.5 < model.rotary.freqs[3] < freqs[3]  # in between: interpolated
    assert model.is_tied
    model.untie()
    assert not model.is_tied and torch.equal(model.embed, model.lm_head)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = stack.GPT(stack.ModelConfig.of(cfg, 1024))
    fresh.load_state_dict(state)
    fresh.sync_flags()
    assert not fresh.is_tied and fresh.scale == model.scale


# -- whole runs ------------------------------------------------------------------------------------------------

def run_stack(data, run_dir, *extra, launcher=(), env=None, **kw):
    cmd = [sys.executable, *launcher, STACK_PATH, *TINY_ARGS, "--data-dir", data, "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, **kw)


def losses(run_dir):
    text = unstamped(open(os.path.join(run_dir, "log.txt")).read())
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+)/\d+ loss (\S+)", text, re.M)}


def final_weights(run_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, open(os.path.join(run_dir, "latest")).read().strip(), "model.safetensors"))


LONG_STAGES = ["--stages", "[[20, 1024, 128, 32, 64, 1.0, [1, 0.5], [1, 0]], [20, 1024, 128, 32, 128, 1.0, [1], [1]]]"]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tiny_data, tmp_path):
    full = run_stack(tiny_data, tmp_path / "full", *LONG_STAGES, "--checkpoint-every", "5")
    assert full.returncode == 0, full.stderr[-2000:]
    metrics = json.load(open(tmp_path / "full" / "metrics.json"))
    assert metrics["train_tokens"] == 40 * 1024 and metrics["world_size"] == 1 and metrics["attn_backend"] == "sdpa"
    assert math.isfinite(metrics["val_bpb"]) and metrics["params"] > metrics["params_matrix"] > 0

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", tiny_data, "--run-dir", str(killed_dir),
                             *LONG_STAGES, "--checkpoint-every", "5"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "ckpt_000015").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = losses(killed_dir)
    assert max(done) < 40, "the run finished before it was killed: nothing was tested"
    resumed = run_stack(tiny_data, killed_dir, *LONG_STAGES, "--checkpoint-every", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert losses(killed_dir) == losses(tmp_path / "full")  # every logged loss, before and after the kill
    want, got = final_weights(tmp_path / "full"), final_weights(killed_dir)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # bit for bit


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tiny_data, tmp_path):
    one = run_stack(tiny_data, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_stack(tiny_data, tmp_path / "two", launcher=("-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master-port={free_port()}", "--master-addr=127.0.0.1"), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 8
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4)
    assert json.load(open(tmp_path / "two" / "metrics.json"))["world_size"] == 2
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-3)


@pytest.mark.slow
def test_two_gloo_ranks_run_phases_one_after_another(tiny_data, tmp_path):
    """Every rank starts the next phase from the checkpoint rank 0 wrote: the other ranks used to race ahead of the
    write into `eval` and find no checkpoint (or the previous one)."""
    two = run_stack(tiny_data, tmp_path / "two", "--phases", "pt,eval", launcher=(
        "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}", "--master-addr=127.0.0.1"),
                    timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    out = unstamped(two.stdout)
    assert f"evaluating {tmp_path / 'two' / 'ckpt_000008'}" in out
    trained, evaluated = re.findall(r"^(?:step 8/8 )?val bpb (\S+) ", out, re.M)  # pt's last validation, then eval's
    assert trained == evaluated  # every val token, the same weights and windows


@pytest.mark.slow
def test_compiled_cpu_run_matches_eager(tiny_data, tmp_path):
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    eager = run_stack(tiny_data, tmp_path / "eager", "--no-compile")
    compiled = run_stack(tiny_data, tmp_path / "compiled", "--compile", env=cache, timeout=900)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert b[1] == pytest.approx(a[1], rel=1e-5)  # same weights, same batch: the same loss
    for step in a:  # later steps drift apart by float rounding (Muon's orthogonalisation amplifies it)
        assert b[step] == pytest.approx(a[step], rel=3e-2)
    assert "recompil" not in compiled.stderr.lower()


def test_compiled_loss_and_grads_match_eager(stack, tiny_data):
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data])
    tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, tok.vocab_size))
    with torch.no_grad():  # leave the zero init so every parameter gets a gradient
        for name, p in model.named_parameters():
            if name.endswith((".o", ".proj")) or name == "bigram_embed":
                p.normal_(0, 0.02)
    batch = stack.PretrainLoader(stack.pretrain_shards(tiny_data, tok, "train"), tok, 0, 1).next_batch(512, 128, 2, "cpu")
    weights = torch.tensor([1.0, 0.5])
    results = []
    for fn in (stack.train_loss, torch.compile(stack.train_loss)):
        model.zero_grad()
        loss = fn(model, batch, model.windows(32, 64), weights, "sdpa")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_graphs_follow_the_schedule_after_warm_up(stack, tiny_data):
    """The warm-up compiles every graph before the loop; after each window growth (YaRN rescales a buffer and the
    attention scale) and the untie, the compiled loss is still the eager one on the same weights: no graph keeps a
    value from before (weights perturbed off the zero init, so attention and every table reach the loss)."""
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data, "--compile"])
    tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, tok.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loader = stack.PretrainLoader(stack.pretrain_shards(tiny_data, tok, "train"), tok, 0, 1)
    stages, compiled = stack.scaled_stages(cfg), torch.compile(stack.train_loss)
    stack.warm_up_compiled(compiled, model, cfg, rt, stages, loader, 0)
    seen = []
    for step, p, T, accum, grow, untie in stack.pretrain_steps(cfg, stages, 1):
        if grow:
            model.grow_window(*grow)
        if untie:
            model.untie()
        batch = loader.fork().next_batch(T, p.max_doc_len, len(p.mtp_weights), "cpu")
        w, windows = torch.tensor(p.mtp_weights), model.windows(p.short_window, p.long_window)
        a, b = (fn(model, batch, windows, w, "sdpa", 1 / accum) for fn in (stack.train_loss, compiled))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0, msg=f"step {step}")
        seen.append((grow is not None, untie, model.scale, model.is_tied))
    assert any(g for g, *_ in seen) and any(u for _, u, *_ in seen)  # both changes happened inside the walk
    assert len({s for *_, s, _ in seen}) == 2 and {t for *_, t in seen} == {True, False}


def test_fp8_lm_head_path_matches_plain_matmul(stack, tiny_data, monkeypatch):
    """The FP8 lm_head (used on sm89+ GPUs) through torch._scaled_mm, which torch's CPU build also runs."""
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data])
    tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, tok.vocab_size))
    with torch.no_grad():
        model.lm_head.normal_(0, 0.05)
    batch = stack.PretrainLoader(stack.pretrain_shards(tiny_data, tok, "train"), tok, 0, 1).next_batch(512, 128, 1, "cpu")
    results = []
    for fp8 in (False, True):
        monkeypatch.setattr(stack, "fp8_supported", lambda device: fp8)
        model.zero_grad()
        loss = stack.train_loss(model, batch, model.windows(32, 64), torch.tensor([1.0]), "sdpa", 0.5, fp8=True)
        loss.backward()
        results.append((loss.item(), model.lm_head.grad.clone()))
    (plain, g_plain), (fp8, g_fp8) = results
    assert fp8 != plain and fp8 == pytest.approx(plain, rel=2e-2)  # quantised, and close
    assert (g_fp8[tok.vocab_size:] == 0).all()  # padded rows get no gradient
    assert torch.nn.functional.cosine_similarity(g_fp8.flatten(), g_plain.flatten(), dim=0) > 0.98


def test_nan_loss_stops_and_keeps_last_checkpoint(stack, tiny_data, tmp_path, monkeypatch):
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data, "--run-dir", str(tmp_path), "--checkpoint-every", "2"])
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    real = stack.train_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) > 6 else loss  # step 4 (two micro-batches a step) diverges

    monkeypatch.setattr(stack, "train_loss", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        stack.phase_pt(cfg, rt, stack.Logger(cfg, rt))
    assert exit_info.value.code == 2
    assert open(tmp_path / "latest").read() == "ckpt_000002"
    assert json.load(open(tmp_path / "metrics.json")) == {"diverged_at_step": 3}
    assert "loss is nan; stopping" in open(tmp_path / "log.txt").read()


def test_nan_check_waits_for_the_next_log_step(stack, tiny_data, tmp_path, monkeypatch):
    """The loss is read back (a host sync) at log, val and checkpoint steps only: a NaN at step 3 is seen at step 4,
    the next log step; the run has gone on meanwhile, but stops before writing anything, naming the first bad step."""
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data, "--run-dir", str(tmp_path), "--log-every", "4",
                                          "--val-every", "100", "--checkpoint-every", "0"])
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    real, calls = stack.train_loss, []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) > 6 else loss  # two micro-batches a step: step 3 diverges

    monkeypatch.setattr(stack, "train_loss", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        stack.phase_pt(cfg, rt, stack.Logger(cfg, rt))
    assert exit_info.value.code == 2 and len(calls) == 10  # steps 3 and 4 ran before the check at step 4
    assert json.load(open(tmp_path / "metrics.json")) == {"diverged_at_step": 3}
    assert not os.path.exists(tmp_path / "latest")  # nothing saved after the NaN (and nothing before: ckpt at the end)


def test_attention_pairs_count_every_visible_key(stack):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 20)
    for window in (None, -1, 0, 1, 64, 1000):
        want = 0
        for L in lengths:
            i = np.arange(L)
            j = np.arange(L)
            visible = (j[None, :] <= i[:, None]) & ((i[:, None] - j[None, :] <= window) if window is not None and window >= 0 else True)
            want += int(visible.sum())
        assert stack.attention_pairs(lengths, window) == want
    # deep inside a long document a query sees window + 1 keys, not half of that
    assert stack.attention_pairs([100_000], 127) == pytest.approx(100_000 * 128, rel=1e-3)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                                        ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
                                        ("Tesla T4", None), ("NVIDIA A10G", None)])
def test_peak_flops_by_device_name(stack, monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert stack.peak_flops(torch.device("cuda", 0)) == peak
    assert stack.peak_flops(torch.device("cuda", 0), torch.float32) is None  # MFU for bf16 runs only
    assert stack.peak_flops("cpu") is None


def test_stages_are_named_records_settable_as_json_objects_or_lists(stack):
    positional = stack.parse_config(["--stages", "[[10, 100, 64, 8, 16, 1.0, [1, 0.5], [1, 0]]]"])
    named = stack.parse_config(["--stages", '[{"steps": 10, "batch_tokens": 100, "max_doc_len": 64, "short_window": 8, '
                                            '"long_window": 16, "lr_mul": 1.0, "mtp_start": [1, 0.5], "mtp_end": [1, 0]}]'])
    assert positional.stages == named.stages == (stack.Stage(10, 100, 64, 8, 16, 1.0, (1, 0.5), (1, 0)),)
    # a config read back from its JSON (the log, state.json) gives the same stages
    again = stack.Config(**json.loads(json.dumps(stack.dataclasses.asdict(named))))
    assert again.stages == named.stages and again.stages[0].long_window == 16


@pytest.mark.parametrize("stages", ['[{"steps": 10}]', "[[10, 100, 64]]", "[5]"])
def test_a_malformed_stage_is_one_usage_error(stack, stages, capsys):
    with pytest.raises(SystemExit):
        stack.parse_config(["--stages", stages])
    assert "a stage needs exactly steps, batch_tokens, max_doc_len" in capsys.readouterr().err
