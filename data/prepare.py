"""Prepare a complete data directory (tokenizer, pretrain shards, CORE, SFT, chat eval) with every step's defaults.

    python data/prepare.py --source PATH --vocab-size 8192 --out DIR    # PATH in the shared/data layout
    python data/prepare.py --source hf --vocab-size 32768 --out DIR     # public sources from the Hugging Face hub

Each step is the step's own command (printed before it runs), so any of them can be rerun alone.
"""
import argparse
import glob
import os
import subprocess
import sys
import time

from common import DataError, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_VAL_SHARD = 6542  # the last shard is held out for validation (nanochat's convention)


def download_climbmix(n_train, cache_dir):
    """Download the first n_train parquet shards and the validation shard; returns (train_files, val_files)."""
    from huggingface_hub import hf_hub_download
    fetch = lambda i: hf_hub_download(CLIMBMIX_REPO, f"shard_{i:05d}.parquet", repo_type="dataset", local_dir=cache_dir)
    return [fetch(i) for i in range(n_train)], [fetch(CLIMBMIX_VAL_SHARD)]


def steps(args):
    """The commands that build --out, in order."""
    out, tok = args.out, os.path.join(args.out, "tokenizer")
    if args.source == "hf":
        train_text, val_text = download_climbmix(args.hf_shards, os.path.join(out, "downloads", "climbmix"))
        exclude, bundle, sft_inputs, chat_input = [], "download", ["hf"], "hf"
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
    exclude_args = ["--exclude", *exclude] if exclude else []
    return [
        ["tokenizer.py", "train", "--input", *train_text, *exclude_args, "--vocab-size", str(args.vocab_size), "--out", tok],
        ["pretrain_shards.py", "--input", *train_text, *exclude_args, "--val-input", *val_text, "--tokenizer", tok,
         "--out", os.path.join(out, "pretrain"), "--shard-tokens", str(args.shard_tokens)],
        ["core_shards.py", "--bundle", bundle, "--tokenizer", tok, "--out", os.path.join(out, "core")],
        ["sft_shards.py", "--input", *sft_inputs, "--tokenizer", tok, "--out", os.path.join(out, "sft")],
        ["chat_eval_shards.py", "--input", chat_input, "--tokenizer", tok, "--out", os.path.join(out, "chat_eval")],
        ["chat_eval_shards.py", "--rl", "--input", chat_input, "--tokenizer", tok, "--out", os.path.join(out, "rl")],
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a folder in the shared/data layout, or 'hf'")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--hf-shards", type=int, default=8, help="climbmix training shards to download with --source hf")
    args = parser.parse_args()
    t_all = time.time()
    for step in steps(args):
        print(f"\n$ python data/{' '.join(step)}", flush=True)
        t0 = time.time()
        if subprocess.run([sys.executable, os.path.join(HERE, step[0]), *step[1:]]).returncode != 0:
            raise DataError(f"step data/{step[0]} failed (its error is above); {args.out} holds the steps before it")
        print(f"({step[0]} took {time.time() - t0:.1f}s)", flush=True)
    print(f"\nprepared {args.out} in {time.time() - t_all:.1f}s")


if __name__ == "__main__":
    run_cli(main)
