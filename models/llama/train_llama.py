"""llama: the "minimal state of the art" Llama recipe as a peer of DecoderStack's main stack.

Same prepared data directory (data/README.md), same bits-per-byte definition, same CORE scoring, same metrics.json
keys and log lines as models/gpt2-adamw, so the two can be compared run for run and the difference is the recipe:
RMSNorm pre-norm, rotary positions, SwiGLU MLP of hidden size 8/3 x dim (rounded up to a multiple of 64), grouped-query
attention (--n-kv-heads), no biases, no dropout, tied embeddings, optionally parallel attention + MLP blocks; AdamW
(0.9, 0.95) with weight decay 0.1 on matrices only, gradient clipping at 1.0, 3% linear warmup then cosine decay to
10% of the peak. Attention over fixed windows that cross document boundaries, as GPT-2's. Single process.
Self-contained on purpose: it imports neither the main stack nor data/, so it can be diffed and frozen.

Run:
    CPU (~ the main stack's cpu preset compute):  python train_llama.py --preset cpu --data-dir DIR --run-dir DIR
    one GPU (GPT-2 124M's shape, Llama's recipe): python train_llama.py --preset gpu --data-dir DIR --run-dir DIR
Any field of Config can be overridden with --name=value (--flag / --no-flag for booleans, JSON for tuples).
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

# -----------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config:
    preset: str = "gpu"
    data_dir: str = ""
    run_dir: str = "runs/llama"
    seed: int = 0
    device: str = "auto"               # auto: cuda -> mps -> cpu
    compile: bool = True
    # model: GPT-2 small's depth and width with Llama's blocks
    n_layers: int = 12
    model_dim: int = 768
    n_heads: int = 12
    n_kv_heads: int = 4                # grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads
    seq_len: int = 1024
    ffn_multiple: int = 64             # SwiGLU hidden size: floor(8/3 x model_dim) rounded up to a multiple of this
    rope_theta: float = 10000.0        # Llama 1/2's base; enough for contexts of a few thousand tokens
    norm_eps: float = 1e-5             # RMSNorm's epsilon (Llama 2 and 3)
    parallel_blocks: bool = False      # x + attn(norm(x)) + mlp(norm(x)) (GPT-J / PaLM) instead of one after the other
    tie_embeddings: bool = True        # one matrix for the token embedding and the output head (as Llama 3.2 1B/3B)
    init_std: float = 0.02             # N(0, init_std) truncated at 3 std; residual projections / sqrt(2 n_layers)
    vocab_multiple: int = 64           # pad the embedding rows for matmul-friendly shapes; logits are sliced back
    # optimization: AdamW as Llama 2 trained (betas, weight decay, clipping, warmup + cosine to 10%)
    batch_tokens: int = 524288         # tokens per optimizer step
    micro_batch_tokens: int = 32768    # tokens per forward; gradient accumulation makes up batch_tokens
    train_tokens: int = 338_821_120    # the main stack's h100x8 token budget
    lr: float = 6e-4                   # llm.c's value for a 124M model (Llama 2's 3e-4 is for 7B and up)
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8                  # the gpt2 peer's (Llama 2 used 1e-5 at 7B+)
    weight_decay: float = 0.1          # on matrices (every 2D weight, the tied embedding included), not on RMSNorm gains
    grad_clip: float = 1.0             # max global gradient norm
    warmup_frac: float = 0.03          # linear warmup over this fraction of the steps
    min_lr_frac: float = 0.1           # cosine decay from lr to lr * min_lr_frac at the last step
    # evaluation and logging
    val_tokens: int = 10_485_760
    val_every: int = 250
    core_max_per_task: int = -1        # CORE examples per task after training (-1: all, 0: skip CORE)
    core_batch_tokens: int = 32768     # tokens (rows x longest sequence) per CORE forward
    log_every: int = 10


PRESETS = {
    "gpu": {},
    # the main stack's cpu preset: its layers, width, batch and steps (150 x 4096 tokens), val tokens and CORE
    # examples; fp32. 3 heads of 64 allow 1 or 3 key/value heads: 3 (no grouping) keeps the block matrices exactly
    # the other stacks' (SwiGLU's 3 x 192 x 512 = GELU's 2 x 192 x 768), so the comparison is the recipe's.
    "cpu": dict(n_layers=4, model_dim=192, n_heads=3, n_kv_heads=3, seq_len=512, batch_tokens=4096,
                micro_batch_tokens=4096, train_tokens=614_400, val_tokens=131_072, val_every=75, log_every=10,
                compile=False, core_max_per_task=50, core_batch_tokens=8192),
}


def parse_config(argv=None):
    """--preset picks the defaults, then every --name=value (or --name value) overrides one field."""
    parser = argparse.ArgumentParser(description="Llama + AdamW peer stack (see the header of this file)")
    for field in dataclasses.fields(Config):
        flags = sorted({f"--{field.name.replace('_', '-')}", f"--{field.name}"})
        if isinstance(field.default, bool):
            parser.add_argument(*flags, dest=field.name, nargs="?", const=True, default=None, type=parse_bool)
            parser.add_argument(f"--no-{field.name.replace('_', '-')}", dest=field.name, action="store_const", const=False)
        elif isinstance(field.default, tuple):
            parser.add_argument(*flags, dest=field.name, default=None, type=parse_tuple)
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
        parser.error(f"--model-dim {cfg.model_dim} / --n-heads {cfg.n_heads} must be an even head size (rotary pairs dims)")
    if cfg.n_kv_heads < 1 or cfg.n_heads % cfg.n_kv_heads:
        parser.error(f"--n-kv-heads {cfg.n_kv_heads} must divide --n-heads {cfg.n_heads}")
    if cfg.ffn_multiple < 1:
        parser.error(f"--ffn-multiple {cfg.ffn_multiple} must be at least 1")
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


def parse_tuple(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r} ({e.msg})") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}")
    return tuple(value)


# -----------------------------------------------------------------------------------------------------------------
# Data: the tokenizer's metadata, the pretrain shards and the CORE file (formats in data/README.md)

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
MANIFEST_VERSIONS = {"pretrain": 2, "core": 1}  # pretrain 2: val_sources (which source file each val document is from)


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
    if manifest.get("format") != fmt or manifest.get("version") != MANIFEST_VERSIONS[fmt]:
        raise DataError(f"{path}: expected format {fmt!r} version {MANIFEST_VERSIONS[fmt]}, got {manifest.get('format')!r} version {manifest.get('version')}")
    if manifest.get("tokenizer_sha256") != tok.sha256:
        raise DataError(f"{path}: written with a different tokenizer than {tok.sha256[:12]}... (re-prepare the data)")
    return manifest


class TokenStream:
    """The shards of one split, in manifest order, as one stream of tokens that wraps around at its end. The val
    stream also knows the source file of each document (set by load_split from the manifest's val_sources)."""

    def __init__(self, shards):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.n_tokens = int(self.starts[-1])
        self.source_names, self.doc_starts, self.doc_source = [], None, None

    def sources_at(self, positions):
        """Index into source_names of the document holding each stream position (its last <|bos|> at or before)."""
        return self.doc_source[np.searchsorted(self.doc_starts, positions, side="right") - 1]

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
        raise DataError(f"{os.path.join(directory, 'manifest.json')}: no {split} tokens")
    if split == "val":
        attach_val_sources(stream, manifest, tok.bos_id, os.path.join(directory, "manifest.json"))
    return stream


def attach_val_sources(stream, manifest, bos_id, path):
    """The manifest's val_sources (runs of consecutive val documents from one source file, in stream order) checked
    against the <|bos|> tokens of the val stream, then kept on it as the source of every document."""
    runs = manifest.get("val_sources")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) and type(r.get("n_docs")) is int
                                             and r["n_docs"] >= 0 for r in runs):
        raise DataError(f"{path}: val_sources must be a list of {{\"name\": str, \"n_docs\": int >= 0}}, got {json.dumps(runs)[:100]}")
    starts = np.concatenate([np.flatnonzero(np.asarray(s) == bos_id) + int(o) for s, o in zip(stream.shards, stream.starts)])
    if sum(r["n_docs"] for r in runs) != len(starts):
        raise DataError(f"{path}: val_sources count {sum(r['n_docs'] for r in runs):,} documents, the val shards hold "
                        f"{len(starts):,} (<|bos|> tokens)")
    if stream.n_tokens < 2 or starts[0] != 0:
        raise DataError(f"{path}: the val stream must start with <|bos|> and hold a target ({stream.n_tokens} tokens)")
    stream.source_names = list(dict.fromkeys(r["name"] for r in runs))  # one name even if its documents come in several runs
    stream.doc_starts = starts
    stream.doc_source = np.repeat([stream.source_names.index(r["name"]) for r in runs], [r["n_docs"] for r in runs]).astype(np.int64)


class TrainLoader:
    """llm.c's loader: each micro batch is B consecutive windows of T+1 tokens (inputs and shifted targets) read
    from the train stream; consecutive windows share one token, and the stream wraps around at its end."""

    def __init__(self, stream, rows, seq_len, device):
        self.stream, self.rows, self.seq_len, self.device = stream, rows, seq_len, device
        self.pos = 0

    def next_batch(self):
        B, T = self.rows, self.seq_len
        buf = torch.from_numpy(self.stream.read(self.pos, B * T + 1))
        self.pos = (self.pos + B * T) % self.stream.n_tokens
        return buf[:-1].view(B, T).to(self.device), buf[1:].view(B, T).to(self.device)


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


# -----------------------------------------------------------------------------------------------------------------
# Model: Llama (Meta's reference model.py names: tok_embeddings, layers, attention.wq/wk/wv/wo, feed_forward.w1/w2/w3,
# attention_norm, ffn_norm, norm, output)


class RMSNorm(nn.Module):
    """x / rms(x) times a learned gain, computed in fp32 and returned in x's dtype (as Llama's reference does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def swiglu_hidden(dim, multiple):
    """Llama's FeedForward size: 8/3 x dim (floored), rounded up to a multiple of `multiple` (Llama: 256, here 64).
    8/3 keeps SwiGLU's three matrices at the parameter count of a 4x two-matrix MLP; dim 192 gives exactly 512."""
    return -(-(8 * dim // 3) // multiple) * multiple


def rotary_cos_sin(seq_len, head_dim, theta):
    """cos, sin (seq_len, head_dim / 2) of position t times frequency theta^(-2i / head_dim), in fp32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotate the pair (dim i, dim i + D/2) of every head by position x frequency i (the "rotate half" layout of
    Hugging Face's Llama; Meta's pairs adjacent dims, the same rotation up to a fixed permutation of the dims).
    x: (B, T, H, D); cos, sin: (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.model_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, dim // cfg.n_heads
        self.wq = nn.Linear(dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, dim, bias=False)
        self.wo.residual = True

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # query head h reads key/value head h // (n_heads / n_kv_heads), as Llama's repeat_kv; SDPA does the
        # grouping itself rather than copying the key/value heads. The whole window, documents included.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg):
        super().__init__()
        hidden = swiglu_hidden(cfg.model_dim, cfg.ffn_multiple)
        self.w1 = nn.Linear(cfg.model_dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.model_dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.model_dim, bias=False)  # down
        self.w2.residual = True

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.parallel = cfg.parallel_blocks
        self.attention_norm, self.attention = RMSNorm(cfg.model_dim, cfg.norm_eps), Attention(cfg)
        # parallel blocks share one norm (GPT-J, PaLM): both branches read the same normalized input
        self.ffn_norm = None if self.parallel else RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):
        if self.parallel:
            h = self.attention_norm(x)
            return x + self.attention(h, cos, sin) + self.feed_forward(h)
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple  # the extra rows are never targets
        self.tok_embeddings = nn.Embedding(padded, cfg.model_dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.model_dim, padded, bias=False)
        if cfg.tie_embeddings:
            self.tok_embeddings.weight = self.output.weight
        # rotary tables for every position of a window; not saved (persistent=False): they follow from the config
        cos, sin = rotary_cos_sin(cfg.seq_len, cfg.model_dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """Every matrix N(0, init_std) truncated at 3 std (torchtitan's Llama init, the embedding too since it is
        the head as well); projections into the residual stream (wo, w2) scaled by 1/sqrt(2 * n_layers) so the
        stream's variance does not grow with depth. RMSNorm gains start at 1 (their constructor)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "residual", False) else self.cfg.init_std
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def hidden(self, idx):
        """idx: (B, T) token ids, T <= seq_len -> final hidden states (B, T, model_dim)."""
        T = idx.size(1)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, self.rope_cos[:T], self.rope_sin[:T])
        return self.norm(x)

    def logits(self, h):
        """Logits over the real vocabulary (the padding rows sliced off)."""
        return self.output(h)[..., :self.vocab_size]

    def forward(self, idx):
        return self.logits(self.hidden(idx))


def matrix_params(model):
    """The Linear weights inside the blocks: what the main stack's params_matrix counts."""
    return sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, nn.Linear))


def make_optimizer(model, cfg):
    # weight decay on matrices only: every 2D tensor (the blocks' Linear weights and the embedding, which is also the
    # output head when tied) decays; the RMSNorm gains (1D) do not, since shrinking them towards 0 only fights the norm
    params = list(model.parameters())  # deduplicated: the tied embedding appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel over all tensors; on CPU the default foreach path took ~5x longer per step (gpt2 peer)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def warmup_steps(cfg, total):
    return round(cfg.warmup_frac * total)


def lr_at(cfg, step, total):
    """Linear warmup to lr over warmup_frac of the steps, then cosine decay that reaches lr * min_lr_frac on the last
    step."""
    warmup = warmup_steps(cfg, total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - 1 - warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer_step(model, opt, grad_clip):
    """Clip the global gradient norm to grad_clip, step, clear the gradients; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


# -----------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass
class ValScore:
    """Sums over the counted val targets (token_bytes > 0) of the rows scored, per source (rows of sums, in the order
    of the stream's source_names); bpb = nats / (ln 2 x bytes), loss = nats / targets, the same in every stack."""
    names: list
    sums: np.ndarray   # float64 [n_sources, 3]: nats, bytes, counted targets
    scored: int = 0    # target positions scored, counted or not (padding excluded)
    total: int = 0     # target positions in the val stream: n_val - 1

    def add(self, stream, positions, nats, nbytes, scored):
        """One batch of `scored` targets: each target's stream position, nats and bytes (0: not counted; padding is
        given 0 bytes)."""
        counted = nbytes > 0
        src = stream.sources_at(positions[counted])
        for col, v in enumerate((nats[counted], nbytes[counted], np.ones(int(counted.sum())))):
            self.sums[:, col] += np.bincount(src, weights=v, minlength=len(self.names))
        self.scored += scored

    @property
    def bpb(self):
        return float(self.sums[:, 0].sum() / (math.log(2) * self.sums[:, 1].sum()))

    @property
    def loss(self):
        return float(self.sums[:, 0].sum() / self.sums[:, 2].sum())

    @property
    def targets(self):
        return int(self.sums[:, 2].sum())

    def bpb_by_source(self):
        """{source: bpb} of the sources with scored bytes (a subset can miss a source, a source can have no bytes)."""
        return {n: float(nats / (math.log(2) * b)) for n, (nats, b, _) in zip(self.names, self.sums) if b > 0}

    def describe(self):
        """The log's words for it: a subset says how much of the stream it scored, the full score its split."""
        if self.scored < self.total:
            return f"val bpb {self.bpb:.4f} val loss {self.loss:.4f} (subset: {self.scored:,} of {self.total:,} targets, spread over the stream)"
        split = ", ".join(f"{n} {b:.4f}" for n, b in self.bpb_by_source().items())
        return f"val bpb {self.bpb:.4f} val loss {self.loss:.4f} (every val token: {self.total:,} targets, {self.targets:,} with bytes; by source: {split})"


def val_rows(n_val, seq_len):
    """Rows of the val stream: row r predicts targets r * seq_len + 1 .. (r + 1) * seq_len; together every target."""
    return -(-(n_val - 1) // seq_len)


def spread_rows(n_val, seq_len, n_tokens):
    """n_tokens worth of val rows (every row when that covers the stream), evenly spaced from the first row to the
    last, as the main stack picks them: a periodic evaluation on them draws from every part of the val stream, whose
    documents come source after source."""
    n_rows = val_rows(n_val, seq_len)
    if n_tokens >= n_val - 1:
        return list(range(n_rows))
    return np.unique(np.linspace(0, n_rows - 1, max(1, n_tokens // seq_len)).round().astype(np.int64)).tolist()


@torch.no_grad()
def evaluate_bpb(model, val, token_bytes, seq_len, batch_rows, device, rows=None, autocast=contextlib.nullcontext):
    """Bits per byte and loss (ValScore) of next-token prediction on rows of the val stream: row r is the window of
    tokens r * seq_len .. (r + 1) * seq_len, its inputs and its targets (shifted by one); the val_rows rows predict
    every target 1 .. n_val - 1 exactly once, the last row padded (the padding scores nothing). rows: the row indices
    to score (None: every row). Targets that are special tokens (0 bytes) count in no sum. autocast: a function
    returning the precision context of the forward."""
    rows = list(range(val_rows(val.n_tokens, seq_len)) if rows is None else rows)
    was_training = model.training
    model.eval()
    score = ValScore(val.source_names, np.zeros((len(val.source_names), 3)), total=val.n_tokens - 1)
    for first in range(0, len(rows), batch_rows):
        batch = np.asarray(rows[first:first + batch_rows], dtype=np.int64)
        buf = np.zeros((len(batch), seq_len + 1), dtype=np.int64)  # token 0 pads the last row: causal, so invisible
        for row, r in zip(buf, batch):
            part = val.read(r * seq_len, min(seq_len + 1, val.n_tokens - r * seq_len))  # never wraps around
            row[:len(part)] = part
        positions = batch[:, None] * seq_len + np.arange(1, seq_len + 1)  # stream position of each target
        real = positions < val.n_tokens
        with autocast():
            logits = model(torch.from_numpy(np.ascontiguousarray(buf[:, :-1])).to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), torch.from_numpy(buf[:, 1:].ravel()).to(device), reduction="none")
        score.add(val, positions.ravel(), loss.double().cpu().numpy(), (token_bytes[buf[:, 1:]] * real).ravel(), int(real.sum()))
    model.train(was_training)
    if score.targets == 0:
        raise ValueError(f"the val rows scored hold no target with bytes ({score.scored} targets)")
    return score


def crop_to_context(tokens, start, end, seq_len):
    """Rotary positions run past seq_len, but this model never saw a position beyond it in training, so a longer
    CORE sequence keeps its last seq_len tokens (as the gpt2 peer, and as lm-eval truncates to a model's context on
    the left); at least one token stays before the continuation, so a continuation longer than seq_len - 1 tokens is
    scored on its last seq_len - 1 tokens."""
    crop = max(0, len(tokens) - seq_len)
    return tokens[crop:], max(1, start - crop), end - crop


@torch.no_grad()
def sequence_scores(model, seqs, bos_id, device, autocast=contextlib.nullcontext):
    """(mean continuation loss, every continuation token argmax-right) of each (tokens, cont_start, cont_end), from
    one forward of them (cropped to the context) as rows padded on the right with <|bos|>. The model is causal, so
    the padding changes no scored position. An empty continuation has mean loss NaN."""
    seqs = [crop_to_context(*seq, model.cfg.seq_len) for seq in seqs]
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
        # cropped before batching, so rows are grouped by the length actually forwarded
        seqs = (crop_to_context(*core.sequence(s), model.cfg.seq_len) for _, _, a, k in examples for s in range(a, a + k))
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


# -----------------------------------------------------------------------------------------------------------------
# Run


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
    model = Llama(cfg, tok.vocab_size).to(device)
    opt = make_optimizer(model, cfg)
    forward = torch.compile(model) if cfg.compile else model
    micro = min(cfg.micro_batch_tokens, cfg.batch_tokens)
    accum, rows_per_forward = cfg.batch_tokens // micro, micro // cfg.seq_len
    total = max(1, cfg.train_tokens // cfg.batch_tokens)
    loader = TrainLoader(train_stream, rows_per_forward, cfg.seq_len, device)
    n_params, n_matrix = sum(p.numel() for p in model.parameters()), matrix_params(model)
    n_decayed = sum(p.numel() for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    log(f"model: {n_params:,} parameters ({n_matrix:,} in block matrices), vocab {tok.vocab_size}, {total} steps of "
        f"{cfg.batch_tokens:,} tokens ({accum} x {rows_per_forward} x {cfg.seq_len}), device {device}, bf16 {use_bf16}, world size 1")
    log(f"llama: {cfg.n_heads} query heads of {cfg.model_dim // cfg.n_heads} sharing {cfg.n_kv_heads} key/value heads, "
        f"SwiGLU hidden {swiglu_hidden(cfg.model_dim, cfg.ffn_multiple)}, {'parallel' if cfg.parallel_blocks else 'sequential'} "
        f"blocks, {'tied' if cfg.tie_embeddings else 'untied'} embeddings, rotary theta {cfg.rope_theta:g}, "
        f"{warmup_steps(cfg, total)} warmup steps, weight decay {cfg.weight_decay} on {n_decayed:,} matrix weights")
    log(f"data: {train_stream.n_tokens:,} train tokens, {val_stream.n_tokens:,} val tokens")

    # periodic evaluations score val_tokens worth of rows spread over the stream, the last one every val token
    subset = spread_rows(val_stream.n_tokens, cfg.seq_len, cfg.val_tokens)
    evaluate = lambda rows: evaluate_bpb(model, val_stream, tok.token_bytes, cfg.seq_len, rows_per_forward, device, rows, autocast)
    train_time, score = 0.0, None
    for step in range(total):
        lr = lr_at(cfg, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = loader.next_batch()
            with autocast():
                logits = forward(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
            loss.backward()
            step_loss += loss.detach()
        optimizer_step(model, opt, cfg.grad_clip)
        loss_value = step_loss.item()  # also waits for the GPU, so dt is the step's real time
        dt = time.perf_counter() - t0
        if step > 0 or total == 1:  # the first step includes compilation and allocator warmup
            train_time += dt
        if not math.isfinite(loss_value):
            log(f"step {step + 1}/{total}: loss is {loss_value}; stopping")
            sys.exit(2)
        if step % cfg.log_every == 0 or step == total - 1:
            log(f"step {step + 1}/{total} loss {loss_value:.4f} lr {lr:.2e} {cfg.batch_tokens / dt:,.0f} tok/s "
                f"eta {dt * (total - step - 1) / 60:.1f} min")
        if (step + 1) % cfg.val_every == 0 or step == total - 1:
            score = evaluate(None if step == total - 1 else subset)
            log(f"step {step + 1}/{total} {score.describe()}")

    from safetensors.torch import save_model  # save_model stores a tied embedding once
    tmp = os.path.join(cfg.run_dir, "model.safetensors.tmp")
    save_model(model, tmp, metadata={"config": json.dumps(dataclasses.asdict(cfg)), "vocab_size": str(tok.vocab_size)})
    os.replace(tmp, os.path.join(cfg.run_dir, "model.safetensors"))
    timed_steps = total - 1 if total > 1 else 1
    metrics = {"stack": "llama", "val_bpb": score.bpb, "val_loss": score.loss, "val_bpb_by_source": score.bpb_by_source(),
               "val_loss_tokens": score.targets, "train_tokens": total * cfg.batch_tokens,
               "params": n_params, "params_matrix": n_matrix, "tok_per_s": timed_steps * cfg.batch_tokens / train_time,
               "device": str(device), "world_size": 1, "pt_train_time_s": train_time}
    split = ", ".join(f"{n} {b:.4f}" for n, b in metrics["val_bpb_by_source"].items())
    summary = f"val bpb {score.bpb:.4f} over every val token (by source: {split}), val loss {score.loss:.4f}"
    if core is not None:
        t0 = time.time()
        out = evaluate_core(model, core, tok.bos_id, device, cfg.core_max_per_task, cfg.core_batch_tokens, autocast)
        log(format_core_table(out, core))
        log(f"CORE took {time.time() - t0:.0f}s")
        metrics.update(core=out["core"], core_per_task=out["centered"], core_max_per_task=cfg.core_max_per_task)
        summary += f", CORE {out['core']:.4f}"
    write_atomic(os.path.join(cfg.run_dir, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    log(f"llama done: {summary}, {metrics['train_tokens']:,} tokens, {n_params:,} params, "
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
