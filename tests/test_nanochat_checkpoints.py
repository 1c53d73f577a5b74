"""The nanochat peer scoring nanochat's own checkpoints (--phases eval --init-from): a checkpoint written in nanochat's
layout and key names (model_<step>.pt, a plain state dict; meta_<step>.json with its model_config) from a tiny peer
model, its tokenizer a pickled tiktoken Encoding imported with data/tokenizer.py, the val / CORE / chat-eval data
written with that tokenizer. Same weights give the same numbers; the latest step is picked; a checkpoint that does
not fit, holds more than tensors, or lacks its meta file is refused with one error naming the file."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import chat_eval_shards
import core_shards
import pretrain_shards
from conftest import ROOT, load_module, stdlib_text, write_eval_sources
from test_core_eval import MAX_LEN, TASKS, one_thread, write_bundle  # noqa: F401 (one_thread: an autouse fixture)

NANOCHAT_PATH = os.path.join(ROOT, "models", "nanochat", "train_nanochat.py")
TINY = ["--preset", "cpu", "--n-layers", "3", "--model-dim", "64", "--n-heads", "2", "--seq-len", "128"]
N_RANKS = 600  # the tiny tokenizer: the first 600 merges of the session's, then nanochat's 9 special tokens
SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


def val_bos_count(pretrain_dir, manifest):
    """<|bos|> tokens in the val shards, read straight from the files (256 int32 header words, then the ids)."""
    n = 0
    for shard in manifest["shards"]:
        if shard["split"] == "val":
            path = os.path.join(pretrain_dir, shard["file"])
            width = int(np.fromfile(path, dtype="<i4", count=4)[3])
            n += int((np.fromfile(path, dtype="<u2" if width == 2 else "<u4", offset=1024) == manifest["bos_id"]).sum())
    return n


def with_val_sources(pretrain_dir, runs=None):
    """The pretrain manifest as version 2 (data/README.md): a version 1 one gains seed, max_doc_chars and val_sources
    (one source for every val document); runs(n_docs) -> [(name, n_docs)] replaces val_sources."""
    path = os.path.join(pretrain_dir, "manifest.json")
    manifest = json.loads(open(path).read())
    n = val_bos_count(pretrain_dir, manifest)
    if manifest["version"] == 1:
        manifest.update(version=2, seed=None, max_doc_chars=0, val_sources=[{"name": "val", "n_docs": n}])
    if runs is not None:
        manifest["val_sources"] = [{"name": name, "n_docs": k} for name, k in runs(n)]
    with open(path, "w") as f:
        f.write(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def nanochat():
    return load_module(NANOCHAT_PATH, "train_nanochat")


def nanochat_state(model):
    """The peer's state dict under nanochat's key names, embeddings in bf16 (as nanochat keeps them)."""
    out = {}
    for key, value in model.state_dict().items():
        name = "transformer." + key if key.startswith("wte.") else "transformer.h." + key[7:] if key.startswith("blocks.") else key
        out[name] = value.bfloat16() if key.startswith(("wte.", "value_embeds.")) else value.clone()
    return out


def tiny_model(nanochat, vocab_size, seed, extra=()):
    """A tiny peer model with every zero-initialised part randomised and its embeddings rounded to bf16 (what the
    checkpoint will hold), so that saving and loading it is exact."""
    torch.manual_seed(seed)
    model = nanochat.GPT(nanochat.parse_config(TINY + ["--data-dir", "x", *extra]), vocab_size).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or name == "lm_head.weight":  # zero or near zero at init: make the steps differ
                p.normal_(0, 0.05)
            if name.startswith(("wte.", "value_embeds.")):
                p.copy_(p.bfloat16().float())
        model.smear_lambda.fill_(0.3)
    return model


def meta(vocab_size, step, window_pattern="SSSL"):
    config = {"sequence_len": 128, "vocab_size": vocab_size, "n_layer": 3, "n_head": 2, "n_kv_head": 2, "n_embd": 64}
    if window_pattern:
        config["window_pattern"] = window_pattern
    return {"step": step, "val_bpb": 1.5, "model_config": config, "user_config": {"depth": 3}, "device_batch_size": 4,
            "max_seq_len": 128, "total_batch_size": 512, "dataloader_state_dict": {"pq_idx": 0}, "loop_state": {"min_val_bpb": 1.5}}


def save_checkpoint(directory, step, state, meta_data):
    os.makedirs(directory, exist_ok=True)
    torch.save(state, os.path.join(directory, f"model_{step:06d}.pt"))
    with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
        json.dump(meta_data, f, indent=2)


@pytest.fixture(scope="module")
def env(nanochat, tok_dir, tmp_path_factory):
    """nanochat's base directory (tokenizer/tokenizer.pkl + token_bytes.pt, base_checkpoints/d3/model_00000{5,10}.pt
    with their meta files) and a data directory prepared with its tokenizer: two val sources, CORE, chat eval."""
    import tiktoken
    import tokenizer
    root = tmp_path_factory.mktemp("nanochat_ckpt")
    base, data = root / "nanochat", root / "data"
    ours = tokenizer.Tokenizer.load(tok_dir)
    ranks = {t: r for t, r in ours.mergeable_ranks.items() if r < N_RANKS}
    enc = tiktoken.Encoding("rustbpe", pat_str=ours.pattern, mergeable_ranks=ranks,
                            special_tokens={name: N_RANKS + i for i, name in enumerate(SPECIALS)})
    (base / "tokenizer").mkdir(parents=True)
    (base / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data", "tokenizer.py"), "import",
                           str(base / "tokenizer" / "tokenizer.pkl"), "--out", str(data / "tokenizer")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tok = tokenizer.Tokenizer.load(str(data / "tokenizer"))
    vocab = tok.vocab_size
    assert vocab == N_RANKS + len(SPECIALS)
    torch.save(torch.from_numpy(tok.token_bytes()), base / "tokenizer" / "token_bytes.pt")

    texts = stdlib_text()
    src = root / "src"
    src.mkdir()
    for i, t in enumerate(texts[:30]):
        (src / f"doc{i:02d}.txt").write_text(t)
    val_a, val_b = root / "val_a.jsonl", root / "val_b.jsonl"
    val_a.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[-40:-25]))
    val_b.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[-25:]))
    pretrain_shards.write_pretrain(sorted(map(str, src.iterdir())), [str(val_a), str(val_b)], str(data / "tokenizer"),
                                   str(data / "pretrain"), shard_tokens=20000, progress=False)
    manifest = with_val_sources(str(data / "pretrain"))
    if [r["name"] for r in manifest["val_sources"]] == ["val"]:  # written as version 1: credit the files by hand
        with_val_sources(str(data / "pretrain"), lambda n: [("val_a.jsonl", 15), ("val_b.jsonl", n - 15)])
    core_shards.write_core(write_bundle(root / "bundle", TASKS), str(data / "tokenizer"), str(data / "core"), max_len=MAX_LEN)
    write_eval_sources(root / "eval")
    chat_eval_shards.write_chat_eval(str(root / "eval"), str(data / "tokenizer"), str(data / "chat_eval"))

    ckpt = base / "base_checkpoints" / "d3"
    models = {step: tiny_model(nanochat, vocab, step) for step in (5, 10)}
    for step, model in models.items():
        save_checkpoint(ckpt, step, nanochat_state(model), meta(vocab, step))
    return dict(root=root, base=base, ckpt=str(ckpt), data=str(data), models=models, vocab=vocab)


def eval_cfg(nanochat, init_from, data, run, *extra):
    return nanochat.parse_config(TINY[:2] + ["--phases", "eval", "--init-from", init_from, "--data-dir", data,
                                             "--run-dir", str(run), "--core-max-per-task", "0", "--chat-max-per-task", "0", *extra])


def reference(nanochat, model, data):
    """The saved model's val score, computed in this process with the peer's evaluation."""
    tok = nanochat.load_tokenizer(os.path.join(data, "tokenizer"))
    return nanochat.evaluate_bpb(model, nanochat.load_val(data, tok), tok.token_bytes, 128, 32, torch.device("cpu"))


def test_eval_mode_scores_the_saved_weights_of_the_latest_step(nanochat, env, tmp_path):
    """The CLI on the checkpoint directory: step 10 (the latest) is loaded, and its bpb, loss, per-source bpb, CORE
    and chat accuracy are those of the model that was saved."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, NANOCHAT_PATH, "--preset", "cpu", "--phases", "eval", "--init-from", env["ckpt"],
                           "--data-dir", env["data"], "--run-dir", str(run), "--core-max-per-task", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    model = env["models"][10]
    ref, ref5 = reference(nanochat, model, env["data"]), reference(nanochat, env["models"][5], env["data"])
    assert metrics["step"] == 10 and metrics["checkpoint"].endswith("model_000010.pt") and metrics["init_from"] == env["ckpt"]
    assert metrics["nanochat_gpt"] == "2026-03" and metrics["meta_val_bpb"] == 1.5
    assert metrics["val_bpb"] == pytest.approx(ref["bpb"], rel=1e-6) and metrics["val_loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert abs(ref["bpb"] - ref5["bpb"]) > 1e-3  # the two steps are told apart
    assert metrics["val_bpb_by_source"] == pytest.approx(ref["by_source"], rel=1e-6)
    assert list(metrics["val_bpb_by_source"]) == ["val_a.jsonl", "val_b.jsonl"] and metrics["val_loss_tokens"] == ref["targets"]
    assert metrics["params"] == sum(p.numel() for p in model.parameters())

    tok = nanochat.load_tokenizer(os.path.join(env["data"], "tokenizer"))
    core = nanochat.evaluate_core(model, nanochat.load_core(env["data"], tok), tok.bos_id, "cpu", 8)
    assert metrics["core"] == pytest.approx(core["core"], abs=1e-9) and metrics["core_per_task"] == pytest.approx(core["centered"])
    chat = nanochat.load_chat_eval(env["data"], tok)
    expected = nanochat.evaluate_chat_categorical(model, chat, tok.bos_id, "cpu")
    assert set(metrics["chat_per_task"]) == {t["name"] for t in chat.tasks if t["kind"] == "categorical"} == set(expected["results"])
    assert metrics["chat_per_task"] == expected["results"] and metrics["chat_max_per_task"] == -1
    log = (run / "log.txt").read_text()
    assert "step 10" in log and "token_bytes.pt agrees with the data's tokenizer" in log
    assert "every val target" in log and "categorical tasks only" in log


def test_chat_categorical_is_the_letter_argmax(nanochat, env):
    """Each categorical example's answer is the argmax of the last position's logits over its own letters."""
    tok = nanochat.load_tokenizer(os.path.join(env["data"], "tokenizer"))
    chat = nanochat.load_chat_eval(env["data"], tok)
    model = env["models"][10]
    out = nanochat.evaluate_chat_categorical(model, chat, tok.bos_id, "cpu", batch_tokens=64)  # several batches
    for task in chat.tasks:
        if task["kind"] != "categorical":
            continue
        rows = chat.examples[task["first_example"]:task["first_example"] + task["n_examples"]]
        right = 0
        for _, offset, length, gold, choices in rows:
            ids = torch.from_numpy(np.asarray(chat.tokens[offset:offset + length]).astype(np.int64))
            with torch.no_grad():
                logits = model(ids[None])[0, -1]
            right += int(logits[chat.letter_ids[:choices]].argmax()) == gold
        assert out["results"][task["name"]] == right / len(rows)


@pytest.mark.parametrize("form", ["@5", "/model_000005.pt"])
def test_a_given_step_is_the_one_loaded(nanochat, env, tmp_path, form):
    metrics = nanochat.evaluate_checkpoint(eval_cfg(nanochat, env["ckpt"] + form, env["data"], tmp_path / "run"))
    assert metrics["step"] == 5 and metrics["val_bpb"] == pytest.approx(reference(nanochat, env["models"][5], env["data"])["bpb"], rel=1e-6)
    assert "core" not in metrics and "chat_per_task" not in metrics
    with pytest.raises(nanochat.DataError, match=re.escape(f"{env['ckpt']}: no checkpoint of step 7 (steps: 5, 10)")):
        nanochat.evaluate_checkpoint(eval_cfg(nanochat, env["ckpt"] + "@7", env["data"], tmp_path / "run7"))


def one_checkpoint(env, tmp_path, edit=None, step=10):
    """A copy of step `step` alone, its state dict edited by edit(state) (in place)."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json"):
        shutil.copy(os.path.join(env["ckpt"], name), directory / name)
    if edit:
        path = directory / f"model_{step:06d}.pt"
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    return directory


def rename(old, new):
    return lambda state: state.__setitem__(new, state.pop(old))


@pytest.mark.parametrize("edit, message", [
    (rename("transformer.h.1.attn.c_q.weight", "transformer.h.1.attn.c_query.weight"),
     "unexpected key 'transformer.h.1.attn.c_query.weight': not in nanochat's GPT of 2026-03"),
    (lambda s: s.__setitem__("transformer.h.2.mlp.c_fc.weight", torch.zeros(128, 64)),
     "'transformer.h.2.mlp.c_fc.weight' has shape (128, 64), but the GPT meta_000010.json configures needs (256, 64)"),
    (lambda s: s.pop("lm_head.weight"), "no 'lm_head.weight', which nanochat's GPT of 2026-03"),
    (lambda s: s.pop("value_embeds.2.weight"), "no 'value_embeds.2.weight'"),
    (lambda s: [s.pop(k) for k in ("smear_gate.weight", "smear_lambda", "backout_lambda")],
     "nanochat's GPT of 2026-01-11 .. 2026-03-14 (residual lambdas or value embeddings, but no smear_gate): not a version"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_file_and_key(nanochat, env, tmp_path, edit, message):
    directory = one_checkpoint(env, tmp_path, edit)
    with pytest.raises(nanochat.DataError, match=f"^{re.escape(str(directory / 'model_000010.pt'))}: {re.escape(message)}"):
        nanochat.evaluate_checkpoint(eval_cfg(nanochat, str(directory), env["data"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


class System:
    """Pickled, it is os.system(command): what a hostile checkpoint would run."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("payload", ["object", "os.system"])
def test_a_pickle_bearing_checkpoint_is_refused_by_weights_only_loading(nanochat, env, tmp_path, payload):
    """A state dict holding an arbitrary object (here an argparse.Namespace, or a reduce to os.system) is refused by
    torch.load(weights_only=True) before anything of it runs."""
    import argparse
    marker = tmp_path / "ran"
    extra = argparse.Namespace(lr=0.1) if payload == "object" else System(f"touch {marker}")
    directory = one_checkpoint(env, tmp_path, lambda s: s.__setitem__("note", extra))
    path = directory / "model_000010.pt"
    with pytest.raises(nanochat.DataError, match=f"^{re.escape(str(path))}: refused by torch.load\\(weights_only=True\\), which "
                                                 "reads tensors and plain containers only: it refers to (argparse\\.Namespace|\\w+\\.system)$"):
        nanochat.evaluate_checkpoint(eval_cfg(nanochat, str(directory), env["data"], tmp_path / "run"))
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_missing_meta_file_is_one_error_and_writes_nothing(env, tmp_path):
    directory = one_checkpoint(env, tmp_path)
    (directory / "meta_000010.json").unlink()
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, NANOCHAT_PATH, "--preset", "cpu", "--phases", "eval", "--init-from", str(directory),
                           "--data-dir", env["data"], "--run-dir", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not run.exists()
    assert proc.stderr.strip() == (f"error: {directory / 'meta_000010.json'}: missing: nanochat writes it beside model_000010.pt, "
                                   "and the model's config is read from it")


def test_the_original_nanochat_gpt_loads_as_what_it_computed(nanochat, env, tmp_path):
    """nanochat's first GPT (2025-10 .. 2026-01): no lambdas, value embeddings, smear or backout, rotary base 10,000,
    no q/k scale, full context, no window_pattern in meta. The peer with those switched off and the missing scalars
    at their neutral values computes it exactly; its keys are all the checkpoint holds."""
    model = tiny_model(nanochat, env["vocab"], 3, ["--no-value-embeds", "--qk-scale", "1.0", "--rope-base", "10000",
                                                   "--window-pattern", "L"])
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.zero_()
        model.smear_lambda.zero_()
        model.backout_lambda.zero_()
    state = {k: v for k, v in nanochat_state(model).items()
             if k.startswith(("transformer.", "lm_head.")) and ".ve_gate." not in k}
    assert len(state) == 2 + 3 * 6
    directory = tmp_path / "d3"
    save_checkpoint(directory, 700, state, meta(env["vocab"], 700, window_pattern=None))
    metrics = nanochat.evaluate_checkpoint(eval_cfg(nanochat, str(directory), env["data"], tmp_path / "run"))
    assert metrics["nanochat_gpt"] == "2025-10" and metrics["step"] == 700
    assert metrics["val_bpb"] == pytest.approx(reference(nanochat, model, env["data"])["bpb"], rel=1e-6)
    assert metrics["params"] == sum(v.numel() for v in state.values())
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "rope base 10000, q/k scale 1, softcap 15, value embeddings False" in log and "windows [128, 128, 128]" in log


def test_data_prepared_with_another_tokenizer_is_refused(nanochat, env, tiny_data, tmp_path):
    """The session's 1024-token data is not the checkpoint's; nor is the checkpoint's data with one token's byte count
    changed in token_bytes.pt. nanochat's older count through decoded text (U+FFFD for a lone byte >= 0x80) is its
    tokenizer all the same."""
    data = tmp_path / "other"
    shutil.copytree(tiny_data, data)
    with_val_sources(str(data / "pretrain"))
    with pytest.raises(nanochat.DataError, match=re.escape(f"{env['ckpt']}/meta_000010.json: vocab_size {env['vocab']}, but "
                                                           f"{data}/tokenizer has 1024 tokens: prepare the data with the "
                                                           "checkpoint's tokenizer (python data/tokenizer.py import ")):
        nanochat.evaluate_checkpoint(eval_cfg(nanochat, env["ckpt"], str(data), tmp_path / "run"))

    base = tmp_path / "base"
    shutil.copytree(env["base"], base)
    token_bytes = base / "tokenizer" / "token_bytes.pt"
    right = torch.load(token_bytes, weights_only=True)
    as_text = right.clone()
    as_text[128:256] = 3  # bytes 0x80 .. 0xff alone: one U+FFFD each when decoded to text
    torch.save(as_text, token_bytes)
    ckpt = str(base / "base_checkpoints" / "d3")
    nanochat.evaluate_checkpoint(eval_cfg(nanochat, ckpt, env["data"], tmp_path / "run2"))
    assert "(128 counted through decoded text" in (tmp_path / "run2" / "log.txt").read_text()
    wrong = right.clone()
    wrong[300] += 1
    torch.save(wrong, token_bytes)
    with pytest.raises(nanochat.DataError, match=re.escape(f"{token_bytes}: token 300 has {int(wrong[300])} bytes there and "
                                                           f"{int(right[300])} in {env['data']}/tokenizer/token_bytes.npy")):
        nanochat.evaluate_checkpoint(eval_cfg(nanochat, ckpt, env["data"], tmp_path / "run3"))


def test_init_from_and_phases_go_together(nanochat):
    for argv in (["--phases", "eval"], ["--init-from", "somewhere"]):
        with pytest.raises(SystemExit):
            nanochat.parse_config(TINY + ["--data-dir", "x", *argv])


def test_hf_checkpoints_resolve_through_the_hub_api(nanochat, env, tmp_path, monkeypatch):
    """hf:OWNER/NAME[/DIR][@STEP] through huggingface_hub's list_repo_files and hf_hub_download, here stand-ins
    serving nanochat's base directory as a repository (no network): the folder of the model files, the latest step,
    the repository's tokenizer files; several folders need naming one."""
    import huggingface_hub
    repo_root = tmp_path / "repo"
    shutil.copytree(env["base"], repo_root)
    shutil.copytree(repo_root / "base_checkpoints" / "d3", repo_root / "chatsft_checkpoints" / "d3")
    listing = sorted(os.path.relpath(os.path.join(d, f), repo_root).replace(os.sep, "/") for d, _, fs in os.walk(repo_root) for f in fs)
    fetched = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo: listing if repo == "someone/nanochat-d3" else 1 / 0)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, f: fetched.append(f) or str(repo_root / f))
    with pytest.raises(nanochat.DataError, match=re.escape("hf:someone/nanochat-d3: checkpoints in several folders "
                                                           "(base_checkpoints/d3, chatsft_checkpoints/d3): name one")):
        nanochat.find_checkpoint("hf:someone/nanochat-d3")
    ckpt = nanochat.find_checkpoint("hf:someone/nanochat-d3/base_checkpoints/d3")
    assert ckpt.step == 10 and ckpt.model == str(repo_root / "base_checkpoints/d3/model_000010.pt")
    assert ckpt.meta == str(repo_root / "base_checkpoints/d3/meta_000010.json")
    assert ckpt.token_bytes == str(repo_root / "tokenizer/token_bytes.pt") and ckpt.tokenizer == str(repo_root / "tokenizer/tokenizer.pkl")
    assert fetched == ["base_checkpoints/d3/model_000010.pt", "base_checkpoints/d3/meta_000010.json",
                       "tokenizer/token_bytes.pt", "tokenizer/tokenizer.pkl"]  # only what is needed
    assert nanochat.find_checkpoint("hf:someone/nanochat-d3/chatsft_checkpoints/d3@5").step == 5
    metrics = nanochat.evaluate_checkpoint(eval_cfg(nanochat, "hf:someone/nanochat-d3/base_checkpoints/d3", env["data"], tmp_path / "run"))
    assert metrics["init_from"] == "hf:someone/nanochat-d3/base_checkpoints/d3" and metrics["step"] == 10
    with pytest.raises(nanochat.DataError, match=r"^hf:someone/other: cannot list the repository \(ZeroDivisionError"):
        nanochat.find_checkpoint("hf:someone/other@3")
    with pytest.raises(nanochat.DataError, match=re.escape("hf:nanochat: expected hf:OWNER/NAME[/DIR][@STEP]")):
        nanochat.find_checkpoint("hf:nanochat")
