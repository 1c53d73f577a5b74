"""Peer stacks in models/: a whole gpt2-adamw run on the tiny data, and agreement with the main stack on what bits
per byte means."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_ARGS, load_module

GPT2_PATH = os.path.join(ROOT, "models", "gpt2-adamw", "train_gpt2.py")
GPT2_TINY = ["--preset", "cpu", "--n-layers", "2", "--model-dim", "64", "--n-heads", "2", "--seq-len", "128"]


@pytest.fixture(scope="module")
def gpt2():
    return load_module(GPT2_PATH, "train_gpt2")


def val_shard(data_dir):
    """The val tokens read straight from the file (256 int32 header words, then uint16 ids for a 1024 vocab)."""
    path = os.path.join(data_dir, "pretrain", "val_000000.bin")
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[3] == 2
    return np.fromfile(path, dtype="<u2", offset=1024)


def test_gpt2_run_writes_metrics_log_and_checkpoint(gpt2, tiny_data, tmp_path):
    run = tmp_path / "run"
    args = GPT2_TINY + ["--batch-tokens", "512", "--train-tokens", "8192", "--val-tokens", "2048", "--val-every", "8",
                        "--log-every", "1", "--lr", "3e-3", "--data-dir", tiny_data, "--run-dir", str(run)]
    proc = subprocess.run([sys.executable, GPT2_PATH] + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gpt2-adamw done: val bpb" in proc.stdout.splitlines()[-1]

    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val_bpb", "val_loss", "train_tokens", "params", "params_matrix", "tok_per_s", "device", "world_size",
            "stack"} <= set(metrics)
    assert metrics["stack"] == "gpt2-adamw" and metrics["world_size"] == 1 and metrics["device"] == "cpu"
    assert metrics["train_tokens"] == 8192 and metrics["tok_per_s"] > 0
    d, L, V, T = 64, 2, 1024, 128
    assert metrics["params_matrix"] == L * 12 * d * d
    # tied: the embedding is counted once; per block 12 d^2 weights + 9 d biases + 4 d LayerNorm; final LayerNorm
    assert metrics["params"] == V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    assert 0 < metrics["val_bpb"] < 10 and 0 < metrics["val_loss"] < math.log(V) + 1

    log = (run / "log.txt").read_text()
    assert log.startswith("config: {")
    losses = [float(x) for x in re.findall(r"^step \d+/16 loss (\S+)", log, re.M)]
    assert len(losses) == 16 and losses[-1] < losses[0] - 0.3
    vals = re.findall(r"^step (\d+)/16 val bpb (\S+) val loss (\S+)$", log, re.M)
    assert [v[0] for v in vals] == ["8", "16"]
    assert float(vals[-1][1]) == pytest.approx(metrics["val_bpb"], abs=1e-4)

    # the checkpoint holds the trained model: reloaded, it scores the same val bpb
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    from safetensors.torch import load_model
    cfg = gpt2.parse_config(GPT2_TINY + ["--data-dir", tiny_data])
    model = gpt2.GPT(cfg, V)
    load_model(model, str(run / "model.safetensors"))
    tok = gpt2.load_tokenizer(os.path.join(tiny_data, "tokenizer"))
    bpb, loss = gpt2.evaluate_bpb(model, gpt2.load_split(tiny_data, "val", tok), tok.token_bytes, T, 2048, 4, torch.device("cpu"))
    assert bpb == pytest.approx(metrics["val_bpb"], rel=1e-5) and loss == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_uniform_predictor_has_the_same_bpb_in_both_stacks(gpt2, stack, tiny_data):
    """A model that gives every token probability 1/V scores log2(V) bits per counted target; bits per byte divides
    by the targets' bytes. Both stacks must count the same targets (val tokens 1..N) and bytes."""
    N, V = 1024, 1024  # N: a multiple of the main stack's 512-token val batches and of the baseline's 128-token windows
    val = val_shard(tiny_data)
    assert len(val) - 1 >= N
    tok_bytes = np.load(os.path.join(tiny_data, "tokenizer", "token_bytes.npy"), allow_pickle=False)
    w = tok_bytes[val[1:N + 1]]
    assert (w == 0).sum() > 1  # BOS targets are present, so excluding them matters
    expected = math.log2(V) * (w > 0).sum() / w.sum()

    tok = gpt2.load_tokenizer(os.path.join(tiny_data, "tokenizer"))
    model = gpt2.GPT(gpt2.parse_config(GPT2_TINY + ["--data-dir", tiny_data]), tok.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 for every token of the real vocabulary
    # 3 windows per batch: the last batch is partial
    bpb_gpt2, loss_gpt2 = gpt2.evaluate_bpb(model, gpt2.load_split(tiny_data, "val", tok), tok.token_bytes, 128, N, 3, torch.device("cpu"))

    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data, "--val-tokens", str(N)])
    assert cfg.micro_batch_tokens == 512
    main_tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    main_model = stack.GPT(cfg, main_tok.vocab_size)
    with torch.no_grad():
        main_model.lm_head.zero_()  # the softcap maps 0 to one constant: uniform over the real vocabulary
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    bpb_main, loss_main = stack.evaluate_bpb(main_model, cfg, rt, main_tok, main_model.windows(32, 64), 128)

    assert bpb_gpt2 == pytest.approx(expected, abs=1e-5)
    assert bpb_main == pytest.approx(expected, abs=1e-5)
    assert bpb_gpt2 == pytest.approx(bpb_main, abs=1e-5)
    assert loss_gpt2 == pytest.approx(math.log(V), abs=1e-5) and loss_main == pytest.approx(math.log(V), abs=1e-5)


def test_gpt2_bpb_scores_exactly_val_targets_1_to_n(gpt2, tiny_data):
    """A context-free but non-uniform predictor (constant logits z): bits per byte depends on which targets are
    scored, so a shifted or partial window set shows, unlike with the uniform predictor above."""
    N, V = 1024, 1024
    val = val_shard(tiny_data)
    tok = gpt2.load_tokenizer(os.path.join(tiny_data, "tokenizer"))
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.parse_config(GPT2_TINY + ["--data-dir", tiny_data]), V)
    with torch.no_grad():
        model.ln_f.weight.zero_()  # the final hidden state is ln_f's bias for every token
        model.ln_f.bias.copy_(torch.randn(64) * 30)  # logits with a spread of a few nats
        z = model.lm_head.weight[:V] @ model.ln_f.bias
    bpb, loss = gpt2.evaluate_bpb(model, gpt2.load_split(tiny_data, "val", tok), tok.token_bytes, 128, N, 3, torch.device("cpu"))
    targets = torch.from_numpy(val[1:N + 1].astype(np.int64))
    nll = -torch.log_softmax(z.double(), 0)[targets]
    w = torch.from_numpy(tok.token_bytes)[targets]
    assert bpb == pytest.approx(float((nll * (w > 0)).sum() / (math.log(2) * w.sum())), rel=1e-6)
    assert loss == pytest.approx(float((nll * (w > 0)).sum() / (w > 0).sum()), rel=1e-6)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-2], "header says"),                         # truncated
    (lambda b: b"\0\0\0\0" + b[4:], "bad magic"),
    (lambda b: b[:12] + (4).to_bytes(4, "little") + b[16:], "bytes per token"),
])
def test_gpt2_rejects_a_damaged_shard_naming_the_file(gpt2, tiny_data, tmp_path, damage, message):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / "pretrain" / "train_000002.bin"
    shard.write_bytes(damage(shard.read_bytes()))
    tok = gpt2.load_tokenizer(str(data / "tokenizer"))
    with pytest.raises(gpt2.DataError, match=f"{re.escape(str(shard))}: .*{message}"):
        gpt2.load_split(str(data), "train", tok)


def test_gpt2_cli_reports_bad_data_in_one_line_and_writes_nothing(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / "pretrain" / "val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, GPT2_PATH, "--data-dir", str(data), "--run-dir", str(run)] + GPT2_TINY,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"error: {shard}: header says")
    assert not run.exists()
