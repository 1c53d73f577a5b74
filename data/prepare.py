"""Prepare a complete data directory (tokenizer, pretrain shards, CORE, SFT, chat eval) with every step's defaults.

    python data/prepare.py --vocab-size 8192 --out DIR                  # --source auto (the default): see below
    python data/prepare.py --source PATH --vocab-size 8192 --out DIR    # PATH in the shared/data layout
    python data/prepare.py --source hf --vocab-size 32768 --out DIR     # public sources from the Hugging Face hub
    python data/prepare.py --source PATH --tokenizer TOK_DIR --out DIR  # an existing tokenizer instead of training one

--source auto takes $DECODERSTACK_DATA if set, else ../shared/data beside the repository, when that folder has
pretrain/ inside; otherwise the public sources (hf). It prints one line saying which it chose and why.

Each step is the step's own command (printed before it runs), so any of them can be rerun alone. The pretraining
documents are cut at --max-doc-chars and, from a local source, shuffled with --seed; climbmix (hf) is shuffled
already, so its documents keep their order unless --seed is given.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import DataError, run_cli
from tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_VAL_SHARD = 6542  # the last shard is held out for validation (nanochat's convention)
DEFAULT_VOCAB_SIZE, DEFAULT_SEED, DEFAULT_MAX_DOC_CHARS = 32768, 1337, 8192
TOKENIZER_FILES = ("tokenizer.tiktoken", "tokenizer.json", "token_bytes.npy")
OFFLINE_HINT = ("without network, prepare from local files: --source PATH (a folder in the shared/data layout) or "
                "$DECODERSTACK_DATA=PATH with --source auto")


def download_climbmix(n_train, cache_dir):
    """Download the first n_train parquet shards and the validation shard; returns (train_files, val_files)."""
    from huggingface_hub import hf_hub_download

    def fetch(i):
        try:
            return hf_hub_download(CLIMBMIX_REPO, f"shard_{i:05d}.parquet", repo_type="dataset", local_dir=cache_dir)
        except OSError as e:  # the hub's network and cache errors (offline: LocalEntryNotFoundError) are OSErrors
            raise DataError(f"{CLIMBMIX_REPO}: download of shard_{i:05d}.parquet failed ({e}); {OFFLINE_HINT}") from None
    return [fetch(i) for i in range(n_train)], [fetch(CLIMBMIX_VAL_SHARD)]


def local_data_dir():
    """Where --source auto looks for the shared data: $DECODERSTACK_DATA if set (as tests/conftest.py reads it),
    else ../shared/data relative to the repository root."""
    return os.environ.get("DECODERSTACK_DATA") or os.path.join(REPO_ROOT, "..", "shared", "data")


def resolve_source(source):
    """--source as given -> (the source to use, the line that says why, or None when it was given explicitly).
    `auto` is the local shared data when its folder has pretrain/ inside, else the public sources (`hf`)."""
    if source != "auto":
        return source, None
    local = local_data_dir()
    where = f"$DECODERSTACK_DATA={local}" if os.environ.get("DECODERSTACK_DATA") else os.path.normpath(local)
    if os.path.isdir(os.path.join(local, "pretrain")):
        return local, f"--source auto: using the local shared data {where} (it has pretrain/)"
    reason = "does not exist" if not os.path.isdir(local) else "has no pretrain/ inside"
    return "hf", f"--source auto: using the public sources from the Hugging Face hub (hf): {where} {reason}"


def copy_tokenizer(src, dst):
    """Copy the tokenizer directory `src` (our format) to `dst`, checked by loading it on both sides; `dst` is
    replaced only once the copy loads."""
    Tokenizer.load(src)  # its own errors name the file
    for name in TOKENIZER_FILES:
        if not os.path.isfile(os.path.join(src, name)):
            raise DataError(f"{os.path.join(src, name)}: missing (a tokenizer directory holds {', '.join(TOKENIZER_FILES)})")
    if os.path.isdir(dst) and os.path.samefile(src, dst):
        return
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", dir=parent)
    os.chmod(stage, 0o755)
    try:
        for name in TOKENIZER_FILES:
            shutil.copyfile(os.path.join(src, name), os.path.join(stage, name))
        Tokenizer.load(stage)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(stage, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def steps(args):
    """The commands that build --out, in order (without the tokenizer step when --tokenizer names one to copy)."""
    out, tok = args.out, os.path.join(args.out, "tokenizer")
    if args.source == "hf":
        train_text, val_text = download_climbmix(args.hf_shards, os.path.join(out, "downloads", "climbmix"))
        exclude, bundle, sft_inputs, chat_input = [], "download", ["hf"], "hf"
        order = ["--keep-order"] if args.seed is None else ["--seed", str(args.seed)]  # climbmix is shuffled already
    else:
        src = args.source
        if not os.path.isdir(os.path.join(src, "pretrain")):
            raise DataError(f"{src}: not a data folder in the shared layout (no pretrain/ inside); use --source hf for the hub")
        train_text, val_text = [os.path.join(src, "pretrain")], sorted(glob.glob(os.path.join(src, "pretrain", "val_*")))
        if not val_text:
            raise DataError(f"{src}/pretrain: no val_* files to hold out for validation")
        exclude = ["val_*"]
        bundle, sft_inputs = os.path.join(src, "eval", "core"), [os.path.join(src, "sft"), os.path.join(src, "eval", "gsm8k", "train.jsonl")]
        chat_input = os.path.join(src, "eval")
        order = ["--seed", str(DEFAULT_SEED if args.seed is None else args.seed)]
    exclude_args = ["--exclude", *exclude] if exclude else []
    tokenizer_step = [["tokenizer.py", "train", "--input", *train_text, *exclude_args,
                       "--vocab-size", str(args.vocab_size or DEFAULT_VOCAB_SIZE), "--out", tok]]
    return (tokenizer_step if not args.tokenizer else []) + [
        ["pretrain_shards.py", "--input", *train_text, *exclude_args, "--val-input", *val_text, "--tokenizer", tok,
         "--out", os.path.join(out, "pretrain"), "--shard-tokens", str(args.shard_tokens),
         "--max-doc-chars", str(args.max_doc_chars), *order],
        ["core_shards.py", "--bundle", bundle, "--tokenizer", tok, "--out", os.path.join(out, "core")],
        ["sft_shards.py", "--input", *sft_inputs, "--tokenizer", tok, "--out", os.path.join(out, "sft")],
        ["chat_eval_shards.py", "--input", chat_input, "--tokenizer", tok, "--out", os.path.join(out, "chat_eval")],
        ["chat_eval_shards.py", "--rl", "--input", chat_input, "--tokenizer", tok, "--out", os.path.join(out, "rl")],
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="auto",
                        help="a folder in the shared/data layout, 'hf' (the Hugging Face hub), or 'auto' (default): "
                             "$DECODERSTACK_DATA or ../shared/data when it has pretrain/ inside, else hf")
    parser.add_argument("--vocab-size", type=int, default=None, help=f"of the tokenizer trained (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="use this tokenizer directory (our format, e.g. from `data/tokenizer.py import`) instead of "
                             "training one: copied to OUT/tokenizer, checked by loading it")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--max-doc-chars", type=int, default=DEFAULT_MAX_DOC_CHARS,
                        help="pretraining documents are cut into pieces of at most this many characters (0: whole)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"shuffle the pretraining documents with this seed (default {DEFAULT_SEED}; with "
                             "hf, also when auto chooses it, the documents keep climbmix's order unless --seed is given)")
    parser.add_argument("--hf-shards", type=int, default=8, help="climbmix training shards to download with --source hf")
    args = parser.parse_args(argv)
    if args.tokenizer and args.vocab_size is not None:
        raise DataError(f"--vocab-size {args.vocab_size} and --tokenizer {args.tokenizer}: give one (the tokenizer has its own vocabulary)")
    if args.max_doc_chars < 0:
        raise DataError(f"--max-doc-chars {args.max_doc_chars}: must be 0 (documents whole) or more")
    return args


def main():
    args = parse_args()
    t_all = time.time()
    args.source, why = resolve_source(args.source)
    if why:
        print(why, flush=True)
    todo = steps(args)  # checks the source (with hf: downloads it) before the tokenizer is copied
    if args.tokenizer:
        tok = os.path.join(args.out, "tokenizer")
        print(f"\n$ cp {' '.join(os.path.join(args.tokenizer, f) for f in TOKENIZER_FILES)} {tok}/   (checked by loading it)", flush=True)
        copy_tokenizer(args.tokenizer, tok)
    for step in todo:
        print(f"\n$ python data/{' '.join(step)}", flush=True)
        t0 = time.time()
        if subprocess.run([sys.executable, os.path.join(HERE, step[0]), *step[1:]]).returncode != 0:
            hint = f"; if it could not download, {OFFLINE_HINT}" if args.source == "hf" else ""
            raise DataError(f"step data/{step[0]} failed (its error is above); {args.out} holds the steps before it{hint}")
        print(f"({step[0]} took {time.time() - t0:.1f}s)", flush=True)
    print(f"\nprepared {args.out} in {time.time() - t_all:.1f}s")


if __name__ == "__main__":
    run_cli(main)
