"""Data pipeline speed on the shared pretraining text: tokenizer training, encoding, shard writing and reading.

    python bench/data_bench.py [--data ../shared/data] [--vocab-size 8192]

Prints one table and a last summary line. Timings vary +-30% on shared machines.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from load_stack import load_stack  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "data"))
import pretrain_shards  # noqa: E402
import tokenizer  # noqa: E402
from common import TEXT_EXTS, expand_inputs, iter_documents, write_token_file  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("DECODERSTACK_DATA", os.path.join(ROOT, "..", "shared", "data")))
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    stack = load_stack()
    files = expand_inputs([os.path.join(args.data, "pretrain")], TEXT_EXTS, ["val_*"])
    mb = sum(len(d.encode("utf-8")) for d in iter_documents(files)) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = os.path.join(tmp, "tokenizer")
        for doc_cap in (0, 10_000):  # the default cap trains on ~1 MB here; uncapped on all 33 MB
            tok, dt = timed(lambda: tokenizer.train(tokenizer.capped_texts(files, 2_000_000_000, doc_cap), args.vocab_size))
            rows.append((f"tokenizer training, doc cap {doc_cap or 'none'}", f"{dt:.1f} s", f"{args.vocab_size} vocab"))
        tok.save(tok_dir)
        encode_rate = {}
        for workers in (1, 2):
            docs, dt = timed(lambda: list(pretrain_shards.encoded_documents(files, tok_dir, workers)))
            encode_rate[workers] = mb / dt
            rows.append((f"encode, {workers} process{'es' * (workers > 1)}", f"{mb / dt:.2f} MB/s", f"{mb:.1f} MB text -> {sum(map(len, docs)):,} tokens"))
        tokens = np.concatenate(docs)
        shard = os.path.join(tmp, "shard.bin")
        _, dt = timed(lambda: write_token_file(shard, tokens, tok.vocab_size, tok.bos_id))
        rows.append(("shard write", f"{os.path.getsize(shard) / 1e6 / dt:.0f} MB/s", f"{os.path.getsize(shard) / 1e6:.1f} MB, atomic rename"))
        reader = stack.Tokenizer(tok_dir)
        read, dt = timed(lambda: np.asarray(stack.read_token_file(shard, reader.vocab_size), dtype=np.int64))
        assert np.array_equal(read, tokens)
        rows.append(("shard read (checked, to int64)", f"{len(read) / dt / 1e6:.0f} M tok/s", f"{len(read):,} tokens"))
    print(f"{'step':<36} {'speed':>14}   notes")
    for name, speed, note in rows:
        print(f"{name:<36} {speed:>14}   {note}")
    print(f"summary: encode {encode_rate[1]:.2f} MB/s (1 proc) / {encode_rate[2]:.2f} MB/s (2 procs), "
          f"tokenizer training {rows[0][1]} (all text), shard read {rows[-1][1]}")


if __name__ == "__main__":
    main()
