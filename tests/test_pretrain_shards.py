"""Pretraining shards: written by data/pretrain_shards.py, read by the stack; round trips and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
    shards = pretrain_shards.write_pretrain(files, [str(val)], tok_dir, str(out), shard_tokens=3000, progress=False)
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
    pretrain_shards.write_pretrain(train_files, val_files, tok_dir, str(tmp_path / "pretrain"), shard_tokens=4_000_000, workers=2, progress=False)
    tok = stack.Tokenizer(tok_dir)
    sources = list(pretrain_shards.iter_documents(train_files))
    assert decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path), tok, "train")) == [d for d in sources if d]
    assert decoded_documents(stack, tok, stack.pretrain_shards(str(tmp_path), tok, "val")) == list(pretrain_shards.iter_documents(val_files))


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
    manifest's per-shard sha256 was never compared. `--phases data` compares it; training's fast path does not."""
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
        stack.pretrain_shards(str(prepared), tok, "val", check_sha256=True)
    result = subprocess.run([sys.executable, stack.__file__, "--phases", "data", f"--data-dir={prepared}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: sha256 ")
