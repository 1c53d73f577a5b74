"""nanochat: Karpathy's nanochat GPT and its Muon + AdamW recipe as a peer stack of DecoderStack's main stack.

Same prepared data directory (data/README.md), same bits-per-byte definition and CORE scoring, same metrics.json
keys, so a run of each stack can be compared number for number. What makes it nanochat: rotary positions, QK-norm,
ReLU^2 MLP, untied embeddings, value embeddings on alternating layers, an SSSL sliding-window pattern, per-layer
residual and x0 scalars, smear and backout, a tanh logit softcap, Muon (Polar Express, NorMuon, cautious weight
decay) for the blocks' matrices and AdamW for the rest. Rows have a fixed length and documents inside a row attend to
each other (no varlen): that is the difference from the main stack this peer exists to measure. Single process.
Self-contained on purpose: it imports neither the main stack nor data/, so it can be diffed and frozen.

Run:
    CPU (~ the main stack's cpu preset compute):  python train_nanochat.py --preset cpu --data-dir DIR --run-dir DIR
    one GPU (nanochat d12):                       python train_nanochat.py --preset gpu --data-dir DIR --run-dir DIR
    score nanochat's own checkpoint (DIR prepared with its tokenizer.pkl, see README):
        python train_nanochat.py --phases eval --init-from hf:karpathy/nanochat-d32 --data-dir DIR --run-dir DIR
Any field of Config can be overridden with --name=value (--flag / --no-flag for booleans, JSON for tuples).

Contents
    1. Config: one dataclass, presets, overrides
    2. Data: tokenizer metadata, pretrain shards and the val stream's sources, the two row loaders (stream,
       BOS-aligned best fit), the CORE and chat-eval files
    3. Model: nanochat's GPT
    4. Optimizer: Muon for matrices, AdamW for the rest, the schedules
    5. Evaluation: bits per byte (every val target, per source), CORE, categorical chat eval
    6. Run: the training loop, metrics, the checkpoint
    7. nanochat's own checkpoints: finding (local or HF hub), checking and loading them, the eval-only run
"""
import argparse
import base64
import contextlib
import dataclasses
import json
import math
import os
import pickle
import posixpath
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# =================================================================================================================
# 1. Config


@dataclasses.dataclass
class Config:
    preset: str = "gpu"
    data_dir: str = ""
    run_dir: str = "runs/nanochat"
    seed: int = 0
    device: str = "auto"               # auto: cuda -> mps -> cpu
    compile: bool = True
    phases: str = "pt"                 # pt: train, evaluate, save | eval: only evaluate the checkpoint --init-from
    init_from: str = ""                # eval: nanochat's checkpoint: DIR[@STEP], DIR/model_<step>.pt, hf:OWNER/NAME[/DIR][@STEP]
    # model: nanochat d12 (depth 12 x aspect ratio 64, head_dim 128)
    n_layers: int = 12
    model_dim: int = 768
    n_heads: int = 6
    seq_len: int = 2048
    window_pattern: str = "SSSL"       # tiled over the layers, the last always L; L = seq_len, S = seq_len/4 (up to x128)
    rope_base: float = 100000.0
    qk_scale: float = 1.2              # q and k times this after QK-norm (nanochat before 2026-03: 1.0)
    value_embeds: bool = True          # value embeddings on alternating layers (nanochat before 2026-01-16: none)
    softcap: float = 15.0              # logits = softcap * tanh(z / softcap)
    vocab_multiple: int = 64           # padded embedding rows; logits are sliced back to the real vocabulary
    # data
    loader: str = "bestfit"            # bestfit: nanochat's BOS-aligned best-fit rows | stream: consecutive windows
    bestfit_buffer: int = 1000         # documents searched for the best fit
    # optimization: nanochat's base_train defaults at its reference batch of 2**19 tokens
    batch_tokens: int = 524288         # tokens per optimizer step
    micro_batch_tokens: int = 65536    # tokens per forward (nanochat's device batch 32 x 2048)
    train_tokens: int = 338_821_120    # the main stack's h100x8 token budget
    matrix_lr: float = 0.02            # Muon
    embedding_lr: float = 0.3          # AdamW; embedding, unembedding and value-embedding lrs are x (model_dim/768)^-0.5
    unembedding_lr: float = 0.008
    scalar_lr: float = 0.5
    weight_decay: float = 0.28         # Muon's cautious weight decay at step 0, cosine to 0 at the end
    warmup_steps: int = 40             # linear lr warmup
    warmdown_frac: float = 0.65        # lr decays linearly to final_lr_frac over this last fraction of the steps
    final_lr_frac: float = 0.05
    momentum_warmup_steps: int = 400   # Muon momentum 0.85 -> 0.97 over these steps, 0.97 -> 0.90 over the warmdown
    # evaluation and logging
    val_tokens: int = 10_485_760       # targets of the periodic evaluation, spread over the val stream (final: all)
    val_every: int = 250
    core_max_per_task: int = -1        # CORE examples per task after training (-1: all, 0: skip CORE)
    core_batch_tokens: int = 32768     # tokens (rows x longest sequence) per CORE (and chat-eval) forward
    chat_max_per_task: int = -1        # eval: categorical chat-eval examples per task (-1: all, 0: skip); needs chat_eval/
    log_every: int = 10


PRESETS = {
    "gpu": {},
    # the main stack's cpu preset: its layers, width, batch and steps (150 x 4096 tokens), val tokens and CORE
    # examples; fp32. Warmups are the same fractions of the run as nanochat d12's 40 and 400 of ~2,500 steps. The
    # stream loader because the local documents are mostly books (see README: best fit would keep their first rows).
    "cpu": dict(n_layers=4, model_dim=192, n_heads=3, seq_len=512, batch_tokens=4096, micro_batch_tokens=4096,
                train_tokens=614_400, val_tokens=131_072, val_every=75, log_every=10, compile=False, loader="stream",
                warmup_steps=3, momentum_warmup_steps=24, core_max_per_task=50, core_batch_tokens=8192),
}


def parse_config(argv=None):
    """--preset picks the defaults, then every --name=value (or --name value) overrides one field."""
    parser = argparse.ArgumentParser(description="nanochat peer stack (see the header of this file)")
    for field in dataclasses.fields(Config):
        flags = sorted({f"--{field.name.replace('_', '-')}", f"--{field.name}"})
        if isinstance(field.default, bool):
            parser.add_argument(*flags, dest=field.name, nargs="?", const=True, default=None, type=parse_bool)
            parser.add_argument(f"--no-{field.name.replace('_', '-')}", dest=field.name, action="store_const", const=False)
        else:
            parser.add_argument(*flags, dest=field.name, default=None, type=type(field.default))
    args = parser.parse_args(argv)
    preset = args.preset or Config.preset
    if preset not in PRESETS:
        parser.error(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset}
    given = {k for k, v in vars(args).items() if v is not None}
    values.update({k: getattr(args, k) for k in given})
    cfg = Config(**values)
    cfg.given = frozenset(given)  # what the command line set (eval: these win over the checkpoint's defaults)
    if not cfg.data_dir:
        parser.error("--data-dir is required (a directory prepared by data/prepare.py)")
    if cfg.model_dim % cfg.n_heads or (cfg.model_dim // cfg.n_heads) % 2:
        parser.error(f"--model-dim {cfg.model_dim} / --n-heads {cfg.n_heads} must be an even head size")
    if cfg.model_dim < 24:
        parser.error("--model-dim must be at least 24 (the smear gate reads 24 channels)")
    if not cfg.window_pattern or set(cfg.window_pattern.upper()) - set("SL"):
        parser.error(f"--window-pattern {cfg.window_pattern!r}: use only S and L")
    if cfg.loader not in ("bestfit", "stream"):
        parser.error(f"--loader {cfg.loader!r}: choose bestfit or stream")
    if cfg.phases not in ("pt", "eval"):
        parser.error(f"--phases {cfg.phases!r}: choose pt (train) or eval (score the checkpoint --init-from)")
    if (cfg.phases == "eval") != bool(cfg.init_from):
        parser.error("--phases eval needs --init-from (a nanochat checkpoint), and --init-from is read by --phases eval only")
    micro = min(cfg.micro_batch_tokens, cfg.batch_tokens)
    if micro % cfg.seq_len or cfg.batch_tokens % micro:
        parser.error(f"--batch-tokens {cfg.batch_tokens} must be a multiple of the micro batch ({micro} tokens), "
                     f"itself a multiple of --seq-len {cfg.seq_len}")
    return cfg


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


# =================================================================================================================
# 2. Data: the tokenizer's metadata, the pretrain shards and the CORE file (formats in data/README.md)

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
MANIFEST_VERSIONS = {"pretrain": 2, "core": 1, "chat_eval": 2}  # pretrain 2: val_sources, seed, max_doc_chars


class DataError(Exception):
    """A prepared file is missing or malformed; the message names the file."""


@dataclasses.dataclass
class TokenizerInfo:
    vocab_size: int
    bos_id: int
    sha256: str
    token_bytes: np.ndarray  # int32 [vocab_size]: UTF-8 bytes of each token, 0 for special tokens


def read_json(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None


def load_npy(path, dtype, columns=None):
    """A plain .npy array (never unpickled) of `dtype`: 1-D, or 2-D with `columns` columns."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a plain .npy array ({e})") from None
    if arr.dtype != np.dtype(dtype) or arr.ndim != (2 if columns else 1) or (columns and arr.shape[1] != columns):
        raise DataError(f"{path}: expected {np.dtype(dtype)} array with {columns or 'no'} columns, got {arr.dtype} {arr.shape}")
    return arr


def load_tokenizer(tok_dir):
    """Vocabulary size, BOS id and byte counts; the BPE ranks themselves are not needed to train on token ids."""
    meta_path = os.path.join(tok_dir, "tokenizer.json")
    meta = read_json(meta_path)
    if meta.get("version") != 2:
        raise DataError(f"{meta_path}: tokenizer version {meta.get('version')} is not 2")
    vocab_size, bos_id = meta["vocab_size"], meta["special_tokens"]["<|bos|>"]
    bytes_path = os.path.join(tok_dir, "token_bytes.npy")
    token_bytes = load_npy(bytes_path, np.int32)
    if token_bytes.shape != (vocab_size,):
        raise DataError(f"{bytes_path}: expected shape ({vocab_size},), got {token_bytes.shape}")
    return TokenizerInfo(vocab_size, bos_id, meta["sha256"], token_bytes)


def read_shard(path, vocab_size):
    """Memory-map a token file after checking its header against the file size and the tokenizer."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise DataError(f"{path}: truncated header ({size} bytes, expected at least {HEADER_INTS * 4})")
    magic, version, n_tokens, width, file_vocab = (int(x) for x in np.fromfile(path, dtype="<i4", count=5))
    if magic != MAGIC:
        raise DataError(f"{path}: bad magic {magic} (expected {MAGIC}): not a DecoderStack token file")
    if version != VERSION:
        raise DataError(f"{path}: token file version {version}, this reader knows {VERSION}")
    if width != (2 if file_vocab <= 65536 else 4):
        raise DataError(f"{path}: {width} bytes per token does not fit vocab_size {file_vocab}")
    if file_vocab != vocab_size:
        raise DataError(f"{path}: written for vocab_size {file_vocab}, but the tokenizer has {vocab_size}")
    if size != HEADER_INTS * 4 + n_tokens * width:
        raise DataError(f"{path}: header says {n_tokens} tokens ({HEADER_INTS * 4 + n_tokens * width} bytes), file has {size} bytes (truncated?)")
    return np.memmap(path, dtype="<u2" if width == 2 else "<u4", mode="r", offset=HEADER_INTS * 4, shape=(n_tokens,))


def read_manifest(directory, fmt, tok):
    path = os.path.join(directory, "manifest.json")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = MANIFEST_VERSIONS[fmt]
    if manifest.get("format") != fmt or manifest.get("version") != version:
        raise DataError(f"{path}: expected format {fmt!r} version {version}, got {manifest.get('format')!r} version {manifest.get('version')}")
    if manifest.get("tokenizer_sha256") != tok.sha256:
        raise DataError(f"{path}: written with a different tokenizer than {tok.sha256[:12]}... (re-prepare the data)")
    return manifest


class TokenStream:
    """The shards of one split, in manifest order, as one stream of tokens that wraps around at its end."""

    def __init__(self, shards):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.n_tokens = int(self.starts[-1])

    def read(self, pos, n):
        """n tokens (int64) from stream position pos onwards, wrapping around."""
        parts, pos = [], pos % self.n_tokens
        while n > 0:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1  # side=right skips empty shards
            offset = pos - int(self.starts[i])
            part = self.shards[i][offset:offset + n]
            parts.append(part)
            n -= len(part)
            pos = (pos + len(part)) % self.n_tokens
        return np.concatenate(parts).astype(np.int64)


def split_shards(data_dir, split, tok):
    """(the manifest, the 'train' or 'val' shards listed in pretrain/manifest.json), every header checked."""
    directory = os.path.join(data_dir, "pretrain")
    manifest = read_manifest(directory, "pretrain", tok)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards):
        raise DataError(f"{directory}/manifest.json: 'shards' must be a list of {{file, split, ...}} objects")
    return manifest, [read_shard(os.path.join(directory, s["file"]), tok.vocab_size) for s in shards if s.get("split") == split]


def load_split(data_dir, split, tok):
    """The 'train' or 'val' pretrain shards as one TokenStream."""
    stream = TokenStream(split_shards(data_dir, split, tok)[1])
    if stream.n_tokens == 0:
        raise DataError(f"{data_dir}/pretrain/manifest.json: no {split} tokens")
    return stream


@dataclasses.dataclass
class ValData:
    tokens: np.ndarray  # the val shards' tokens back to back
    source: np.ndarray  # int32 per position: the source (index into names) of the document the position lies in
    names: list         # the sources' names, each once, in the order val_sources first names them


def load_val(data_dir, tok):
    """The val stream and the source of every position, from the manifest's val_sources: runs, in stream order, of
    consecutive documents (each starting with <|bos|>) from one source, their n_docs summing to the stream's BOS
    count. A source may have several runs; its numbers cover them all."""
    path = os.path.join(data_dir, "pretrain", "manifest.json")
    manifest, shards = split_shards(data_dir, "val", tok)
    runs = manifest.get("val_sources")
    if not (isinstance(runs, list) and runs and all(isinstance(r, dict) and isinstance(r.get("name"), str) and r["name"]
                                                    and type(r.get("n_docs")) is int and r["n_docs"] >= 0 for r in runs)):
        raise DataError(f"{path}: 'val_sources' must be a non-empty list of {{\"name\": non-empty string, \"n_docs\": int >= 0}} objects")
    tokens = np.concatenate([np.asarray(s) for s in shards]) if shards else np.zeros(0, np.uint16)
    if len(tokens) < 2:
        raise DataError(f"{path}: {len(tokens)} val tokens: nothing to predict")
    if tokens.max() >= tok.vocab_size:
        raise DataError(f"{path}: a val shard holds token id {int(tokens.max())}, outside the vocabulary of {tok.vocab_size}")
    doc = np.cumsum(tokens == tok.bos_id) - 1  # the document each position lies in
    n_docs, listed = int(doc[-1]) + 1, sum(r["n_docs"] for r in runs)
    if listed != n_docs or doc[0] < 0:
        raise DataError(f"{path}: val_sources count {listed} documents, but the val stream holds {n_docs} "
                        f"(one <|bos|> each{'' if doc[0] == 0 else ', and it must start with one'})")
    names = list(dict.fromkeys(r["name"] for r in runs))
    run_source = np.repeat([names.index(r["name"]) for r in runs], [r["n_docs"] for r in runs])
    return ValData(tokens, run_source[doc].astype(np.int32), names)


class StreamLoader:
    """nanochat's original loader (and gpt2-adamw's): each micro batch is B consecutive windows of T+1 tokens read
    from the stream, consecutive windows sharing one token. Rows start anywhere inside a document."""

    def __init__(self, stream, rows, seq_len, device):
        self.stream, self.rows, self.seq_len, self.device = stream, rows, seq_len, device
        self.pos = 0

    def next_batch(self):
        B, T = self.rows, self.seq_len
        buf = torch.from_numpy(self.stream.read(self.pos, B * T + 1))
        self.pos = (self.pos + B * T) % self.stream.n_tokens
        return buf[:-1].view(B, T).to(self.device), buf[1:].view(B, T).to(self.device)


class Documents:
    """The stream's documents (each <|bos|> + its tokens; shards end at document ends) in order, repeating."""

    def __init__(self, stream, bos_id):
        self.spans = []  # (shard, start, end) of every document
        for shard, tokens in enumerate(stream.shards):
            starts = np.flatnonzero(tokens == bos_id)
            self.spans += [(shard, int(a), int(b)) for a, b in zip(starts, np.append(starts[1:], len(tokens)))]
        if not self.spans:
            raise DataError("the train shards hold no <|bos|> token: no documents to pack")
        self.stream, self.i = stream, 0

    def next(self):
        shard, a, b = self.spans[self.i % len(self.spans)]
        self.i += 1
        return self.stream.shards[shard][a:b]


class BestFitLoader:
    """nanochat's BOS-aligned best-fit rows: each row of T+1 tokens is filled with the largest buffered document that
    fits whole, again and again; when none fits, the shortest one is cropped to fill the row and its rest dropped. So
    every row starts with <|bos|>, nothing is padding, and documents sharing a row see each other."""

    def __init__(self, docs, rows, seq_len, buffer_size, device):
        self.docs, self.rows, self.seq_len, self.buffer_size, self.device = docs, rows, seq_len, buffer_size, device
        self.buffer = []

    def next_batch(self):
        out = np.empty((self.rows, self.seq_len + 1), dtype=np.int64)
        for row in out:
            pos = 0
            while pos < len(row):
                while len(self.buffer) < self.buffer_size:
                    self.buffer.append(self.docs.next())
                lengths = np.array([len(d) for d in self.buffer])
                room = len(row) - pos
                fits = np.flatnonzero(lengths <= room)
                # ties go to the first buffered document, as in nanochat
                doc = self.buffer.pop(int(fits[np.argmax(lengths[fits])]) if len(fits) else int(np.argmin(lengths)))
                n = min(len(doc), room)
                row[pos:pos + n] = doc[:n]
                pos += n
        buf = torch.from_numpy(out)
        return buf[:, :-1].to(self.device), buf[:, 1:].to(self.device)


@dataclasses.dataclass
class CoreData:
    tasks: list            # manifest task dicts: label, task_type, random_baseline, first_example, n_examples, ...
    tokens: np.ndarray     # token segments back to back
    sequences: np.ndarray  # [n_seq, 6] offset_a, len_a, offset_b, len_b, cont_start, cont_end: sequence = a ++ b
    examples: np.ndarray   # [n_ex, 4] task, gold, first sequence, number of sequences

    def sequence(self, i):
        """(tokens, cont_start, cont_end) of sequence i: the continuation is tokens[cont_start:cont_end]."""
        off_a, len_a, off_b, len_b, start, end = (int(x) for x in self.sequences[i])
        return np.concatenate([self.tokens[off_a:off_a + len_a], self.tokens[off_b:off_b + len_b]]).astype(np.int64), start, end


def load_core(data_dir, tok):
    directory = os.path.join(data_dir, "core")
    manifest = read_manifest(directory, "core", tok)
    tokens = read_shard(os.path.join(directory, "tokens.bin"), tok.vocab_size)
    sequences = load_npy(os.path.join(directory, "sequences.npy"), np.int64, 6)
    examples = load_npy(os.path.join(directory, "examples.npy"), np.int64, 4)
    if len(sequences) and max((sequences[:, 0] + sequences[:, 1]).max(), (sequences[:, 2] + sequences[:, 3]).max()) > len(tokens):
        raise DataError(f"{directory}/sequences.npy: a segment runs past the end of tokens.bin")
    if len(examples) and ((examples[:, 0] >= len(manifest["tasks"])).any() or (examples[:, 2] + examples[:, 3]).max() > len(sequences)):
        raise DataError(f"{directory}/examples.npy: a row points past the tasks or sequences")
    return CoreData(manifest["tasks"], tokens, sequences, examples)


@dataclasses.dataclass
class ChatEvalData:
    tasks: list            # manifest task dicts: name, kind (categorical | generative | code), first_example, ...
    tokens: np.ndarray     # the prompts back to back, each ending in <|assistant_start|>
    examples: np.ndarray   # [n, 5] task, offset, length, gold choice (-1: not categorical), number of choices
    letter_ids: list       # the token of each answer letter A, B, C, ...


def load_chat_eval(data_dir, tok):
    directory = os.path.join(data_dir, "chat_eval")
    path = os.path.join(directory, "manifest.json")
    manifest = read_manifest(directory, "chat_eval", tok)
    tokens = read_shard(os.path.join(directory, "tokens.bin"), tok.vocab_size)
    examples = load_npy(os.path.join(directory, "examples.npy"), np.int64, 5)
    letter_ids, tasks = manifest.get("letter_ids"), manifest.get("tasks")
    if not (isinstance(letter_ids, list) and letter_ids and all(type(i) is int and 0 <= i < tok.vocab_size for i in letter_ids)):
        raise DataError(f"{path}: 'letter_ids' must be a non-empty list of token ids")
    if not (isinstance(tasks, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("kind"), str)
            and type(t.get("first_example")) is int and type(t.get("n_examples")) is int
            and isinstance(t.get("random_baseline"), (int, float))
            and 0 <= t["first_example"] and 0 <= t["n_examples"] and t["first_example"] + t["n_examples"] <= len(examples)
            for t in tasks)):
        raise DataError(f"{path}: 'tasks' must be a list of {{name, kind, first_example, n_examples, random_baseline}} "
                        f"with their examples inside the {len(examples)} rows")
    if len(examples) and ((examples[:, 1] < 0).any() or (examples[:, 2] < 1).any() or (examples[:, 1] + examples[:, 2]).max() > len(tokens)):
        raise DataError(f"{directory}/examples.npy: a prompt lies outside tokens.bin")
    for t in tasks:
        rows = examples[t["first_example"]:t["first_example"] + t["n_examples"]]
        if t["kind"] == "categorical" and len(rows) and ((rows[:, 4] < 1).any() or (rows[:, 4] > len(letter_ids)).any()
                                                         or (rows[:, 3] < 0).any() or (rows[:, 3] >= rows[:, 4]).any()):
            raise DataError(f"{directory}/examples.npy: task {t['name']!r} has a row whose gold or number of choices does not fit the {len(letter_ids)} letters")
    return ChatEvalData(tasks, tokens, examples, letter_ids)


# =================================================================================================================
# 3. Model: nanochat's GPT (nanochat/gpt.py), without the KV cache and GQA


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no learnable gain


def has_value_embed(cfg, layer):
    """Every other layer, counted back from the last one (which always has a value embedding); none without them."""
    return cfg.value_embeds and layer % 2 == (cfg.n_layers - 1) % 2


def window_sizes(cfg):
    """Per layer, how many earlier tokens a query may see: the pattern tiled over the layers, the last layer long."""
    long_window = cfg.seq_len
    short_window = -(-long_window // 4 // 128) * 128  # a quarter of the context, rounded up to FA3's tile of 128
    sizes = [long_window if cfg.window_pattern.upper()[i % len(cfg.window_pattern)] == "L" else short_window
             for i in range(cfg.n_layers)]
    sizes[-1] = long_window
    return sizes


def rotary_cos_sin(T, head_dim, base, device):
    """cos, sin (1, T, 1, head_dim/2) of position t times frequency base^(-2i/head_dim)."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate dim i with dim i + D/2 (nanochat's convention: by -theta; only relative angles matter)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def causal_attention(q, k, v, window):
    """Plain SDPA over a whole row, documents included: a query sees itself and up to `window` earlier tokens.
    q, k, v: (B, H, T, D)."""
    T = q.size(2)
    if window >= T - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    i = torch.arange(T, device=q.device)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        dim = cfg.model_dim
        self.n_heads, self.head_dim, self.qk_scale = cfg.n_heads, dim // cfg.n_heads, cfg.qk_scale
        self.c_q, self.c_k, self.c_v, self.c_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        # value embedding gate: per head, from the first 12 channels of the block input
        self.ve_gate = nn.Linear(12, cfg.n_heads, bias=False) if has_value_embed(cfg, layer) else None

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.shape
        heads = (B, T, self.n_heads, self.head_dim)
        q, k, v = self.c_q(x).view(heads), self.c_k(x).view(heads), self.c_v(x).view(heads)
        if ve is not None:  # value residual (ResFormer): a gated share of the token's own value embedding, gate in (0, 3)
            v = v + 3 * torch.sigmoid(self.ve_gate(x[..., :12]))[..., None] * ve.view(heads)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale  # QK-norm (after rotary, as nanochat); 1.2 sharpens
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.model_dim, 4 * cfg.model_dim, bias=False)
        self.c_proj = nn.Linear(4 * cfg.model_dim, cfg.model_dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn, self.mlp = Attention(cfg, layer), MLP(cfg)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple  # the extra rows are never targets
        L, dim = cfg.n_layers, cfg.model_dim
        self.windows = window_sizes(cfg)
        self.wte = nn.Embedding(padded, dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.lm_head = nn.Linear(dim, padded, bias=False)  # untied from wte
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(padded, dim) for i in range(L) if has_value_embed(cfg, i)})
        # per layer, x = resid_lambda * x + x0_lambda * x0 before the block: stronger residual and more of the
        # embedding early, less later
        self.resid_lambdas = nn.Parameter(torch.tensor([1.15 - 0.10 * i / max(L - 1, 1) for i in range(L)]))
        self.x0_lambdas = nn.Parameter(torch.tensor([0.20 - 0.15 * i / max(L - 1, 1) for i in range(L)]))
        # smear: a gated share of the previous token's embedding (cheap bigram information), off at init;
        # backout: subtract a share of the middle layer's residual stream before the head
        self.smear_gate = nn.Linear(24, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """nanochat's init: uniform with the normal's std (no outliers) for the block inputs, zeros for the
        projections into the residual stream, a wide embedding and a near-zero head."""
        s = math.sqrt(3) / math.sqrt(self.cfg.model_dim)
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for w in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(w.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)  # gates start slightly above neutral
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)

    def forward(self, idx):
        """idx: (B, T) token ids -> softcapped logits (B, T, vocab_size), fp32, over the real vocabulary."""
        return self.logits(self.hidden(idx))

    def hidden(self, idx):
        """(B, T) token ids -> final hidden states (B, T, model_dim)."""
        x = norm(self.wte(idx))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, backout = x, None
        cos_sin = rotary_cos_sin(idx.size(1), self.cfg.model_dim // self.cfg.n_heads, self.cfg.rope_base, idx.device)
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.windows[i])
            if i == self.cfg.n_layers // 2:
                backout = x
        return norm(x - self.backout_lambda * backout)

    def logits(self, h):
        z = self.lm_head(h)[..., :self.vocab_size].float()
        return self.cfg.softcap * torch.tanh(z / self.cfg.softcap)


def matrix_params(model):
    """The attention and MLP weights of the blocks: what the main stack's params_matrix counts."""
    return sum(p.numel() for n, p in model.blocks.named_parameters() if "ve_gate" not in n)


# =================================================================================================================
# 4. Optimizer: Muon for every parameter of the blocks (nanochat puts the small value-embedding gates there too),
# AdamW for embeddings, head and scalars (nanochat/optim.py, single process)

# Polar Express (Amsel et al., arXiv:2505.16932): the odd polynomial a x + b x^3 + c x^5 applied to the singular
# values per iteration; computed for 5 iterations, safety factor 2e-2, cushion 2.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(X, steps=5):
    """Approximately orthogonalise a stack of matrices (K, rows, cols): U S V^T -> ~U V^T."""
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # spectral norm <= Frobenius norm < 1
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:  # iterate on the small Gram matrix
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def muon_update(p, g, momentum_buf, second_moment, momentum, lr, wd, beta2=0.9):
    """nanochat's Muon step on a stack of same-shaped matrices (K, rows, cols), all fp32, p updated in place:
    Nesterov momentum -> MuonEq row equilibration -> Polar Express -> Muon+ renormalisation -> NorMuon variance
    reduction -> cautious weight decay."""
    momentum_buf.lerp_(g, 1 - momentum)
    X = g.lerp(momentum_buf, momentum)
    X = X.bfloat16() if X.is_cuda else X  # bf16 matmuls on the GPU; fp32 on CPUs, where bf16 is ~100x slower
    # MuonEq: every row rescaled to the mean row norm, a better conditioned spectrum for the iteration
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (X.float().norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5 / row_norm).to(X.dtype)
    X = polar_express(X).float()
    # Muon+: snap the Frobenius norm to sqrt(min(rows, cols)), an exactly semi-orthogonal matrix's
    X = X * (min(X.shape[-2:]) ** 0.5 / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # NorMuon: divide each row (or column, along the larger dim) by its running RMS, keeping the update's norm
    red_dim = -1 if X.size(-2) >= X.size(-1) else -2
    v_mean = X.square().mean(dim=red_dim, keepdim=True)
    n = X.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(v_mean, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * n * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    X = X * (step_size * v_norm / v_norm_new.clamp_min(1e-10))
    # cautious weight decay: only where the update already pushes the weight towards zero (or does not push)
    p.sub_(lr * X + lr * wd * p * ((X * p) >= 0))


class MuonAdamW:
    """Muon for the blocks' matrices, grouped by shape and updated as stacks; torch's AdamW (the same arithmetic as
    nanochat's fused step) for the rest. Learning rates are set per step from the schedules."""

    def __init__(self, model, cfg):
        scale = (cfg.model_dim / 768) ** -0.5  # nanochat tuned the AdamW lrs at width 768
        adam = lambda params, lr, betas, wd: dict(params=params, lr=lr, initial_lr=lr, betas=betas, weight_decay=wd)
        self.adamw = torch.optim.AdamW([group for group in [
            adam([model.lm_head.weight], cfg.unembedding_lr * scale, (0.8, 0.96), 0.01),
            adam([model.wte.weight], cfg.embedding_lr * scale, (0.8, 0.995), 0.001),
            adam(list(model.value_embeds.parameters()), cfg.embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
            adam([model.resid_lambdas], cfg.scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adam([model.x0_lambdas], cfg.scalar_lr, (0.96, 0.95), 0.0),
            adam([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ] if group["params"]], eps=1e-10, fused=True)  # fused: one kernel over all tensors (CPU too)
        matrices = list(model.blocks.parameters())
        assert len(matrices) + sum(len(g["params"]) for g in self.adamw.param_groups) == len(list(model.parameters()))
        self.lr = cfg.matrix_lr
        self.muon_groups = []
        for shape in sorted({tuple(p.shape) for p in matrices}):
            params = [p for p in matrices if tuple(p.shape) == shape]
            rows, cols = shape
            self.muon_groups.append((params, torch.zeros(len(params), rows, cols, device=params[0].device),
                                     torch.zeros(len(params), *((rows, 1) if rows >= cols else (1, cols)), device=params[0].device)))

    @torch.no_grad()
    def step(self, lr_mult, momentum, weight_decay):
        for group in self.adamw.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
        self.adamw.step()
        for params, momentum_buf, second_moment in self.muon_groups:
            rows, cols = params[0].shape
            stacked = torch.stack(params)
            muon_update(stacked, torch.stack([p.grad for p in params]), momentum_buf, second_moment, momentum,
                        self.lr * lr_mult * max(1.0, rows / cols) ** 0.5, weight_decay)
            torch._foreach_copy_(params, list(stacked.unbind(0)))

    def zero_grad(self):
        self.adamw.zero_grad(set_to_none=True)
        for params, _, _ in self.muon_groups:
            for p in params:
                p.grad = None


def lr_multiplier(cfg, step, total):
    """Linear warmup, flat, then a linear warmdown to final_lr_frac."""
    warmdown = round(cfg.warmdown_frac * total)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if step <= total - warmdown:
        return 1.0
    progress = (total - step) / warmdown
    return progress + (1 - progress) * cfg.final_lr_frac


def muon_momentum(cfg, step, total):
    warmdown = round(cfg.warmdown_frac * total)
    if step < cfg.momentum_warmup_steps:
        frac = step / cfg.momentum_warmup_steps
        return 0.85 * (1 - frac) + 0.97 * frac
    if step >= total - warmdown:
        progress = (step - (total - warmdown)) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(cfg, step, total):
    return cfg.weight_decay * 0.5 * (1 + math.cos(math.pi * step / total))


# =================================================================================================================
# 5. Evaluation


def val_rows(n_targets, T, subset=0):
    """The rows an evaluation scores; row r predicts targets r*T+1 .. r*T+T of the val stream (the last row fewer).
    All of them: every target once. subset=N (< n_targets): N targets' worth of rows spread evenly over the stream,
    first and last included, so that every source is drawn from (evaluation during training; the main stack's rule)."""
    n_rows = -(-n_targets // T)
    if subset and subset < n_targets:
        return np.unique(np.linspace(0, n_rows - 1, max(1, subset // T)).round().astype(np.int64))
    return np.arange(n_rows)


def describe_val(n_targets, T, subset=0):
    rows = val_rows(n_targets, T, subset)
    scored = int(np.minimum(T, n_targets - rows * T).sum())
    return (f"every val target ({n_targets:,})" if scored == n_targets else
            f"subset: {scored:,} of {n_targets:,} targets, spread over the stream")


@torch.no_grad()
def evaluate_bpb(model, val, token_bytes, seq_len, rows, device, autocast=contextlib.nullcontext, subset=0):
    """Bits per byte and mean loss of next-token prediction over the val stream `val` (ValData), the main stack's
    definitions: every target t_i (i >= 1) is predicted once, in rows of seq_len tokens (row r: tokens r*T ..
    r*T+T-1 predict targets r*T+1 .. r*T+T; the last row is partial, padded on the right, the padding not counted),
    `rows` rows per forward; each prediction sees the earlier tokens of its row, documents included. Counted targets
    are those with > 0 bytes (special tokens count in neither sum). bpb = nats / (ln 2 x bytes), loss = nats / count;
    by_source: the same over the targets whose position lies in a document of that source. subset=N: the rows of
    val_rows(..., N) only (periodic evaluation). autocast: a function returning the precision context of the forward.
    A dict: bpb, loss, targets (counted), of (the stream's targets), by_source {name: bpb}, sums {name: [nats, bytes,
    counted]}, what (for the log)."""
    T, n = seq_len, len(val.tokens) - 1
    picked = val_rows(n, T, subset)
    weights = torch.from_numpy(token_bytes).to(device)
    sums = torch.zeros(len(val.names), 3, dtype=torch.float64, device=device)  # per source: nats, bytes, counted
    was_training = model.training
    model.eval()
    for first in range(0, len(picked), rows):
        batch = picked[first:first + rows]
        x = np.zeros((len(batch), T), np.int64)
        y = np.full((len(batch), T), -1, np.int64)  # -1: padding
        src = np.zeros((len(batch), T), np.int64)
        for j, r in enumerate(batch):
            start = int(r) * T
            real = min(T, n - start)
            x[j, :real] = val.tokens[start:start + real]
            y[j, :real] = val.tokens[start + 1:start + 1 + real]
            src[j, :real] = val.source[start + 1:start + 1 + real]
        x, y, src = (torch.from_numpy(a).to(device) for a in (x, y, src))
        with autocast():
            h = model.hidden(x)
            for j in range(len(batch)):  # one row's logits at a time: T x vocab floats
                target = y[j].clamp_min(0)
                loss = F.cross_entropy(model.logits(h[j]).float(), target, reduction="none")
                w = torch.where(y[j] >= 0, weights[target], 0)
                keep = w > 0
                sums.index_add_(0, src[j], torch.stack([torch.where(keep, loss, 0), w, keep]).T.double())
    model.train(was_training)
    sums = sums.cpu()
    nats, nbytes, count = sums.sum(0).tolist()
    if count == 0:
        raise ValueError("the val targets scored hold no bytes (only special tokens)")
    per_source = dict(zip(val.names, sums.tolist()))
    return dict(bpb=nats / (math.log(2) * nbytes), loss=nats / count, targets=int(count), of=n,
                by_source={name: s[0] / (math.log(2) * s[1]) for name, s in per_source.items() if s[1] > 0},
                sums=per_source, what=describe_val(n, T, subset))


@torch.no_grad()
def sequence_scores(model, seqs, bos_id, device, autocast=contextlib.nullcontext):
    """(mean continuation loss, every continuation token argmax-right) of each (tokens, cont_start, cont_end), from
    one forward of them as rows padded on the right with <|bos|>, as nanochat batches an example's options. The
    model is causal, so the padding changes no scored position. An empty continuation has mean loss NaN."""
    L = max(len(t) for t, _, _ in seqs)
    ids = torch.full((len(seqs), L), bos_id, dtype=torch.long)
    for row, (tokens, _, _) in zip(ids, seqs):
        row[:len(tokens)] = torch.from_numpy(tokens)
    ids = ids.to(device)
    with autocast():
        h = model.hidden(ids)
        # logits only where a continuation token is predicted (position i predicts token i + 1)
        logits = model.logits(torch.cat([h[row, start - 1:end - 1] for row, (_, start, end) in enumerate(seqs)])).float()
    targets = torch.cat([ids[row, start:end] for row, (_, start, end) in enumerate(seqs)])
    losses, right = F.cross_entropy(logits, targets, reduction="none").cpu(), (logits.argmax(-1) == targets).cpu()
    scores, i = [], 0
    for _, start, end in seqs:
        scores.append((losses[i:i + end - start].mean().item(), bool(right[i:i + end - start].all())))
        i += end - start
    return scores


def core_decision(task_type, gold, mean_losses, all_right):
    """nanochat's rule. multiple_choice / schema: the option with the lowest mean continuation loss is the answer
    (an empty continuation's NaN wins only when it comes first, as min() and index() make it in nanochat).
    language_modeling (one sequence): correct iff every greedy prediction over the continuation is right."""
    if task_type == "language_modeling":
        return all_right[0]
    return mean_losses.index(min(mean_losses)) == gold


def row_batches(seqs, batch_tokens):
    """Consecutive sequences grouped so that rows x longest <= batch_tokens (a longer sequence goes alone)."""
    batch, longest = [], 0
    for seq in seqs:
        if batch and (len(batch) + 1) * max(longest, len(seq[0])) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(seq)
        longest = max(longest, len(seq[0]))
    if batch:
        yield batch


@torch.no_grad()
def evaluate_core(model, core, bos_id, device, max_per_task=-1, batch_tokens=32768, autocast=contextlib.nullcontext):
    """CORE as the main stack scores it: the first max_per_task examples of each task (<= 0: all; the file's examples
    are pre-shuffled), accuracy per task, centered = (accuracy - baseline) / (1 - baseline), CORE = mean centered."""
    was_training = model.training
    model.eval()
    results, centered, counts = {}, {}, {}
    for task in core.tasks:
        first = task["first_example"]
        n = task["n_examples"] if max_per_task <= 0 else min(max_per_task, task["n_examples"])
        examples = core.examples[first:first + n]
        seqs = (core.sequence(s) for _, _, a, k in examples for s in range(a, a + k))
        scores = [sc for batch in row_batches(seqs, batch_tokens) for sc in sequence_scores(model, batch, bos_id, device, autocast)]
        correct, i = 0, 0
        for _, gold, _, k in examples:
            losses, right = zip(*scores[i:i + k])
            correct += core_decision(task["task_type"], int(gold), list(losses), right)
            i += k
        results[task["label"]] = correct / max(1, n)
        centered[task["label"]] = (results[task["label"]] - task["random_baseline"]) / (1 - task["random_baseline"])
        counts[task["label"]] = n
    model.train(was_training)
    return dict(results=results, centered=centered, counts=counts, core=sum(centered.values()) / len(centered))


def format_core_table(out, core):
    lines = [f"{'task':<34} {'examples':>8} {'accuracy':>8} {'centered':>8}"]
    for t in core.tasks:
        note = "  (stand-in)" if t.get("stand_in") else ""
        lines.append(f"{t['label']:<34} {out['counts'][t['label']]:>8} {out['results'][t['label']]:>8.4f} {out['centered'][t['label']]:>8.4f}{note}")
    lines.append(f"{'CORE':<34} {'':>8} {'':>8} {out['core']:>8.4f}")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_chat_categorical(model, chat, bos_id, device, max_per_task=-1, batch_tokens=32768, autocast=contextlib.nullcontext):
    """The categorical tasks of chat_eval/ (ARC-Easy, ARC-Challenge, MMLU) as nanochat's chat_eval scores them: the
    answer is the argmax of the logits at the prompt's last position (after <|assistant_start|>) over the letters of
    the example's choices. Prompts go through in rows padded on the right (causal: the padding changes nothing
    scored). Accuracy and centered accuracy per task, and the mean centered accuracy of these tasks (not ChatCORE,
    which also counts GSM8K and HumanEval, generated with a KV cache this peer does not have)."""
    was_training = model.training
    model.eval()
    letters = torch.tensor(chat.letter_ids, device=device)
    results, centered, counts = {}, {}, {}
    for task in chat.tasks:
        if task["kind"] != "categorical":
            continue
        first = task["first_example"]
        n = task["n_examples"] if max_per_task <= 0 else min(max_per_task, task["n_examples"])
        prompts = [(np.asarray(chat.tokens[o:o + k]).astype(np.int64), int(gold), int(choices))
                   for _, o, k, gold, choices in chat.examples[first:first + n]]
        correct = 0
        for batch in row_batches(prompts, batch_tokens):
            L = max(len(t) for t, _, _ in batch)
            ids = torch.full((len(batch), L), bos_id, dtype=torch.long)
            for row, (tokens, _, _) in zip(ids, batch):
                row[:len(tokens)] = torch.from_numpy(tokens)
            ids = ids.to(device)
            last = torch.tensor([len(t) - 1 for t, _, _ in batch], device=device)
            with autocast():
                h = model.hidden(ids)[torch.arange(len(batch), device=device), last]
                scores = model.logits(h).float()[:, letters]
            allowed = torch.arange(len(letters), device=device) < torch.tensor([c for _, _, c in batch], device=device)[:, None]
            choice = scores.masked_fill(~allowed, float("-inf")).argmax(-1).cpu()
            correct += sum(int(c) == gold for c, (_, gold, _) in zip(choice, batch))
        name, baseline = task["name"], task["random_baseline"]
        results[name], counts[name] = correct / max(1, n), n
        centered[name] = (results[name] - baseline) / (1 - baseline) if baseline < 1 else 0.0
    model.train(was_training)
    return dict(results=results, centered=centered, counts=counts,
                mean=sum(centered.values()) / len(centered) if centered else None)


# =================================================================================================================
# 6. Run


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def write_atomic(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class RunLog:
    """Each message to stdout and to RUN/log.txt."""

    def __init__(self, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "log.txt"), "w", encoding="utf-8")

    def __call__(self, msg):
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def precision(device):
    """(bf16?, a function returning the autocast context): bf16 matmuls where the GPU has them (parameters and
    optimizer state stay fp32); fp32 elsewhere, since bf16 on CPUs is many times slower."""
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return use_bf16, lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def run_core(log, model, core, tok, device, cfg, autocast):
    t0 = time.time()
    out = evaluate_core(model, core, tok.bos_id, device, cfg.core_max_per_task, cfg.core_batch_tokens, autocast)
    log(format_core_table(out, core))
    log(f"CORE took {time.time() - t0:.0f}s")
    return dict(core=out["core"], core_per_task=out["centered"], core_max_per_task=cfg.core_max_per_task)


def format_sources(out):
    return ", ".join(f"{name} {bpb:.4f}" for name, bpb in out["by_source"].items())


def val_metrics(out):
    return {"val_bpb": out["bpb"], "val_loss": out["loss"], "val_bpb_by_source": out["by_source"], "val_loss_tokens": out["targets"]}


def train(cfg):
    # check the data before anything is written: a bad data directory leaves no run directory behind
    tok = load_tokenizer(os.path.join(cfg.data_dir, "tokenizer"))
    train_stream, val = load_split(cfg.data_dir, "train", tok), load_val(cfg.data_dir, tok)
    core = load_core(cfg.data_dir, tok) if cfg.core_max_per_task != 0 else None
    device = pick_device(cfg.device)
    log = RunLog(cfg.run_dir)
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    use_bf16, autocast = precision(device)

    torch.manual_seed(cfg.seed)
    model = GPT(cfg, tok.vocab_size).to(device)
    opt = MuonAdamW(model, cfg)
    forward = torch.compile(model) if cfg.compile else model
    micro = min(cfg.micro_batch_tokens, cfg.batch_tokens)
    accum, rows = cfg.batch_tokens // micro, micro // cfg.seq_len
    total = max(1, cfg.train_tokens // cfg.batch_tokens)
    loader = (BestFitLoader(Documents(train_stream, tok.bos_id), rows, cfg.seq_len, cfg.bestfit_buffer, device)
              if cfg.loader == "bestfit" else StreamLoader(train_stream, rows, cfg.seq_len, device))
    n_params, n_matrix = sum(p.numel() for p in model.parameters()), matrix_params(model)
    log(f"model: {n_params:,} parameters ({n_matrix:,} in block matrices), vocab {tok.vocab_size}, windows {model.windows}, "
        f"{total} steps of {cfg.batch_tokens:,} tokens ({accum} x {rows} x {cfg.seq_len}, {cfg.loader} rows), "
        f"device {device}, bf16 {use_bf16}, world size 1")
    log(f"data: {train_stream.n_tokens:,} train tokens, {len(val.tokens):,} val tokens from {len(val.names)} sources")
    log(f"val: every {cfg.val_every} steps, {describe_val(len(val.tokens) - 1, cfg.seq_len, cfg.val_tokens)}; "
        f"after the last step, every val target")

    evaluate = lambda subset: evaluate_bpb(model, val, tok.token_bytes, cfg.seq_len, rows, device, autocast, subset)
    train_time, out = 0.0, None
    for step in range(total):
        lrm = lr_multiplier(cfg, step, total)
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = loader.next_batch()
            with autocast():
                logits = forward(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
            loss.backward()
            step_loss += loss.detach()
        opt.step(lrm, muon_momentum(cfg, step, total), muon_weight_decay(cfg, step, total))
        opt.zero_grad()
        loss_value = step_loss.item()  # also waits for the GPU, so dt is the step's real time
        dt = time.perf_counter() - t0
        if step > 0 or total == 1:  # the first step includes compilation and allocator warmup
            train_time += dt
        if not math.isfinite(loss_value):
            log(f"step {step + 1}/{total}: loss is {loss_value}; stopping")
            sys.exit(2)
        if step % cfg.log_every == 0 or step == total - 1:
            log(f"step {step + 1}/{total} loss {loss_value:.4f} lrm {lrm:.3f} {cfg.batch_tokens / dt:,.0f} tok/s "
                f"eta {dt * (total - step - 1) / 60:.1f} min")
        if (step + 1) % cfg.val_every == 0 or step == total - 1:
            out = evaluate(0 if step == total - 1 else cfg.val_tokens)
            log(f"step {step + 1}/{total} val bpb {out['bpb']:.4f} val loss {out['loss']:.4f}")
    log(f"final val: {out['what']}, {out['targets']:,} with bytes counted; bpb by source: {format_sources(out)}")

    from safetensors.torch import save_model
    tmp = os.path.join(cfg.run_dir, "model.safetensors.tmp")
    save_model(model, tmp, metadata={"config": json.dumps(dataclasses.asdict(cfg)), "vocab_size": str(tok.vocab_size)})
    os.replace(tmp, os.path.join(cfg.run_dir, "model.safetensors"))
    timed_steps = total - 1 if total > 1 else 1
    metrics = {"stack": "nanochat", **val_metrics(out), "train_tokens": total * cfg.batch_tokens,
               "params": n_params, "params_matrix": n_matrix, "tok_per_s": timed_steps * cfg.batch_tokens / train_time,
               "device": str(device), "world_size": 1, "pt_train_time_s": train_time}
    summary = f"val bpb {out['bpb']:.4f}, val loss {out['loss']:.4f}"
    if core is not None:
        metrics.update(run_core(log, model, core, tok, device, cfg, autocast))
        summary += f", CORE {metrics['core']:.4f}"
    write_atomic(os.path.join(cfg.run_dir, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    log(f"nanochat done: {summary}, {metrics['train_tokens']:,} tokens, {n_params:,} params, "
        f"{metrics['tok_per_s']:,.0f} tok/s on {device}; wrote {cfg.run_dir}/metrics.json and model.safetensors")
    log.close()
    return metrics


# =================================================================================================================
# 7. nanochat's own checkpoints, evaluated (--phases eval --init-from)
#
# nanochat (checkpoint_manager.py) saves model_<step:06d>.pt, torch.save of the model's state dict, beside
# meta_<step:06d>.json: {"step", "val_bpb", "model_config": its GPTConfig (sequence_len, vocab_size, n_layer, n_head,
# n_kv_head, n_embd, window_pattern since 2026-01), "user_config", ...}. Its tokenizer is tokenizer.pkl (a pickled
# tiktoken Encoding) and token_bytes.pt in BASE/tokenizer/, checkpoints in BASE/base_checkpoints/<tag>/; models
# published on the HF hub hold the same files.

MODEL_FILE = re.compile(r"model_(\d+)\.pt")
MODEL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
# The versions of nanochat's GPT this peer expresses, told apart by the checkpoint's keys, and what the keys cannot
# say. "2026-03": since commit a825e63 (2026-03-14, smear and backout), the GPT this file implements.
# "2025-10": the first GPT (2025-10-13 .. 2026-01-11): no residual/x0 lambdas, value embeddings, smear or backout
# (loaded as their neutral values: lambdas 1 and 0, smear and backout 0, which compute exactly that), rotary base
# 10,000, no q/k scale, full-context attention. --rope-base, --qk-scale and --softcap on the command line win.
GENERATIONS = {
    "2026-03": dict(rope_base=100000.0, qk_scale=1.2, softcap=15.0, value_embeds=True),
    "2025-10": dict(rope_base=10000.0, qk_scale=1.0, softcap=15.0, value_embeds=False),
}


@dataclasses.dataclass
class Checkpoint:
    model: str        # model_<step>.pt
    meta: str         # meta_<step>.json beside it (an error when read, if missing)
    step: int
    token_bytes: str  # nanochat's token_bytes.pt of its tokenizer, where one was found ("": none)
    tokenizer: str    # its tokenizer.pkl, where one was found ("": none)


def peer_key(key):
    """nanochat's state-dict key -> this peer's (its blocks are transformer.h.*, its embedding transformer.wte)."""
    key = key.removeprefix("_orig_mod.")  # torch.compile's prefix, which nanochat strips too
    if key.startswith("transformer.wte."):
        return key[len("transformer."):]
    if key.startswith("transformer.h."):
        return "blocks." + key[len("transformer.h."):]
    return key


def nanochat_key(key):
    if key.startswith("wte."):
        return "transformer." + key
    if key.startswith("blocks."):
        return "transformer.h." + key[len("blocks."):]
    return key


def split_step(spec):
    head, sep, tail = spec.rpartition("@")
    return (head, int(tail)) if sep and tail.isdigit() else (spec, None)


def pick_step(models, step, where):
    """models {step: file}: (the step asked for, or the latest, its file)."""
    if not models:
        raise DataError(f"{where}: no model_<step>.pt (a nanochat checkpoint directory holds model_<step>.pt and meta_<step>.json)")
    step = max(models) if step is None else step
    if step not in models:
        raise DataError(f"{where}: no checkpoint of step {step} (steps: {', '.join(map(str, sorted(models)))})")
    return step, models[step]


def meta_name(model_name):
    return f"meta_{MODEL_FILE.fullmatch(model_name).group(1)}.json"


def find_checkpoint(spec):
    """--init-from: DIR (its latest model_<step>.pt), DIR@STEP, DIR/model_<step>.pt or hf:OWNER/NAME[/DIR][@STEP]."""
    if spec.startswith("hf:"):
        return download_checkpoint(spec[3:])
    path, step = split_step(spec)
    if os.path.isfile(path):
        m = MODEL_FILE.fullmatch(os.path.basename(path))
        if not m:
            raise DataError(f"{path}: not a nanochat model_<step>.pt")
        directory, (step, name) = os.path.dirname(path) or ".", pick_step({int(m.group(1)): os.path.basename(path)}, step, path)
    elif os.path.isdir(path):
        models = {int(m.group(1)): f for f in os.listdir(path) if (m := MODEL_FILE.fullmatch(f))}
        directory, (step, name) = path, pick_step(models, step, path)
    else:
        raise DataError(f"{path}: missing")
    near = [directory, os.path.join(directory, "tokenizer"), os.path.dirname(os.path.abspath(directory)),
            os.path.join(directory, "..", "tokenizer"), os.path.join(directory, "..", "..", "tokenizer")]
    found = lambda f: next((os.path.normpath(os.path.join(d, f)) for d in near if os.path.isfile(os.path.join(d, f))), "")
    return Checkpoint(os.path.join(directory, name), os.path.join(directory, meta_name(name)), step,
                      found("token_bytes.pt"), found("tokenizer.pkl"))


def download_checkpoint(spec):
    """hf:OWNER/NAME[/DIR][@STEP]: the checkpoint's model and meta files, and the repository's tokenizer.pkl and
    token_bytes.pt where it has them, from the HF hub into huggingface_hub's cache (only these files)."""
    where, step = split_step(spec)
    parts = [p for p in where.split("/") if p]
    if len(parts) < 2:
        raise DataError(f"hf:{spec}: expected hf:OWNER/NAME[/DIR][@STEP]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import HfApi, hf_hub_download
        files = HfApi().list_repo_files(repo)
    except Exception as e:  # no network, no such repository, no access
        raise DataError(f"hf:{repo}: cannot list the repository ({type(e).__name__}: {e})") from None
    folders = {}
    for f in files:
        folder, name = posixpath.split(f)
        if (m := MODEL_FILE.fullmatch(name)) and (not sub or folder == sub):
            folders.setdefault(folder, {})[int(m.group(1))] = f
    if len(folders) > 1:
        names = sorted(folders)
        raise DataError(f"hf:{repo}: checkpoints in several folders ({', '.join(n or '.' for n in names)}): name one, "
                        f"e.g. hf:{repo}/{names[-1]}")
    step, model_file = pick_step(next(iter(folders.values()), {}), step, f"hf:{where}")
    meta_file = posixpath.join(posixpath.dirname(model_file), meta_name(posixpath.basename(model_file)))
    if meta_file not in files:
        raise DataError(f"hf:{repo}: {meta_file}: missing (nanochat's meta_<step>.json holds the model's config)")
    extras = {}
    for name in ("token_bytes.pt", "tokenizer.pkl"):  # the shallowest of each
        hits = sorted((f for f in files if posixpath.basename(f) == name), key=lambda f: (f.count("/"), f))
        extras[name] = hits[0] if hits else None
    try:
        local = {f: hf_hub_download(repo, f) for f in [model_file, meta_file, *filter(None, extras.values())]}
    except Exception as e:
        raise DataError(f"hf:{repo}: download failed ({type(e).__name__}: {e})") from None
    return Checkpoint(local[model_file], local[meta_file], step, local.get(extras["token_bytes.pt"], ""),
                      local.get(extras["tokenizer.pkl"], ""))


def read_checkpoint(ckpt):
    """(nanochat's state dict, its meta JSON). The .pt is read by torch.load(weights_only=True): tensors and plain
    containers only, so a pickle that holds any other object is refused, nothing of it run."""
    if not os.path.isfile(ckpt.meta):
        raise DataError(f"{ckpt.meta}: missing: nanochat writes it beside {os.path.basename(ckpt.model)}, and the model's config is read from it")
    meta = read_json(ckpt.meta)
    mc = meta.get("model_config") if isinstance(meta, dict) else None
    if not (isinstance(mc, dict) and all(type(mc.get(k)) is int and mc[k] > 0 for k in MODEL_CONFIG_KEYS)):
        raise DataError(f"{ckpt.meta}: needs 'model_config' with the positive ints {', '.join(MODEL_CONFIG_KEYS)} (nanochat's GPTConfig)")
    pattern = mc.get("window_pattern", "L")
    if not (isinstance(pattern, str) and pattern and not set(pattern.upper()) - set("SL")):
        raise DataError(f"{ckpt.meta}: model_config.window_pattern {pattern!r}: use only S and L")
    try:
        state = torch.load(ckpt.model, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it refers to {named.group(1)}" if named else (str(e).strip().splitlines() or ["?"])[0]
        raise DataError(f"{ckpt.model}: refused by torch.load(weights_only=True), which reads tensors and plain containers only: {why}") from None
    except Exception as e:  # not a torch file, truncated
        raise DataError(f"{ckpt.model}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise DataError(f"{ckpt.model}: not a state dict (names -> tensors), which is what nanochat saves")
    return state, meta


def token_strings(tok_dir):
    """{rank: token bytes} of the data's tokenizer.tiktoken (base64 and rank per line)."""
    path = os.path.join(tok_dir, "tokenizer.tiktoken")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    out = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                b64, rank = line.split()
                out[int(rank)] = base64.b64decode(b64)
    return out


def check_tokenizer(ckpt, meta, data_dir, tok):
    """The data directory must be prepared with the checkpoint's tokenizer: the vocabulary sizes agree and, where
    nanochat's token_bytes.pt was found, every token's byte count. nanochat before 2026-07 (2ce972a) counted a token's
    bytes after decoding it to text, so a token that is not valid UTF-8 alone counts U+FFFD's 3 bytes per bad byte:
    that count is accepted too (this peer's bpb uses the data's raw counts). Returns a line for the log."""
    tok_dir = os.path.join(data_dir, "tokenizer")
    hint = (f"prepare the data with the checkpoint's tokenizer (python data/tokenizer.py import "
            f"{ckpt.tokenizer or 'PATH/tokenizer.pkl'} --out {tok_dir}, then the data writers)")
    vocab = meta["model_config"]["vocab_size"]
    if vocab != tok.vocab_size:
        raise DataError(f"{ckpt.meta}: vocab_size {vocab}, but {tok_dir} has {tok.vocab_size} tokens: {hint}")
    if not ckpt.token_bytes:
        return "no token_bytes.pt found beside the checkpoint: the data's tokenizer is trusted on its vocabulary size"
    try:
        theirs = torch.load(ckpt.token_bytes, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{ckpt.token_bytes}: not readable by torch.load(weights_only=True) ({type(e).__name__})") from None
    if not (isinstance(theirs, torch.Tensor) and tuple(theirs.shape) == (vocab,)):
        raise DataError(f"{ckpt.token_bytes}: expected a tensor of {vocab} byte counts")
    theirs = theirs.numpy().astype(np.int64)
    differ = np.flatnonzero(theirs != tok.token_bytes)
    if len(differ):
        strings = token_strings(tok_dir)
        as_text = np.array([len(strings[i].decode("utf-8", errors="replace").encode("utf-8")) if i in strings else 0 for i in differ])
        bad = differ[theirs[differ] != as_text]
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{ckpt.token_bytes}: token {i} has {theirs[i]} bytes there and {tok.token_bytes[i]} in "
                            f"{tok_dir}/token_bytes.npy: the data's tokenizer is not the checkpoint's; {hint}")
    note = f" ({len(differ)} counted through decoded text, nanochat's rule before 2026-07)" if len(differ) else ""
    return f"{ckpt.token_bytes} agrees with the data's tokenizer{note}"


def checkpoint_model(cfg, state, meta, ckpt, vocab_size):
    """(this peer's GPT with the checkpoint's weights in fp32, its Config, which nanochat GPT it is). The keys and
    shapes must be exactly those of that GPT as meta's model_config sizes it; the first that is not is the error."""
    mc = meta["model_config"]
    if mc["n_kv_head"] != mc["n_head"]:
        raise DataError(f"{ckpt.meta}: n_kv_head {mc['n_kv_head']} != n_head {mc['n_head']}: grouped-query attention "
                        "is not implemented by this peer (nanochat's base_train always sets them equal)")
    if mc["n_embd"] % mc["n_head"] or (mc["n_embd"] // mc["n_head"]) % 2 or mc["n_embd"] < 24:
        raise DataError(f"{ckpt.meta}: n_embd {mc['n_embd']} / n_head {mc['n_head']}: not an even head size (or n_embd < 24)")
    peer = {peer_key(k): v for k, v in state.items()}
    origin = {peer_key(k): k for k in state}
    if "smear_gate.weight" in peer:
        generation = "2026-03"
    elif "resid_lambdas" in peer or any(k.startswith("value_embeds.") for k in peer):
        raise DataError(f"{ckpt.model}: nanochat's GPT of 2026-01-11 .. 2026-03-14 (residual lambdas or value "
                        "embeddings, but no smear_gate): not a version this peer implements (its value-embedding "
                        "gates, rotary base, q/k scale and short windows differ; see models/nanochat/README.md)")
    else:
        generation = "2025-10"
        L = mc["n_layer"]
        neutral = {"resid_lambdas": torch.ones(L), "x0_lambdas": torch.zeros(L), "smear_gate.weight": torch.zeros(1, 24),
                   "smear_lambda": torch.zeros(1), "backout_lambda": torch.zeros(1)}
        for key, value in neutral.items():
            peer.setdefault(key, value)
    arch = dict(GENERATIONS[generation])
    arch.update({k: getattr(cfg, k) for k in ("rope_base", "qk_scale", "softcap") if k in getattr(cfg, "given", ())})
    wte = peer.get("wte.weight")
    model_cfg = dataclasses.replace(cfg, n_layers=mc["n_layer"], model_dim=mc["n_embd"], n_heads=mc["n_head"],
                                    seq_len=mc["sequence_len"], window_pattern=mc.get("window_pattern", "L"),
                                    vocab_multiple=1 if wte is not None and wte.shape[0] == vocab_size else 64, **arch)
    with torch.device("meta"):  # shapes only: the checkpoint's tensors are assigned below
        model = GPT(model_cfg, vocab_size)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, tensor in peer.items():
        name = origin.get(key, key)
        if key not in expected:
            raise DataError(f"{ckpt.model}: unexpected key {name!r}: not in nanochat's GPT of {generation} as {os.path.basename(ckpt.meta)} configures it")
        if tuple(tensor.shape) != expected[key]:
            raise DataError(f"{ckpt.model}: {name!r} has shape {tuple(tensor.shape)}, but the GPT {os.path.basename(ckpt.meta)} "
                            f"configures needs {expected[key]}")
    missing = [k for k in expected if k not in peer]
    if missing:
        raise DataError(f"{ckpt.model}: no {nanochat_key(missing[0])!r}, which nanochat's GPT of {generation} as "
                        f"{os.path.basename(ckpt.meta)} configures has")
    model.load_state_dict({k: v.float() for k, v in peer.items()}, assign=True)
    return model, model_cfg, generation


def format_chat_table(out):
    lines = [f"{'task':<34} {'examples':>8} {'accuracy':>8} {'centered':>8}"]
    lines += [f"{name:<34} {out['counts'][name]:>8} {acc:>8.4f} {out['centered'][name]:>8.4f}" for name, acc in out["results"].items()]
    return "\n".join(lines)


def evaluate_checkpoint(cfg):
    """--phases eval: nanochat's checkpoint --init-from scored with this peer's bpb, CORE and categorical chat eval on
    the data directory, which must be prepared with the checkpoint's tokenizer; metrics.json as a training run
    writes it, plus where the model came from. Everything is checked before the run directory is written."""
    tok = load_tokenizer(os.path.join(cfg.data_dir, "tokenizer"))
    val = load_val(cfg.data_dir, tok)
    core = load_core(cfg.data_dir, tok) if cfg.core_max_per_task != 0 else None
    has_chat = os.path.isdir(os.path.join(cfg.data_dir, "chat_eval"))
    chat = load_chat_eval(cfg.data_dir, tok) if cfg.chat_max_per_task != 0 and has_chat else None
    ckpt = find_checkpoint(cfg.init_from)
    state, meta = read_checkpoint(ckpt)
    tokenizer_note = check_tokenizer(ckpt, meta, cfg.data_dir, tok)
    model, mcfg, generation = checkpoint_model(cfg, state, meta, ckpt, tok.vocab_size)
    n_params = sum(v.numel() for v in state.values())
    del state
    device = pick_device(cfg.device)
    model.to(device)
    log = RunLog(cfg.run_dir)
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log(f"checkpoint: {ckpt.model} (step {ckpt.step}), nanochat's GPT of {generation}: {mcfg.n_layers} layers, dim "
        f"{mcfg.model_dim}, {mcfg.n_heads} heads, seq_len {mcfg.seq_len}, windows {model.windows}, rope base "
        f"{mcfg.rope_base:g}, q/k scale {mcfg.qk_scale:g}, softcap {mcfg.softcap:g}, value embeddings "
        f"{mcfg.value_embeds}; {n_params:,} parameters")
    log(f"tokenizer: {tokenizer_note}")
    use_bf16, autocast = precision(device)
    rows = max(1, min(cfg.micro_batch_tokens, cfg.batch_tokens) // mcfg.seq_len)
    log(f"device {device}, bf16 {use_bf16}; val: {len(val.tokens):,} tokens from {len(val.names)} sources, {rows} rows of {mcfg.seq_len} per forward")
    t0 = time.time()
    out = evaluate_bpb(model, val, tok.token_bytes, mcfg.seq_len, rows, device, autocast)
    log(f"val bpb {out['bpb']:.4f} val loss {out['loss']:.4f} ({out['what']}, {out['targets']:,} with bytes counted, {time.time() - t0:.0f}s)")
    log(f"val bpb by source: {format_sources(out)}")
    metrics = {"stack": "nanochat", "init_from": cfg.init_from, "checkpoint": ckpt.model, "step": ckpt.step,
               "nanochat_gpt": generation, "meta_val_bpb": meta.get("val_bpb"), **val_metrics(out),
               "params": n_params, "params_matrix": matrix_params(model), "device": str(device), "world_size": 1}
    summary = f"val bpb {out['bpb']:.4f}, val loss {out['loss']:.4f}"
    if core is not None:
        metrics.update(run_core(log, model, core, tok, device, cfg, autocast))
        summary += f", CORE {metrics['core']:.4f}"
    if chat is not None:
        out = evaluate_chat_categorical(model, chat, tok.bos_id, device, cfg.chat_max_per_task, cfg.core_batch_tokens, autocast)
        log(format_chat_table(out))
        log("chat eval: categorical tasks only (GSM8K and HumanEval need generation: the main stack's)")
        metrics.update(chat_per_task=out["results"], chat_categorical_centered=out["mean"], chat_max_per_task=cfg.chat_max_per_task)
    else:
        log("chat eval: skipped (" + ("--chat-max-per-task 0" if has_chat else f"no {cfg.data_dir}/chat_eval") + ")")
    write_atomic(os.path.join(cfg.run_dir, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    log(f"nanochat eval done: {summary} for {ckpt.model}; wrote {cfg.run_dir}/metrics.json")
    log.close()
    return metrics


def main(argv=None):
    cfg = parse_config(argv)
    try:
        evaluate_checkpoint(cfg) if cfg.phases == "eval" else train(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
