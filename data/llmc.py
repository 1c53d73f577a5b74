"""A folder of llm.c shards (modded-nanogpt's FineWeb, the seed's climbmix_32k_8_170) as a data directory the stack
reads: a tokenizer/ and a pretrain/ whose manifest lists the shards, linked where they lie, never copied.

    python data/llmc.py --src data/fineweb10B --tokenizer gpt2          # GPT-2 ids: tiktoken's gpt2 encoding
    python data/llmc.py --src climbmix_32k_8_170 --tokenizer climbmix_32k_8_170/tokenizer/tokenizer.pkl
    python data/llmc.py --src DIR --tokenizer runs/data/tokenizer       # a tokenizer of ours

llm.c writes uint16 ids behind 256 int32 header words (magic 20240520, version 1, n_tokens, then zeros): no vocabulary
and no BOS, so those come from --tokenizer (with gpt2, <|endoftext|> is the BOS, named <|bos|>; a .pkl is read without
being unpickled, as `tokenizer.py import` reads it); a config.json beside the shards (the seed's) must agree with it.
Shards are the *train_NNNNNN.bin and *val_NNNNNN.bin files in --src or one folder down, in name order; each one's
header, size and ids are checked and its sha256 recorded (data/check.py compares them). Writes --out (default: --src)
/tokenizer and /pretrain, the latter only once it is whole.
"""
import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from common import DataError, read_text, run_cli, sha256_file, write_json
from pretrain_shards import FORMAT_VERSION
from tokenizer import Tokenizer, import_pickled

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_stack import load_stack  # noqa: E402  (the stack sits one folder up; its reader checks the shards)

SHARD_NAME = re.compile(r"(?:^|_)(train|val)_\d+\.bin$")


def find_shards(src, skip):
    """{"train": paths, "val": paths} of the llm.c shards in src or one folder down (not under `skip`), in name order."""
    found = {"train": [], "val": []}
    for path in sorted(glob.glob(os.path.join(src, "*.bin")) + glob.glob(os.path.join(src, "*", "*.bin"))):
        if (m := SHARD_NAME.search(os.path.basename(path))) and os.path.dirname(os.path.abspath(path)) != skip:
            found[m.group(1)].append(path)
    if not found["train"] or not found["val"]:
        raise DataError(f"{src}: llm.c shards need both *train_NNNNNN.bin and *val_NNNNNN.bin (here or one folder "
                        f"down); found {len(found['train'])} train and {len(found['val'])} val shards")
    names = [os.path.basename(p) for p in found["val"] + found["train"]]
    if len(set(names)) != len(names):
        raise DataError(f"{src}: two shards share a file name (one folder down); keep one folder of shards per --src")
    return found


def read_shard(path, vocab_size):
    """An llm.c shard's tokens (memory-mapped), read by the stack's own reader: magic, version, size and every id
    against the tokenizer; words 3-5 of the header (bytes per token, vocab, BOS in ours) must be llm.c's zeros."""
    if np.fromfile(path, dtype="<i4", count=6)[3:].any():
        raise DataError(f"{path}: not an llm.c shard (its header records bytes per token, vocab and BOS: a token file "
                        "of ours, which data/prepare.py's pretrain/ lists already)")
    try:
        return load_stack().read_token_file(path, vocab_size)
    except load_stack().DataFormatError as e:
        raise DataError(str(e)) from None


def gpt2_tokenizer():
    """tiktoken's gpt2 encoding as ours: its ranks and split pattern, <|endoftext|> (50256) named <|bos|>."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without a cache: requests' or tiktoken's own errors
        raise DataError(f"tiktoken's gpt2 encoding is neither cached nor downloadable ({type(e).__name__}: "
                        f"{str(e)[:200]}); point TIKTOKEN_CACHE_DIR at a cache that holds it") from None
    return Tokenizer(enc._mergeable_ranks, enc._pat_str, {"<|bos|>": enc.eot_token})


def load_tokenizer(spec):
    """--tokenizer: gpt2, a pickled tiktoken encoding (.pkl, never unpickled) or a tokenizer directory of ours."""
    if spec == "gpt2":
        return gpt2_tokenizer()
    return import_pickled(spec) if spec.endswith(".pkl") else Tokenizer.load(spec)


def check_config(src, tok):
    """The seed's config.json, where there is one, names the vocabulary and BOS: they must be the tokenizer's."""
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        return
    try:
        config = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg})") from None
    for name in ("vocab_size", "bos_id"):
        given = config.get(name) if isinstance(config, dict) else None
        if given is not None and given != getattr(tok, name):
            raise DataError(f"{path}: {name} {given}, but the tokenizer has {getattr(tok, name)}")


def convert(src, tokenizer, out=None, log=print):
    """Write out/tokenizer and out/pretrain (links to src's shards and their manifest); returns the shard rows."""
    out = out or src
    tok, target = load_tokenizer(tokenizer), os.path.abspath(os.path.join(out, "pretrain"))
    check_config(src, tok)
    found = find_shards(src, skip=target)
    if os.path.isdir(target) and not all(os.path.islink(p) for p in glob.glob(os.path.join(target, "*.bin"))):
        raise DataError(f"{target}: holds shards of its own (data/prepare.py's?); give another --out")
    shards = []
    for split in ("val", "train"):
        for path in found[split]:
            tokens = read_shard(path, tok.vocab_size)
            shards.append({"file": os.path.basename(path), "split": split, "n_tokens": len(tokens),
                           "n_docs": int(np.count_nonzero(tokens == tok.bos_id)), "sha256": sha256_file(path),
                           "source": os.path.abspath(path)})
            log(f"{path}: {len(tokens):,} tokens, {shards[-1]['n_docs']:,} documents")
    tok.save(os.path.join(out, "tokenizer"))  # every shard is checked by now; this also names it (tok.sha256)
    stage = tempfile.mkdtemp(prefix=".pretrain.", dir=os.path.dirname(target))
    os.chmod(stage, 0o755)
    try:
        for s in shards:
            os.symlink(os.path.relpath(s["source"], target), os.path.join(stage, s["file"]))
        n_val_docs = sum(s["n_docs"] for s in shards if s["split"] == "val")
        write_json(os.path.join(stage, "manifest.json"), {
            "format": "pretrain", "version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "tokenizer_sha256": tok.sha256, "shards": shards, "sources": {"llmc": os.path.abspath(src)},
            "val_sources": [{"name": os.path.basename(os.path.abspath(src)), "n_docs": n_val_docs}] if n_val_docs else []})
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(stage, target)  # its links are relative to target, a sibling of stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return shards


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the folder of llm.c shards")
    parser.add_argument("--tokenizer", required=True,
                        help="gpt2 (tiktoken's), PATH/tokenizer.pkl (nanochat's or the seed's) or a DIR/tokenizer of ours")
    parser.add_argument("--out", help="the data directory to write tokenizer/ and pretrain/ into (default: --src)")
    args = parser.parse_args()
    shards = convert(args.src, args.tokenizer, args.out)
    for split in ("val", "train"):
        rows = [s for s in shards if s["split"] == split]
        print(f"{split}: {len(rows)} shards, {sum(s['n_tokens'] for s in rows):,} tokens")
    print(f"wrote {os.path.join(args.out or args.src, 'pretrain')} and its tokenizer/: "
          f"python decoderstack_small_pt-eval-sft.py --data-dir {args.out or args.src}")


if __name__ == "__main__":
    run_cli(main)
