"""DecoderStack: one file that pretrains a decoder on pre-tokenized shards, evaluates it (bits per byte, CORE),
fine-tunes it for chat and generates with a KV cache. Data is prepared by the scripts in data/ (data/README.md).

Run:
    8xH100 record:  torchrun --nproc_per_node=8 decoderstack_small_pt-eval-sft.py --preset h100x8 --data-dir DIR
    one GPU:        python decoderstack_small_pt-eval-sft.py --preset gpu1 --data-dir DIR
    Colab:          python decoderstack_small_pt-eval-sft.py --preset colab --data-dir DIR
    CPU:            python decoderstack_small_pt-eval-sft.py --preset cpu --data-dir DIR
Any hyperparameter can be overridden with --name=value.

Contents
    1. Hyperparameters: one dataclass, presets, --name=value overrides
    2. Runtime: logging, run directory
    3. Data readers: tokenizer, token files, pretrain shards, CORE, SFT, chat eval
    4. Phases: data (check a prepared data directory)
    5. Main
"""
import argparse
import base64
import dataclasses
import json
import os
import sys
import time

import numpy as np

# =============================================================================================================
# 1. Hyperparameters


@dataclasses.dataclass
class Config:
    preset: str = "cpu"
    data_dir: str = "runs/data"
    run_dir: str = "runs/cpu"
    phases: str = "data"
    seed: int = 0


PRESETS = {
    "h100x8": dict(run_dir="runs/h100x8"),
    "gpu1": dict(run_dir="runs/gpu1"),
    "colab": dict(run_dir="runs/colab"),
    "cpu": dict(run_dir="runs/cpu"),
}


def parse_config(argv=None):
    """--preset picks the defaults, then every --name=value (or --name value) overrides one field."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    parser = argparse.ArgumentParser(description="DecoderStack (see the header of this file)")
    for name, field in fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(field.default), default=None)
    args = parser.parse_args(argv)
    preset = args.preset or Config.preset
    if preset not in PRESETS:
        parser.error(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset}
    values.update({k: v for k, v in vars(args).items() if v is not None})
    return Config(**values)


# =============================================================================================================
# 2. Runtime


def log(msg):
    print(msg, flush=True)


# =============================================================================================================
# 3. Data readers. The writers are data/*.py; the formats are documented in data/README.md.

TOKEN_FILE_MAGIC, TOKEN_FILE_VERSION, HEADER_INTS = 20240520, 1, 256
FORMAT_VERSIONS = {"pretrain": 1, "core": 1, "sft": 1, "chat_eval": 1}


class DataFormatError(Exception):
    """A prepared file is missing or malformed; the message names the file."""


class Tokenizer:
    """The tokenizer written by data/tokenizer.py: tiktoken ranks in base64 text, JSON metadata, byte counts."""

    def __init__(self, tok_dir):
        import tiktoken
        meta = read_json(os.path.join(tok_dir, "tokenizer.json"))
        if meta.get("version") != 1:
            raise DataFormatError(f"{tok_dir}/tokenizer.json: tokenizer version {meta.get('version')} is not 1")
        bpe_path = os.path.join(tok_dir, "tokenizer.tiktoken")
        ranks = {}
        for lineno, line in enumerate(read_bytes(bpe_path).splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise DataFormatError(f"{bpe_path}:{lineno}: expected '<base64 token> <rank>'") from None
        self.special_tokens = meta["special_tokens"]
        self.enc = tiktoken.Encoding("decoderstack", pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size, self.bos_id = self.enc.n_vocab, self.special_tokens["<|bos|>"]
        if self.vocab_size != meta["vocab_size"]:
            raise DataFormatError(f"{tok_dir}/tokenizer.json: vocab_size {meta['vocab_size']}, but the files define {self.vocab_size} tokens")
        self.sha256 = meta["tiktoken_sha256"]
        self.token_bytes = load_npy(os.path.join(tok_dir, "token_bytes.npy"), np.int32, (self.vocab_size,))

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def special(self, name):
        return self.special_tokens[name]


def read_bytes(path):
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing")
    with open(path, "rb") as f:
        return f.read()


def read_json(path):
    try:
        return json.loads(read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: malformed JSON ({e})") from None


def load_npy(path, dtype, shape=None):
    """A plain .npy array (never unpickled) of the given dtype and, where given, shape (None = any size)."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataFormatError(f"{path}: not a plain .npy array ({e})") from None
    if arr.dtype != np.dtype(dtype) or (shape is not None and (arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)))):
        raise DataFormatError(f"{path}: expected {np.dtype(dtype)} array of shape {shape}, got {arr.dtype} {arr.shape}")
    return arr


def read_token_file(path, vocab_size, check_ids=True):
    """Memory-map a token file after checking its header against the file size and the tokenizer."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise DataFormatError(f"{path}: truncated header ({size} bytes, expected at least {HEADER_INTS * 4})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n_tokens, width, file_vocab, _bos = (int(x) for x in header[:6])
    if magic != TOKEN_FILE_MAGIC:
        raise DataFormatError(f"{path}: bad magic {magic} (expected {TOKEN_FILE_MAGIC}): not a DecoderStack token file")
    if version != TOKEN_FILE_VERSION:
        raise DataFormatError(f"{path}: token file version {version}, this reader knows {TOKEN_FILE_VERSION}")
    if width not in (2, 4) or width != (2 if file_vocab <= 65536 else 4):
        raise DataFormatError(f"{path}: {width} bytes per token does not fit vocab_size {file_vocab}")
    if file_vocab != vocab_size:
        raise DataFormatError(f"{path}: written for vocab_size {file_vocab}, but the tokenizer has {vocab_size}")
    if size != HEADER_INTS * 4 + n_tokens * width:
        raise DataFormatError(f"{path}: header says {n_tokens} tokens ({HEADER_INTS * 4 + n_tokens * width} bytes), file has {size} bytes (truncated?)")
    tokens = np.memmap(path, dtype="<u2" if width == 2 else "<u4", mode="r", offset=HEADER_INTS * 4, shape=(n_tokens,))
    if check_ids and n_tokens and int(tokens.max()) >= vocab_size:
        raise DataFormatError(f"{path}: token id {int(tokens.max())} >= vocab_size {vocab_size}")
    return tokens


def read_manifest(directory, fmt, tokenizer):
    path = os.path.join(directory, "manifest.json")
    manifest = read_json(path)
    if manifest.get("format") != fmt or manifest.get("version") != FORMAT_VERSIONS[fmt]:
        raise DataFormatError(f"{path}: expected format {fmt!r} version {FORMAT_VERSIONS[fmt]}, got {manifest.get('format')!r} version {manifest.get('version')}")
    if manifest.get("tokenizer_sha256") != tokenizer.sha256:
        raise DataFormatError(f"{path}: written with a different tokenizer than {tokenizer.sha256[:12]}... (re-prepare the data)")
    return manifest


def pretrain_shards(data_dir, tokenizer, split):
    """Paths of the `split` ('train' or 'val') pretraining shards, in order, after checking every header."""
    directory = os.path.join(data_dir, "pretrain")
    manifest = read_manifest(directory, "pretrain", tokenizer)
    paths = [os.path.join(directory, s["file"]) for s in manifest["shards"] if s["split"] == split]
    if not paths:
        raise DataFormatError(f"{directory}/manifest.json: no {split} shards")
    for p in paths:
        read_token_file(p, tokenizer.vocab_size, check_ids=False)
    return paths


@dataclasses.dataclass
class CoreData:
    tasks: list          # manifest task dicts: label, task_type, num_fewshot, random_baseline, first_example, n_examples
    tokens: np.ndarray     # token segments back to back
    sequences: np.ndarray  # [n_seq, 6] offset_a, len_a, offset_b, len_b, cont_start, cont_end: sequence = a ++ b
    examples: np.ndarray   # [n_ex, 4] task, gold, first sequence, number of sequences
    max_len: int

    def sequence(self, i):
        """(tokens, cont_start, cont_end) of sequence i."""
        off_a, len_a, off_b, len_b, start, end = (int(x) for x in self.sequences[i])
        return np.concatenate([self.tokens[off_a:off_a + len_a], self.tokens[off_b:off_b + len_b]]).astype(np.int64), start, end


def load_core(data_dir, tokenizer):
    directory = os.path.join(data_dir, "core")
    manifest = read_manifest(directory, "core", tokenizer)
    tokens = read_token_file(os.path.join(directory, "tokens.bin"), tokenizer.vocab_size)
    sequences = load_npy(os.path.join(directory, "sequences.npy"), np.int64, (None, 6))
    examples = load_npy(os.path.join(directory, "examples.npy"), np.int64, (None, 4))
    n_tasks = len(manifest["tasks"])
    if len(sequences) and max((sequences[:, 0] + sequences[:, 1]).max(), (sequences[:, 2] + sequences[:, 3]).max()) > len(tokens):
        raise DataFormatError(f"{directory}/sequences.npy: a segment runs past the end of tokens.bin")
    if len(examples) and ((examples[:, 0] >= n_tasks).any() or (examples[:, 2] + examples[:, 3]).max() > len(sequences)):
        raise DataFormatError(f"{directory}/examples.npy: a row points past the tasks or sequences")
    return CoreData(manifest["tasks"], tokens, sequences, examples, manifest["max_len"])


@dataclasses.dataclass
class SFTSplit:
    tokens: np.ndarray  # conversations back to back, each starting with BOS
    mask: np.ndarray    # uint8, 1 where the token is a training target
    convs: np.ndarray   # [n_convs + 1] start offsets, then n_tokens

    def conversation(self, i):
        a, b = int(self.convs[i]), int(self.convs[i + 1])
        return np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.mask[a:b], dtype=np.int64)


def load_sft(data_dir, tokenizer, split):
    directory = os.path.join(data_dir, "sft")
    read_manifest(directory, "sft", tokenizer)
    tokens = read_token_file(os.path.join(directory, f"{split}.bin"), tokenizer.vocab_size)
    mask = load_npy(os.path.join(directory, f"{split}_mask.npy"), np.uint8, (len(tokens),))
    convs = load_npy(os.path.join(directory, f"{split}_convs.npy"), np.int64, (None,))
    if len(convs) < 1 or convs[0] != 0 or convs[-1] != len(tokens) or (np.diff(convs) <= 0).any():
        raise DataFormatError(f"{directory}/{split}_convs.npy: offsets must rise from 0 to {len(tokens)}")
    if len(convs) > 1 and (np.asarray(tokens[convs[:-1]]) != tokenizer.bos_id).any():
        raise DataFormatError(f"{directory}/{split}.bin: a conversation does not start with <|bos|>")
    return SFTSplit(tokens, mask, convs)


@dataclasses.dataclass
class ChatEvalData:
    tasks: list       # manifest task dicts: name, kind, first_example, n_examples, random_baseline, answers
    tokens: np.ndarray
    examples: np.ndarray  # [n, 5] task, offset, length, gold (-1: generative), n_choices
    letter_ids: list

    def prompt(self, i):
        _, offset, length, gold, n_choices = (int(x) for x in self.examples[i])
        return np.asarray(self.tokens[offset:offset + length], dtype=np.int64), gold, n_choices


def load_chat_eval(data_dir, tokenizer):
    directory = os.path.join(data_dir, "chat_eval")
    manifest = read_manifest(directory, "chat_eval", tokenizer)
    tokens = read_token_file(os.path.join(directory, "tokens.bin"), tokenizer.vocab_size)
    examples = load_npy(os.path.join(directory, "examples.npy"), np.int64, (None, 5))
    if len(examples) and (examples[:, 1] + examples[:, 2]).max() > len(tokens):
        raise DataFormatError(f"{directory}/examples.npy: a prompt runs past the end of tokens.bin")
    return ChatEvalData(manifest["tasks"], tokens, examples, manifest["letter_ids"])


# =============================================================================================================
# 4. Phases


def phase_data(cfg):
    """Check every part of a prepared data directory and print what it holds."""
    t0 = time.time()
    tok = Tokenizer(os.path.join(cfg.data_dir, "tokenizer"))
    log(f"tokenizer: vocab {tok.vocab_size}, bos {tok.bos_id}, {len(tok.special_tokens)} special tokens")
    for split in ("val", "train"):
        paths = pretrain_shards(cfg.data_dir, tok, split)
        n = sum(len(read_token_file(p, tok.vocab_size)) for p in paths)
        log(f"pretrain/{split}: {len(paths)} shards, {n:,} tokens")
    core = load_core(cfg.data_dir, tok)
    log(f"core: {len(core.tasks)} tasks, {len(core.examples):,} examples, {len(core.tokens):,} tokens (max_len {core.max_len})")
    for split in ("val", "train"):
        sft = load_sft(cfg.data_dir, tok, split)
        log(f"sft/{split}: {len(sft.convs) - 1:,} conversations, {len(sft.tokens):,} tokens, {int(sft.mask.sum()):,} supervised")
    chat = load_chat_eval(cfg.data_dir, tok)
    log("chat_eval: " + ", ".join(f"{t['name']} {t['n_examples']}" for t in chat.tasks))
    log(f"data directory {cfg.data_dir} is complete and consistent ({time.time() - t0:.1f}s)")


PHASES = {"data": phase_data}


# =============================================================================================================
# 5. Main


def main(argv=None):
    cfg = parse_config(argv)
    phases = [p for p in cfg.phases.split(",") if p]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        sys.exit(f"error: unknown phase(s) {', '.join(unknown)}; available: {', '.join(PHASES)}")
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    try:
        for phase in phases:
            PHASES[phase](cfg)
    except DataFormatError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
