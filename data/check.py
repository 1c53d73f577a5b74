"""Check a prepared data directory as the stack reads it: every file's format, every pretraining shard's sha256
against its manifest, and what each part holds. Writes nothing.

    python data/check.py --data-dir runs/data
    python data/check.py --data-dir data/fineweb10B --vocab-size 50257 --bos-id 50256     # a folder of llm.c shards

It takes the stack's flags (--data-dir, --vocab-size, --bos-id matter here) and reads with the stack's own readers,
so what passes here is what training, evaluation and the chat phases will read. A bad file: one `error: FILE: ...`
line and exit status 1.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_stack import load_stack  # noqa: E402  (the stack sits one folder up)

ds = load_stack()


def check(cfg, log=print):
    """Read every part of cfg.data_dir (pretraining shards by sha256 too) and log what it holds."""
    t0, directory = time.time(), cfg.data_dir
    data = ds.pretrain_data(directory, cfg.vocab_size, cfg.bos_id)
    ours = os.path.isfile(os.path.join(directory, "pretrain", "manifest.json"))
    log(f"pretraining data: vocab {data.vocab_size}, bos {data.bos_id}; {data.origin}")
    for split, paths in (("val", data.val), ("train", data.train)):
        if ours:
            ds.pretrain_shards(directory, data.tokenizer, split, check_sha256=True)
        n = sum(len(ds.read_token_file(p, data.vocab_size)) for p in paths)
        log(f"pretrain/{split}: {len(paths)} shards, {n:,} tokens")
    if data.val_sources:
        log("val documents: " + ", ".join(f"{name} {n:,}" for name, n in data.val_sources))
    if not ours:
        log(f"{directory}: llm.c shards, read for pretraining and its val loss; CORE, SFT and chat need data/prepare.py")
        return
    tokenizer = data.tokenizer
    log(f"tokenizer: vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, {len(tokenizer.special_tokens)} special tokens")
    core = ds.load_core(directory, tokenizer)
    log(f"core: {len(core.tasks)} tasks, {len(core.examples):,} examples, {len(core.tokens):,} tokens "
        f"(max_len {core.max_len})")
    for split in ("val", "train"):
        sft = ds.load_sft(directory, tokenizer, split)
        log(f"sft/{split}: {len(sft.convs) - 1:,} conversations, {len(sft.tokens):,} tokens, "
            f"{int(sft.mask.sum()):,} supervised")
    for name in ("chat_eval", "rl"):
        chat = ds.load_chat_eval(directory, tokenizer, name)
        log(f"{name}: " + ", ".join(f"{t['name']} {t['n_examples']}" for t in chat.tasks))
    log(f"data directory {directory} is complete and consistent ({time.time() - t0:.1f}s)")


def main(argv=None):
    cfg = ds.parse_flags(argv, [ds.Config], prog="data/check.py", description=__doc__.split("\n\n")[0])[0]
    try:
        check(cfg, lambda line: print(line, flush=True))
    except ds.DataFormatError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
