"""Check a prepared data directory as the stack reads it: every file's format, every pretraining shard's sha256
against its manifest, and what each part holds; then show the pretraining data: document lengths and bytes per token
per source, the most frequent tokens, the special tokens' counts, and one batch as the loader packs it, decoded, its
document starts and its cuts (a document longer than max_doc_len is trained on in pieces) marked.

    python data/check.py --data-dir runs/data
    python data/check.py --data-dir runs/data --histogram --run-dir runs/cpu     # + RUN_DIR/data_doc_lengths.png
    python data/check.py --data-dir data/fineweb10B     # a folder of llm.c shards, once data/llmc.py converted it

It takes the stack's flags (--data-dir, --vocab-size, --bos-id, --stages, --run-dir matter here) and its own below,
and reads with the stack's own readers, so what passes here is what training, evaluation and the chat phases will
read. Writes nothing but the histogram, when asked. A bad file: one `error: FILE: ...` line and exit status 1.
"""
import dataclasses
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_stack import load_stack  # noqa: E402  (the stack sits one folder up)

ds = load_stack()
DOC_MARK, CUT_MARK = "[doc]", "[cut]"  # in the decoded batch: a document starts / a long one goes on in a new segment


@dataclasses.dataclass
class CheckConfig:
    """data/check.py: how much of the pretraining data it shows"""
    inspect_tokens: int = 1 << 21  # train tokens shown, from the stream's start (0: no inspection, the check only)
    histogram: bool = False        # also write RUN_DIR/data_doc_lengths.png: document lengths per source


def check(cfg, log=print, show=None):
    """Read every part of cfg.data_dir (pretraining shards by sha256 too) and log what it holds; show (a CheckConfig):
    then show the pretraining data (inspect)."""
    t0, directory = time.time(), cfg.data_dir
    data = ds.pretrain_data(directory, cfg.vocab_size, cfg.bos_id)
    log(f"pretraining data: vocab {data.vocab_size}, bos {data.bos_id}, tokenizer {os.path.join(directory, 'tokenizer')}")
    for split, paths in (("val", data.val), ("train", data.train)):
        check_sha256(directory, data.tokenizer, split)
        n = sum(len(ds.read_token_file(p, data.vocab_size)) for p in paths)
        log(f"pretrain/{split}: {len(paths)} shards, {n:,} tokens")
    if data.val_sources:
        log("val documents: " + ", ".join(f"{name} {n:,}" for name, n in data.val_sources))
    if show is not None and show.inspect_tokens > 0:
        inspect(data, cfg, show, log)
    sources = ds.read_json(os.path.join(directory, "pretrain", "manifest.json")).get("sources")
    if isinstance(sources, dict) and sources.get("llmc"):
        log(f"{directory}: llm.c shards of {sources['llmc']} (data/llmc.py), read for pretraining and its val bpb; "
            "CORE, SFT and chat need data/prepare.py's files")
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


def check_sha256(data_dir, tokenizer, split):
    """The stack's pretrain_shards (every header), then every byte of them against the manifest's sha256."""
    paths, where = ds.pretrain_shards(data_dir, tokenizer, split), os.path.join(data_dir, "pretrain", "manifest.json")
    recorded = {s["file"]: s.get("sha256") for s in ds.read_json(where)["shards"]}
    for path in paths:
        want, digest = recorded[os.path.basename(path)], ds.sha256_file(path)
        if digest != want:
            raise ds.DataFormatError(f"{path}: sha256 {digest[:12]}... differs from the {str(want)[:12]}... in {where} "
                                     "(a damaged or replaced shard)")
    return paths


def document_lengths(tokens, bos_id):
    """Lengths of the documents of a token stream, each starting at a BOS (tokens before the first: one more)."""
    starts = np.flatnonzero(tokens == bos_id)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return np.diff(np.concatenate([starts, [len(tokens)]]))


def head(paths, vocab_size, n):
    """The first n tokens of the shards back to back."""
    parts, left = [], n
    for path in paths:
        if left <= 0:
            break
        parts.append(np.asarray(ds.read_token_file(path, vocab_size)[:left]))
        left -= len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def inspect(data, cfg, show, log):
    """Log what the pretraining data holds (by val source, and the first show.inspect_tokens train tokens): documents
    and their lengths, bytes per token, the most frequent tokens, the special tokens' counts, one packed batch."""
    tokenizer, bos = data.tokenizer, data.bos_id
    text = tokenizer.decode
    val, source = data.val_stream()
    train = head(data.train, data.vocab_size, show.inspect_tokens)
    streams = [(f"val: {name}", val[source == i]) for i, name in enumerate(data.source_names())] or [("val", val)]
    streams.append((f"train: first {len(train):,} tokens", train))
    log("| stream | documents | tokens | document length p10 / p50 / p90 / max | bytes per token |")
    log("| --- | --- | --- | --- | --- |")
    for name, tokens in streams:
        lengths = document_lengths(tokens, bos)
        spread = " / ".join(f"{int(x):,}" for x in np.percentile(lengths, [10, 50, 90, 100], method="lower"))
        log(f"| {name} | {len(lengths):,} | {len(tokens):,} | {spread} | {data.token_bytes[tokens].sum() / len(tokens):.2f} |")
    counts = np.bincount(train, minlength=data.vocab_size)
    top = np.argsort(-counts, kind="stable")[:12]
    log("most frequent train tokens: " + ", ".join(f"{text([int(t)])!r} {counts[t] / len(train):.1%}" for t in top))
    log("special tokens (train, val): " + ", ".join(f"{name} {counts[i]:,}, {int((val == i).sum()):,}"
                                                   for name, i in tokenizer.special_tokens.items()))
    stage = cfg.stages[0]
    T = min(stage.batch_tokens, 2048, len(train) - 1)
    batch = ds.PretrainLoader(data.train, data, 0, 1).next_batch(T, stage.max_doc_len, 1, torch.device("cpu"))
    inputs, prev = batch.inputs.numpy(), batch.prev_ids.numpy()
    cuts = sorted(set(batch.cu_seqlens.tolist()) | {T})
    log(f"the first batch as the loader packs it ({T:,} tokens, max_doc_len {stage.max_doc_len}; {DOC_MARK} a "
        f"document starts, {CUT_MARK} a longer one goes on in a new segment):")
    for a, b in zip(cuts, cuts[1:]):
        shown = text(inputs[a:b].tolist())
        shown = shown if len(shown) <= 160 else shown[:110] + " ... " + shown[-45:]
        log(f"  {DOC_MARK if prev[a] == -1 else CUT_MARK} {b - a:,} tokens: {shown!r}")
    if show.histogram:
        path = os.path.join(cfg.run_dir, "data_doc_lengths.png")
        histogram([(name, document_lengths(tokens, bos)) for name, tokens in streams], path)
        log(f"document lengths per stream: {path}")


def histogram(lengths, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    top = max(int(x.max()) for _, x in lengths)
    bins = np.logspace(0, np.log10(max(top, 2)), 40)
    for name, x in lengths:
        ax.hist(x, bins=bins, histtype="step", density=True, label=f"{name} ({len(x):,} documents)")
    ax.set(xscale="log", xlabel="document length (tokens)", ylabel="density", title="document lengths per stream")
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    cfg, show = ds.parse_flags(argv, [ds.Config, CheckConfig], prog="data/check.py",
                               description=__doc__.split("\n\n")[0])
    try:
        check(cfg, lambda line: print(line, flush=True), show)
    except ds.DataFormatError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
