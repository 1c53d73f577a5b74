"""Pretraining shards: written by data/pretrain_shards.py, read by the stack; round trips and bad input."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import check as data_check  # data/check.py
import prepare
import pretrain_shards
import tokenizer
from common import DataError, write_token_file
from conftest import ROOT, copy_tree, edit_json, stdlib_text


def decoded_documents(stack, tok, paths):
    """Split the concatenated shards at BOS and decode each document."""
    docs = []
    for p in paths:
        tokens = np.asarray(stack.read_token_file(p, tok.vocab_size))
        assert tokens[0] == tok.bos_id, f"{p} does not start at a document boundary"
        starts = np.flatnonzero(tokens == tok.bos_id).tolist() + [len(tokens)]
        docs += [tok.decode(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])]
    return docs


@pytest.fixture
def corpus(tmp_path):
    """Documents in all three input formats (and one empty document, which is skipped)."""
    texts = stdlib_text()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_book.txt").write_text(texts[0] + "\n<|bos|> is just text here\n")
    (src / "b_web.jsonl").write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in texts[1:60] + [""]))
    pq.write_table(pa.table({"text": texts[60:120]}), src / "c_rows.parquet")
    (tmp_path / "val.txt").write_text(texts[120] + "\n" + texts[121])
    train_docs = [texts[0] + "\n<|bos|> is just text here\n"] + texts[1:60] + texts[60:120]
    return src, tmp_path / "val.txt", train_docs, [texts[120] + "\n" + texts[121]]


def test_roundtrip_through_stack_reader(corpus, tok_dir, tmp_path, stack):
    src, val, train_docs, val_docs = corpus
    out = tmp_path / "pretrain"
    files = pretrain_shards.expand_inputs([src], pretrain_shards.TEXT_EXTS)
    shards = pretrain_shards.write_pretrain(files, [str(val)], tok_dir, str(out), shard_tokens=3000, progress=False,
                                            seed=None, max_doc_chars=0)  # input order, documents whole
    tok = stack.Tokenizer(tok_dir)
    assert [s["file"] for s in shards][:2] == ["val_000000.bin", "train_000001.bin"]
    assert len(shards) > 3, "small shard_tokens should give several train shards"
    data_dir = str(tmp_path)
    train_paths = stack.pretrain_shards(data_dir, tok, "train")
    assert decoded_documents(stack, tok, stack.pretrain_shards(data_dir, tok, "val")) == val_docs
    assert decoded_documents(stack, tok, train_paths) == train_docs
    for s, p in zip(shards[1:], train_paths):
        n = len(stack.read_token_file(p, tok.vocab_size))
        assert n == s["n_tokens"] and (n <= 3000 or s["n_docs"] == 1)
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["tokenizer_sha256"] == tok.sha256 and manifest["vocab_size"] == 1024


def test_parallel_workers_write_identical_shards(corpus, tok_dir, tmp_path):
    src, val, _, _ = corpus
    files = pretrain_shards.expand_inputs([src], pretrain_shards.TEXT_EXTS)
    one = pretrain_shards.write_pretrain(files, [str(val)], tok_dir, str(tmp_path / "w1"), 3000, workers=1, progress=False)
    two = pretrain_shards.write_pretrain(files, [str(val)], tok_dir, str(tmp_path / "w2"), 3000, workers=2, progress=False)
    assert one == two  # same files, token counts and sha256


# ---- cutting long documents, shuffling the training documents (format version 2) ---------------------------------

cut_document = pretrain_shards.cut_document


def greedy(units, n):
    """The reference packing: consecutive units (each <= n) joined while they fit."""
    pieces = [""]
    for u in units:
        if pieces[-1] and len(pieces[-1]) + len(u) > n:
            pieces.append("")
        pieces[-1] += u
    return pieces


def test_cut_keeps_short_documents_whole_and_0_means_whole():
    text = "One paragraph.\n\nAnother one. " * 400
    assert cut_document(text, 0) == [text]
    assert cut_document(text, len(text)) == [text]
    assert cut_document("", 10) == [""]  # and write_pretrain skips it


def test_cut_at_paragraph_boundaries_when_paragraphs_fit():
    rng = random.Random(0)
    words = "the of and a to in is you that it he was for on are as with his they at be this have from".split()
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randrange(3, 12))).capitalize() + rng.choice(".!?")
    units = [" ".join(sentence() for _ in range(rng.randrange(1, 6))) + rng.choice(["\n\n", "\n\n\n", "\n\n\n\n"])
             for _ in range(200)]
    units[-1] = units[-1].rstrip("\n")
    n = max(map(len, units)) + 20
    text = "".join(units)
    pieces = cut_document(text, n)
    assert "".join(pieces) == text and all(len(p) <= n for p in pieces) and len(pieces) > 10
    assert pieces == greedy(units, n)  # whole paragraphs, as many as fit, the blank lines kept at the end
    assert all(p.endswith("\n\n") and not q.startswith("\n") for p, q in zip(pieces, pieces[1:]))


def test_cut_a_long_paragraph_at_sentence_ends_then_whitespace_then_hard():
    long = "First sentence is here. Second one asks why? Third exclaims loudly!\tFourth ends the paragraph."
    text = "Short intro.\n\n" + long + "\n\nShort outro."
    assert cut_document(text, 50) == ["Short intro.\n\n", "First sentence is here. Second one asks why? ",
                                      "Third exclaims loudly!\t", "Fourth ends the paragraph.\n\n", "Short outro."]
    # a sentence longer than N at whitespace, a word longer than N at every N characters
    assert cut_document("one two three four five six.", 10) == ["one two ", "three ", "four five ", "six."]
    assert cut_document("a" * 25, 10) == ["a" * 10, "a" * 10, "a" * 5]
    assert cut_document("ok " + "x" * 25 + " end. Next.", 10) == ["ok ", "x" * 10, "x" * 10, "x" * 5 + " ", "end. ", "Next."]


def test_cut_pieces_always_fit_and_concatenate_to_the_document():
    rng = random.Random(1)
    for _ in range(3000):
        text = "".join(rng.choice(["ab", "c", " ", ". ", "!\n", "?", "\n\n", "\n", "\t", "é"]) for _ in range(rng.randrange(1, 60)))
        n = rng.randrange(1, 25)
        pieces = cut_document(text, n)
        assert "".join(pieces) == text and all(0 < len(p) <= n for p in pieces), (text, n, pieces)
    for doc in stdlib_text()[:200]:
        pieces = cut_document(doc, 300)
        assert "".join(pieces) == doc and all(0 < len(p) <= 300 for p in pieces)


def cut_all(docs, n):
    return [p for d in docs for p in cut_document(d, n) if p]


def write(files, val_files, tok_dir, out, **kw):
    pretrain_shards.write_pretrain(files, val_files, tok_dir, str(out), shard_tokens=3000, progress=False, **kw)
    return json.loads((out / "manifest.json").read_text())


def test_training_documents_are_cut_and_shuffled_val_documents_only_cut(corpus, tok_dir, tmp_path, stack):
    src, val, train_docs, val_docs = corpus
    files = pretrain_shards.expand_inputs([src], pretrain_shards.TEXT_EXTS)
    tok = stack.Tokenizer(tok_dir)
    decoded = lambda root, split: decoded_documents(stack, tok, stack.pretrain_shards(str(root), tok, split))
    expected, expected_val = cut_all(train_docs, 400), cut_all(val_docs, 400)
    assert len(expected) > len(train_docs) and len(expected_val) > 1, "the corpus should have documents to cut"

    runs = {}
    for name, kw in [("a", dict(seed=1337)), ("b", dict(seed=1337)), ("c", dict(seed=2)), ("d", dict(seed=None))]:
        manifest = write(files, [str(val)], tok_dir, tmp_path / name / "pretrain", max_doc_chars=400, **kw)
        assert (manifest["version"], manifest["seed"], manifest["max_doc_chars"]) == (2, kw["seed"], 400)
        runs[name] = decoded(tmp_path / name, "train")
        assert sorted(runs[name]) == sorted(expected)  # the same pieces, each once
        assert decoded(tmp_path / name, "val") == expected_val  # never shuffled
        assert manifest["val_sources"] == [{"name": "val.txt", "n_docs": len(expected_val)}]
        assert sum(s["n_docs"] for s in manifest["shards"] if s["split"] == "train") == len(expected)
    assert runs["d"] == expected  # seed None (--keep-order): input order
    assert runs["a"] != expected and runs["c"] != expected and runs["a"] != runs["c"]
    read = lambda name: {p.name: p.read_bytes() for p in (tmp_path / name / "pretrain").iterdir()}
    assert read("a") == read("b")  # same inputs, same seed: the same bytes
    # the default: seed 1337, cut at 8192 (none of these documents is that long)
    manifest = write(files, [str(val)], tok_dir, tmp_path / "e" / "pretrain")
    assert (manifest["seed"], manifest["max_doc_chars"]) == (1337, 8192)
    assert sorted(decoded(tmp_path / "e", "train")) == sorted(train_docs) != decoded(tmp_path / "e", "train")


def test_manifest_version_2_fields(corpus, tok_dir, tmp_path):
    src, val, _, _ = corpus
    files = pretrain_shards.expand_inputs([src], pretrain_shards.TEXT_EXTS)
    manifest = write(files, [str(val)], tok_dir, tmp_path / "pretrain", seed=None, max_doc_chars=0)
    assert list(manifest) == ["format", "version", "vocab_size", "bos_id", "tokenizer_sha256", "shard_tokens", "seed",
                              "max_doc_chars", "shards", "val_sources", "sources"]
    assert (manifest["format"], manifest["version"], manifest["seed"], manifest["max_doc_chars"]) == ("pretrain", 2, None, 0)
    assert manifest["sources"] == {"val": [str(val)], "train": files}
    assert all(list(s) == ["file", "split", "n_tokens", "n_docs", "sha256"] for s in manifest["shards"])


def test_val_sources_are_the_runs_of_each_val_file(tmp_path, tok_dir, stack):
    texts = stdlib_text()
    (tmp_path / "train.txt").write_text(texts[0])
    long = "\n\n".join(texts[1:8])
    (tmp_path / "v1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [long, "", texts[9]]))
    (tmp_path / "v2.txt").write_text(long[::-1])
    val_files = [str(tmp_path / "v1.jsonl"), str(tmp_path / "v2.txt")]
    docs = {f: cut_all(pretrain_shards.iter_documents([f]), 500) for f in val_files}
    assert len(docs[val_files[0]]) > 2 and len(docs[val_files[1]]) > 1
    manifest = write([str(tmp_path / "train.txt")], val_files, tok_dir, tmp_path / "pretrain", max_doc_chars=500)
    assert manifest["val_sources"] == [{"name": "v1.jsonl", "n_docs": len(docs[val_files[0]])},  # the empty one not counted
                                       {"name": "v2.txt", "n_docs": len(docs[val_files[1]])}]
    assert sum(r["n_docs"] for r in manifest["val_sources"]) == manifest["shards"][0]["n_docs"]
    tok = stack.Tokenizer(tok_dir)
    val = decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path), tok, "val"))
    assert val == docs[val_files[0]] + docs[val_files[1]]  # in input order, the runs in stream order
    # two val files with one base name are named by their paths as given
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "val.txt").write_text(f"validation text from {d}")
    val_files = pretrain_shards.expand_inputs([tmp_path / "a", tmp_path / "b", tmp_path / "v2.txt"], pretrain_shards.TEXT_EXTS)
    manifest = write([str(tmp_path / "train.txt")], val_files, tok_dir, tmp_path / "pretrain", max_doc_chars=500)
    assert manifest["val_sources"] == [{"name": str(tmp_path / "a" / "val.txt"), "n_docs": 1},
                                       {"name": str(tmp_path / "b" / "val.txt"), "n_docs": 1},
                                       {"name": "v2.txt", "n_docs": len(docs[str(tmp_path / "v2.txt")])}]


def test_cli_seed_keep_order_and_max_doc_chars(corpus, tok_dir, tmp_path, stack):
    src, val, train_docs, val_docs = corpus
    tok = stack.Tokenizer(tok_dir)
    common = ["--input", src, "--val-input", val, "--tokenizer", tok_dir, "--shard-tokens", 3000]
    r = run_cli(*common, "--out", tmp_path / "s" / "pretrain", "--seed", 7, "--max-doc-chars", 300)  # 2 workers
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "s" / "pretrain" / "manifest.json").read_text())
    assert (manifest["seed"], manifest["max_doc_chars"]) == (7, 300)
    files = pretrain_shards.expand_inputs([src], pretrain_shards.TEXT_EXTS)
    assert write(files, [str(val)], tok_dir, tmp_path / "api" / "pretrain", seed=7, max_doc_chars=300)["shards"] == manifest["shards"]
    shuffled = decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path / "s"), tok, "train"))
    assert sorted(shuffled) == sorted(cut_all(train_docs, 300)) and shuffled != cut_all(train_docs, 300)
    assert decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path / "s"), tok, "val")) == cut_all(val_docs, 300)

    r = run_cli(*common, "--out", tmp_path / "k" / "pretrain", "--keep-order", "--max-doc-chars", 0)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "k" / "pretrain" / "manifest.json").read_text())
    assert (manifest["seed"], manifest["max_doc_chars"]) == (None, 0)
    assert decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path / "k"), tok, "train")) == train_docs

    help_text = " ".join(run_cli("--help").stdout.split())
    for fragment in ("--seed", "--keep-order", "--max-doc-chars", "streams", "in memory", "0 keeps documents whole"):
        assert fragment in help_text, fragment


@pytest.mark.parametrize("flag,value,message", [
    ("--max-doc-chars", -1, "error: --max-doc-chars -1: must be"),
    ("--shard-tokens", 0, "error: --shard-tokens 0: must be 1 or more"),
])
def test_cli_bad_values(tmp_path, tok_dir, flag, value, message):
    (tmp_path / "t.txt").write_text("training text")
    (tmp_path / "v.txt").write_text("validation text")
    assert_one_error(run_cli("--input", tmp_path / "t.txt", "--val-input", tmp_path / "v.txt", "--tokenizer", tok_dir,
                             "--out", tmp_path / "o", flag, value), message)
    assert not (tmp_path / "o").exists() and [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


# ---- data/prepare.py: the options it passes to pretrain_shards.py, --tokenizer ---------------------------------------


def pretrain_step(steps):
    return next(s for s in steps if s[0] == "pretrain_shards.py")


def test_prepare_shuffles_a_local_source_and_keeps_climbmix_order(tmp_path, monkeypatch):
    (tmp_path / "src" / "pretrain").mkdir(parents=True)
    (tmp_path / "src" / "pretrain" / "val_x.txt").write_text("validation")
    local = ["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    steps = prepare.steps(prepare.parse_args(local + ["--vocab-size", "512"]))
    assert steps[0][:2] == ["tokenizer.py", "train"] and steps[0][steps[0].index("--vocab-size") + 1] == "512"
    step = pretrain_step(steps)
    assert step[-4:] == ["--max-doc-chars", "8192", "--seed", "1337"] and "--keep-order" not in step
    assert pretrain_step(prepare.steps(prepare.parse_args(local + ["--seed", "5", "--max-doc-chars", "0"])))[-4:] == \
        ["--max-doc-chars", "0", "--seed", "5"]
    monkeypatch.setattr(prepare, "download_climbmix", lambda n, cache: ([f"shard_{i:05d}.parquet" for i in range(n)], ["shard_06542.parquet"]))
    hf = ["--source", "hf", "--out", str(tmp_path / "out")]
    step = pretrain_step(prepare.steps(prepare.parse_args(hf)))
    assert step[-3:] == ["--max-doc-chars", "8192", "--keep-order"] and "--seed" not in step
    assert pretrain_step(prepare.steps(prepare.parse_args(hf + ["--seed", "3"])))[-2:] == ["--seed", "3"]
    steps = prepare.steps(prepare.parse_args(local + ["--tokenizer", str(tmp_path / "tok")]))
    assert [s[0] for s in steps] == ["pretrain_shards.py", "core_shards.py", "sft_shards.py", "chat_eval_shards.py", "chat_eval_shards.py"]
    for bad, message in [(["--tokenizer", "T", "--vocab-size", "512"], "--vocab-size 512 and --tokenizer T: give one"),
                         (["--max-doc-chars", "-3"], "--max-doc-chars -3: must be 0")]:
        with pytest.raises(DataError, match=message):
            prepare.parse_args(local + bad)
    r = subprocess.run([sys.executable, "data/prepare.py", *local, "--max-doc-chars", "-3"], cwd=ROOT, capture_output=True, text=True)
    assert_one_error(r, "--max-doc-chars -3: must be 0")
    assert not (tmp_path / "out").exists()


def test_prepare_with_an_existing_tokenizer_copies_it(tmp_path, tok_dir, monkeypatch, capsys):
    (tmp_path / "src" / "pretrain").mkdir(parents=True)
    (tmp_path / "src" / "pretrain" / "val_x.txt").write_text("validation")
    out = tmp_path / "out"
    ran = []
    monkeypatch.setattr(prepare.subprocess, "run", lambda cmd: ran.append(cmd[1:]) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--source", str(tmp_path / "src"), "--tokenizer", tok_dir, "--out", str(out)])
    prepare.main()
    for name in prepare.TOKENIZER_FILES:
        assert (out / "tokenizer" / name).read_bytes() == open(os.path.join(tok_dir, name), "rb").read()
    assert tokenizer.Tokenizer.load(str(out / "tokenizer")).sha256 == tokenizer.Tokenizer.load(tok_dir).sha256
    assert "(checked by loading it)" in capsys.readouterr().out
    assert [os.path.basename(c[0]) for c in ran][0] == "pretrain_shards.py"
    assert all(c[c.index("--tokenizer") + 1] == str(out / "tokenizer") for c in ran)
    # a damaged tokenizer is refused before anything is copied; the previous copy stays
    damaged = copy_tree(tok_dir, tmp_path / "damaged")
    meta = edit_json(damaged / "tokenizer.json", lambda m: m.update(pattern=m["pattern"] + "|x"))
    before = {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()}
    with pytest.raises(DataError, match=f"{meta}: sha256 .* differs"):
        prepare.copy_tokenizer(str(damaged), str(out / "tokenizer"))
    os.remove(damaged / "token_bytes.npy")
    edit_json(damaged / "tokenizer.json", lambda m: m.update(pattern=m["pattern"][:-2]))
    with pytest.raises(DataError, match="token_bytes.npy: missing"):
        prepare.copy_tokenizer(str(damaged), str(out / "tokenizer"))
    assert {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()} == before
    assert [p for p in os.listdir(out) if p.startswith(".")] == []


def run_cli(*args):
    return subprocess.run([sys.executable, "data/pretrain_shards.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def assert_one_error(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()  # progress bars may come first
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.mark.parametrize("name,content,fragments", [
    ("bad.jsonl", '{"text": "ok"}\n\n{"text": broken\n', ["bad.jsonl:3: malformed JSON"]),
    ("nofield.jsonl", '{"body": "no text field"}\n', ["nofield.jsonl:1: expected an object with a string field 'text'"]),
    ("latin1.txt", "caf\xe9".encode("latin-1"), ["latin1.txt: not UTF-8 text (invalid byte at offset 3)"]),
    ("empty.txt", "", ["no train text"]),
])
def test_bad_inputs_leave_previous_output_intact(tmp_path, tok_dir, name, content, fragments):
    (tmp_path / "val.txt").write_text("validation text")
    out = tmp_path / "pretrain"
    (tmp_path / "good.txt").write_text("good training text")
    good = run_cli("--input", tmp_path / "good.txt", "--val-input", tmp_path / "val.txt", "--tokenizer", tok_dir, "--out", out)
    assert good.returncode == 0, good.stderr
    before = {p: open(out / p, "rb").read() for p in os.listdir(out)}
    bad = tmp_path / name
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_one_error(run_cli("--input", bad, "--val-input", tmp_path / "val.txt", "--tokenizer", tok_dir, "--out", out), *fragments)
    assert {p: open(out / p, "rb").read() for p in os.listdir(out)} == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging directory left behind


def test_cli_input_errors(tmp_path, tok_dir):
    (tmp_path / "t.txt").write_text("text")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    assert_one_error(run_cli("--input", tmp_path / "nocol.parquet", "--val-input", tmp_path / "t.txt", "--tokenizer", tok_dir, "--out", tmp_path / "o"),
                     "nocol.parquet: missing column 'text'")
    assert_one_error(run_cli("--input", tmp_path / "missing", "--val-input", tmp_path / "t.txt", "--tokenizer", tok_dir, "--out", tmp_path / "o"),
                     "missing: no such file or directory")
    assert_one_error(run_cli("--input", tmp_path, "--exclude", "*.txt", "*.parquet", "--val-input", tmp_path / "t.txt", "--tokenizer", tok_dir, "--out", tmp_path / "o"),
                     "no input files")
    assert_one_error(run_cli("--input", tmp_path / "t.txt", "--val-input", tmp_path / "t.txt", "--tokenizer", tok_dir, "--out", tmp_path / "o"),
                     "t.txt: is both a training and a validation input")
    assert not (tmp_path / "o").exists()


def test_reader_rejects_malformed_token_files(tmp_path, tok_dir, stack):
    tok = stack.Tokenizer(tok_dir)
    path = str(tmp_path / "x.bin")
    write_token_file(path, np.arange(100), tok.vocab_size, tok.bos_id)
    assert np.array_equal(stack.read_token_file(path, tok.vocab_size), np.arange(100))
    raw = bytearray(open(path, "rb").read())

    def check(mutate, message, vocab=tok.vocab_size):
        data = bytearray(raw)
        mutate(data)
        open(path, "wb").write(bytes(data))
        with pytest.raises(stack.DataFormatError, match=message):
            stack.read_token_file(path, vocab)

    check(lambda d: d.__setitem__(slice(0, 4), (123).to_bytes(4, "little")), r"x.bin: bad magic 123")
    check(lambda d: d.__setitem__(slice(4, 8), (7).to_bytes(4, "little")), r"x.bin: token file version 7")
    check(lambda d: d.__delitem__(slice(len(d) - 10, len(d))), r"x.bin: header says 100 tokens .* \(truncated\?\)")
    check(lambda d: d.__delitem__(slice(500, len(d))), r"x.bin: truncated header")
    check(lambda d: None, r"x.bin: written for vocab_size 1024, but the tokenizer has 2048", vocab=2048)
    check(lambda d: d.__setitem__(slice(1024, 1026), (1500).to_bytes(2, "little")), r"x.bin: token id 1500 >= vocab_size 1024")
    with pytest.raises(DataError, match=r"token ids must be in \[0, 1024\)"):
        write_token_file(path, np.array([1, 2, 1024]), 1024, 0)


def test_large_vocab_uses_uint32(tmp_path, stack):
    path = str(tmp_path / "big.bin")
    write_token_file(path, np.array([0, 70000, 99999]), 100000, 0)
    header = np.fromfile(path, dtype="<i4", count=6)
    assert header.tolist() == [20240520, 1, 3, 4, 100000, 0]
    assert stack.read_token_file(path, 100000).tolist() == [0, 70000, 99999]


def test_shared_pretrain_roundtrip(shared_data, tmp_path, stack):
    """The issue's acceptance check: 8192-vocab tokenizer on pretrain/ minus val_*, shards decode to the sources."""
    src = os.path.join(shared_data, "pretrain")
    tok_dir = str(tmp_path / "tokenizer")
    train_files = pretrain_shards.expand_inputs([src], pretrain_shards.TEXT_EXTS, ["val_*"])
    val_files = pretrain_shards.expand_inputs([os.path.join(src, f) for f in sorted(os.listdir(src)) if f.startswith("val_")], pretrain_shards.TEXT_EXTS)
    tokenizer.train(tokenizer.capped_texts(train_files, 2_000_000_000, 10_000), 8192).save(tok_dir)
    pretrain_shards.write_pretrain(train_files, val_files, tok_dir, str(tmp_path / "pretrain"), shard_tokens=4_000_000, workers=2,
                                   progress=False, seed=None, max_doc_chars=0)
    tok = stack.Tokenizer(tok_dir)
    sources = list(pretrain_shards.iter_documents(train_files))
    assert decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path), tok, "train")) == [d for d in sources if d]
    assert decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path), tok, "val")) == list(pretrain_shards.iter_documents(val_files))
    # the defaults: every book and web page cut at 8192 characters, the pieces of all inputs shuffled together
    pretrain_shards.write_pretrain(train_files, val_files, tok_dir, str(tmp_path / "pretrain"), shard_tokens=4_000_000, workers=2, progress=False)
    cut = lambda files: [p for d in pretrain_shards.iter_documents(files) for p in pretrain_shards.cut_document(d, 8192) if p]
    shuffled = decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path), tok, "train"))
    assert shuffled != cut(train_files) and sorted(shuffled) == sorted(cut(train_files))
    assert max(map(len, shuffled)) <= 8192
    assert decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path), tok, "val")) == cut(val_files)
    manifest = json.load(open(tmp_path / "pretrain" / "manifest.json"))
    assert manifest["val_sources"] == [{"name": os.path.basename(f), "n_docs": len(cut([f]))} for f in val_files]


# ---- the stack's reader trusts nothing in a prepared directory -------------------------------------------------------


@pytest.fixture
def prepared(tiny_data, tmp_path):
    return copy_tree(tiny_data, tmp_path / "data")


def edit_manifest(root, edit):
    return edit_json(root / "pretrain" / "manifest.json", edit)


@pytest.mark.parametrize("name", ["../../../evil.bin", "/etc/hostname", "sub/val.bin", ".."])
def test_manifest_paths_stay_in_the_data_directory(stack, prepared, name):
    tok = stack.Tokenizer(str(prepared / "tokenizer"))
    path = edit_manifest(prepared, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(stack.DataFormatError, match=f"{path}: shard file '{name}' is not a file name in"):
        stack.pretrain_shards(str(prepared), tok, "val")


def test_manifest_token_counts_and_shapes_are_checked(stack, prepared):
    tok = stack.Tokenizer(str(prepared / "tokenizer"))
    val = next(s for s in json.loads((prepared / "pretrain" / "manifest.json").read_text())["shards"] if s["split"] == "val")
    edit_manifest(prepared, lambda m: next(s for s in m["shards"] if s["split"] == "val").update(n_tokens=val["n_tokens"] + 1))
    with pytest.raises(stack.DataFormatError, match=f"{val['file']}: {val['n_tokens']} tokens, but .* says {val['n_tokens'] + 1}"):
        stack.pretrain_shards(str(prepared), tok, "val")
    path = edit_manifest(prepared, lambda m: m.pop("shards"))
    with pytest.raises(stack.DataFormatError, match=f"{path}: 'shards' must be a list"):
        stack.pretrain_shards(str(prepared), tok, "val")
    path.write_text("[1, 2]")
    with pytest.raises(stack.DataFormatError, match=f"{path}: expected a JSON object, got list"):
        stack.pretrain_shards(str(prepared), tok, "val")


def test_token_ids_past_the_vocabulary_are_caught_when_a_shard_is_first_read(stack, prepared):
    """Before: accepted, then a crash inside F.embedding (a device-side assert on a GPU) naming no file."""
    tok = stack.Tokenizer(str(prepared / "tokenizer"))
    manifest = json.loads((prepared / "pretrain" / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["split"] == "train")
    path = prepared / "pretrain" / shard["file"]
    tokens = np.array(stack.read_token_file(str(path), tok.vocab_size))
    tokens[len(tokens) // 2] = tok.vocab_size + 5  # same header and size; one id out of range
    with open(path, "r+b") as f:
        f.seek(256 * 4)
        f.write(tokens.astype("<u2").tobytes())
    paths = stack.pretrain_shards(str(prepared), tok, "train")  # the header checks alone pass
    loader = stack.PretrainLoader(paths, tok, 0, 1)
    with pytest.raises(stack.DataFormatError, match=f"{path}: token id {tok.vocab_size + 5} >= vocab_size {tok.vocab_size}"):
        for _ in range(len(paths)):
            loader.next_batch(512, 128, 1, "cpu")


def test_tokenizer_checksum_is_computed_not_copied(stack, prepared):
    """Two swapped merges change the ranks file; tokenizer.json still names the old one: refused, not loaded."""
    bpe = prepared / "tokenizer" / "tokenizer.tiktoken"
    lines = bpe.read_bytes().splitlines()
    a, b = lines[300].split(), lines[301].split()
    lines[300], lines[301] = b[0] + b" " + a[1], a[0] + b" " + b[1]
    bpe.write_bytes(b"\n".join(lines) + b"\n")
    meta = prepared / "tokenizer" / "tokenizer.json"
    with pytest.raises(stack.DataFormatError, match=f"{meta}: sha256 .* of tokenizer.tiktoken, the pattern and the special tokens differs"):
        stack.Tokenizer(str(prepared / "tokenizer"))


@pytest.mark.parametrize("edit", [
    lambda m: m.update(pattern=m["pattern"].replace(r"\p{N}{1,2}", r"\p{N}{1,3}")),  # numbers in runs of three
    lambda m: m["special_tokens"].update({"<|bos|>": m["special_tokens"]["<|user_start|>"],
                                          "<|user_start|>": m["special_tokens"]["<|bos|>"]}),
])
def test_an_edited_pattern_or_special_token_is_refused_on_both_sides(stack, prepared, edit):
    """Version 1 hashed the ranks file alone: a changed pattern in tokenizer.json loaded silently and encoded
    differently from the data. The identity now covers the pattern and the special tokens, computed by both sides."""
    meta = edit_json(prepared / "tokenizer" / "tokenizer.json", edit)
    with pytest.raises(stack.DataFormatError, match=f"{meta}: sha256 .* differs from the .* recorded"):
        stack.Tokenizer(str(prepared / "tokenizer"))
    with pytest.raises(DataError, match=f"{meta}: sha256 .* differs from the .* recorded"):
        tokenizer.Tokenizer.load(str(prepared / "tokenizer"))


def test_both_sides_compute_one_identity_and_refuse_version_1(stack, prepared):
    tok_dir = str(prepared / "tokenizer")
    assert stack.Tokenizer(tok_dir).sha256 == tokenizer.Tokenizer.load(tok_dir).sha256 == \
        json.loads((prepared / "tokenizer" / "tokenizer.json").read_text())["sha256"]
    meta = edit_json(prepared / "tokenizer" / "tokenizer.json", lambda m: m.update(version=1))
    with pytest.raises(stack.DataFormatError, match=f"{meta}: tokenizer version 1 is not 2 \\(re-prepare the data"):
        stack.Tokenizer(tok_dir)
    with pytest.raises(DataError, match=f"{meta}: tokenizer version 1 is not 2"):
        tokenizer.Tokenizer.load(tok_dir)


def test_data_check_compares_every_shard_with_its_sha256(stack, prepared):
    """A flipped byte inside the tokens (header, size and ids all still valid) passes every cheap check; the
    manifest's per-shard sha256 was never compared. data/check.py compares it; training's fast path does not."""
    tok = stack.Tokenizer(str(prepared / "tokenizer"))
    shard = next(s for s in json.loads((prepared / "pretrain" / "manifest.json").read_text())["shards"] if s["split"] == "val")
    path = prepared / "pretrain" / shard["file"]
    data = bytearray(path.read_bytes())
    data[256 * 4 + 10], data[256 * 4 + 12] = data[256 * 4 + 12], data[256 * 4 + 10]  # two tokens swapped
    assert data != path.read_bytes()
    path.write_bytes(bytes(data))
    assert stack.pretrain_shards(str(prepared), tok, "val") == [str(path)]
    with pytest.raises(stack.DataFormatError, match=f"{path}: sha256 [0-9a-f]{{12}}\\.\\.\\. differs from the "
                                                    f"{shard['sha256'][:12]}\\.\\.\\. in .*manifest.json"):
        data_check.check_sha256(str(prepared), tok, "val")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data", "check.py"), f"--data-dir={prepared}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: sha256 ")
