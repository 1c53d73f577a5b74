"""Text -> pretraining shards: every document is <|bos|> + its tokens; the validation shard is written first.

    python data/pretrain_shards.py --input PATH... [--exclude GLOB] --val-input PATH... --tokenizer DIR/tokenizer --out DIR/pretrain
                                   [--max-doc-chars 8192] [--seed 1337 | --keep-order]

A .txt file is one document, a .jsonl line's `text` field is one, a .parquet row's `text` column is one. Documents
longer than --max-doc-chars are cut into pieces (at blank lines, else sentence ends, else whitespace, else hard),
each piece its own document, on both sides. The training documents of all inputs are then shuffled with
random.Random(--seed), which holds the training tokens in memory; --keep-order keeps input order and streams. The
validation documents are never shuffled. Shards end at document boundaries so a reader can start any shard at a
BOS. The whole directory is built beside --out and renamed into place at the end, so a failed run leaves the
previous output untouched.
"""
import argparse
import multiprocessing as mp
import os
import random
import re
import shutil
import tempfile
import time

import numpy as np

from common import DataError, TEXT_EXTS, expand_inputs, iter_documents, run_cli, sha256_file, token_dtype, write_json, write_token_file
from tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: documents cut at max_doc_chars, training documents shuffled (seed), val_sources
BATCH_CHARS = 1 << 22  # documents are sent to workers in batches of about this many characters
DEFAULT_SEED, DEFAULT_MAX_DOC_CHARS = 1337, 8192

# Where a too-long text may be cut, coarsest first; each match (the separator) stays at the end of the piece before it.
CUT_LEVELS = (re.compile(r"\n\n+"),            # paragraphs: blank lines
              re.compile(r"(?<=[.!?])\s+"),    # sentences: whitespace after . ! ?
              re.compile(r"\s+"))              # words

_worker_tokenizer = None


def _units(text, separator):
    """text split just after each run of `separator`: the pieces concatenate to text."""
    start = 0
    for m in separator.finditer(text):
        if m.end() > start:
            yield text[start:m.end()]
            start = m.end()
    if start < len(text):
        yield text[start:]


def cut_document(text, max_chars, level=0):
    """Pieces of at most max_chars characters that concatenate to `text` (0: the text whole). Greedy: a piece takes
    as many whole paragraphs as fit; a paragraph longer than max_chars is cut the same way at sentence ends, a
    sentence at whitespace, and a run without any at every max_chars characters."""
    if not max_chars or len(text) <= max_chars:
        return [text]
    if level == len(CUT_LEVELS):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    pieces, current, size = [], [], 0
    for unit in _units(text, CUT_LEVELS[level]):
        if size + len(unit) > max_chars and current:
            pieces.append("".join(current))
            current, size = [], 0
        if len(unit) > max_chars:
            pieces += cut_document(unit, max_chars, level + 1)
        else:
            current.append(unit)
            size += len(unit)
    if current:
        pieces.append("".join(current))
    return pieces


def _init_worker(tok_dir):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tok_dir)


def _encode_batch(docs):
    """One batch of texts -> (their token arrays, BOS first, back to back; each one's length)."""
    tok = _worker_tokenizer
    arrays = [np.array([tok.bos_id, *ids], dtype=token_dtype(tok.vocab_size)) for ids in tok.encode_batch(docs, num_threads=1)]
    return np.concatenate(arrays), np.array([len(a) for a in arrays], dtype=np.int64)


def batched(docs, max_chars=BATCH_CHARS):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def documents(files, max_doc_chars, counts):
    """Every document of `files` in input order, cut at max_doc_chars; counts[i] += 1 for each one from files[i].
    An empty document would be a lone BOS, no signal: skipped, not counted."""
    for i, path in enumerate(files):
        for doc in iter_documents([path]):
            for piece in cut_document(doc, max_doc_chars):
                if piece:
                    counts[i] += 1
                    yield piece


def encoded_batches(docs, tok_dir, workers):
    """(tokens, lengths) of each batch of `docs`, in order, tokenized by `workers` processes (the batches, and so
    the output, do not depend on `workers`)."""
    batches = batched(docs)
    if workers <= 1:
        _init_worker(tok_dir)
        yield from map(_encode_batch, batches)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok_dir,)) as pool:
        yield from pool.imap(_encode_batch, batches)


def split_batch(tokens, lengths):
    """One batch's token array -> each document's (a view)."""
    ends = np.cumsum(lengths)
    return [tokens[a:b] for a, b in zip(ends - lengths, ends)]


def shuffled(batches, seed):
    """Every document of `batches`, permuted with random.Random(seed). The tokens stay in the batches' arrays; only
    (batch, start, length) per document is kept beside them."""
    arrays, where = [], []
    for tokens, lengths in batches:
        starts = np.cumsum(lengths) - lengths
        where.append(np.stack([np.full(len(lengths), len(arrays)), starts, lengths], axis=1))
        arrays.append(tokens)
    where = np.concatenate(where) if where else np.zeros((0, 3), dtype=np.int64)
    order = list(range(len(where)))
    random.Random(seed).shuffle(order)
    for i in order:
        b, start, n = where[i].tolist()
        yield arrays[b][start:start + n]


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


def source_names(files):
    """Each file's name in val_sources: its base name, or the path as given where two files share a base name."""
    base = [os.path.basename(f) for f in files]
    return [b if base.count(b) == 1 else f for f, b in zip(files, base)]


def write_pretrain(train_files, val_files, tok_dir, out_dir, shard_tokens=100_000_000, workers=1, progress=True,
                   seed=DEFAULT_SEED, max_doc_chars=DEFAULT_MAX_DOC_CHARS):
    """Write the val shard (documents in input order) then the train shards (documents permuted with
    random.Random(seed); seed=None keeps input order) into out_dir (replaced only once everything is written).
    Documents longer than max_doc_chars (0: no limit) are cut into pieces with cut_document first."""
    from tqdm import tqdm
    if type(max_doc_chars) is not int or max_doc_chars < 0:
        raise DataError(f"--max-doc-chars {max_doc_chars}: must be a whole number of characters, 0 (documents whole) or more")
    if type(shard_tokens) is not int or shard_tokens < 1:
        raise DataError(f"--shard-tokens {shard_tokens}: must be 1 or more")
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
        val_counts = [0] * len(val_files)
        for split, files in (("val", val_files), ("train", train_files)):
            counts = val_counts if split == "val" else [0] * len(files)
            batches = encoded_batches(documents(files, max_doc_chars, counts), tok_dir, workers)
            if split == "train" and seed is not None:
                docs = shuffled(tqdm(batches, desc="train batches (read, then shuffled)", unit=" batches", disable=not progress), seed)
            else:
                docs = tqdm((d for b in batches for d in split_batch(*b)), desc=f"{split} documents", unit=" docs", disable=not progress)
            # all validation documents go into the one shard val_000000.bin
            writer.shard_tokens = float("inf") if split == "val" else shard_tokens
            for doc in docs:
                writer.add(doc, split)
            if sum(counts) == 0:
                raise DataError(f"no {split} text: every document in {', '.join(files)} is empty")
            writer.flush(split)
        write_json(os.path.join(stage, "manifest.json"), {
            "format": "pretrain", "version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "tokenizer_sha256": tok.sha256, "shard_tokens": shard_tokens, "seed": seed, "max_doc_chars": max_doc_chars,
            "shards": writer.shards,
            "val_sources": [{"name": name, "n_docs": n} for name, n in zip(source_names(val_files), val_counts) if n],
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
    parser.add_argument("--val-input", nargs="+", required=True, help="validation text, written first to val_000000.bin, in input order")
    parser.add_argument("--tokenizer", required=True, help="DIR/tokenizer written by data/tokenizer.py")
    parser.add_argument("--out", required=True, help="DIR/pretrain")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per training shard (at most)")
    parser.add_argument("--max-doc-chars", type=int, default=DEFAULT_MAX_DOC_CHARS,
                        help="cut longer documents (train and val) into pieces of at most this many characters, at "
                             "blank lines, else sentence ends, else whitespace; 0 keeps documents whole (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="shuffle the training documents of all inputs with random.Random(SEED); holds the "
                             "training tokens in memory (default %(default)s)")
    parser.add_argument("--keep-order", action="store_true",
                        help="write the training documents in input order instead (streams; overrides --seed)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    args = parser.parse_args()
    train_files = expand_inputs(args.input, TEXT_EXTS, args.exclude)
    val_files = expand_inputs(args.val_input, TEXT_EXTS)
    t0 = time.time()
    shards = write_pretrain(train_files, val_files, args.tokenizer, args.out, args.shard_tokens, args.workers,
                            seed=None if args.keep_order else args.seed, max_doc_chars=args.max_doc_chars)
    for split in ("val", "train"):
        rows = [s for s in shards if s["split"] == split]
        print(f"{split}: {len(rows)} shards, {sum(s['n_docs'] for s in rows):,} documents, {sum(s['n_tokens'] for s in rows):,} tokens")
    print(f"wrote {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
