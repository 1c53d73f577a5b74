"""modded-nanogpt: the speedrun record's architecture, including the two attention features DecoderStack's main stack
leaves out for its KV cache (paired-head attention, the partial key offset), as a peer stack on the same data, bits
per byte, CORE and metrics.json keys. Pretraining and evaluation only. Single process.
Self-contained on purpose: it imports neither the main stack nor data/, so it can be diffed and frozen.

Everything else follows the main stack's form of modded-nanogpt (varlen attention over packed documents, half-
truncated RoPE with YaRN, QK-norm, value embeddings, bigram hash embedding, smear, U-net skips, sigmoid-softcapped
logits, multi-token prediction, staged batch/window schedule, NorMuon + Adam), so `diff` against it shows the three
additions: paired heads, key offset, attention-free layers.

Run:
    CPU (the main stack's cpu preset budget):  python train_modded.py --preset cpu --data-dir DIR --run-dir DIR
    one GPU (the record's model and stages):   python train_modded.py --preset gpu --data-dir DIR --run-dir DIR
Any field of Config can be overridden with --name=value (--flag / --no-flag for booleans, JSON for tuples).

Contents
    1. Config: one dataclass, presets, overrides
    2. Data: tokenizer metadata, pretrain shards, packed batches, the CORE file
    3. Attention over packed documents: FA3 / flex / SDPA; paired heads; the partial key offset
    4. Model
    5. Optimizer: NorMuon (Polar Express) for matrices, Adam for the rest
    6. Evaluation: bits per byte, CORE
    7. Run: schedule, training loop, metrics, the checkpoint
"""
import argparse
import contextlib
import dataclasses
import functools
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
    run_dir: str = "runs/modded-nanogpt"
    seed: int = 0
    device: str = "auto"               # auto: cuda -> mps -> cpu
    compile: bool = True
    attn_backend: str = "auto"         # auto (fa3 -> flex on CUDA, else sdpa) | fa3 | flex | sdpa
    # model: the record's (train_gpt.py)
    n_layers: int = 11
    model_dim: int = 768
    n_heads: int = 6
    head_dim: int = 128
    mlp_mult: int = 4
    vocab_multiple: int = 128
    long_window_layers: str = "3,10"   # the others use the short window
    paired_head_layers: str = "0,2,5,9"
    no_attn_layers: str = "6"          # MLP-only layers
    value_embed_layers: str = "1,2,8,9,10"
    key_offset: bool = True            # partial key offset in the long-window layers that are not paired
    bigram_rows_per_vocab: float = 7.5
    attn_scale: float = 0.1
    softcap: tuple = (23.0, 5.0, 7.5)  # logits = a * sigmoid((z + b) / c)
    # schedule: stages of (steps, batch tokens, max document length, short window, long window, lr multiplier,
    # MTP weights at the stage's start, at its end); the record's, in tokens (its windows are x128-token blocks)
    stages: tuple = (
        (423, 131072, 896, 128, 384, 1.0, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0)),
        (424, 262144, 2048, 384, 896, 1.52, (1.0, 0.5), (1.0, 0.0)),
        (423, 393216, 2048, 640, 1408, 1.73, (1.0,), (1.0,)),
        (15, 393216, 2048, 768, 1664, 1.73, (1.0,), (1.0,)),
    )
    micro_batch_tokens: int = 16384    # tokens per forward: the record's per-GPU batch of its first stage
    train_tokens: int = 0              # 0: as the stages say; N: rescale every stage's steps to N tokens in total
    cooldown_frac: float = 0.6         # lr is flat, then decays linearly to final_lr over this last fraction
    final_lr: float = 0.15
    untie_frac: float = 0.667          # embed and lm_head share weights until this fraction of the steps
    muon_lr: float = 0.023
    muon_wd: float = 0.028
    adam_lr: float = 0.008
    adam_wd: float = 0.006
    # evaluation and logging
    val_tokens: int = 10_485_760
    val_every: int = 250
    core_max_per_task: int = -1        # CORE examples per task after training (-1: all, 0: skip CORE)
    core_batch_tokens: int = 32768     # tokens per packed CORE forward
    log_every: int = 10


PRESETS = {
    "gpu": {},
    # the main stack's cpu preset (layers, width, matrices, stages: 150 steps x 4096 tokens, val tokens, CORE
    # examples) with 4 heads of 48 instead of 3 of 64, since heads pair up; fp32
    "cpu": dict(n_layers=4, model_dim=192, n_heads=4, head_dim=48, long_window_layers="3", paired_head_layers="0,2",
                no_attn_layers="", value_embed_layers="1,2,3", bigram_rows_per_vocab=2.0, micro_batch_tokens=4096,
                stages=((50, 4096, 256, 64, 128, 1.0, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0)),
                        (50, 4096, 512, 128, 256, 1.0, (1.0, 0.5), (1.0, 0.0)),
                        (50, 4096, 512, 128, 512, 1.0, (1.0,), (1.0,))),
                val_every=75, val_tokens=131072, log_every=10, compile=False, core_max_per_task=50, core_batch_tokens=8192),
}


def parse_config(argv=None):
    """--preset picks the defaults, then every --name=value (or --name value) overrides one field."""
    parser = argparse.ArgumentParser(description="modded-nanogpt peer stack (see the header of this file)")
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
    if parse_ints(cfg.paired_head_layers) and cfg.n_heads % 2:
        parser.error(f"paired-head layers need an even --n-heads, got {cfg.n_heads}")
    if cfg.head_dim % 4 or cfg.model_dim < 12:
        parser.error("--head-dim must be a multiple of 4 and --model-dim at least 12 (the gates read 12 channels)")
    if cfg.attn_backend not in ("auto", "fa3", "flex", "sdpa"):
        parser.error(f"--attn-backend {cfg.attn_backend!r}: choose auto, fa3, flex or sdpa")
    if set(parse_ints(cfg.no_attn_layers)) & set(parse_ints(cfg.value_embed_layers)):
        parser.error("a value-embedding layer needs attention: --no-attn-layers and --value-embed-layers overlap")
    for s in cfg.stages:
        if s[1] % min(cfg.micro_batch_tokens, s[1]):
            parser.error(f"stage batch {s[1]} is not a multiple of --micro-batch-tokens {cfg.micro_batch_tokens}")
    return cfg


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def parse_tuple(text):
    try:
        return freeze(json.loads(text))
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r} ({e.msg})") from None


def freeze(value):
    """JSON lists -> nested tuples, the form of the tuple fields of Config."""
    return tuple(freeze(x) for x in value) if isinstance(value, list) else value


def parse_ints(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


# =================================================================================================================
# 2. Data: the tokenizer's metadata, the pretrain shards and the CORE file (formats in data/README.md)

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
        raise DataError(f"{directory}/manifest.json: no {split} tokens")
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


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor         # (T,) token ids of packed documents
    prev_ids: torch.Tensor    # (T,) previous token of the same document, -1 at a document start
    positions: torch.Tensor   # (T,) position inside the attention segment
    targets: torch.Tensor     # (T, K) token k+1 ahead, -1 where that crosses a document end
    cu_seqlens: torch.Tensor  # int32 segment starts, padded to a static length by repeating T
    max_seqlen: int           # bound on the segment lengths


def padded_cu_seqlens(starts, T):
    """Segment starts then T, repeated to a power of two >= 128, so torch.compile sees few distinct shapes."""
    cu = np.full(max(128, 1 << len(starts).bit_length()), T, dtype=np.int32)
    cu[:len(starts)] = starts
    return cu


def make_batch(buf, bos_id, max_doc_len, n_targets, device):
    """A packed batch from a window of T + n_targets tokens: attention segments start at every <|bos|> and every
    max_doc_len tokens inside a document (long documents are trained on whole, in pieces)."""
    T = len(buf) - n_targets
    ids = buf[:T]
    is_bos = ids == bos_id
    doc_starts = np.flatnonzero(is_bos).tolist()
    starts = sorted({s for a, b in zip([0] + doc_starts, doc_starts + [T]) for s in range(a, b, max_doc_len)})
    positions = np.arange(T) - np.asarray(starts)[np.searchsorted(starts, np.arange(T), side="right") - 1]
    prev = np.concatenate([[-1], ids[:-1]])
    prev[is_bos] = -1
    # target k (k tokens beyond the next one) is kept while no <|bos|> lies between it and the input
    bos_seen = np.cumsum(buf == bos_id)
    targets = np.stack([buf[1 + k:T + 1 + k] for k in range(n_targets)], axis=1)
    for k in range(1, n_targets):
        targets[bos_seen[k:T + k] != bos_seen[:T], k] = -1
    as_tensor = lambda a, dtype=torch.long: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)
    return Batch(as_tensor(ids), as_tensor(prev), as_tensor(positions), as_tensor(targets),
                 as_tensor(padded_cu_seqlens(starts, T), torch.int32), min(max_doc_len, T))


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
# 3. Attention over packed documents. q, k, v: (T, H, D); cu_seqlens: int32 segment starts ending in T (padded by
# repeating T). Query i attends key j iff both lie in one segment, j <= i and i - j <= window: FlashAttention's
# varlen causal attention with window_size=(window, 0).


@functools.cache
def flash_attn3():
    """FA3 from the HF kernels hub, as the record loads it; None where it cannot be had (no GPU, offline, ...)."""
    try:
        from kernels import get_kernel
        return get_kernel("kernels-community/flash-attn3", version=1).flash_attn_interface
    except Exception:
        return None


def select_backend(device, requested):
    if requested == "fa3" and flash_attn3() is None:
        raise RuntimeError("attention backend fa3: FA3 could not be loaded from the kernels hub (needs a CUDA GPU)")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"  # flex_attention has no CPU backward
    return "fa3" if flash_attn3() is not None else "flex"


def segment_ids(cu_seqlens, T):
    return torch.searchsorted(cu_seqlens, torch.arange(T, dtype=cu_seqlens.dtype, device=cu_seqlens.device), right=True)


def sdpa_attention(q, k, v, cu_seqlens, window, scale, reach, block=256):
    """SDPA with a boolean mask, queries in blocks of `block` that each see their band of block + reach keys (reach:
    how far back any query can see), so the work grows as T * (block + reach), not T^2."""
    T, H, D = q.shape
    n = -(-T // block)
    pad = n * block - T
    seg = segment_ids(cu_seqlens, T)
    # keys get `reach` slots on the left (segment -2: matches nothing); padded queries (segment -1) see themselves
    seg_q = F.pad(seg, (0, pad), value=-1)
    seg_k = F.pad(F.pad(seg, (reach, 0), value=-2), (0, pad), value=-1)
    k, v = (F.pad(x, (0, 0, 0, 0, reach, pad)) for x in (k, v))
    kb, vb = (x.unfold(0, block + reach, block).permute(0, 1, 3, 2) for x in (k, v))  # (n, H, block + reach, D)
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(n, block, H, D).transpose(1, 2)          # (n, H, block, D)
    i = torch.arange(n * block, device=q.device).view(n, block)
    j = i[:, :1] - reach + torch.arange(block + reach, device=q.device)
    mask = (seg_q.view(n, block)[:, :, None] == seg_k.unfold(0, block + reach, block)[:, None, :])
    mask &= (j[:, None, :] <= i[:, :, None]) & (i[:, :, None] - j[:, None, :] <= window)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale)
    return y.transpose(1, 2).reshape(n * block, H, D)[:T]


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def flex(q, k, v, cu_seqlens, window, scale):
        seg, T = segment_ids(cu_seqlens, q.size(0)), q.size(0)
        mask_mod = lambda b, h, i, j: (seg[i] == seg[j]) & (j <= i) & (i - j <= window)
        block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device)
        q, k, v = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)[0].transpose(0, 1)
    return torch.compile(flex)


def attention(q, k, v, cu_seqlens, max_seqlen, window, scale, backend):
    """Causal sliding-window attention within the segments of a packed batch; returns (T, H, D)."""
    window = min(window, q.size(0))
    if backend == "fa3":
        out = flash_attn3().flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                                   max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True,
                                                   softmax_scale=scale, window_size=(window, 0))
        return out[0] if isinstance(out, tuple) else out
    if backend == "flex":
        return compiled_flex()(q, k, v, cu_seqlens, window, scale)
    return sdpa_attention(q, k, v, cu_seqlens, window, scale, min(window, max(1, max_seqlen) - 1))


def pair_heads(x):
    """Paired-head attention's layout, the record's reshape: (T, H, D) -> (2T, H/2, D). Token t's heads 0..H/2-1 fill
    slot 2t and heads H/2..H-1 slot 2t+1; head h lands in head h mod H/2 of its slot. So heads h and h + H/2 form one
    head over a sequence twice as long: a query sees both heads' keys at earlier tokens, its own, and (from slot 2t+1)
    its partner's at its own token."""
    T, H, D = x.shape
    return x.reshape(2 * T, H // 2, D)


def paired_rotary_positions(positions, n_heads):
    """(T, H) rotary positions of paired layers, the record's: head h of token t rotates as position 2t + (h mod 2)
    (its Yarn(paired=True) rotates each adjacent head pair as positions 2t and 2t+1, before pair_heads)."""
    return 2 * positions[:, None] + torch.arange(n_heads, device=positions.device) % 2


def partial_key_offset(k, prev_ids, stationary):
    """The partial key offset: the position-free (zero rotary frequency) dims of each key are replaced by those of the
    previous token's key, so a query can match "the token after X" in one layer (1-layer induction heads). A
    document's first token keeps its own. k: (T, H, D); stationary: bool (D,)."""
    shifted = torch.where((prev_ids >= 0)[:, None, None], torch.cat([k[:1], k[:-1]]), k)
    return torch.where(stationary, shifted, k)


# =================================================================================================================
# 4. Model: the record's architecture (above), in the main stack's form.


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Half-truncated RoPE: the first half of each head's dims rotate (periods from 2*pi to 2*pi*1024 tokens), the
    other half carry position-free content; `yarn` stretches the slow frequencies when the window grows."""

    def __init__(self, head_dim):
        super().__init__()
        n_rot = head_dim // 4
        freqs = torch.cat([(1 / 1024) ** torch.linspace(0, 1, n_rot), torch.zeros(head_dim // 2 - n_rot)])
        self.register_buffer("freqs", freqs)

    def stationary(self):
        """bool (head_dim,): dims that never rotate (dim i turns with dim i + head_dim/2 at frequency i)."""
        return (self.freqs == 0).repeat(2)

    def yarn(self, old_window, new_window, alpha=1.0, beta=32.0):
        """Interpolate the frequencies that turn fewer than `beta` times inside the old window (YaRN); returns the
        factor by which the attention scale grows."""
        rotations = old_window * self.freqs / (2 * math.pi)
        ramp = ((rotations - alpha) / (beta - alpha)).clamp(0, 1)
        s = old_window / new_window
        self.freqs.mul_(s + ramp * (1 - s))
        return 0.2 * math.log(new_window / old_window) + 1

    def forward(self, x, positions):
        """x: (T, H, D); positions: (T, 1) or (T, H)."""
        angles = positions.to(self.freqs.dtype)[..., None] * self.freqs
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg, has_attn, has_value_embed):
        super().__init__()
        inner, dim = cfg.n_heads * cfg.head_dim, cfg.model_dim
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        bound = math.sqrt(3) * 0.5 / math.sqrt(dim)  # uniform with std 0.5/sqrt(dim)
        if has_attn:
            self.q, self.k, self.v = (nn.Parameter(torch.empty(inner, dim).uniform_(-bound, bound)) for _ in range(3))
            self.o = nn.Parameter(torch.zeros(dim, inner))  # zero-init output projections: each block starts as identity
            self.attn_gate = nn.Parameter(torch.zeros(cfg.n_heads, 12))  # per-head output gate, starts at 0.5
        self.ve_gate = nn.Parameter(torch.zeros(cfg.n_heads, 12)) if has_value_embed else None  # starts at 1
        self.fc = nn.Parameter(torch.empty(cfg.mlp_mult * dim, dim).uniform_(-bound, bound))
        self.proj = nn.Parameter(torch.zeros(dim, cfg.mlp_mult * dim))
        self.has_attn = has_attn

    def forward(self, x, ve, rotary, batch, attn_scale, window, paired, offset_keys, backend):
        if self.has_attn:
            h = norm(x)
            heads = (x.size(0), self.n_heads, self.head_dim)
            q, k, v = (h @ self.q.T).view(heads), (h @ self.k.T).view(heads), (h @ self.v.T).view(heads)
            positions = paired_rotary_positions(batch.positions, self.n_heads) if paired else batch.positions[:, None]
            q, k = rotary(norm(q), positions), rotary(norm(k), positions)  # QK-norm, then rotate
            if offset_keys:
                k = partial_key_offset(k, batch.prev_ids, rotary.stationary())
            if ve is not None:
                v = v + 2 * torch.sigmoid(h[..., :12] @ self.ve_gate.T)[..., None] * ve.view_as(v)
            if paired:  # twice the sequence, half the heads: the window (in slots) covers half as many tokens
                y = attention(pair_heads(q), pair_heads(k), pair_heads(v), 2 * batch.cu_seqlens, 2 * batch.max_seqlen,
                              window, attn_scale, backend).reshape(heads)
            else:
                y = attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, window, attn_scale, backend)
            y = y * torch.sigmoid(h[..., :12] @ self.attn_gate.T)[..., None]
            x = x + y.flatten(-2) @ self.o.T
        return x + F.relu(norm(x) @ self.fc.T).square() @ self.proj.T


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple  # matmul-friendly rows; extra ids never occur
        dim, L = cfg.model_dim, cfg.n_layers
        self.value_embed_layers = [i for i in parse_ints(cfg.value_embed_layers) if i < L]
        self.long_window_layers = {i for i in parse_ints(cfg.long_window_layers) if i < L}
        self.paired_head_layers = {i for i in parse_ints(cfg.paired_head_layers) if i < L}
        no_attn = set(parse_ints(cfg.no_attn_layers))
        self.blocks = nn.ModuleList(Block(cfg, i not in no_attn, i in self.value_embed_layers) for i in range(L))
        self.lm_head = nn.Parameter(torch.randn(padded, dim) * 0.005)
        self.embed = nn.Parameter(self.lm_head.detach().clone())  # used once untied; until then lm_head serves both
        self.value_embeds = nn.Parameter(torch.randn(len(self.value_embed_layers), padded, cfg.n_heads * cfg.head_dim) * 0.01)
        self.bigram_rows = max(2, int(cfg.bigram_rows_per_vocab * vocab_size))
        self.bigram_embed = nn.Parameter(torch.zeros(self.bigram_rows, dim))
        self.smear_gate = nn.Parameter(torch.zeros(12))
        # residual mixing per block: x = a*x + b*x0 + c*bigram; U-net skips from the first half into the second
        self.block_lambdas = nn.Parameter(torch.tensor([[1.0, 0.0, 0.05]] * L))
        self.skip_weights = nn.Parameter(torch.ones(L // 2))
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.rotary = Rotary(cfg.head_dim)
        # state that changes during training lives in buffers (saved in the checkpoint) mirrored by Python values
        self.register_buffer("attn_scale", torch.tensor(cfg.attn_scale))
        self.register_buffer("tied", torch.tensor(True))
        self.sync_flags()

    def sync_flags(self):
        self.is_tied, self.scale = bool(self.tied), float(self.attn_scale)

    def untie(self):
        """Give the input embedding its own weights (a copy of lm_head); the optimizer copies the state too."""
        with torch.no_grad():
            self.embed.copy_(self.lm_head)
        self.tied.fill_(False)
        self.sync_flags()

    def grow_window(self, old_window, new_window):
        self.attn_scale.mul_(self.rotary.yarn(old_window, new_window))
        self.sync_flags()

    def windows(self, short_window, long_window):
        return [long_window if i in self.long_window_layers else short_window for i in range(self.cfg.n_layers)]

    def bigram_ids(self, ids, prev_ids):
        """Hash of (previous token, token); a document start (prev_ids < 0) gets the reserved last row."""
        h = ((36313 * ids) ^ (27191 * prev_ids.clamp(min=0))) % (self.bigram_rows - 1)
        return torch.where(prev_ids < 0, self.bigram_rows - 1, h)

    def hidden(self, batch, windows, backend="sdpa"):
        """Final hidden states (T, dim) of the packed documents of `batch` (ids, prev_ids, positions, cu_seqlens,
        max_seqlen); windows: per layer."""
        ids, prev_ids = batch.ids, batch.prev_ids
        embed = self.lm_head if self.is_tied else self.embed
        e = F.embedding(ids, embed)
        # smear: each token takes a gated share of the previous token's embedding (not across documents)
        before = torch.where((prev_ids >= 0)[:, None], F.embedding(prev_ids.clamp(min=0), embed), 0.0)
        e = e + self.smear_lambda * torch.sigmoid(e[..., :12] @ self.smear_gate)[..., None] * before
        x = x0 = norm(e)
        bigram = F.embedding(self.bigram_ids(ids, prev_ids), self.bigram_embed)
        skips, L = [], self.cfg.n_layers
        for i, block in enumerate(self.blocks):
            if i >= L - L // 2 and skips:
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            a, b, c = self.block_lambdas[i]
            x = a * x + b * x0 + c * bigram
            ve = F.embedding(ids, self.value_embeds[self.value_embed_layers.index(i)]) if i in self.value_embed_layers else None
            paired = i in self.paired_head_layers
            # the record shifts keys in its long-window layers; its paired layers have no key offset
            offset_keys = self.cfg.key_offset and i in self.long_window_layers and not paired
            x = block(x, ve, self.rotary, batch, self.scale, windows[i], paired, offset_keys, backend)
            if i < L // 2:
                skips.append(x)
        return norm(x)

    def logits(self, h):
        a, b, c = self.cfg.softcap
        return a * torch.sigmoid((h @ self.lm_head[:self.vocab_size].T + b) / c)


def train_loss(model, batch, windows, mtp_weights, backend):
    """Mean over tokens of the MTP-weighted softcapped cross entropy: weight k on the token k+1 ahead (skipped
    where that lies in the next document)."""
    u = model.logits(model.hidden(batch, windows, backend)).float()
    losses = [w * F.cross_entropy(u, batch.targets[:, k], ignore_index=-1, reduction="sum") for k, w in enumerate(mtp_weights)]
    return sum(losses) / batch.ids.numel()


# =================================================================================================================
# 5. Optimizer: NorMuon (Polar Express) for matrices, Adam for everything else; modded-nanogpt's table of labels

# Polar Express (Amsel et al., arXiv:2505.16932): the odd polynomial a x + b x^3 + c x^5 applied to the singular
# values per iteration; computed for 5 iterations, safety factor 2e-2, cushion 2.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G):
    """Approximately orthogonalise a stack of matrices (K, rows, cols): U S V^T -> ~U V^T. bf16 on the GPU, fp32
    elsewhere (bf16 matmuls are ~100x slower on a CPU); returns fp32."""
    X = G.bfloat16() if G.is_cuda else G
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X  # iterate on the wide orientation: the Gram matrix X X^T is the small one
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if tall else X).float()


def normuon_update(p, g, momentum, second_moment, mu, beta2, lr, wd, eps=1e-10):
    """One NorMuon step on a stack of matrices (K, rows, cols), all fp32; updates the state in place and returns the
    new parameter values. second_moment is (K, rows, 1) if rows >= cols else (K, 1, cols)."""
    momentum.lerp_(g, 1 - mu)
    V = polar_express(g.lerp(momentum, mu))  # Nesterov
    # divide each row (or column, along the larger dim) by its running RMS, then restore the update's norm
    red_dim = -1 if V.size(-2) >= V.size(-1) else -2
    second_moment.lerp_(V.square().mean(dim=red_dim, keepdim=True), 1 - beta2)
    norm_before = V.norm(dim=(-2, -1), keepdim=True)
    V = V * second_moment.clamp_min(eps).rsqrt()
    V = V * (norm_before / V.norm(dim=(-2, -1), keepdim=True).clamp_min(eps))
    # cautious weight decay (only weights the update already pushes towards zero), linear in lr
    return p - lr * (V + wd * ((V * p) > 0) * p)


def adam_update(p, g, exp_avg, exp_avg_sq, step, betas, lr, wd, eps=1e-10):
    """One bias-corrected Adam step with cautious weight decay, all fp32; returns the new parameter values."""
    beta1, beta2 = betas
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    update = exp_avg / (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5 + eps) * (lr / (1 - beta1 ** step))
    return p - update - lr * wd * ((update * p) > 0) * p


def param_label(name):
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("blocks."):
        return {"q": "attn_qk", "k": "attn_qk", "v": "attn", "o": "attn", "fc": "mlp_fc", "proj": "mlp_proj"}.get(leaf, "gate")
    return {"lm_head": "lm_head", "embed": "embed", "value_embeds": "value_embed", "bigram_embed": "bigram",
            "smear_gate": "gate"}.get(leaf, "scalar")


def optimizer_labels(cfg):
    """label -> (rule, lr, lr multiplier, decay, betas): modded-nanogpt's table as the main stack states it (decay
    linear in lr; mlp_proj x4 as the record's storage gets x2 from its shape and x2 more)."""
    muon = lambda lr_mul=1.0: ("normuon", cfg.muon_lr * lr_mul, cfg.muon_wd, None)
    adam = lambda betas, lr_mul=1.0, wd_mul=0.0: ("adam", cfg.adam_lr * lr_mul, cfg.adam_wd * wd_mul, betas)
    return {"attn_qk": muon(), "attn": muon(), "mlp_fc": muon(), "mlp_proj": muon(4.0),
            "lm_head": adam((0.5, 0.95), wd_mul=1.0), "embed": adam((0.5, 0.95), wd_mul=1.0),
            "value_embed": adam((0.75, 0.95), 75, 2.5), "bigram": adam((0.75, 0.95), 75, 2.5),
            "gate": adam((0.9, 0.99)), "scalar": adam((0.9, 0.99), 5)}


class NorMuonAdam:
    """Per parameter: NorMuon on its matrices or Adam elementwise. Q and K are orthogonalised per pair of adjacent
    heads ((H/2, 2*head_dim, dim), the record's qk_bank), the other matrices whole. A parameter without a gradient
    (the unused input embedding while tied) is skipped."""

    def __init__(self, model, cfg):
        self.labels = optimizer_labels(cfg)
        self.params, self.state = {}, {}
        for name, p in model.named_parameters():
            rule, *_ = self.labels[param_label(name)]
            pair = (2 * cfg.head_dim, cfg.model_dim) if param_label(name) == "attn_qk" else tuple(p.shape)
            shape = (-1, *pair) if rule == "normuon" else tuple(p.shape)
            self.params[name] = (p, param_label(name), shape)
            if rule == "normuon":
                K, rows, cols = p.view(shape).shape
                self.state[name] = dict(momentum=torch.zeros(K, rows, cols, device=p.device),
                                        second_moment=torch.zeros(K, *((rows, 1) if rows >= cols else (1, cols)), device=p.device))
            else:
                self.state[name] = dict(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=0)

    @torch.no_grad()
    def step(self, lr_factor, mu):
        for name, (p, label, shape) in self.params.items():
            if p.grad is None:
                continue
            rule, lr, wd, betas = self.labels[label]
            st, lr = self.state[name], lr * lr_factor
            if rule == "normuon":
                rows, cols = shape[-2:]
                new = normuon_update(p.view(shape), p.grad.view(shape), st["momentum"], st["second_moment"], mu, 0.9,
                                     lr * max(1.0, rows / cols) ** 0.5, wd)
            else:
                st["step"] += 1
                new = adam_update(p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], betas, lr, wd)
            p.copy_(new.view_as(p))

    def zero_grad(self):
        for p, _, _ in self.params.values():
            p.grad = None

    def copy_state(self, src, dst):
        self.state[dst] = {k: v.clone() if torch.is_tensor(v) else v for k, v in self.state[src].items()}


def muon_momentum(step, total_steps, warmup=300, cooldown=50, low=0.85, high=0.95):
    """NorMuon momentum: linear low->high over the first `warmup` steps, high->low over the last `cooldown` steps."""
    if step < warmup:
        return low + (high - low) * step / warmup
    if step > total_steps - cooldown:
        return high - (high - low) * (step - (total_steps - cooldown)) / cooldown
    return high


# =================================================================================================================
# 6. Evaluation


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


def val_rows(n_val, T):
    """Rows of the val stream: row r is the batch of tokens r * T .. (r + 1) * T, which predicts targets r * T + 1 ..
    (r + 1) * T; together every target."""
    return -(-(n_val - 1) // T)


def spread_rows(n_val, T, n_tokens):
    """n_tokens worth of val rows (every row when that covers the stream), evenly spaced from the first row to the
    last, as the main stack picks them: a periodic evaluation on them draws from every part of the val stream, whose
    documents come source after source."""
    n_rows = val_rows(n_val, T)
    if n_tokens >= n_val - 1:
        return list(range(n_rows))
    return np.unique(np.linspace(0, n_rows - 1, max(1, n_tokens // T)).round().astype(np.int64)).tolist()


@torch.no_grad()
def evaluate_bpb(model, val, tok, T, windows, max_doc_len, device, backend, rows=None, autocast=contextlib.nullcontext):
    """Bits per byte and loss (ValScore) of next-token prediction on rows of the val stream: row r is the batch of
    tokens r * T .. (r + 1) * T packed like a training batch (segments at every <|bos|> and every max_doc_len), which
    predicts targets r * T + 1 .. (r + 1) * T; the val_rows rows predict every target 1 .. n_val - 1 exactly once,
    the last row padded (the padding scores nothing). rows: the row indices to score (None: every row). Targets that
    are special tokens (0 bytes) count in no sum."""
    rows = range(val_rows(val.n_tokens, T)) if rows is None else rows
    was_training = model.training
    model.eval()
    score = ValScore(val.source_names, np.zeros((len(val.source_names), 3)), total=val.n_tokens - 1)
    for r in rows:
        part = val.read(r * T, min(T + 1, val.n_tokens - r * T))  # never wraps around
        # token 0 pads the last row to T: everything here (attention, smear, bigram, key offset) looks only back,
        # so the padding changes no real position, and the batch keeps the shape torch.compile and FA3 have seen
        buf = np.concatenate([part, np.zeros(T + 1 - len(part), dtype=np.int64)])
        b = make_batch(buf, tok.bos_id, max_doc_len, 1, device)
        with autocast():
            loss = F.cross_entropy(model.logits(model.hidden(b, windows, backend)).float(), b.targets[:, 0], reduction="none")
        positions = r * T + np.arange(1, T + 1)  # stream position of each target
        real = positions < val.n_tokens
        score.add(val, positions, loss.double().cpu().numpy(), tok.token_bytes[buf[1:]] * real, int(real.sum()))
    model.train(was_training)
    if score.targets == 0:
        raise ValueError(f"the val rows scored hold no target with bytes ({score.scored} targets)")
    return score


def packed_sequences(sequences, device):
    """Token arrays packed back to back, each its own document (no padding), as a Batch without targets."""
    lengths = [len(t) for t in sequences]
    starts = np.cumsum([0] + lengths)
    ids = np.concatenate(sequences)
    prev = np.concatenate([[-1], ids[:-1]])
    prev[starts[:-1]] = -1  # every sequence is a document (left-truncated ones do not start with <|bos|>)
    positions = np.concatenate([np.arange(n) for n in lengths])
    as_tensor = lambda a, dtype=torch.long: torch.from_numpy(np.asarray(a)).to(device=device, dtype=dtype)
    return Batch(as_tensor(ids), as_tensor(prev), as_tensor(positions), None,
                 as_tensor(padded_cu_seqlens(starts[:-1], int(starts[-1])), torch.int32), max(lengths))


@torch.no_grad()
def sequence_scores(model, seqs, windows, device, backend, autocast=contextlib.nullcontext):
    """(mean continuation loss, every continuation token argmax-right) of each (tokens, cont_start, cont_end), from
    one forward of them packed as separate documents. An empty continuation has mean loss NaN."""
    batch = packed_sequences([t for t, _, _ in seqs], device)
    offsets = np.cumsum([0] + [len(t) for t, _, _ in seqs])
    rows = torch.from_numpy(np.concatenate([o + np.arange(s - 1, e - 1) for o, (_, s, e) in zip(offsets, seqs)]).astype(np.int64)).to(device)
    with autocast():
        logits = model.logits(model.hidden(batch, windows, backend)[rows]).float()  # position i predicts token i + 1
    targets = batch.ids[rows + 1]
    losses, right = F.cross_entropy(logits, targets, reduction="none").cpu(), (logits.argmax(-1) == targets).cpu()
    scores, i = [], 0
    for _, start, end in seqs:
        scores.append((losses[i:i + end - start].mean().item(), bool(right[i:i + end - start].all())))
        i += end - start
    return scores


def token_batches(seqs, batch_tokens):
    """Consecutive sequences grouped into batches of up to batch_tokens tokens (a longer sequence goes alone)."""
    batch, used = [], 0
    for seq in seqs:
        if batch and used + len(seq[0]) > batch_tokens:
            yield batch
            batch, used = [], 0
        batch.append(seq)
        used += len(seq[0])
    if batch:
        yield batch


def core_decision(task_type, gold, mean_losses, all_right):
    """nanochat's rule. multiple_choice / schema: the option with the lowest mean continuation loss is the answer
    (an empty continuation's NaN wins only when it comes first, as min() and index() make it in nanochat).
    language_modeling (one sequence): correct iff every greedy prediction over the continuation is right."""
    if task_type == "language_modeling":
        return all_right[0]
    return mean_losses.index(min(mean_losses)) == gold


@torch.no_grad()
def evaluate_core(model, core, windows, device, backend, max_per_task=-1, batch_tokens=32768, autocast=contextlib.nullcontext):
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
        scores = [sc for batch in token_batches(seqs, batch_tokens) for sc in sequence_scores(model, batch, windows, device, backend, autocast)]
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
# 7. Run


@dataclasses.dataclass
class StepPlan:
    batch_tokens: int
    max_doc_len: int
    short_window: int
    long_window: int
    lr_factor: float
    mtp_weights: list


def scaled_stages(cfg):
    """The stages, with step counts rescaled so that they add up to --train-tokens when it is set."""
    stages = [list(s) for s in cfg.stages]
    if cfg.train_tokens:
        factor = cfg.train_tokens / sum(s[0] * s[1] for s in stages)
        for s in stages:
            s[0] = max(1, round(s[0] * factor))
    return stages


def plan_step(cfg, stages, step):
    """Batch, document length, windows, lr factor (flat, then the cooldown to final_lr) and MTP weights of a step."""
    total, start = sum(s[0] for s in stages), 0
    for index, (steps, batch, doc_len, short, long_, lr_mul, mtp_start, mtp_end) in enumerate(stages):
        if step < start + steps or index == len(stages) - 1:
            break
        start += steps
    t = (step - start) / max(1, steps - 1)
    mtp = [a + t * (b - a) for a, b in zip(mtp_start, mtp_end)]
    while len(mtp) > 1 and mtp[-1] == 0:  # a horizon whose weight reached 0 costs nothing: drop it
        mtp.pop()
    cooldown_start = total * (1 - cfg.cooldown_frac)
    frac = min(1.0, max(0.0, (step - cooldown_start) / max(1, total - 1 - cooldown_start)))
    return StepPlan(batch, doc_len, short, long_, lr_mul * (1 - frac) + cfg.final_lr * frac, mtp)


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
    backend = select_backend(device, cfg.attn_backend)
    os.makedirs(cfg.run_dir, exist_ok=True)
    log_file = open(os.path.join(cfg.run_dir, "log.txt"), "w", encoding="utf-8")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()  # fp32 elsewhere: bf16 CPU matmuls are slow
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    torch.manual_seed(cfg.seed)
    model = GPT(cfg, tok.vocab_size).to(device)
    opt = NorMuonAdam(model, cfg)
    loss_fn = torch.compile(train_loss) if cfg.compile else train_loss
    stages = scaled_stages(cfg)
    total = sum(s[0] for s in stages)
    untie_step = round(cfg.untie_frac * total)
    n_params = sum(p.numel() for p in model.parameters())
    n_matrix = sum(p.numel() for n, p in model.named_parameters() if param_label(n) in ("attn_qk", "attn", "mlp_fc", "mlp_proj"))
    log(f"model: {n_params:,} parameters ({n_matrix:,} in NorMuon matrices), vocab {tok.vocab_size}, paired-head layers "
        f"{sorted(model.paired_head_layers)}, {total} steps, attention backend {backend}, device {device}, bf16 {use_bf16}, world size 1")
    log(f"data: {train_stream.n_tokens:,} train tokens, {val_stream.n_tokens:,} val tokens")

    # periodic evaluations score val_tokens worth of rows spread over the stream, the last one every val token
    subset = spread_rows(val_stream.n_tokens, cfg.micro_batch_tokens, cfg.val_tokens)
    pos, train_time, score, train_tokens = 0, 0.0, None, 0
    for step in range(total):
        p = plan_step(cfg, stages, step)
        if step > 0:
            before = plan_step(cfg, stages, step - 1)
            if p.long_window != before.long_window:
                model.grow_window(before.long_window, p.long_window)
        if step == untie_step and model.is_tied:
            model.untie()
            opt.copy_state("lm_head", "embed")
        windows = model.windows(p.short_window, p.long_window)
        T = min(cfg.micro_batch_tokens, p.batch_tokens)
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        mtp_weights = torch.tensor(p.mtp_weights, device=device)
        for _ in range(p.batch_tokens // T):
            batch = make_batch(train_stream.read(pos, T + len(p.mtp_weights)), tok.bos_id, p.max_doc_len, len(p.mtp_weights), device)
            pos += T
            with autocast():
                loss = loss_fn(model, batch, windows, mtp_weights, backend) / (p.batch_tokens // T)
            loss.backward()
            step_loss += loss.detach()
        if not torch.isfinite(step_loss):
            log(f"step {step + 1}/{total}: loss is {step_loss.item()}; stopping")
            sys.exit(2)
        opt.step(p.lr_factor, muon_momentum(step, total))
        opt.zero_grad()
        loss_value = step_loss.item()
        dt = time.perf_counter() - t0
        train_tokens += p.batch_tokens
        if step > 0 or total == 1:  # the first step includes compilation and allocator warmup
            train_time += dt
        if step % cfg.log_every == 0 or step == total - 1:
            log(f"step {step + 1}/{total} loss {loss_value:.4f} lr {p.lr_factor:.3f} {p.batch_tokens / dt:,.0f} tok/s "
                f"eta {dt * (total - step - 1) / 60:.1f} min")
        if (step + 1) % cfg.val_every == 0 or step == total - 1:
            score = evaluate_bpb(model, val_stream, tok, cfg.micro_batch_tokens, windows, p.max_doc_len, device, backend,
                                 None if step == total - 1 else subset, autocast)
            log(f"step {step + 1}/{total} {score.describe()}")

    from safetensors.torch import save_file
    tmp = os.path.join(cfg.run_dir, "model.safetensors.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp,
              metadata={"config": json.dumps(dataclasses.asdict(cfg)), "vocab_size": str(tok.vocab_size)})
    os.replace(tmp, os.path.join(cfg.run_dir, "model.safetensors"))
    timed_tokens = train_tokens - stages[0][1] if total > 1 else train_tokens
    metrics = {"stack": "modded-nanogpt", "val_bpb": score.bpb, "val_loss": score.loss, "val_bpb_by_source": score.bpb_by_source(),
               "val_loss_tokens": score.targets, "train_tokens": train_tokens,
               "params": n_params, "params_matrix": n_matrix, "tok_per_s": timed_tokens / train_time,
               "device": str(device), "attn_backend": backend, "world_size": 1, "pt_train_time_s": train_time}
    split = ", ".join(f"{n} {b:.4f}" for n, b in metrics["val_bpb_by_source"].items())
    summary = f"val bpb {score.bpb:.4f} over every val token (by source: {split}), val loss {score.loss:.4f}"
    if core is not None:
        t0 = time.time()
        out = evaluate_core(model, core, windows, device, backend, cfg.core_max_per_task, cfg.core_batch_tokens, autocast)
        log(format_core_table(out, core))
        log(f"CORE took {time.time() - t0:.0f}s")
        metrics.update(core=out["core"], core_per_task=out["centered"], core_max_per_task=cfg.core_max_per_task)
        summary += f", CORE {out['core']:.4f}"
    write_atomic(os.path.join(cfg.run_dir, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    log(f"modded-nanogpt done: {summary}, {train_tokens:,} tokens, {n_params:,} params, {metrics['tok_per_s']:,.0f} tok/s "
        f"on {device}; wrote {cfg.run_dir}/metrics.json and model.safetensors")
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
