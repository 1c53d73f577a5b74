"""The peers' pretraining data: folders of llm.c shards (header words 3-5 zero, uint16 ids) as modded-nanogpt's
FineWeb and the seed's climbmix_32k_8_170 publish them, converted once by data/llmc.py (a tokenizer and a manifest
beside the shards, which are linked, not copied) and then read by the stack as its own pretraining data."""
import glob
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from common import DataError
from conftest import ROOT, STACK_PATH, TINY_ARGS

LLMC = os.path.join(ROOT, "data", "llmc.py")


def write_llmc(path, tokens):
    """A token file exactly as llm.c / modded-nanogpt write them: magic, version 1, n_tokens, 253 zeros, uint16."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, len(tokens)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def llmc_copy(stack, tiny_data, out, layout="modded"):
    """tiny_data's shards rewritten in llm.c's header, in modded's layout (fineweb_{train,val}_NNNNNN.bin at the top)
    or the seed's (climbmix/{train,val}_NNNNNN.bin); the tokens are the same."""
    tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    for split in ("val", "train"):
        for i, path in enumerate(stack.pretrain_shards(tiny_data, tok, split)):
            tokens = np.asarray(stack.read_token_file(path, tok.vocab_size))
            index = i if split == "val" else i + 1
            name = f"fineweb_{split}_{index:06d}.bin" if layout == "modded" else os.path.join("climbmix", f"{split}_{index:06d}.bin")
            write_llmc(os.path.join(out, name), tokens)
    return tok


def convert(src, *args):
    return subprocess.run([sys.executable, LLMC, "--src", str(src), *args], cwd=ROOT, capture_output=True, text=True)


def one_error(r):
    """The one `error: ...` line a failed data/ script prints (exit status 1)."""
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (r.returncode, r.stderr[-2000:])
    return r.stderr.strip()


def test_llmc_header_reads_as_uint16_and_keeps_every_check(stack, tmp_path):
    path = str(tmp_path / "fineweb_val_000000.bin")
    write_llmc(path, [5, 1, 2, 50256])
    assert np.asarray(stack.read_token_file(path, 50257)).tolist() == [5, 1, 2, 50256]
    with pytest.raises(stack.DataFormatError, match="token id 50256 >= vocab_size 1024"):
        stack.read_token_file(path, 1024)
    with pytest.raises(stack.DataFormatError, match="2 bytes per token does not fit vocab_size 100000"):
        stack.read_token_file(path, 100_000)  # uint16 ids cannot reach such a vocabulary
    with open(path, "ab") as f:
        f.write(b"\0")  # one stray byte: the size no longer matches n_tokens
    with pytest.raises(stack.DataFormatError, match="header says 4 tokens"):
        stack.read_token_file(path, 50257)


def test_modded_layout_is_read_once_converted(stack, tiny_data, tmp_path):
    folder = tmp_path / "fineweb"
    tok = llmc_copy(stack, tiny_data, folder)
    # the old command on the raw folder: one error naming the conversion
    with pytest.raises(stack.DataFormatError, match=f"{folder}: shards but no pretrain/: .* python data/llmc.py --src {folder} --tokenizer gpt2"):
        stack.pretrain_data(str(folder), vocab_size=1024, bos_id=1000)
    r = convert(folder, "--tokenizer", os.path.join(tiny_data, "tokenizer"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val: 1 shards" in r.stdout and f"--data-dir {folder}" in r.stdout.splitlines()[-1]
    data = stack.pretrain_data(str(folder))
    assert [os.path.basename(p) for p in data.val] == ["fineweb_val_000000.bin"]
    assert [os.path.basename(p) for p in data.train][:2] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert all(os.path.islink(p) for p in data.val + data.train)  # linked where they lie, not copied
    assert os.path.realpath(data.val[0]) == str(folder / "fineweb_val_000000.bin")
    ours = stack.pretrain_data(tiny_data)
    assert data.vocab_size == tok.vocab_size and data.bos_id == tok.bos_id and (data.token_bytes == tok.token_bytes).all()
    assert (data.val_stream()[0] == ours.val_stream()[0]).all()
    assert data.val_sources == [("fineweb", int((ours.val_stream()[0] == tok.bos_id).sum()))]
    # the flags only confirm the tokenizer's vocabulary and BOS
    assert stack.pretrain_data(str(folder), vocab_size=tok.vocab_size, bos_id=tok.bos_id).bos_id == tok.bos_id
    with pytest.raises(stack.DataFormatError, match="tokenizer: vocab_size 1024, but --vocab-size 999"):
        stack.pretrain_data(str(folder), vocab_size=999)
    with pytest.raises(stack.DataFormatError, match=f"bos_id {tok.bos_id}, but --bos-id 0"):
        stack.pretrain_data(tiny_data, bos_id=0)  # id 0 is a BOS like any other: given, so checked
    # converting again replaces the links; a folder without both splits is one error
    assert convert(folder, "--tokenizer", os.path.join(tiny_data, "tokenizer")).returncode == 0
    for p in folder.glob("fineweb_train_*.bin"):
        p.unlink()
    error = one_error(convert(folder, "--tokenizer", os.path.join(tiny_data, "tokenizer")))
    assert error.endswith("llm.c shards need both *train_NNNNNN.bin and *val_NNNNNN.bin (here or one folder down); "
                          "found 0 train and 1 val shards")


def test_what_does_not_convert_is_one_error_and_nothing_written(stack, tiny_data, tmp_path):
    folder = tmp_path / "fineweb"
    tok = llmc_copy(stack, tiny_data, folder)
    shard = folder / "fineweb_train_000002.bin"
    tokens = np.fromfile(shard, dtype="<u2", offset=1024)
    tokens[7] = tok.vocab_size + 3
    write_llmc(str(shard), tokens)
    error = one_error(convert(folder, "--tokenizer", os.path.join(tiny_data, "tokenizer")))
    assert error == f"error: {shard}: token id {tok.vocab_size + 3} >= vocab_size {tok.vocab_size}"  # the stack's reader
    assert sorted(os.listdir(folder)) == sorted(p.name for p in folder.glob("fineweb_*.bin"))  # no tokenizer/, pretrain/
    shard.write_bytes(np.zeros(256, "<i4").tobytes())  # magic 0: not a token file at all
    assert "bad magic 0" in one_error(convert(folder, "--tokenizer", os.path.join(tiny_data, "tokenizer")))
    header = np.fromfile(os.path.join(tiny_data, "pretrain", "val_000000.bin"), dtype="<i4", count=256)
    shard.write_bytes(header.tobytes() + b"\0" * (2 * int(header[2])))  # our header: words 3-5 set
    assert "not an llm.c shard" in one_error(convert(folder, "--tokenizer", os.path.join(tiny_data, "tokenizer")))
    ours = tmp_path / "ours"  # a prepared directory's own shards are never replaced by links
    shutil.copytree(tiny_data, ours)
    llmc_copy(stack, tiny_data, ours)
    error = one_error(convert(ours, "--tokenizer", os.path.join(tiny_data, "tokenizer")))
    assert error.endswith("holds shards of its own (data/prepare.py's?); give another --out")
    assert not any(os.path.islink(p) for p in glob.glob(str(ours / "pretrain" / "*")))


def test_seed_layout_with_its_pickled_tokenizer_and_config_json(stack, tiny_data, tmp_path):
    folder = tmp_path / "climbmix_32k_8_170"
    tok = llmc_copy(stack, tiny_data, folder, layout="seed")
    (folder / "config.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "seq_len": 2048}))
    os.makedirs(folder / "tokenizer")
    (folder / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))  # the seed's: a pickled Encoding
    r = convert(folder, "--tokenizer", str(folder / "tokenizer" / "tokenizer.pkl"))
    assert r.returncode == 0, r.stderr[-2000:]
    data = stack.pretrain_data(str(folder))
    assert [os.path.relpath(os.path.realpath(p), folder) for p in data.val] == ["climbmix/val_000000.bin"]
    assert (data.token_bytes == tok.token_bytes).all() and data.token_bytes.dtype == np.int32
    assert data.tokenizer.encode("def main():") == tok.encode("def main():")

    (folder / "config.json").write_text(json.dumps({"vocab_size": 2048, "bos_id": tok.bos_id}))
    error = one_error(convert(folder, "--tokenizer", str(folder / "tokenizer" / "tokenizer.pkl")))
    assert error == f"error: {folder / 'config.json'}: vocab_size 2048, but the tokenizer has {tok.vocab_size}"

    # the tokenizer.pkl is never unpickled: one that would run code is refused, and nothing runs
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (folder / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps({"bytes": Evil()}))
    error = one_error(convert(folder, "--tokenizer", str(folder / "tokenizer" / "tokenizer.pkl")))
    assert "only a pickled tiktoken Encoding is read" in error and not marker.exists()


def test_gpt2_tokenizer_from_tiktoken_or_a_clear_error(stack, tmp_path, monkeypatch):
    """GPT-2 ids (modded's FineWeb): tiktoken's gpt2 encoding becomes our tokenizer, <|endoftext|> its <|bos|>."""
    import tiktoken
    import llmc
    # a stand-in for tiktoken's gpt2 ranks with GPT-2's shape: 50256 tokens of varied lengths, then <|endoftext|>
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"x" * (2 + i % 5) + i.to_bytes(3, "big"): i for i in range(256, 50256)})
    enc = tiktoken.Encoding("gpt2-standin", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc if name == "gpt2" else None)
    llmc.gpt2_tokenizer().save(str(tmp_path / "tokenizer"))
    tok = stack.Tokenizer(str(tmp_path / "tokenizer"))
    assert (tok.vocab_size, tok.bos_id, tok.special_tokens) == (50257, 50256, {"<|bos|>": 50256})
    counts = tok.token_bytes
    assert counts.shape == (50257,) and counts[50256] == 0
    assert counts[:50256].tolist() == [len(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    assert counts[65] == 1 and counts[256] == 2 + 256 % 5 + 3

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="tiktoken's gpt2 encoding is neither cached nor downloadable \\(ConnectionError"):
        llmc.gpt2_tokenizer()


def run(data, run_dir, *extra):
    cmd = [sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_training_on_llmc_shards_matches_our_format(stack, tiny_data, tmp_path):
    """The same tokens in llm.c's header, converted, train the same model: identical losses and val bpb."""
    ours = run(tiny_data, tmp_path / "ours", "--phases", "pt")
    assert ours.returncode == 0, ours.stderr[-2000:]
    folder = tmp_path / "modded"
    tok = llmc_copy(stack, tiny_data, folder)
    old = run(folder, tmp_path / "old", "--phases", "pt", "--vocab-size", str(tok.vocab_size), "--bos-id", str(tok.bos_id))
    assert old.returncode == 1 and f"python data/llmc.py --src {folder} --tokenizer gpt2" in old.stderr  # says how
    assert convert(folder, "--tokenizer", os.path.join(tiny_data, "tokenizer")).returncode == 0
    theirs = run(folder, tmp_path / "theirs", "--phases", "pt,eval")
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    m_ours, m_theirs = (json.load(open(tmp_path / d / "metrics.json")) for d in ("ours", "theirs"))
    assert m_theirs["val_bpb"] == pytest.approx(m_ours["val_bpb"], rel=1e-6) and m_ours["val_scored"] == "every val token"
    assert list(m_theirs["val_bpb_by_source"].values()) == pytest.approx(list(m_ours["val_bpb_by_source"].values()), rel=1e-6)
    assert m_theirs["val_loss"] == pytest.approx(m_ours["val_loss"], rel=1e-6)
    assert "no CORE: " in open(tmp_path / "theirs" / "log.txt").read()


def check(data, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", "check.py"), "--data-dir", str(data), *extra],
                          cwd=ROOT, capture_output=True, text=True)


def test_data_check_reads_a_converted_llmc_folder(stack, tiny_data, tmp_path):
    """data/check.py on a converted folder of llm.c shards: every shard's bytes against the sha256 the conversion
    recorded, what was read said; a shard changed since is one error naming it."""
    tok = llmc_copy(stack, tiny_data, tmp_path / "d")
    assert convert(tmp_path / "d", "--tokenizer", os.path.join(tiny_data, "tokenizer")).returncode == 0
    ok = check(tmp_path / "d")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"llm.c shards of {tmp_path / 'd'} (data/llmc.py)" in ok.stdout and "pretrain/val: 1 shards" in ok.stdout
    shard = tmp_path / "d" / "fineweb_train_000002.bin"
    tokens = np.fromfile(shard, dtype="<u2", offset=1024)
    tokens[7] = tok.vocab_size + 3
    write_llmc(str(shard), tokens)
    bad = check(tmp_path / "d")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'd' / 'pretrain' / shard.name}: sha256 ")
