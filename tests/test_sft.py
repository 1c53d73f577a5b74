"""Chat fine-tuning: packed conversation batches, the masked loss, the rank-sharded loader, the SFT phase end to
end (val loss before and after, resume, two gloo ranks)."""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, STACK_PATH, TINY_ARGS, unstamped

SFT_ARGS = ["--sft-steps", "12", "--sft-batch-tokens", "1024", "--sft-eval-every", "6", "--sft-val-tokens", "8192",
            "--sft-momentum-warmup", "5", "--sft-chat-max-per-task", "0"]


def u(text):
    return {"role": "user", "content": text}


def a(content):
    return {"role": "assistant", "content": content}


def conversations():
    """A few hand-written conversations (a system prompt, several turns, a calculator call whose output is not a
    target) and many from templates, so that val conversations resemble train ones."""
    convs = [
        [{"role": "system", "content": "Answer briefly."}, u("What is the capital of France?"), a("Paris.")],
        [u("Name a color."), a("Blue."), u("Another one?"), a("Green."), u("And one more?"), a("Red.")],
        [u("A box holds 12 eggs. How many eggs are in 3 boxes?"),
         a([{"type": "text", "text": "3 boxes hold "}, {"type": "python", "text": "3*12"},
            {"type": "python_output", "text": "36"}, {"type": "text", "text": "36 eggs.\n#### 36"}])],
        [u("Write a function that returns the square of a number."), a("def square(x):\n    return x * x")],
    ]
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "garden", "window", "paper", "light"]
    for i in range(300):
        x, y = rng.randint(2, 60), rng.randint(2, 60)
        w = rng.choice(words)
        convs.append([
            [u(f"What is {x} plus {y}?"), a(f"{x} plus {y} is {x + y}.")],
            [u(f"Spell the word {w}."), a(" ".join(w) + ".")],
            [u(f"How many letters are in {w}?"), a(f"The word {w} has {len(w)} letters."), u("Thanks!"), a("You are welcome.")],
        ][i % 3])
    return convs


@pytest.fixture(scope="module")
def sft_data(tiny_data, tmp_path_factory):
    """tiny_data plus sft/ written by data/sft_shards.py from conversations()."""
    import sft_shards
    root = tmp_path_factory.mktemp("sftdata") / "data"
    shutil.copytree(tiny_data, root)
    src = root.parent / "conversations.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations()))
    manifest, _ = sft_shards.write_sft([str(src)], str(root / "tokenizer"), str(root / "sft"), val_percent=20)
    assert manifest["splits"]["val"]["n_convs"] > 30
    return str(root)


def tiny_model(stack, vocab_size):
    cfg = stack.parse_config(TINY_ARGS)
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, vocab_size))
    with torch.no_grad():  # leave the zero init so attention and the MLPs shape the outputs
        for name, p in model.named_parameters():
            if name.endswith((".o", ".proj")) or name == "bigram_embed":
                p.normal_(0, 0.05)
        model.lm_head.normal_(0, 0.3)
    return model, model.windows(32, 64)


def cpu_runtime(stack):
    return stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")


def per_token_losses(model, batch, windows):
    """(T,) fp32 cross entropy of every row against its next token, -1 targets at 0."""
    with torch.no_grad():
        h = model.hidden(batch, windows, "sdpa")
        t = batch.targets[:, 0]
        return torch.where(t >= 0, F.cross_entropy(model.logits(h), t.clamp(min=0), reduction="none"), 0.0)


# -- batches and the loss --------------------------------------------------------------------------------------

BOS = 500


def synthetic_split(stack, lengths, seed=0):
    """Conversation i: BOS, then tokens 100 + i; its mask alternates in runs so both kinds of target occur."""
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([[BOS] + [100 + i] * (n - 1) for i, n in enumerate(lengths)]).astype(np.uint16)
    mask = np.concatenate([[0] + list(rng.integers(0, 2, n - 1)) for n in lengths]).astype(np.uint8)
    return stack.SFTSplit(tokens, mask, np.cumsum([0] + list(lengths)).astype(np.int64))


def test_sft_batch_documents_masked_targets_padding_and_truncation(stack):
    split = synthetic_split(stack, [4, 3, 9])
    t0, m0 = split.conversation(0)
    t1, m1 = split.conversation(1)
    b = stack.sft_batch(split, [0, 1], 10, BOS, "cpu")
    assert b.inputs.tolist() == [BOS, 100, 100, 100, BOS, 101, 101, BOS, 0, 0]  # then one padding document
    assert b.cu_seqlens[:4].tolist() == [0, 4, 7, 10] and len(b.cu_seqlens) == 128 and (b.cu_seqlens[3:] == 10).all()
    assert b.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert b.prev_ids.tolist() == [-1, BOS, 100, 100, -1, BOS, 101, -1, BOS, 0]
    want = [t if m else -1 for t, m in zip(list(t0[1:]) + [BOS], list(m0[1:]) + [0])]
    want += [t if m else -1 for t, m in zip(list(t1[1:]) + [BOS], list(m1[1:]) + [0])] + [-1, -1, -1]
    assert b.targets[:, 0].tolist() == want
    assert (np.array(want[:6]) >= 0).any() and (np.array(want[:6]) < 0).any()  # both kinds of target occur
    # exactly full: no padding document, the last token's target is the (unmasked) start of the next conversation
    full = stack.sft_batch(split, [0, 1], 7, BOS, "cpu")
    assert full.cu_seqlens[:3].tolist() == [0, 4, 7] and full.targets[6, 0] == -1
    # longer than the batch: cut, and its token T is the last row's target
    t2, m2 = split.conversation(2)
    cut = stack.sft_batch(split, [2], 5, BOS, "cpu")
    assert cut.inputs.tolist() == t2[:5].tolist() and cut.cu_seqlens[:2].tolist() == [0, 5]
    assert cut.targets[:, 0].tolist() == [t if m else -1 for t, m in zip(t2[1:6], m2[1:6])]


def test_packed_conversation_losses_match_each_alone(stack, sft_data):
    tok = stack.Tokenizer(os.path.join(sft_data, "tokenizer"))
    split = stack.load_sft(sft_data, tok, "train")
    model, windows = tiny_model(stack, tok.vocab_size)
    loader = stack.SFTLoader(split, tok, 0, 1, seed=3)
    convs = stack.SFTLoader(split, tok, 0, 1, seed=3)._take(512)
    batch = loader.next_batch(512, "cpu")
    assert len(convs) > 3 and batch.cu_seqlens[len(convs)] < 512  # several conversations, then padding
    packed = per_token_losses(model, batch, windows)
    total, count = 0.0, 0
    for d, i in enumerate(convs):
        start, n = int(batch.cu_seqlens[d]), len(split.conversation(i)[0])
        alone_batch = stack.sft_batch(split, [i], n, tok.bos_id, "cpu")
        alone = per_token_losses(model, alone_batch, windows)
        assert torch.equal(batch.targets[start:start + n], alone_batch.targets)
        torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
        total, count = total + float(alone.sum()), count + int((alone_batch.targets >= 0).sum())
    assert (packed[int(batch.cu_seqlens[len(convs)]):] == 0).all()  # padding: no targets
    with torch.no_grad():
        loss = stack.sft_loss(model, batch, windows, "sdpa")
    assert float(loss) == pytest.approx(total / count, rel=1e-5)  # the mean over supervised targets


def test_masked_targets_get_no_gradient_and_do_not_count(stack, sft_data, monkeypatch):
    tok = stack.Tokenizer(os.path.join(sft_data, "tokenizer"))
    split = stack.load_sft(sft_data, tok, "train")
    model, windows = tiny_model(stack, tok.vocab_size)
    batch = stack.SFTLoader(split, tok, 0, 1, seed=0).next_batch(512, "cpu")
    real_hidden, leaf = model.hidden, {}

    def hidden(*args, noise=False):  # the final hidden states as a leaf, optionally with masked rows replaced
        h = real_hidden(*args).detach()
        if noise:
            h = torch.where((batch.targets[:, :1] < 0), torch.randn_like(h) * 3, h)
        leaf["h"] = h.requires_grad_()
        return leaf["h"]

    monkeypatch.setattr(model, "hidden", hidden)
    loss = stack.sft_loss(model, batch, windows, "sdpa")
    loss.backward()
    grad, masked = leaf["h"].grad, batch.targets[:, 0] < 0
    assert masked.sum() > 100 and (~masked).sum() > 100
    assert (grad[masked] == 0).all()  # exactly zero: masked rows take no part
    assert (grad[~masked].abs().sum(1) > 0).all()
    monkeypatch.setattr(model, "hidden", lambda *args: hidden(*args, noise=True))
    assert torch.equal(stack.sft_loss(model, batch, windows, "sdpa"), loss.detach())  # whatever masked rows predict
    # against the data directly: each supervised token (mask 1) predicted from the row before it
    with torch.no_grad():
        logits = model.logits(real_hidden(batch, windows, "sdpa"))
    nats, count = 0.0, 0
    for d in range(int((batch.cu_seqlens < 512).sum()) - 1):  # every conversation, not the padding document
        start, stop = int(batch.cu_seqlens[d]), int(batch.cu_seqlens[d + 1])
        conv = next(i for i in range(len(split.convs) - 1) if np.array_equal(split.conversation(i)[0], batch.inputs[start:stop].numpy()))
        tokens, mask = split.conversation(conv)
        rows = np.flatnonzero(mask[1:])
        nats += float(F.cross_entropy(logits[start + rows], torch.from_numpy(tokens[rows + 1]), reduction="sum"))
        count += len(rows)
    assert float(loss.detach()) == pytest.approx(nats / count, rel=1e-5)


def test_evaluate_sft_loss_is_the_masked_mean_over_conversations_alone(stack, sft_data):
    tok = stack.Tokenizer(os.path.join(sft_data, "tokenizer"))
    val = stack.load_sft(sft_data, tok, "val")
    model, windows = tiny_model(stack, tok.vocab_size)
    rt = cpu_runtime(stack)

    def reference(convs):
        nats = count = 0.0
        for i in convs:
            b = stack.sft_batch(val, [i], len(val.conversation(i)[0]), tok.bos_id, "cpu")
            nats += float(per_token_losses(model, b, windows).sum())
            count += int((b.targets >= 0).sum())
        return nats / count

    n = len(val.convs) - 1
    assert stack.evaluate_sft_loss(model, val, rt, windows, 10**9, batch_tokens=200) == pytest.approx(reference(range(n)), rel=1e-5)
    # a budget: the first conversations of a fixed permutation (val files are grouped by source) that fit in it
    order = np.random.default_rng(0).permutation(n)
    lengths = np.diff(val.convs)[order]
    budget = int(lengths[:12].sum()) + int(lengths[12]) - 1  # 12 fit, the 13th does not
    got = stack.evaluate_sft_loss(model, val, rt, windows, budget, batch_tokens=200)
    assert got == pytest.approx(reference(order[:12].tolist()), rel=1e-5)
    assert model.training  # restored


# -- the loader -------------------------------------------------------------------------------------------------

def conversation_ids(batch, T):
    """The conversations of a batch of synthetic_split (token 1 = 100 + index), in order, and whether one was cut."""
    cu = [int(x) for x in batch.cu_seqlens if x < T] + [T]
    docs = [batch.inputs[a:b].tolist() for a, b in zip(cu, cu[1:])]
    return [d[1] - 100 for d in docs if len(d) > 1 and d[1] >= 100], docs


def test_loader_ranks_split_the_single_process_stream_and_resume(stack):
    rng = np.random.default_rng(1)
    lengths = list(rng.integers(2, 60, 35)) + [150, 200]  # two longer than the batch
    split = synthetic_split(stack, lengths)
    T, tok = 128, types.SimpleNamespace(bos_id=BOS)
    one = stack.SFTLoader(split, tok, 0, 1, seed=7)
    two = [stack.SFTLoader(split, tok, r, 2, seed=7) for r in range(2)]
    stream = []
    for step in range(40):  # several epochs
        singles = [one.next_batch(T, "cpu"), one.next_batch(T, "cpu")]
        for loader, want in zip(two, singles):
            got = loader.next_batch(T, "cpu")
            for field in ("inputs", "prev_ids", "positions", "targets", "cu_seqlens"):
                assert torch.equal(getattr(got, field), getattr(want, field)), field
        for b in singles:
            ids, docs = conversation_ids(b, T)
            assert ids, "every batch holds at least one conversation"
            for i, doc in zip(ids, docs):
                tokens = split.conversation(i)[0].tolist()
                assert doc == tokens or (len(tokens) > T and doc == tokens[:T] and len(ids) == 1)  # whole, or cut alone
            stream += ids
    assert one.state == two[0].state == two[1].state and one.state["epoch"] >= 3
    n = len(lengths)
    orders = [one.order(e).tolist() for e in range(one.state["epoch"] + 1)]
    assert all(sorted(o) == list(range(n)) for o in orders) and orders[0] != orders[1]  # reshuffled each epoch
    assert stream == sum(orders, [])[:len(stream)]  # each epoch's permutation, in order, nothing skipped or repeated
    # resume: a loader built from a saved state continues with the same batches
    saved = json.loads(json.dumps(two[1].state))
    resumed = stack.SFTLoader(split, tok, 1, 2, seed=7, state=saved)
    for _ in range(5):
        two[0].next_batch(T, "cpu")
        assert torch.equal(resumed.next_batch(T, "cpu").inputs, two[1].next_batch(T, "cpu").inputs)


def test_lr_schedule_flat_then_linear_decay(stack):
    cfg = stack.parse_config(["--sft-cooldown-frac", "0.5"])
    assert [stack.sft_lr_factor(cfg.sft, s, 10) for s in range(10)] == pytest.approx([1] * 6 + [0.8, 0.6, 0.4, 0.2])
    warm = stack.dataclasses.replace(cfg.sft, warmup_frac=0.2)
    assert [stack.sft_lr_factor(warm, s, 10) for s in range(3)] == pytest.approx([0.5, 1, 1])


# -- the phase --------------------------------------------------------------------------------------------------

def run_stack(data, run_dir, *extra, launcher=()):
    cmd = [sys.executable, *launcher, STACK_PATH, *TINY_ARGS, "--data-dir", data, "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def sft_log(run_dir):
    text = unstamped(open(os.path.join(run_dir, "log.txt")).read())
    train = {int(m[1]): float(m[2]) for m in re.finditer(r"^sft step (\d+)/\d+ loss (\S+)", text, re.M)}
    val = {int(m[1]): float(m[2]) for m in re.finditer(r"^sft step (\d+)/\d+ val loss (\S+)", text, re.M)}
    return train, val


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def pretrained(sft_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("pt") / "run"
    out = run_stack(sft_data, run, "--phases", "pt")
    assert out.returncode == 0, out.stderr[-2000:]
    return run


def test_sft_phase_lowers_val_loss_and_keeps_the_architecture(stack, sft_data, pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    out = run_stack(sft_data, run, "--phases", "sft", *SFT_ARGS)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.load(open(run / "metrics.json"))
    assert "val_bpb" in metrics  # pretraining's keys are kept
    assert metrics["sft_val_loss"] < metrics["sft_val_loss_init"] - 0.5, metrics
    train, val = sft_log(run)
    assert sorted(val) == [0, 6, 12] and val[0] == pytest.approx(metrics["sft_val_loss_init"], rel=1e-4)
    assert len(train) == 12 and train[12] < train[1]
    assert open(run / "latest").read() == "sft_ckpt_000012" == open(run / "latest_sft").read()
    pt_state = json.load(open(run / "ckpt_000008" / "state.json"))
    sft_state = json.load(open(run / "sft_ckpt_000012" / "state.json"))
    assert sft_state["phase"] == "sft" and sft_state["model"] == pt_state["model"]  # lr scaling left it alone
    assert sft_state["run"]["phases"] == "sft" and pt_state["run"]["phases"] == "pt"  # each records its own run
    assert set(sft_state["loader"]) == {"epoch", "cursor"}
    changed = [k for k, v in weights(run / "sft_ckpt_000012").items() if not torch.equal(v, weights(run / "ckpt_000008")[k])]
    assert "lm_head" in changed and "blocks.0.q" in changed


def test_sft_resume_matches_uninterrupted(stack, sft_data, pretrained, tmp_path, monkeypatch):
    """Interrupted after step 5 (checkpoints every 3 steps), resumed: the same losses and bit-identical weights."""
    rt = cpu_runtime(stack)
    runs = {}
    for name in ("full", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(pretrained, runs[name])
    args = TINY_ARGS + ["--data-dir", sft_data, "--checkpoint-every", "3", *SFT_ARGS, "--sft-steps", "8", "--sft-eval-every", "4"]
    cfg = lambda name, *extra: stack.parse_config(args + ["--run-dir", str(runs[name]), *extra])
    stack.phase_sft(cfg("full"), rt, stack.Logger(cfg("full"), rt))
    real, calls = stack.sft_loss, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) > 9:  # two micro-batches a step: step 5 dies
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(stack, "sft_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stack.phase_sft(cfg("killed"), rt, stack.Logger(cfg("killed"), rt))
    monkeypatch.setattr(stack, "sft_loss", real)
    assert open(runs["killed"] / "latest_sft").read() == "sft_ckpt_000003"
    stack.phase_sft(cfg("killed", "--resume"), rt, stack.Logger(cfg("killed", "--resume"), rt))
    (train_a, val_a), (train_b, val_b) = sft_log(runs["full"]), sft_log(runs["killed"])
    assert train_b == train_a and val_b == val_a and sorted(train_a) == list(range(1, 9))
    assert "sft: resumed from" in open(runs["killed"] / "log.txt").read()
    wa, wb = weights(runs["full"] / "sft_ckpt_000008"), weights(runs["killed"] / "sft_ckpt_000008")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.load(open(runs[n] / "metrics.json")) for n in ("full", "killed"))
    assert ma["sft_val_loss"] == mb["sft_val_loss"] and ma["sft_val_loss_init"] == mb["sft_val_loss_init"]


def test_sft_chat_eval_at_later_evaluations(stack, sft_data, pretrained, tmp_path, monkeypatch):
    """With --sft-chat-max-per-task N the chat evaluation runs at every evaluation but the first (the base model)."""
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    calls = []

    def evaluate_chat(model, chat, tokenizer, rt, windows, max_per_task, *rest):
        calls.append((chat, max_per_task))
        return dict(results={"task": 0.5}, centered={"task": 0.25}, chatcore=0.25)

    monkeypatch.setattr(stack, "load_chat_eval", lambda data_dir, tokenizer: "chat data")
    monkeypatch.setattr(stack, "evaluate_chat", evaluate_chat)
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", sft_data, "--run-dir", str(run), *SFT_ARGS,
                                          "--sft-steps", "4", "--sft-eval-every", "2", "--sft-chat-max-per-task", "3"])
    rt = cpu_runtime(stack)
    stack.phase_sft(cfg, rt, stack.Logger(cfg, rt))
    assert calls == [("chat data", 3)] * 2  # after steps 2 and 4
    assert re.findall(r"^sft step (\d+)/4 chatcore 0.2500", unstamped(open(run / "log.txt").read()), re.M) == ["2", "4"]
    metrics = json.load(open(run / "metrics.json"))
    assert metrics["sft_chatcore"] == 0.25 and metrics["sft_chat_per_task"] == {"task": 0.5}


def test_sft_nan_loss_stops(stack, sft_data, pretrained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    real = stack.sft_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) > 6 else 1.0)  # two micro-batches a step: step 3 diverges

    monkeypatch.setattr(stack, "sft_loss", poisoned)
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", sft_data, "--run-dir", str(run), *SFT_ARGS])
    rt = cpu_runtime(stack)
    with pytest.raises(SystemExit) as exit_info:
        stack.phase_sft(cfg, rt, stack.Logger(cfg, rt))
    assert exit_info.value.code == 2
    assert json.load(open(run / "metrics.json"))["sft_diverged_at_step"] == 3
    assert "sft step 3: loss is nan; stopping. The last good checkpoint is " in open(run / "log.txt").read()


@pytest.mark.slow
def test_sft_on_two_gloo_ranks_matches_one_process(sft_data, pretrained, tmp_path):
    from test_pretrain import free_port
    for name in ("one", "two"):
        shutil.copytree(pretrained, tmp_path / name)
    one = run_stack(sft_data, tmp_path / "one", "--phases", "sft", *SFT_ARGS)
    two = run_stack(sft_data, tmp_path / "two", "--phases", "sft", *SFT_ARGS, launcher=(
        "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}", "--master-addr=127.0.0.1"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    (ta, va), (tb, vb) = sft_log(tmp_path / "one"), sft_log(tmp_path / "two")
    assert ta.keys() == tb.keys() and va.keys() == vb.keys()
    for k in ta:  # the same batches, split over the ranks, give the same token-weighted mean
        assert tb[k] == pytest.approx(ta[k], rel=1e-4, abs=1e-4)
    for k in va:
        assert vb[k] == pytest.approx(va[k], rel=1e-4, abs=1e-4)
    wa, wb = weights(tmp_path / "one" / "sft_ckpt_000012"), weights(tmp_path / "two" / "sft_ckpt_000012")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-3)
