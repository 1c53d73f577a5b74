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
Any field of Config can be overridden with --name=value (--flag / --no-flag for booleans, JSON for tuples).

Contents
    1. Config: one dataclass, presets, overrides
    2. Data: tokenizer metadata, pretrain shards, the two row loaders (stream, BOS-aligned best fit), the CORE file
    3. Model: nanochat's GPT
    4. Optimizer: Muon for matrices, AdamW for the rest, the schedules
    5. Evaluation: bits per byte, CORE
    6. Run: the training loop, metrics, the checkpoint
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
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
    # model: nanochat d12 (depth 12 x aspect ratio 64, head_dim 128)
    n_layers: int = 12
    model_dim: int = 768
    n_heads: int = 6
    seq_len: int = 2048
    window_pattern: str = "SSSL"       # tiled over the layers, the last always L; L = seq_len, S = seq_len/4 (up to x128)
    rope_base: float = 100000.0
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
    val_tokens: int = 10_485_760
    val_every: int = 250
    core_max_per_task: int = -1        # CORE examples per task after training (-1: all, 0: skip CORE)
    core_batch_tokens: int = 32768     # tokens (rows x longest sequence) per CORE forward
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
    values.update({k: v for k, v in vars(args).items() if v is not None})
    cfg = Config(**values)
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
    if manifest.get("format") != fmt or manifest.get("version") != 1:
        raise DataError(f"{path}: expected format {fmt!r} version 1, got {manifest.get('format')!r} version {manifest.get('version')}")
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


def load_split(data_dir, split, tok):
    """The 'train' or 'val' pretrain shards listed in pretrain/manifest.json, every header checked."""
    directory = os.path.join(data_dir, "pretrain")
    manifest = read_manifest(directory, "pretrain", tok)
    shards = [read_shard(os.path.join(directory, s["file"]), tok.vocab_size) for s in manifest["shards"] if s["split"] == split]
    stream = TokenStream(shards)
    if stream.n_tokens == 0:
        raise DataError(f"{directory}/manifest.json: no {split} tokens")
    return stream


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


# =================================================================================================================
# 3. Model: nanochat's GPT (nanochat/gpt.py), without the KV cache and GQA


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no learnable gain


def has_value_embed(layer, n_layers):
    """Every other layer, counted back from the last one (which always has a value embedding)."""
    return layer % 2 == (n_layers - 1) % 2


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
        self.n_heads, self.head_dim = cfg.n_heads, dim // cfg.n_heads
        self.c_q, self.c_k, self.c_v, self.c_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        # value embedding gate: per head, from the first 12 channels of the block input
        self.ve_gate = nn.Linear(12, cfg.n_heads, bias=False) if has_value_embed(layer, cfg.n_layers) else None

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.shape
        heads = (B, T, self.n_heads, self.head_dim)
        q, k, v = self.c_q(x).view(heads), self.c_k(x).view(heads), self.c_v(x).view(heads)
        if ve is not None:  # value residual (ResFormer): a gated share of the token's own value embedding, gate in (0, 3)
            v = v + 3 * torch.sigmoid(self.ve_gate(x[..., :12]))[..., None] * ve.view(heads)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        q, k = norm(q) * 1.2, norm(k) * 1.2  # QK-norm (after rotary, as nanochat); the 1.2s sharpen the softmax
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
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(padded, dim) for i in range(L) if has_value_embed(i, L)})
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
        self.adamw = torch.optim.AdamW([
            adam([model.lm_head.weight], cfg.unembedding_lr * scale, (0.8, 0.96), 0.01),
            adam([model.wte.weight], cfg.embedding_lr * scale, (0.8, 0.995), 0.001),
            adam(list(model.value_embeds.parameters()), cfg.embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
            adam([model.resid_lambdas], cfg.scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adam([model.x0_lambdas], cfg.scalar_lr, (0.96, 0.95), 0.0),
            adam([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ], eps=1e-10, fused=True)  # fused: one kernel over all tensors (CPU too)
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


@torch.no_grad()
def evaluate_bpb(model, val, token_bytes, seq_len, val_tokens, rows, device, autocast=contextlib.nullcontext):
    """Bits per byte and mean loss of next-token prediction on the val stream, as the main stack and gpt2-adamw
    define them: windows of seq_len + 1 tokens at stride seq_len cover targets 1 .. n_windows * seq_len
    (n_windows * seq_len <= min(val_tokens, n_val - 1)); targets that are special tokens (0 bytes) count in
    neither sum. (nanochat itself scores best-fit rows of the val split.) autocast: a function returning the
    precision context of the forward."""
    n_windows = min(val_tokens, val.n_tokens - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"val split has {val.n_tokens} tokens: fewer than one window of {seq_len + 1}")
    token_bytes = torch.from_numpy(token_bytes).to(device)
    was_training = model.training
    model.eval()
    nats = nbytes = count = 0.0
    for first in range(0, n_windows, rows):
        n = min(rows, n_windows - first)
        buf = torch.from_numpy(val.read(first * seq_len, n * seq_len + 1))
        x, y = buf[:-1].view(n, seq_len).to(device), buf[1:].view(n, seq_len).to(device)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        w = token_bytes[y.flatten()]
        nats += float((loss * (w > 0)).double().sum())
        nbytes += float(w.double().sum())
        count += float((w > 0).sum())
    model.train(was_training)
    return nats / (math.log(2) * nbytes), nats / count


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


def train(cfg):
    # check the data before anything is written: a bad data directory leaves no run directory behind
    tok = load_tokenizer(os.path.join(cfg.data_dir, "tokenizer"))
    train_stream, val_stream = load_split(cfg.data_dir, "train", tok), load_split(cfg.data_dir, "val", tok)
    if val_stream.n_tokens <= cfg.seq_len:
        raise DataError(f"{cfg.data_dir}/pretrain: {val_stream.n_tokens} val tokens, fewer than one window of {cfg.seq_len + 1}")
    core = load_core(cfg.data_dir, tok) if cfg.core_max_per_task != 0 else None
    device = pick_device(cfg.device)
    os.makedirs(cfg.run_dir, exist_ok=True)
    log_file = open(os.path.join(cfg.run_dir, "log.txt"), "w", encoding="utf-8")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")

    # bf16 matmuls where the GPU has them (parameters and optimizer state stay fp32); fp32 elsewhere, since bf16
    # on CPUs is many times slower
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

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
    log(f"data: {train_stream.n_tokens:,} train tokens, {val_stream.n_tokens:,} val tokens")

    evaluate = lambda: evaluate_bpb(model, val_stream, tok.token_bytes, cfg.seq_len, cfg.val_tokens, rows, device, autocast)
    train_time, val_bpb, val_loss = 0.0, None, None
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
            val_bpb, val_loss = evaluate()
            log(f"step {step + 1}/{total} val bpb {val_bpb:.4f} val loss {val_loss:.4f}")

    from safetensors.torch import save_model
    tmp = os.path.join(cfg.run_dir, "model.safetensors.tmp")
    save_model(model, tmp, metadata={"config": json.dumps(dataclasses.asdict(cfg)), "vocab_size": str(tok.vocab_size)})
    os.replace(tmp, os.path.join(cfg.run_dir, "model.safetensors"))
    timed_steps = total - 1 if total > 1 else 1
    metrics = {"stack": "nanochat", "val_bpb": val_bpb, "val_loss": val_loss, "train_tokens": total * cfg.batch_tokens,
               "params": n_params, "params_matrix": n_matrix, "tok_per_s": timed_steps * cfg.batch_tokens / train_time,
               "device": str(device), "world_size": 1, "pt_train_time_s": train_time}
    summary = f"val bpb {val_bpb:.4f}, val loss {val_loss:.4f}"
    if core is not None:
        t0 = time.time()
        out = evaluate_core(model, core, tok.bos_id, device, cfg.core_max_per_task, cfg.core_batch_tokens, autocast)
        log(format_core_table(out, core))
        log(f"CORE took {time.time() - t0:.0f}s")
        metrics.update(core=out["core"], core_per_task=out["centered"], core_max_per_task=cfg.core_max_per_task)
        summary += f", CORE {out['core']:.4f}"
    write_atomic(os.path.join(cfg.run_dir, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    log(f"nanochat done: {summary}, {metrics['train_tokens']:,} tokens, {n_params:,} params, "
        f"{metrics['tok_per_s']:,.0f} tok/s on {device}; wrote {cfg.run_dir}/metrics.json and model.safetensors")
    log_file.close()
    return metrics


def main(argv=None):
    cfg = parse_config(argv)
    try:
        train(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
