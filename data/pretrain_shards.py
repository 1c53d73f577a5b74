"""Text -> pretraining shards: every document is <|bos|> + its tokens; the validation shard is written first.

    python data/pretrain_shards.py --input PATH... [--exclude GLOB] --val-input PATH... --tokenizer DIR/tokenizer --out DIR/pretrain

A .txt file is one document, a .jsonl line's `text` field is one, a .parquet row's `text` column is one. Shards end
at document boundaries so a reader can start any shard at a BOS. The whole directory is built beside --out and
renamed into place at the end, so a failed run leaves the previous output untouched.
"""
import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time

import numpy as np

from common import DataError, TEXT_EXTS, expand_inputs, iter_documents, run_cli, sha256_file, token_dtype, write_json, write_token_file
from tokenizer import Tokenizer

FORMAT_VERSION = 1
BATCH_CHARS = 1 << 22  # documents are sent to workers in batches of about this many characters

_worker_tokenizer = None


def _init_worker(tok_dir):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tok_dir)


def _encode_batch(docs):
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    return [np.array([tok.bos_id, *ids], dtype=dtype) for ids in tok.encode_batch(docs, num_threads=1)]


def batched(docs, max_chars=BATCH_CHARS):
    batch, size = [], 0
    for doc in docs:
        if not doc:  # an empty document would be a lone BOS: no signal, skip it
            continue
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encoded_documents(files, tok_dir, workers):
    """Token arrays (BOS first) of every document of `files`, in input order, tokenized by `workers` processes."""
    batches = batched(iter_documents(files))
    if workers <= 1:
        _init_worker(tok_dir)
        for batch in batches:
            yield from _encode_batch(batch)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok_dir,)) as pool:
        for encoded in pool.imap(_encode_batch, batches):
            yield from encoded


class ShardWriter:
    """Collects documents into shards of at most `shard_tokens` tokens, closing a shard before the document that
    would overflow it (a single longer document gets a shard of its own)."""

    def __init__(self, out_dir, tok, shard_tokens):
        self.out_dir, self.tok, self.shard_tokens = out_dir, tok, shard_tokens
        self.shards, self.pending, self.pending_tokens, self.next_index = [], [], 0, 0

    def add(self, doc, split):
        if self.pending and self.pending_tokens + len(doc) > self.shard_tokens:
            self.flush(split)
        self.pending.append(doc)
        self.pending_tokens += len(doc)

    def flush(self, split):
        if not self.pending:
            return
        name = f"{split}_{self.next_index:06d}.bin"
        path = os.path.join(self.out_dir, name)
        write_token_file(path, np.concatenate(self.pending), self.tok.vocab_size, self.tok.bos_id)
        self.shards.append({"file": name, "split": split, "n_tokens": self.pending_tokens, "n_docs": len(self.pending), "sha256": sha256_file(path)})
        self.pending, self.pending_tokens, self.next_index = [], 0, self.next_index + 1


def write_pretrain(train_files, val_files, tok_dir, out_dir, shard_tokens=100_000_000, workers=1, progress=True):
    """Write the val shard then the train shards into out_dir (replaced only once everything is written)."""
    from tqdm import tqdm
    overlap = sorted(set(map(os.path.abspath, train_files)) & set(map(os.path.abspath, val_files)))
    if overlap:
        raise DataError(f"{overlap[0]}: is both a training and a validation input (leave it out with --exclude)")
    tok = Tokenizer.load(tok_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    os.chmod(stage, 0o755)  # mkdtemp makes a private directory; the output is an ordinary one
    try:
        writer = ShardWriter(stage, tok, shard_tokens)
        for split, files in (("val", val_files), ("train", train_files)):
            if split == "val":  # all validation documents go into the one shard val_000000.bin
                writer.shard_tokens = float("inf")
            n_docs = 0
            for doc in tqdm(encoded_documents(files, tok_dir, workers), desc=f"{split} documents", unit=" docs", disable=not progress):
                writer.add(doc, split)
                n_docs += 1
            if n_docs == 0:
                raise DataError(f"no {split} text: every document in {', '.join(files)} is empty")
            writer.flush(split)
            writer.shard_tokens = shard_tokens
        write_json(os.path.join(stage, "manifest.json"), {
            "format": "pretrain", "version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "tokenizer_sha256": tok.sha256, "shard_tokens": shard_tokens, "shards": writer.shards,
            "sources": {"val": val_files, "train": train_files}})
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return writer.shards


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="training text: files or folders of .txt/.jsonl/.parquet")
    parser.add_argument("--exclude", nargs="*", default=[], help="globs of input files to leave out (e.g. 'val_*')")
    parser.add_argument("--val-input", nargs="+", required=True, help="validation text, written first to val_000000.bin")
    parser.add_argument("--tokenizer", required=True, help="DIR/tokenizer written by data/tokenizer.py")
    parser.add_argument("--out", required=True, help="DIR/pretrain")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per training shard (at most)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    args = parser.parse_args()
    train_files = expand_inputs(args.input, TEXT_EXTS, args.exclude)
    val_files = expand_inputs(args.val_input, TEXT_EXTS)
    t0 = time.time()
    shards = write_pretrain(train_files, val_files, args.tokenizer, args.out, args.shard_tokens, args.workers)
    for split in ("val", "train"):
        rows = [s for s in shards if s["split"] == split]
        print(f"{split}: {len(rows)} shards, {sum(s['n_docs'] for s in rows):,} documents, {sum(s['n_tokens'] for s in rows):,} tokens")
    print(f"wrote {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
