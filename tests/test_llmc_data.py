"""The peers' pretraining data: folders of llm.c shards (header words 3-5 zero, uint16 ids) as modded-nanogpt's
FineWeb and the seed's climbmix_32k_8_170 publish them, with vocab and BOS from somewhere explicit."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, STACK_PATH, TINY_ARGS


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


def test_llmc_header_reads_as_uint16_and_keeps_every_check(stack, tmp_path):
    path = str(tmp_path / "fineweb_val_000000.bin")
    write_llmc(path, [5, 1, 2, 50256])
    assert np.asarray(stack.read_token_file(path, 50257)).tolist() == [5, 1, 2, 50256]
    with pytest.raises(stack.DataFormatError, match="token id 50256 >= vocab_size 1024"):
        stack.read_token_file(path, 1024)
    with pytest.raises(stack.DataFormatError, match="uint16 ids, which cannot reach vocab_size 100000"):
        stack.read_token_file(path, 100_000)
    with open(path, "ab") as f:
        f.write(b"\0")  # one stray byte: the size no longer matches n_tokens
    with pytest.raises(stack.DataFormatError, match="header says 4 tokens"):
        stack.read_token_file(path, 50257)


def test_modded_layout_needs_vocab_and_bos_from_somewhere(stack, tiny_data, tmp_path):
    llmc_copy(stack, tiny_data, tmp_path)
    with pytest.raises(stack.DataFormatError, match="llm.c shards record no vocab_size: give --vocab-size, or put a config.json"):
        stack.pretrain_data(str(tmp_path))
    data = stack.pretrain_data(str(tmp_path), vocab_size=1024, bos_id=1000)
    assert [os.path.basename(p) for p in data.val] == ["fineweb_val_000000.bin"]
    assert [os.path.basename(p) for p in data.train][:2] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert data.vocab_size == 1024 and data.bos_id == 1000 and data.token_bytes is None and data.val_sources == []
    assert data.origin.startswith("vocab_size 1024 from --vocab-size; bos_id 1000 from --bos-id; token bytes unknown")
    with pytest.raises(stack.DataFormatError, match="tokenizer: vocab_size 1024, but --vocab-size 999"):
        stack.pretrain_data(tiny_data, vocab_size=999)  # ours: the flags must agree with the tokenizer
    with pytest.raises(stack.DataFormatError, match="bos_id 1024 is not below vocab_size 1024"):
        stack.pretrain_data(str(tmp_path), vocab_size=1024, bos_id=1024)
    assert stack.pretrain_data(str(tmp_path), vocab_size=1024, bos_id=0).bos_id == 0  # id 0 is a BOS like any other
    with pytest.raises(stack.DataFormatError, match="bos_id 1015, but --bos-id 0"):
        stack.pretrain_data(tiny_data, bos_id=0)
    (tmp_path / "fineweb_train_000001.bin").unlink()
    (tmp_path / "fineweb_train_000002.bin").rename(tmp_path / "notashard.bin")
    for p in tmp_path.glob("fineweb_train_*.bin"):
        p.unlink()
    with pytest.raises(stack.DataFormatError, match="llm.c shards need both .*; found 0 train and 1 val shards"):
        stack.pretrain_data(str(tmp_path), vocab_size=1024, bos_id=1000)


def test_seed_layout_config_json_and_token_bytes_pt(stack, tiny_data, tmp_path):
    tok = llmc_copy(stack, tiny_data, tmp_path, layout="seed")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "seq_len": 2048}))
    os.makedirs(tmp_path / "tokenizer")
    torch.save(torch.from_numpy(tok.token_bytes.astype(np.int32)), tmp_path / "tokenizer" / "token_bytes.pt")
    data = stack.pretrain_data(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in data.val] == ["climbmix/val_000000.bin"]
    assert (data.token_bytes == tok.token_bytes).all() and data.token_bytes.dtype == np.int32
    config = str(tmp_path / "config.json")
    assert data.origin == (f"vocab_size {tok.vocab_size} from {config}; bos_id {tok.bos_id} from {config}; "
                           f"token bytes from {tmp_path / 'tokenizer' / 'token_bytes.pt'}")
    assert stack.pretrain_data(str(tmp_path), vocab_size=tok.vocab_size).vocab_size == tok.vocab_size  # agreeing is fine
    with pytest.raises(stack.DataFormatError, match=f"vocab_size disagrees: 2048 from --vocab-size, {tok.vocab_size} from {config}"):
        stack.pretrain_data(str(tmp_path), vocab_size=2048)

    # token_bytes.pt is loaded weights_only: a pickle that would run code is refused, and nothing runs
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"bytes": Evil()}, tmp_path / "tokenizer" / "token_bytes.pt")
    with pytest.raises(stack.DataFormatError, match="token_bytes.pt: not a plain tensor file"):
        stack.pretrain_data(str(tmp_path))
    assert not marker.exists()
    torch.save(torch.ones(7, dtype=torch.int32), tmp_path / "tokenizer" / "token_bytes.pt")
    with pytest.raises(stack.DataFormatError, match=f"token_bytes.pt: expected a \\[{tok.vocab_size}\\] tensor of byte counts"):
        stack.pretrain_data(str(tmp_path))


def test_gpt2_token_bytes_from_tiktoken_or_loss_only(stack, tmp_path, monkeypatch):
    """GPT-2 ids (modded's FineWeb): bytes per token from tiktoken's gpt2 encoding where it loads, else no bpb."""
    import tiktoken
    # a stand-in for tiktoken's gpt2 ranks with GPT-2's shape: 50256 tokens of varied lengths, then <|endoftext|>
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"x" * (2 + i % 5) + i.to_bytes(3, "big"): i for i in range(256, 50256)})
    enc = tiktoken.Encoding("gpt2-standin", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc if name == "gpt2" else None)
    counts, where = stack.llmc_token_bytes(str(tmp_path), 50257, None)
    assert where == "from tiktoken's gpt2 encoding" and counts.shape == (50257,) and counts[50256] == 0
    assert counts[:50256].tolist() == [len(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    assert counts[65] == 1 and counts[256] == 2 + 256 % 5 + 3

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    counts, where = stack.llmc_token_bytes(str(tmp_path), 50257, None)
    assert counts is None and "neither cached nor downloadable: ConnectionError" in where and "val loss only" in where


def run(data, run_dir, *extra):
    cmd = [sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_training_on_llmc_shards_matches_our_format(stack, tiny_data, tmp_path):
    """The same tokens in llm.c's header train the same model: identical losses and val bpb where the token bytes are
    known (our tokenizer/ beside the shards); without them, the val loss counts every target and bpb is n/a."""
    ours = run(tiny_data, tmp_path / "ours", "--phases", "pt")
    assert ours.returncode == 0, ours.stderr[-2000:]
    folder = tmp_path / "modded"
    tok = llmc_copy(stack, tiny_data, folder)
    shutil.copytree(os.path.join(tiny_data, "tokenizer"), folder / "tokenizer")
    theirs = run(folder, tmp_path / "theirs", "--phases", "pt,eval")
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    m_ours, m_theirs = (json.load(open(tmp_path / d / "metrics.json")) for d in ("ours", "theirs"))
    assert m_theirs["val_bpb"] == pytest.approx(m_ours["val_bpb"], rel=1e-6) and m_theirs["val_bpb_by_source"] == {}
    assert len(m_ours["val_bpb_by_source"]) == 1 and m_ours["val_scored"] == "every val token"
    log = open(tmp_path / "theirs" / "log.txt").read()
    assert f"vocab_size {tok.vocab_size} from {folder}/tokenizer" in log and "no CORE: " in log

    shutil.rmtree(folder / "tokenizer")
    bare = run(folder, tmp_path / "bare", "--phases", "pt", "--vocab-size", str(tok.vocab_size), "--bos-id", str(tok.bos_id))
    assert bare.returncode == 0, bare.stderr[-2000:]
    m_bare = json.load(open(tmp_path / "bare" / "metrics.json"))
    assert m_bare["val_bpb"] is None and math.isfinite(m_bare["val_loss"])
    val, _ = stack.pretrain_data(str(folder), tok.vocab_size, tok.bos_id).val_stream()
    assert m_bare["val_loss_tokens"] == len(val) - 1  # every target, BOS included: modded-nanogpt's val loss
    assert "val bpb n/a val loss" in open(tmp_path / "bare" / "log.txt").read()


def check(data, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", "check.py"), "--data-dir", str(data), *extra],
                          cwd=ROOT, capture_output=True, text=True)


def test_data_check_reads_an_llmc_folder(stack, tiny_data, tmp_path):
    """data/check.py on a folder of llm.c shards: every shard's ids checked, what was read said; an id past the
    vocabulary is one error naming the shard."""
    tok = llmc_copy(stack, tiny_data, tmp_path / "d")
    ids = ["--vocab-size", str(tok.vocab_size), "--bos-id", str(tok.bos_id)]
    ok = check(tmp_path / "d", *ids)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "llm.c shards, read for pretraining and its val loss" in ok.stdout and "pretrain/val: 1 shards" in ok.stdout
    shard = tmp_path / "d" / "fineweb_train_000002.bin"
    tokens = np.fromfile(shard, dtype="<u2", offset=1024)
    tokens[7] = tok.vocab_size + 3
    write_llmc(str(shard), tokens)
    bad = check(tmp_path / "d", *ids)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == f"error: {shard}: token id {tok.vocab_size + 3} >= vocab_size {tok.vocab_size}"
