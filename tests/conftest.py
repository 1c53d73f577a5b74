"""Shared test setup: the stack loaded by path, data/ importable, a small tokenizer, the shared data if present."""
import importlib.util
import os
import sys

# Triton reads this when a kernel is decorated: set it before the stack (or anything else) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "data"), ROOT, os.path.join(ROOT, "bench")]  # data/'s writers, the files beside the stack
from load_stack import STACK as STACK_PATH, load_stack  # noqa: E402  DECODERSTACK_STACK: another copy, e.g. a record's
SHARED_DATA = os.environ.get("DECODERSTACK_DATA", os.path.join(ROOT, "..", "shared", "data"))


def load_module(path, name):
    """Import a single-file stack by path (they are scripts, not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# The head of a script for a fresh process (sys.argv[1]: the stack's path) that imports the stack compiled for real
# GPUs rather than interpreted, e.g. to compile its kernels ahead of time.
UNINTERPRETED_STACK = """import importlib.util, json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
spec = importlib.util.spec_from_file_location("decoderstack", sys.argv[1])
stack = importlib.util.module_from_spec(spec)
sys.modules["decoderstack"] = stack
spec.loader.exec_module(stack)
"""


@pytest.fixture(scope="session")
def stack():
    return load_stack()  # the one module serve.py, export.py and report.py use too


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(os.path.join(SHARED_DATA, "pretrain")):
        pytest.skip(f"shared data not found at {SHARED_DATA} (set DECODERSTACK_DATA)")
    return SHARED_DATA


def unstamped(text):
    """A log's text without the time stamps ([h:mm:ss]) that start its lines after each invocation's header."""
    import re
    return re.sub(r"^\[\d+:\d\d:\d\d\] ", "", text, flags=re.M)


def copy_tree(src, dst):
    """A writable copy of a session fixture's directory, for a test that damages it."""
    import shutil
    shutil.copytree(src, dst)
    return dst


def edit_json(path, edit):
    """Rewrite the JSON file at path with edit(obj) applied in place; returns path."""
    import json
    obj = json.loads(open(path).read())
    edit(obj)
    with open(path, "w") as f:
        f.write(json.dumps(obj))
    return path


def stdlib_text():
    """English-ish text that ships with every Python: the docstrings of a few standard modules."""
    import argparse, collections, inspect, json, logging, os, pathlib, shutil, subprocess, textwrap, unittest
    mods = [argparse, collections, inspect, json, logging, os, pathlib, shutil, subprocess, textwrap, unittest]
    docs = []
    for m in mods:
        docs.append(m.__doc__ or "")
        docs += [getattr(m, n).__doc__ for n in sorted(dir(m)) if not n.startswith("_")]
    return [d for d in docs if isinstance(d, str) and len(d) > 40]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A 1024-token tokenizer trained on stdlib docstrings, saved in the on-disk format."""
    import tokenizer
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer.train(iter(stdlib_text()), 1024).save(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tok_dir):
    """A prepared data directory (tokenizer + pretrain shards) built from stdlib text; several train shards."""
    import json
    import shutil
    import pretrain_shards
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(tok_dir, root / "tokenizer")
    texts = stdlib_text()
    src, val = root / "src", root / "val"
    src.mkdir()
    val.mkdir()
    for i, t in enumerate(texts[:-40]):
        (src / f"doc{i:04d}.txt").write_text(t)
    (val / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[-40:]))
    files = pretrain_shards.expand_inputs([src], pretrain_shards.TEXT_EXTS)
    pretrain_shards.write_pretrain(files, [str(val / "val.jsonl")], str(root / "tokenizer"), str(root / "pretrain"), shard_tokens=20000, progress=False)
    return str(root)


# A model small enough for seconds-long CPU runs; stages cover a window change, MTP decay and the untie step.
TINY_ARGS = ["--preset", "cpu", "--n-layers", "2", "--model-dim", "64", "--n-heads", "2", "--head-dim", "32",
             "--long-window-layers", "1", "--value-embed-layers", "0,1", "--micro-batch-tokens", "512",
             "--stages", "[[4, 1024, 128, 32, 64, 1.0, [1, 0.5], [1, 0]], [4, 1024, 128, 32, 128, 1.0, [1], [1]]]",
             "--val-tokens", "2048", "--val-every", "4", "--log-every", "1", "--wandb", "disabled"]


def write_eval_sources(root):
    """ARC, MMLU and GSM8K (test and train) files in the shared eval layout, a few questions each."""
    import json
    for d in ("arc", "mmlu/test", "gsm8k"):
        (root / d).mkdir(parents=True)
    arc = lambda q, key: json.dumps({"id": q, "question": {"stem": q, "choices": [{"text": t, "label": l} for t, l in zip(["red", "blue", "green", "pink"], "ABCD")]}, "answerKey": key}) + "\n"
    (root / "arc/ARC-Easy-Test.jsonl").write_text(arc("Sky color?", "B") + arc("Grass color?", "C"))
    (root / "arc/ARC-Challenge-Test.jsonl").write_text(arc("Rose color?", "A"))
    (root / "mmlu/test/astronomy_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nPlain?,a,b,c,d,0\n")
    gsm8k = lambda pairs: "".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in pairs)
    (root / "gsm8k/test.jsonl").write_text(gsm8k([("1+1?", 2), ("2+3?", 5)]))
    (root / "gsm8k/train.jsonl").write_text(gsm8k([("3+3?", 6), ("4+1?", 5), ("2*4?", 8)]))


@pytest.fixture(scope="session")
def pretrained_run(tiny_data, tok_dir, tmp_path_factory):
    """A tiny pretrained checkpoint (RUN/ckpt_000008) with chat-eval and RL data beside its pretraining data. Tests
    that write checkpoints copy RUN first."""
    import shutil
    import subprocess
    import chat_eval_shards
    root = tmp_path_factory.mktemp("pretrained")
    data, run = root / "data", root / "run"
    shutil.copytree(tiny_data, data)
    write_eval_sources(root / "eval")
    chat_eval_shards.write_chat_eval(str(root / "eval"), tok_dir, str(data / "chat_eval"))
    chat_eval_shards.write_rl(str(root / "eval"), tok_dir, str(data / "rl"))
    r = subprocess.run([sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run), "--phases", "pt"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return data, run
