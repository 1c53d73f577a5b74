"""data/check.py's view of the pretraining data: per stream the documents, their lengths and bytes per token, the most
frequent tokens, the special tokens' counts and the first packed batch with its document starts and cuts, each against
a direct computation from the shards; on our prepared directories (with the histogram) and on llm.c folders."""
import os
import re
import subprocess
import sys

import numpy as np

from conftest import ROOT, TINY_ARGS
from test_llmc_data import convert, llmc_copy

CHECK = os.path.join(ROOT, "data", "check.py")
MAX_DOC_LEN = 128  # TINY_ARGS' first stage


def check(*args):
    """data/check.py's lines; tiny_data holds pretraining data only, so the check ends at core/, after the view."""
    r = subprocess.run([sys.executable, CHECK, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 or re.fullmatch(r"error: \S+/core/manifest.json: missing", r.stderr.strip()), r.stderr[-2000:]
    return r.stdout.splitlines()


def rows(lines):
    return {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines
                                  if line.startswith("| ") and not line.startswith(("| ---", "| stream")))}


def segments(lines):
    """(mark, tokens) of each segment line of the decoded batch."""
    return [(m.group(1), int(m.group(2).replace(",", ""))) for line in lines
            if (m := re.match(r"  (\[doc\]|\[cut\]) ([\d,]+) tokens: ", line))]


def test_check_shows_our_data_as_the_stack_reads_it(stack, tiny_data, tmp_path):
    lines = check("--data-dir", str(tiny_data), *TINY_ARGS, "--inspect-tokens", "3000", "--histogram",
                  "--run-dir", str(tmp_path / "run"))
    tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    data = stack.pretrain_data(str(tiny_data))
    train = np.concatenate([np.asarray(stack.read_token_file(p, tok.vocab_size)) for p in data.train])[:3000]
    val, source = data.val_stream()
    table = rows(lines)
    streams = {f"val: {n}": val[source == i] for i, n in enumerate(data.source_names())} or {"val": val}
    streams["train: first 3,000 tokens"] = train
    assert set(table) == set(streams)
    for name, tokens in streams.items():
        starts = np.flatnonzero(tokens == tok.bos_id)
        n_docs = len(starts) + (tokens[0] != tok.bos_id)
        assert table[name][:2] == [f"{n_docs:,}", f"{len(tokens):,}"], name
        lengths = np.diff(np.concatenate([[0] if tokens[0] != tok.bos_id else [], starts, [len(tokens)]]))
        assert table[name][2].endswith(f"/ {int(lengths.max()):,}")
        assert table[name][3] == f"{tok.token_bytes[tokens].sum() / len(tokens):.2f}"
    counts = np.bincount(train, minlength=tok.vocab_size)
    top = int(np.argmax(counts))
    assert next(line for line in lines if line.startswith("most frequent")).startswith(
        f"most frequent train tokens: {tok.decode([top])!r} {counts[top] / len(train):.1%}")
    specials = next(line for line in lines if line.startswith("special tokens"))
    assert f"<|bos|> {counts[tok.bos_id]:,}, {int((val == tok.bos_id).sum()):,}" in specials
    # the batch: segments cover its tokens, none longer than max_doc_len; a [doc] wherever a document starts
    shown = segments(lines)
    T = sum(n for _, n in shown)
    assert T == min(1024, 2048, 2999) and max(n for _, n in shown) <= MAX_DOC_LEN
    first = train[:T]
    assert sum(mark == "[doc]" for mark, _ in shown) == int((first == tok.bos_id).sum()) + (first[0] != tok.bos_id)
    assert any(mark == "[cut]" for mark, _ in shown)  # the stdlib documents are longer than 128 tokens
    assert (tmp_path / "run" / "data_doc_lengths.png").stat().st_size > 0


def test_check_shows_a_converted_llmc_folder_as_ours(stack, tiny_data, tmp_path):
    """llm.c shards converted by data/llmc.py (our tokenizer beside them): the same view, decoded, bytes per token
    known; the check ends after the pretraining data, saying what the folder is for."""
    llmc_copy(stack, tiny_data, tmp_path / "llmc")
    assert convert(tmp_path / "llmc", "--tokenizer", os.path.join(tiny_data, "tokenizer")).returncode == 0
    tok = stack.Tokenizer(os.path.join(tiny_data, "tokenizer"))
    lines = check("--data-dir", str(tmp_path / "llmc"), "--vocab-size", str(tok.vocab_size), "--bos-id",
                  str(tok.bos_id), *TINY_ARGS, "--inspect-tokens", "2000")
    table, data = rows(lines), stack.pretrain_data(str(tmp_path / "llmc"))
    assert set(table) == {"val: llmc", "train: first 2,000 tokens"}
    val = data.val_stream()[0]
    assert table["val: llmc"][3] == f"{tok.token_bytes[val].sum() / len(val):.2f}"  # the tokenizer's bytes per token
    assert re.match(r"special tokens \(train, val\): <\|bos\|> [\d,]+, [\d,]+", next(l for l in lines if l.startswith("special")))
    shown = [line for line in lines if line.startswith("  [doc] ")]
    assert shown and shown[0].startswith("  [doc] ") and not re.match(rf"  \[doc\] [\d,]+ tokens: '{tok.bos_id} ", shown[0])
    assert lines[-1].endswith("(data/llmc.py), read for pretraining and its val bpb; CORE, SFT and chat need data/prepare.py's files")
    assert not os.path.exists(tmp_path / "llmc" / "data_doc_lengths.png")
