"""Peer stacks in models/: a whole run of each on the tiny data, agreement with the main stack on what bits per byte
means, and per stack the invariants that make it what it claims to be (nanochat's window pattern, best-fit rows,
Muon's update norm, padding-free CORE rows; modded-nanogpt's paired heads, partial key offset, equality with the main
stack without them, and packed CORE equal to each sequence alone)."""
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
import torch.nn.functional as F

import core_shards
from conftest import ROOT, TINY_ARGS, edit_json, load_module
from test_core_eval import MAX_LEN, TASKS, one_thread, write_bundle  # noqa: F401 (one_thread: an autouse fixture)

GPT2_PATH = os.path.join(ROOT, "models", "gpt2-adamw", "train_gpt2.py")
GPT2_TINY = ["--preset", "cpu", "--n-layers", "2", "--model-dim", "64", "--n-heads", "2", "--seq-len", "128"]
NANOCHAT_PATH = os.path.join(ROOT, "models", "nanochat", "train_nanochat.py")
NANOCHAT_TINY = ["--preset", "cpu", "--n-layers", "3", "--model-dim", "64", "--n-heads", "2", "--seq-len", "128"]
MODDED_PATH = os.path.join(ROOT, "models", "modded-nanogpt", "train_modded.py")
# 4 layers: paired heads in 0 and 2, the key offset in long-window layer 3, layer 1 without attention
MODDED_TINY = ["--preset", "cpu", "--n-layers", "4", "--model-dim", "64", "--n-heads", "4", "--head-dim", "16",
               "--no-attn-layers", "1", "--value-embed-layers", "2,3", "--micro-batch-tokens", "512",
               "--stages", "[[8, 512, 128, 32, 64, 1.0, [1, 0.5], [1, 0]], [8, 512, 128, 32, 128, 1.0, [1], [1]]]"]


@pytest.fixture(scope="module")
def gpt2():
    return load_module(GPT2_PATH, "train_gpt2")


@pytest.fixture(scope="module")
def nanochat():
    return load_module(NANOCHAT_PATH, "train_nanochat")


@pytest.fixture(scope="module")
def modded():
    return load_module(MODDED_PATH, "train_modded")


@pytest.fixture(scope="module")
def core_data(tiny_data, tok_dir, tmp_path_factory):
    """The tiny data plus a small CORE file (test_core_eval's three tasks: multiple choice, schema, language
    modeling; left-truncated sequences and empty continuations included)."""
    root = tmp_path_factory.mktemp("models_core")
    shutil.copytree(tiny_data, root / "data")
    core_shards.write_core(write_bundle(root / "bundle", TASKS), tok_dir, root / "data" / "core", max_len=MAX_LEN)
    return str(root / "data")


def val_shard(data_dir):
    """The val tokens read straight from the file (256 int32 header words, then uint16 ids for a 1024 vocab)."""
    path = os.path.join(data_dir, "pretrain", "val_000000.bin")
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[3] == 2
    return np.fromfile(path, dtype="<u2", offset=1024)


def uniform_main_stack(stack, tiny_data, N):
    """evaluate_bpb of the main stack's model with lm_head 0 (uniform over the vocabulary): on val targets 1..N, and on
    every val target."""
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data, "--val-tokens", str(N)])
    assert cfg.micro_batch_tokens == 512
    main_tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    main_model = stack.GPT(stack.ModelConfig.of(cfg, main_tok.vocab_size))
    with torch.no_grad():
        main_model.lm_head.zero_()  # the softcap maps 0 to one constant: uniform over the real vocabulary
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    data = stack.pretrain_data(tiny_data)
    return [stack.evaluate_bpb(main_model, data, rt, main_model.windows(32, 64), 128, cfg.micro_batch_tokens, first=first)
            for first in (N, 0)]


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
    # 3 windows per batch: the last batch is partial; rows 0 .. N/128 - 1 hold targets 1 .. N
    stream = gpt2.load_split(tiny_data, "val", tok)
    score = gpt2.evaluate_bpb(model, stream, tok.token_bytes, 128, 3, torch.device("cpu"), rows=range(N // 128))
    bpb_gpt2, loss_gpt2 = score.bpb, score.loss

    out_main, full_main = uniform_main_stack(stack, tiny_data, N)
    bpb_main, loss_main = out_main["bpb"], out_main["loss"]

    assert bpb_gpt2 == pytest.approx(expected, abs=1e-5)
    assert bpb_main == pytest.approx(expected, abs=1e-5)
    assert bpb_gpt2 == pytest.approx(bpb_main, abs=1e-5)
    assert loss_gpt2 == pytest.approx(math.log(V), abs=1e-5) and loss_main == pytest.approx(math.log(V), abs=1e-5)
    # the headline, over every val target (rows of 128 here, 512 there, both with a padded last row): the same again
    w = tok_bytes[val[1:]]
    full_gpt2 = gpt2.evaluate_bpb(model, stream, tok.token_bytes, 128, 3, torch.device("cpu"))
    assert full_gpt2.bpb == pytest.approx(math.log2(V) * (w > 0).sum() / w.sum(), abs=1e-5)
    assert full_gpt2.bpb == pytest.approx(full_main["bpb"], abs=1e-5) and full_gpt2.targets == full_main["targets"] == (w > 0).sum()
    assert full_gpt2.bpb_by_source() == pytest.approx(full_main["by_source"], abs=1e-5)


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
    stream = gpt2.load_split(tiny_data, "val", tok)
    score = gpt2.evaluate_bpb(model, stream, tok.token_bytes, 128, 3, torch.device("cpu"), rows=range(N // 128))
    bpb, loss = score.bpb, score.loss
    targets = torch.from_numpy(val[1:N + 1].astype(np.int64))
    nll = -torch.log_softmax(z.double(), 0)[targets]
    w = torch.from_numpy(tok.token_bytes)[targets]
    assert bpb == pytest.approx(float((nll * (w > 0)).sum() / (math.log(2) * w.sum())), rel=1e-6)
    assert loss == pytest.approx(float((nll * (w > 0)).sum() / (w > 0).sum()), rel=1e-6)
    # every row: targets 1 .. n_val - 1, each once (the last row is partial: its padding must not count)
    assert (len(val) - 1) % 128
    full = gpt2.evaluate_bpb(model, stream, tok.token_bytes, 128, 3, torch.device("cpu"))
    targets = torch.from_numpy(val[1:].astype(np.int64))
    nll = -torch.log_softmax(z.double(), 0)[targets]
    w = torch.from_numpy(tok.token_bytes)[targets]
    assert full.bpb == pytest.approx(float((nll * (w > 0)).sum() / (math.log(2) * w.sum())), rel=1e-6)
    assert full.loss == pytest.approx(float((nll * (w > 0)).sum() / (w > 0).sum()), rel=1e-6)
    assert full.targets == (w > 0).sum() and full.scored == full.total == len(val) - 1


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


# --- gpt2 / modded: every val token once, per source (pretrain manifest version 2) ---------------------------------


@pytest.fixture(scope="module")
def two_source_data(tiny_data, tmp_path_factory):
    """The tiny data with its val documents credited to two sources by the manifest's val_sources: the first 12 to
    first.jsonl, the rest to second.jsonl (same shards)."""
    root = tmp_path_factory.mktemp("two_sources") / "data"
    shutil.copytree(tiny_data, root)

    def two_runs(m):
        assert m["version"] == 2 and [r["name"] for r in m["val_sources"]] == ["val.jsonl"]
        m["val_sources"] = [{"name": "first.jsonl", "n_docs": 12}, {"name": "second.jsonl", "n_docs": m["val_sources"][0]["n_docs"] - 12}]
    edit_json(str(root / "pretrain" / "manifest.json"), two_runs)
    return str(root)


def direct_row_sums(row_nats, data_dir, T):
    """(source names, [n_rows, n_sources, 3] nats, bytes and counted targets of each row of T targets of the val
    stream) with no peer code but row_nats(the row's tokens, unpadded: the last row is shorter) -> nats per target;
    the source of a target is that of the document holding it, counted from the <|bos|> tokens and val_sources."""
    val = val_shard(data_dir).astype(np.int64)
    tok_bytes = np.load(os.path.join(data_dir, "tokenizer", "token_bytes.npy"), allow_pickle=False)
    manifest = json.loads(open(os.path.join(data_dir, "pretrain", "manifest.json")).read())
    names = [r["name"] for r in manifest["val_sources"]]
    source = np.repeat(np.arange(len(names)), [r["n_docs"] for r in manifest["val_sources"]])[np.cumsum(val == manifest["bos_id"]) - 1]
    n_rows = -(-(len(val) - 1) // T)
    sums = np.zeros((n_rows, len(names), 3))
    for r in range(n_rows):
        tokens = val[r * T:r * T + T + 1]
        nats, pos = row_nats(tokens), np.arange(r * T + 1, r * T + len(tokens))
        w = tok_bytes[val[pos]]
        for s in range(len(names)):
            m = (source[pos] == s) & (w > 0)
            sums[r, s] = nats[m].sum(), w[m].sum(), m.sum()
    return names, sums


def check_val_score(score, names, sums):
    """A peer's ValScore against direct sums [n_sources, 3]: total and per-source bpb, loss, counted targets, and the
    per-source bpbs weighted by their bytes recombine to the total."""
    nats, nbytes, count = sums.sum(0)
    assert score.bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
    assert score.loss == pytest.approx(nats / count, rel=1e-5) and score.targets == count
    by = score.bpb_by_source()
    assert list(by) == [n for n, s in zip(names, sums) if s[1] > 0]
    assert by == pytest.approx({n: s[0] / (math.log(2) * s[1]) for n, s in zip(names, sums) if s[1] > 0}, rel=1e-5)
    assert sum(by[n] * s[1] for n, s in zip(names, sums) if s[1] > 0) / nbytes == pytest.approx(score.bpb, rel=1e-9)


def peer_val_setup(peer, mod, data_dir):
    """(T, row_nats, evaluate(rows)) of a tiny gpt2 or modded model on the val stream of data_dir."""
    tok = mod.load_tokenizer(os.path.join(data_dir, "tokenizer"))
    stream = mod.load_split(data_dir, "val", tok)
    if peer == "gpt2":
        torch.manual_seed(0)
        model = mod.GPT(mod.parse_config(GPT2_TINY + ["--data-dir", data_dir]), tok.vocab_size).eval()
        row_nats = lambda t: F.cross_entropy(model(torch.from_numpy(t[:-1])[None])[0], torch.from_numpy(t[1:]), reduction="none").double().numpy()
        return 128, row_nats, lambda rows=None: mod.evaluate_bpb(model, stream, tok.token_bytes, 128, 3, "cpu", rows)
    model = modded_model(mod, tok.vocab_size).eval()
    windows = model.windows(32, 64)

    def row_nats(t):
        b = mod.make_batch(t, tok.bos_id, 128, 1, "cpu")  # the row as it is, unpadded
        return F.cross_entropy(model.logits(model.hidden(b, windows, "sdpa")), b.targets[:, 0], reduction="none").double().numpy()
    return 512, row_nats, lambda rows=None: mod.evaluate_bpb(model, stream, tok, 512, windows, 128, "cpu", "sdpa", rows)


@torch.no_grad()
@pytest.mark.parametrize("peer", ["gpt2", "modded"])
def test_peer_final_eval_scores_every_val_target_once_per_source(peer, request, two_source_data):
    """The final evaluation: every target 1 .. n_val - 1 predicted once in the peer's rows (seq_len windows for gpt2,
    packed micro batches for modded; the last row partial and padded), equal to each row forwarded alone, unpadded;
    per source the same sums over its documents' targets, and bytes-weighted they make the total."""
    mod = request.getfixturevalue(peer)
    T, row_nats, evaluate = peer_val_setup(peer, mod, two_source_data)
    val = val_shard(two_source_data)
    assert (len(val) - 1) % T  # a partial last row
    names, sums = direct_row_sums(row_nats, two_source_data, T)
    score = evaluate()
    assert score.scored == score.total == len(val) - 1 and names == ["first.jsonl", "second.jsonl"]
    tok_bytes = np.load(os.path.join(two_source_data, "tokenizer", "token_bytes.npy"), allow_pickle=False)
    assert score.targets == (tok_bytes[val[1:]] > 0).sum()  # every target with bytes, once
    check_val_score(score, names, sums.sum(0))
    assert sums[:, :, 1].sum(0).min() > 0.2 * sums[:, :, 1].sum()  # both sources weigh in
    assert score.describe().endswith(f"(every val token: {len(val) - 1:,} targets, {score.targets:,} with bytes; by source: "
                                     f"first.jsonl {score.bpb_by_source()['first.jsonl']:.4f}, second.jsonl {score.bpb_by_source()['second.jsonl']:.4f})")


@torch.no_grad()
@pytest.mark.parametrize("peer", ["gpt2", "modded"])
def test_peer_periodic_eval_is_rows_spread_over_the_whole_stream(peer, request, two_source_data):
    """During training --val-tokens worth of rows, evenly spread from the first row to the last, so both halves of
    the stream (and so both sources) are drawn from; they score exactly what those rows score directly."""
    mod = request.getfixturevalue(peer)
    T, row_nats, evaluate = peer_val_setup(peer, mod, two_source_data)
    n = len(val_shard(two_source_data)) - 1
    n_rows = -(-n // T)
    rows = mod.spread_rows(n + 1, T, 2048)
    assert len(rows) == 2048 // T and rows[0] == 0 and rows[-1] == n_rows - 1 and max(np.diff(rows)) - min(np.diff(rows)) <= 1
    assert min(rows) < n_rows / 2 <= max(rows)
    assert mod.spread_rows(n + 1, T, n) == list(range(n_rows))  # --val-tokens covering the stream: every row
    names, sums = direct_row_sums(row_nats, two_source_data, T)
    score = evaluate(rows)
    check_val_score(score, names, sums[rows].sum(0))
    assert set(score.bpb_by_source()) == {"first.jsonl", "second.jsonl"}
    scored = sum(min(T, n - r * T) for r in rows)
    assert score.scored == scored < score.total == n
    assert score.describe().endswith(f"(subset: {scored:,} of {n:,} targets, spread over the stream)")


@pytest.mark.parametrize("peer", ["gpt2", "modded"])
@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("val_sources"), "val_sources must be a list of"),
    (lambda m: m.update(val_sources={"val.jsonl": 40}), "val_sources must be a list of"),
    (lambda m: m["val_sources"][0].update(n_docs=-1), "val_sources must be a list of"),
    (lambda m: m["val_sources"][0].update(n_docs=True), "val_sources must be a list of"),
    (lambda m: m["val_sources"][0].update(n_docs=39.0), "val_sources must be a list of"),
    (lambda m: m["val_sources"][0].pop("name"), "val_sources must be a list of"),
    (lambda m: m["val_sources"][0].update(n_docs=39), "val_sources count 39 documents, the val shards hold 40 "),
    (lambda m: m["val_sources"].append({"name": "more.txt", "n_docs": 1}), "val_sources count 41 documents"),
    (lambda m: m.update(version=1), "expected format 'pretrain' version 2, got 'pretrain' version 1"),
])
def test_peer_refuses_bad_val_sources_naming_the_manifest(peer, request, edit, message, tiny_data, tmp_path):
    mod = request.getfixturevalue(peer)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = data / "pretrain" / "manifest.json"
    assert json.loads(manifest.read_text())["val_sources"] == [{"name": "val.jsonl", "n_docs": 40}]
    edit_json(str(manifest), edit)
    tok = mod.load_tokenizer(str(data / "tokenizer"))
    with pytest.raises(mod.DataError, match=f"^{re.escape(str(manifest))}: {re.escape(message)}"):
        mod.load_split(str(data), "val", tok)


@pytest.mark.parametrize("path", [GPT2_PATH, MODDED_PATH], ids=["gpt2", "modded"])
def test_peer_cli_refuses_bad_val_sources_in_one_line(path, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = data / "pretrain" / "manifest.json"
    edit_json(str(manifest), lambda m: m["val_sources"][0].update(n_docs=41))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, path, "--preset", "cpu", "--data-dir", str(data), "--run-dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == (f"error: {manifest}: val_sources count 41 documents, the val "
                                                            f"shards hold 40 (<|bos|> tokens)")
    assert not run.exists()


# --- peer stacks with CORE: whole runs -----------------------------------------------------------------------------


def run_stack(path, args, data, run):
    proc = subprocess.run([sys.executable, path, *args, "--data-dir", data, "--run-dir", str(run), "--val-tokens", "2048",
                           "--val-every", "8", "--log-every", "1", "--core-max-per-task", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"stack", "val_bpb", "val_loss", "train_tokens", "params", "params_matrix", "tok_per_s", "device", "world_size",
            "pt_train_time_s", "core", "core_per_task", "core_max_per_task"} <= set(metrics)
    assert metrics["world_size"] == 1 and metrics["device"] == "cpu" and metrics["tok_per_s"] > 0
    assert 0 < metrics["val_bpb"] < 10 and math.isfinite(metrics["val_loss"])
    assert set(metrics["core_per_task"]) == {"mc", "schema", "lm"} and metrics["core_max_per_task"] == 4
    assert metrics["core"] == pytest.approx(np.mean(list(metrics["core_per_task"].values())))
    log = (run / "log.txt").read_text()
    assert log.startswith("config: {") and f"{metrics['stack']} done: val bpb" in proc.stdout.splitlines()[-1]
    losses = [float(x) for x in re.findall(r"^step \d+/16 loss (\S+)", log, re.M)]
    assert len(losses) == 16 and all(map(math.isfinite, losses)) and np.mean(losses[-4:]) < losses[0] - 0.5
    vals = re.findall(r"^step (\d+)/16 val bpb (\S+) val loss (\S+)", log, re.M)
    assert [v[0] for v in vals] == ["8", "16"] and float(vals[-1][1]) == pytest.approx(metrics["val_bpb"], abs=1e-4)
    assert re.search(r"^CORE +(\S+)$", log, re.M) and not any(p.name.endswith(".tmp") for p in run.iterdir())
    return metrics


def test_gpt2_run_writes_metrics_log_core_and_checkpoint(gpt2, core_data, tmp_path):
    run = tmp_path / "run"
    metrics = run_stack(GPT2_PATH, GPT2_TINY + ["--batch-tokens", "1024", "--train-tokens", "16384", "--lr", "3e-3"], core_data, run)
    assert metrics["stack"] == "gpt2-adamw" and metrics["train_tokens"] == 16384
    d, L, V, T = 64, 2, 1024, 128
    assert metrics["params_matrix"] == L * 12 * d * d
    # tied: the embedding is counted once; per block 12 d^2 weights + 9 d biases + 4 d LayerNorm; final LayerNorm
    assert metrics["params"] == V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    assert 0 < metrics["val_loss"] < math.log(V) + 1
    losses = [float(x) for x in re.findall(r"^step \d+/16 loss (\S+)", (run / "log.txt").read_text(), re.M)]
    assert losses[-1] < losses[0] - 0.3

    # the checkpoint holds the trained model: reloaded, it scores the same val bpb
    from safetensors.torch import load_model
    cfg = gpt2.parse_config(GPT2_TINY + ["--data-dir", core_data])
    model = gpt2.GPT(cfg, V)
    load_model(model, str(run / "model.safetensors"))
    tok = gpt2.load_tokenizer(os.path.join(core_data, "tokenizer"))
    score = gpt2.evaluate_bpb(model, gpt2.load_split(core_data, "val", tok), tok.token_bytes, T, 4, torch.device("cpu"))
    bpb, loss = score.bpb, score.loss
    assert bpb == pytest.approx(metrics["val_bpb"], rel=1e-5) and loss == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert metrics["val_bpb_by_source"] == pytest.approx(score.bpb_by_source(), rel=1e-5)
    check_full_val_in_run(metrics, run, core_data, T)


def test_nanochat_run_writes_metrics_log_core_and_checkpoint(nanochat, core_data, tmp_path):
    run = tmp_path / "run"
    args = NANOCHAT_TINY + ["--batch-tokens", "512", "--train-tokens", "8192", "--loader", "bestfit", "--bestfit-buffer", "50"]
    metrics = run_stack(NANOCHAT_PATH, args, core_data, run)
    d, L, V, T = 64, 3, 1024, 128
    assert metrics["stack"] == "nanochat" and metrics["train_tokens"] == 8192
    assert metrics["params_matrix"] == L * 12 * d * d
    # untied wte and lm_head, value embeddings in layers 0 and 2, their gates (2 heads x 12), 2L lambdas, smear, backout
    assert metrics["params"] == 2 * V * d + L * 12 * d * d + 2 * (V * d + 2 * 12) + 2 * L + 24 + 2
    # the checkpoint holds the trained model: reloaded, it scores the same val bpb
    from safetensors.torch import load_model
    model = nanochat.GPT(nanochat.parse_config(NANOCHAT_TINY + ["--data-dir", core_data]), V)
    load_model(model, str(run / "model.safetensors"))
    tok = nanochat.load_tokenizer(os.path.join(core_data, "tokenizer"))
    out = nanochat.evaluate_bpb(model, nanochat.load_val(core_data, tok), tok.token_bytes, T, 4, torch.device("cpu"))
    assert out["bpb"] == pytest.approx(metrics["val_bpb"], rel=1e-5)
    # the final evaluation covers every val target, per source; the periodic one a subset spread over the stream
    assert metrics["val_loss"] == pytest.approx(out["loss"], rel=1e-5) and metrics["val_loss_tokens"] == out["targets"]
    assert metrics["val_bpb_by_source"] == pytest.approx(out["by_source"], rel=1e-5) and list(out["by_source"]) == ["val.jsonl"]
    log = (run / "log.txt").read_text()
    n = len(nanochat.load_val(core_data, tok).tokens) - 1
    rows = np.unique(np.linspace(0, -(-n // T) - 1, 2048 // T).round())  # 16 rows, the first and the (partial) last
    scored = int(sum(min(T, n - r * T) for r in rows))
    assert len(rows) == 16 and 2048 - T < scored <= 2048
    assert f"val: every 8 steps, subset: {scored:,} of {n:,} targets, spread over the stream;" in log
    assert f"final val: every val target ({n:,}), {out['targets']:,} with bytes counted" in log


def test_modded_run_writes_metrics_log_core_and_checkpoint(modded, core_data, tmp_path):
    run = tmp_path / "run"
    metrics = run_stack(MODDED_PATH, MODDED_TINY + ["--attn-backend", "sdpa"], core_data, run)
    assert metrics["stack"] == "modded-nanogpt" and metrics["train_tokens"] == 8192 and metrics["attn_backend"] == "sdpa"
    d, inner = 64, 64
    assert metrics["params_matrix"] == 3 * 4 * inner * d + 4 * 8 * d * d  # attention in 3 of 4 layers, MLPs in all
    log = (run / "log.txt").read_text()
    assert "paired-head layers [0, 2]" in log
    from safetensors.torch import load_file
    state = load_file(str(run / "model.safetensors"))
    assert "blocks.1.q" not in state and "blocks.0.q" in state and not bool(state["tied"])  # untied at 2/3 of the steps
    assert float(state["attn_scale"]) > 0.1  # YaRN grew it with the long window
    check_full_val_in_run(metrics, run, core_data, 512)  # val rows of micro_batch_tokens


def check_full_val_in_run(metrics, run, data, T):
    """A gpt2 / modded run's val numbers: at step 8 (of 16) a subset of --val-tokens 2048 worth of rows of T spread
    over the stream, at the end every val target; metrics and the final line say so, per source."""
    val, tok_bytes = val_shard(data), np.load(os.path.join(data, "tokenizer", "token_bytes.npy"), allow_pickle=False)
    n, counted = len(val) - 1, int((tok_bytes[val[1:]] > 0).sum())
    rows = np.unique(np.linspace(0, -(-n // T) - 1, 2048 // T).round())
    scored = int(sum(min(T, n - r * T) for r in rows.astype(int)))
    assert rows[0] == 0 and rows[-1] == -(-n // T) - 1 and scored < n
    assert metrics["val_loss_tokens"] == counted and set(metrics["val_bpb_by_source"]) == {"val.jsonl"}
    assert metrics["val_bpb_by_source"]["val.jsonl"] == pytest.approx(metrics["val_bpb"], rel=1e-9)  # one source: the total
    log = (run / "log.txt").read_text().splitlines()
    assert re.fullmatch(rf"step 8/16 val bpb \S+ val loss \S+ \(subset: {scored:,} of {n:,} targets, spread over the stream\)",
                        next(l for l in log if l.startswith("step 8/16 val")))
    assert next(l for l in log if l.startswith("step 16/16 val")).endswith(
        f"(every val token: {n:,} targets, {counted:,} with bytes; by source: val.jsonl {metrics['val_bpb']:.4f})")
    assert f"val bpb {metrics['val_bpb']:.4f} over every val token (by source: val.jsonl {metrics['val_bpb']:.4f}), val loss" in log[-1]


@pytest.mark.parametrize("path", [GPT2_PATH, NANOCHAT_PATH, MODDED_PATH], ids=["gpt2", "nanochat", "modded"])
def test_peer_cli_reports_bad_data_in_one_line_and_writes_nothing(path, core_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(core_data, data)
    (data / "core" / "examples.npy").unlink()
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, path, "--preset", "cpu", "--data-dir", str(data), "--run-dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {data / 'core' / 'examples.npy'}: missing"
    assert not run.exists()


def check_cropped_scores(peer, model, seqs, bos_id, T):
    """A peer's batched CORE scores (mean continuation loss, all argmax-right) equal one forward of each sequence
    cropped to its last T tokens (the context), padding and batching invisible; returns them."""
    batched = peer.sequence_scores(model, seqs, bos_id, "cpu")
    for (tokens, start, end), (mean_loss, all_right) in zip(seqs, batched):
        crop = max(0, len(tokens) - T)
        assert start - crop >= 1  # the fixture's continuations fit the context
        ids = torch.from_numpy(tokens[crop:])
        logits = model(ids[None])[0, start - crop - 1:end - crop - 1]
        targets = ids[start - crop:end - crop]
        expected = F.cross_entropy(logits, targets).item() if end > start else float("nan")
        np.testing.assert_allclose(mean_loss, expected, rtol=1e-5, equal_nan=True)
        assert all_right == bool((logits.argmax(-1) == targets).all())
    return batched


@torch.no_grad()
def test_gpt2_core_crops_to_its_context_and_padding_is_invisible(gpt2, core_data):
    """GPT-2 has no positions past seq_len: a longer CORE sequence is scored on its last seq_len tokens, as nanochat
    scores GPT-2. Batched, cropped and padded rows score exactly as each cropped sequence forwarded alone."""
    tok = gpt2.load_tokenizer(os.path.join(core_data, "tokenizer"))
    core = gpt2.load_core(core_data, tok)
    T = 96
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.parse_config(GPT2_TINY + ["--seq-len", str(T), "--batch-tokens", "960", "--data-dir", core_data]), tok.vocab_size).eval()
    seqs = [core.sequence(i) for i in range(len(core.sequences))]
    assert sum(len(t) > T for t, _, _ in seqs) > 5 and sum(len(t) <= T for t, _, _ in seqs) > 5
    batched = check_cropped_scores(gpt2, model, seqs, tok.bos_id, T)
    # evaluate_core agrees with the per-sequence scores and nanochat's decision rule
    out = gpt2.evaluate_core(model, core, tok.bos_id, "cpu", batch_tokens=256)
    for task in core.tasks:
        examples = core.examples[task["first_example"]:task["first_example"] + task["n_examples"]]
        correct = sum(gpt2.core_decision(task["task_type"], int(gold), [batched[s][0] for s in range(a, a + k)],
                                         [batched[s][1] for s in range(a, a + k)]) for _, gold, a, k in examples)
        assert out["results"][task["label"]] == correct / len(examples)


# --- nanochat invariants -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, n_layers, seq_len, expected", [
    ("SSSL", 6, 2048, [512, 512, 512, 2048, 512, 2048]),  # tiled, the last layer always long
    ("SSSL", 4, 512, [128, 128, 128, 512]),               # the cpu preset: a quarter of 512 is exactly 128
    ("SL", 3, 600, [256, 600, 600]),                      # 150 rounds up to FA3's tile of 128
    ("L", 2, 128, [128, 128]),
])
def test_nanochat_window_pattern_is_what_the_config_says(nanochat, pattern, n_layers, seq_len, expected):
    cfg = nanochat.parse_config(["--preset", "cpu", "--data-dir", "x", "--window-pattern", pattern,
                                 "--n-layers", str(n_layers), "--seq-len", str(seq_len), "--batch-tokens", str(seq_len)])
    assert nanochat.window_sizes(cfg) == expected


@pytest.mark.parametrize("window", [0, 5, 30, 31, 100])
def test_nanochat_attention_sees_exactly_its_window(nanochat, window):
    """A query at i sees keys i - window .. i of its row and nothing else (documents are not masked)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 32, 8).unbind(0)
    y = nanochat.causal_attention(q, k, v, window)
    i = torch.arange(32)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)
    scores = (q @ k.mT / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(y, scores.softmax(-1) @ v, atol=1e-6, rtol=1e-5)


def bestfit_reference(documents, n_rows, width, buffer_size):
    """nanochat's loop, written plainly: per row, repeatedly the largest buffered document that fits (the first of
    equals), or when none fits the shortest one cropped to the room left."""
    buffer, rows = [], []
    for _ in range(n_rows):
        row = []
        while len(row) < width:
            while len(buffer) < buffer_size:
                buffer.append(next(documents))
            room = width - len(row)
            best = -1
            for i, d in enumerate(buffer):
                if len(d) <= room and (best < 0 or len(d) > len(buffer[best])):
                    best = i
            row += buffer.pop(best) if best >= 0 else buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[:room]
        rows.append(row)
    return rows


def test_nanochat_bestfit_rows(nanochat, tiny_data):
    """Best-fit rows are nanochat's: each starts with <|bos|> and holds whole documents but for a cropped last one;
    the rows equal those of the plain reference loop, which takes each document out of the buffer once."""
    tok = nanochat.load_tokenizer(os.path.join(tiny_data, "tokenizer"))
    docs = nanochat.Documents(nanochat.load_split(tiny_data, "train", tok), tok.bos_id)
    in_order = [np.asarray(docs.stream.shards[s][a:b]).tolist() for s, a, b in docs.spans]
    whole = {tuple(d) for d in in_order}
    assert len(in_order) > 100 and all(d[0] == tok.bos_id for d in in_order)
    loader = nanochat.BestFitLoader(docs, 4, 63, 20, "cpu")
    rows = []
    for _ in range(6):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows += torch.cat([x, y[:, -1:]], dim=1).tolist()
    assert rows == bestfit_reference(iter(in_order), 24, 64, 20)
    pieces = []
    for row in rows:
        starts = [i for i, t in enumerate(row) if t == tok.bos_id] + [len(row)]
        parts = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
        assert starts[0] == 0 and all(p in whole for p in parts[:-1])
        assert any(d[:len(parts[-1])] == parts[-1] for d in whole)  # whole or cropped
        pieces += parts
    assert docs.i < len(docs.spans) and len(pieces) > len(rows)  # some rows hold several documents; no wrap yet


def test_nanochat_muon_update_has_the_norm_of_an_orthogonal_matrix(nanochat):
    """Muon+ snaps the orthogonalised update to Frobenius norm sqrt(min(rows, cols)) and NorMuon's rescaling keeps
    it; without weight decay each matrix moves by exactly lr times that."""
    torch.manual_seed(0)
    for rows, cols in [(48, 16), (16, 48), (32, 32)]:
        p, g = torch.randn(3, rows, cols), torch.randn(3, rows, cols)
        before = p.clone()
        second = torch.zeros(3, *((rows, 1) if rows >= cols else (1, cols)))
        nanochat.muon_update(p, g, torch.zeros_like(p), second, 0.95, 0.01, 0.0)
        moved = (p - before).norm(dim=(-2, -1))
        torch.testing.assert_close(moved, torch.full((3,), 0.01 * min(rows, cols) ** 0.5), rtol=1e-5, atol=0)
        sv = torch.linalg.svdvals(nanochat.polar_express(g))
        assert sv.min() > 0.5 and sv.max() < 1.3  # Polar Express lands the singular values near 1


@torch.no_grad()
def test_nanochat_core_rows_padding_is_invisible(nanochat, core_data):
    """CORE sequences of different lengths in one right-padded forward score exactly as each forwarded alone."""
    tok = nanochat.load_tokenizer(os.path.join(core_data, "tokenizer"))
    core = nanochat.load_core(core_data, tok)
    torch.manual_seed(0)
    model = nanochat.GPT(nanochat.parse_config(NANOCHAT_TINY + ["--data-dir", core_data]), tok.vocab_size)
    for name, p in model.named_parameters():
        if "c_proj" in name:
            p.normal_(0, 0.05)  # zero-initialised: make every block do something
    seqs = [core.sequence(i) for i in range(len(core.sequences))]
    assert len({len(t) for t, _, _ in seqs}) > 5
    batched = nanochat.sequence_scores(model, seqs, tok.bos_id, "cpu")
    alone = [nanochat.sequence_scores(model, [s], tok.bos_id, "cpu")[0] for s in seqs]
    np.testing.assert_allclose([b[0] for b in batched], [a[0] for a in alone], rtol=1e-5, equal_nan=True)
    assert [b[1] for b in batched] == [a[1] for a in alone]


@pytest.fixture(scope="module")
def nanochat_val_data(tiny_data, tmp_path_factory):
    """The tiny data with its val documents credited by val_sources to three runs, one source twice (a, b, a)."""
    from test_nanochat_checkpoints import with_val_sources
    root = tmp_path_factory.mktemp("nanochat_val") / "data"
    shutil.copytree(tiny_data, root)
    with_val_sources(str(root / "pretrain"), lambda n: [("a.txt", 10), ("b.txt", n - 25), ("a.txt", 15)])
    return str(root)


@torch.no_grad()
def test_nanochat_bpb_scores_every_val_target_once_per_source(nanochat, nanochat_val_data):
    """Direct computation, row by row through the model alone (the last row shorter, unpadded): every target
    1 .. n_val - 1 once, in rows of seq_len; bpb, loss, counted targets and per-source bpb (a source's runs together)
    equal the peer's batched, padded evaluation, and the per-source numbers recombine to the total. The periodic
    subset is the same computation over rows spread evenly over the stream."""
    data = nanochat_val_data
    tok = nanochat.load_tokenizer(os.path.join(data, "tokenizer"))
    val = nanochat.load_val(data, tok)
    torch.manual_seed(0)
    model = nanochat.GPT(nanochat.parse_config(NANOCHAT_TINY + ["--data-dir", data]), tok.vocab_size).eval()
    for name, p in model.named_parameters():
        if "c_proj" in name:
            p.normal_(0, 0.05)
    tokens = val_shard(data).astype(np.int64)
    n, T = len(tokens) - 1, 128
    assert np.array_equal(val.tokens, tokens) and n % T and n // T > 10
    manifest = json.loads(open(os.path.join(data, "pretrain", "manifest.json")).read())
    run_names = [r["name"] for r in manifest["val_sources"]]
    doc_source = np.repeat([["a.txt", "b.txt"].index(x) for x in run_names], [r["n_docs"] for r in manifest["val_sources"]])
    source = doc_source[np.cumsum(tokens == tok.bos_id) - 1]
    rows = []  # per row, per source: nats, bytes, counted
    for r in range(-(-n // T)):
        t = torch.from_numpy(tokens[r * T:r * T + T + 1])
        nll = F.cross_entropy(model(t[:-1][None])[0], t[1:], reduction="none").double().numpy()
        pos = np.arange(r * T + 1, r * T + len(t))
        w = tok.token_bytes[tokens[pos]]
        rows.append([[nll[(source[pos] == s) & (w > 0)].sum(), w[source[pos] == s].sum(), ((source[pos] == s) & (w > 0)).sum()]
                     for s in range(2)])
    rows = np.array(rows)

    def check(out, picked):
        sums = rows[picked].sum(0)
        nats, nbytes, count = sums.sum(0)
        assert out["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
        assert out["loss"] == pytest.approx(nats / count, rel=1e-5) and out["targets"] == count
        expected = {name: s[0] / (math.log(2) * s[1]) for name, s in zip(["a.txt", "b.txt"], sums)}
        assert out["by_source"] == pytest.approx(expected, rel=1e-5) and list(out["by_source"]) == ["a.txt", "b.txt"]
        recombined = sum(out["by_source"][name] * s[1] for name, s in zip(["a.txt", "b.txt"], sums)) / nbytes
        assert recombined == pytest.approx(out["bpb"], rel=1e-9)

    out = nanochat.evaluate_bpb(model, val, tok.token_bytes, T, 3, "cpu")  # 3 rows a forward: the last batch partial
    check(out, np.arange(len(rows)))
    assert out["of"] == n and out["what"] == f"every val target ({n:,})"
    sub = nanochat.evaluate_bpb(model, val, tok.token_bytes, T, 3, "cpu", subset=5 * T)
    picked = np.unique(np.linspace(0, len(rows) - 1, 5).round().astype(int))
    assert len(picked) == 5 and picked[0] == 0 and picked[-1] == len(rows) - 1
    check(sub, picked)
    scored = 4 * T + n - (len(rows) - 1) * T
    assert sub["what"] == f"subset: {scored:,} of {n:,} targets, spread over the stream"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(version=1), "expected format 'pretrain' version 2, got 'pretrain' version 1"),
    (lambda m: m.pop("val_sources"), "'val_sources' must be a non-empty list"),
    (lambda m: m.update(val_sources={"val.jsonl": 40}), "'val_sources' must be a non-empty list"),
    (lambda m: m["val_sources"][0].update(n_docs=str(m["val_sources"][0]["n_docs"])), "'val_sources' must be a non-empty list"),
    (lambda m: m["val_sources"][0].update(n_docs=True), "'val_sources' must be a non-empty list"),
    (lambda m: m["val_sources"][0].update(n_docs=-1), "'val_sources' must be a non-empty list"),
    (lambda m: m["val_sources"][0].pop("name"), "'val_sources' must be a non-empty list"),
    (lambda m: m["val_sources"].append({"name": "more.jsonl", "n_docs": 1}), "val_sources count {n+1} documents, but the val stream holds {n}"),
])
def test_nanochat_refuses_bad_val_sources_naming_the_manifest(nanochat, tiny_data, tmp_path, edit, message):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    path = data / "pretrain" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["version"] == 2 and [r["name"] for r in manifest["val_sources"]] == ["val.jsonl"]
    n = manifest["val_sources"][0]["n_docs"]
    edit(manifest)
    path.write_text(json.dumps(manifest))
    tok = nanochat.load_tokenizer(str(data / "tokenizer"))
    message = message.replace("{n+1}", str(n + 1)).replace("{n}", str(n))
    with pytest.raises(nanochat.DataError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
        nanochat.load_val(str(data), tok)


# --- modded-nanogpt invariants -------------------------------------------------------------------------------------


def modded_model(modded, vocab_size, extra=(), seed=0):
    """The tiny model with its zero-initialised projections, bigram table and smear randomised."""
    torch.manual_seed(seed)
    model = modded.GPT(modded.parse_config(MODDED_TINY + ["--data-dir", "x", *extra]), vocab_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".o", ".proj", "bigram_embed", "smear_lambda", "attn_gate", "ve_gate")):
                p.normal_(0, 0.1)
    return model


def packed(modded, lengths, vocab_size, bos=None, seed=0):
    """A packed batch of documents of the given lengths (BOS-started unless bos is None: then prev_ids mark them)."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, vocab_size - 1, n) for n in lengths]
    return modded.packed_sequences(seqs, "cpu"), seqs


def rotate_reference(x, position, freqs):
    """RoPE by hand: dim i and dim i + D/2 turn by position * freqs[i] (as complex numbers)."""
    D = x.numel() // 2
    z = torch.complex(x[:D].double(), x[D:].double()) * torch.polar(torch.ones(D, dtype=torch.float64), -position * freqs.double())
    return torch.cat([z.real, z.imag]).float()


@torch.no_grad()
@pytest.mark.parametrize("window", [3, 9, 1000])
def test_paired_head_attention_equals_its_reference(modded, window):
    """The record's paired heads, written out: heads h and h + H/2 of every token form one head over 2T slots (token t's
    first H/2 heads in slot 2t, the others in 2t + 1); a query sees the slots of its own document up to its own,
    at most `window` slots back; head h rotates as position 2p + (h mod 2). Checked through a whole paired block."""
    model = modded_model(modded, 64)
    block, H, D = model.blocks[0], 4, 16
    assert 0 in model.paired_head_layers
    batch, _ = packed(modded, [7, 12, 5], 64)
    x = torch.randn(24, 64)
    out = block(x, None, model.rotary, batch, 0.3, window, True, False, "sdpa")

    h = modded.norm(x)
    q, k, v = ((h @ w.T).view(24, H, D) for w in (block.q, block.k, block.v))
    q, k = modded.norm(q), modded.norm(k)  # QK-norm per head
    pos, doc = batch.positions, modded.segment_ids(batch.cu_seqlens, 24)
    rot = lambda t, hh, z: rotate_reference(z, 2 * int(pos[t]) + hh % 2, model.rotary.freqs)
    slot = lambda t, hh: 2 * t + hh // (H // 2)
    y = torch.zeros(24, H, D)
    for t in range(24):
        for hh in range(H):
            keys = [(t2, h2) for t2 in range(24) for h2 in range(H) if h2 % (H // 2) == hh % (H // 2) and doc[t2] == doc[t]
                    and slot(t2, h2) <= slot(t, hh) and slot(t, hh) - slot(t2, h2) <= window]
            scores = torch.stack([0.3 * rot(t, hh, q[t, hh]) @ rot(t2, h2, k[t2, h2]) for t2, h2 in keys])
            y[t, hh] = scores.softmax(0) @ torch.stack([v[t2, h2] for t2, h2 in keys])
    y = y * torch.sigmoid(h[:, :12] @ block.attn_gate.T)[..., None]
    x2 = x + y.flatten(-2) @ block.o.T
    expected = x2 + torch.relu(modded.norm(x2) @ block.fc.T).square() @ block.proj.T
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_partial_key_offset_shifts_exactly_the_stationary_dims(modded):
    """Only the dims RoPE leaves alone (frequency 0: D/4..D/2 and 3D/4..D) take the previous token's values, and
    not across a document start; and only long-window layers without paired heads use it."""
    model = modded_model(modded, 64)
    D = 16
    stationary = model.rotary.stationary()
    assert stationary.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    k = torch.randn(10, 4, D)
    prev = torch.tensor([-1, 5, 5, 5, -1, 5, 5, -1, -1, 5])
    out = modded.partial_key_offset(k, prev, stationary)
    for t in range(10):
        expected = k[t].clone()
        if prev[t] >= 0:
            expected[:, stationary] = k[t - 1][:, stationary]
        assert torch.equal(out[t], expected)
    # a rotation leaves the stationary dims as they were: shifting before or after RoPE is the same
    pos = torch.arange(10)[:, None] * 7
    assert torch.equal(model.rotary(k, pos)[..., stationary], k[..., stationary])

    layers = []
    original = modded.partial_key_offset
    modded.partial_key_offset = lambda *a: layers.append(len(layers)) or original(*a)
    try:
        batch, _ = packed(modded, [40, 24], 64)
        model.hidden(batch, model.windows(8, 32))  # long-window layer 3 (unpaired); paired layers 0, 2; layer 1 MLP-only
        assert len(layers) == 1
        model3 = modded_model(modded, 64, ["--long-window-layers", "0,3"])
        model3.hidden(batch, model3.windows(8, 32))  # layer 0 is long but paired: still only layer 3
        assert len(layers) == 2
    finally:
        modded.partial_key_offset = original


@torch.no_grad()
def test_modded_without_its_additions_is_the_main_stack(modded, stack):
    """Paired heads, key offset and MLP-only layers switched off, the stack computes exactly what the main stack
    computes with the same weights: the diff between the two files is those three features."""
    args = ["--preset", "cpu", "--n-layers", "3", "--model-dim", "64", "--n-heads", "2", "--head-dim", "32",
            "--long-window-layers", "1", "--value-embed-layers", "0,2"]
    torch.manual_seed(0)
    main = stack.GPT(stack.ModelConfig.of(stack.parse_config(args), 300))
    for p in main.parameters():
        p.normal_(0, 0.1)
    ours = modded.GPT(modded.parse_config(args + ["--data-dir", "x", "--paired-head-layers", "", "--no-attn-layers", "",
                                                  "--no-key-offset"]), 300)
    ours.load_state_dict(main.state_dict())
    for m in (main, ours):
        m.grow_window(16, 48)  # YaRN on the shared frequencies and scale
        m.untie()
    buf = np.random.default_rng(0).integers(0, 299, 201)
    buf[[0, 37, 90, 91, 150]] = 299
    windows = ours.windows(16, 48)
    b, mb = modded.make_batch(buf, 299, 64, 2, "cpu"), stack.make_batch(buf, 299, 64, 2, "cpu")
    assert torch.equal(b.targets, mb.targets) and torch.equal(b.cu_seqlens, mb.cu_seqlens)
    h_main = main.hidden(mb, windows, "sdpa")
    torch.testing.assert_close(ours.hidden(b, windows), h_main, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logits(h_main), main.logits(h_main))
    weights = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(modded.train_loss(ours, b, windows, weights, "sdpa"),
                               stack.train_loss(main, mb, windows, weights, "sdpa"), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_modded_packed_core_scores_equal_each_sequence_alone(modded, core_data):
    """Paired heads and the key offset stay inside each document, so CORE sequences packed into one forward score
    as each forwarded alone."""
    tok = modded.load_tokenizer(os.path.join(core_data, "tokenizer"))
    core = modded.load_core(core_data, tok)
    model = modded_model(modded, tok.vocab_size)
    windows = model.windows(8, 40)
    seqs = [core.sequence(i) for i in range(len(core.sequences))]
    assert any(t[0] != tok.bos_id for t, _, _ in seqs) and any(s == e for _, s, e in seqs)
    together = modded.sequence_scores(model, seqs, windows, "cpu", "sdpa")
    alone = [modded.sequence_scores(model, [s], windows, "cpu", "sdpa")[0] for s in seqs]
    np.testing.assert_allclose([a[0] for a in together], [a[0] for a in alone], rtol=1e-5, equal_nan=True)
    assert [a[1] for a in together] == [a[1] for a in alone]


@pytest.mark.parametrize("window", [0, 3, 1000])
def test_modded_fa3_call_matches_the_reference(modded, stack, monkeypatch, window):
    """The peer's FA3 path (GPU only) through a stand-in with FA3's exact varlen signature: what FA requires of the
    call, and the answer the main stack's per-document reference gives."""
    import types
    from test_attention import make_standins, packed as packed_qkv
    calls = []
    fa3 = make_standins(stack, calls, fa3_returns_lse=True)["fa3"]
    monkeypatch.setattr(modded, "flash_attn3", lambda: types.SimpleNamespace(flash_attn_varlen_func=fa3))
    q, k, v, cu = packed_qkv([5, 17, 1, 30, 11], 3, 2, 16, dtype=torch.bfloat16)
    out = modded.attention(q, k, v, cu, 30, window, 0.25, "fa3")
    assert calls == [(min(window, len(q)), 0)]
    torch.testing.assert_close(out, stack.attention_reference(q, k, v, cu, window, 0.25), atol=0, rtol=0)
