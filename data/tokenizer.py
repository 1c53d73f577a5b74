"""Byte-level BPE tokenizer: trained with rustbpe, encoding with tiktoken, saved without pickle; chat template.

    python data/tokenizer.py train --input PATH... [--exclude GLOB] --vocab-size N --out DIR/tokenizer
    python data/tokenizer.py import PATH/tokenizer.pkl --out DIR/tokenizer   (nanochat's pickled tiktoken encoding)

Saved files (data/README.md): tokenizer.tiktoken (base64 ranks), tokenizer.json, token_bytes.npy.
"""
import argparse
import base64
import hashlib
import json
import os
import pickle
import time

import numpy as np

from common import DataError, TEXT_EXTS, atomic_path, expand_inputs, iter_documents, read_text, run_cli, write_json, write_npy

TOKENIZER_VERSION = 2  # 2: the sha256 covers the split pattern and the special tokens, not only the ranks
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
# GPT-4's split regex with numbers split in runs of at most 2 digits (nanochat: better for 32K-class vocabularies).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def tokenizer_sha256(ranks_file, pattern, special_tokens):
    """The tokenizer's identity (data/README.md): everything that decides how text encodes, so data prepared with
    one tokenizer is never read with another."""
    text = json.dumps({"pattern": pattern, "special_tokens": special_tokens}, sort_keys=True)
    return hashlib.sha256(ranks_file + b"\0" + text.encode("utf-8")).hexdigest()


class Tokenizer:
    def __init__(self, mergeable_ranks, pattern, special_tokens):
        import tiktoken
        self.mergeable_ranks, self.pattern, self.special_tokens = mergeable_ranks, pattern, dict(special_tokens)
        self.enc = tiktoken.Encoding("decoderstack", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        self.vocab_size = self.enc.n_vocab
        self.bos_id = self.special_tokens["<|bos|>"]

    # -- persistence (no pickle anywhere) --
    def save(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        bpe_path = os.path.join(out_dir, "tokenizer.tiktoken")
        with atomic_path(bpe_path) as tmp, open(tmp, "wb") as f:
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
        write_npy(os.path.join(out_dir, "token_bytes.npy"), self.token_bytes())
        with open(bpe_path, "rb") as f:
            self.sha256 = tokenizer_sha256(f.read(), self.pattern, self.special_tokens)
        write_json(os.path.join(out_dir, "tokenizer.json"), {
            "version": TOKENIZER_VERSION, "pattern": self.pattern, "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size, "sha256": self.sha256})

    @classmethod
    def load(cls, tok_dir):
        meta_path, bpe_path = os.path.join(tok_dir, "tokenizer.json"), os.path.join(tok_dir, "tokenizer.tiktoken")
        for p in (meta_path, bpe_path):
            if not os.path.isfile(p):
                raise DataError(f"{p}: missing (train one with `python data/tokenizer.py train`)")
        meta = json.loads(read_text(meta_path))
        if meta.get("version") != TOKENIZER_VERSION:
            raise DataError(f"{meta_path}: tokenizer version {meta.get('version')} is not {TOKENIZER_VERSION} "
                            "(re-train it, and re-prepare the data: version 2 changed the sha256 manifests name it by)")
        ranks = {}
        for lineno, line in enumerate(read_text(bpe_path).splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise DataError(f"{bpe_path}:{lineno}: expected '<base64 token> <rank>'") from None
        tok = cls(ranks, meta["pattern"], meta["special_tokens"])
        with open(bpe_path, "rb") as f:
            tok.sha256 = tokenizer_sha256(f.read(), meta["pattern"], meta["special_tokens"])  # names it in every manifest
        if tok.sha256 != meta.get("sha256"):
            raise DataError(f"{meta_path}: sha256 {tok.sha256[:12]}... of tokenizer.tiktoken, the pattern and the special "
                            f"tokens differs from the {str(meta.get('sha256'))[:12]}... recorded (edited or corrupt)")
        if tok.vocab_size != meta["vocab_size"]:
            raise DataError(f"{meta_path}: vocab_size {meta['vocab_size']} but the files define {tok.vocab_size} tokens")
        return tok

    # -- encoding --
    def encode(self, text):
        """Ordinary text -> ids; special-token strings in the text are encoded as plain text, never as specials."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=8):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def special(self, name):
        return self.special_tokens[name]

    def token_bytes(self):
        """Bytes per token id (0 for special tokens): the weights of bits-per-byte."""
        specials = set(self.special_tokens.values())
        return np.array([0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)], dtype=np.int32)

    # -- chat template (nanochat semantics) --
    def render_conversation(self, messages, max_tokens=2048):
        """messages -> (ids, mask). mask=1 marks supervised tokens: assistant text, python calls, <|assistant_end|>.
        A leading system message is merged into the first user message; roles must alternate user/assistant."""
        messages = list(messages)
        if not messages:
            raise ValueError("conversation has no messages")
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]
        ids, mask = [self.bos_id], [0]

        def add(tokens, supervised):
            ids.extend(tokens)
            mask.extend([int(supervised)] * len(tokens))

        sp = self.special
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {expected!r} (roles must alternate user/assistant)")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string")
                add([sp("<|user_start|>"), *self.encode(content), sp("<|user_end|>")], False)
                continue
            add([sp("<|assistant_start|>")], False)
            for part in ([{"type": "text", "text": content}] if isinstance(content, str) else content):
                kind, text_ids = part["type"], self.encode(part["text"])
                if kind == "text":
                    add(text_ids, True)
                elif kind == "python":
                    add([sp("<|python_start|>"), *text_ids, sp("<|python_end|>")], True)
                elif kind == "python_output":  # produced by the tool at inference time: never a target
                    add([sp("<|output_start|>"), *text_ids, sp("<|output_end|>")], False)
                else:
                    raise ValueError(f"message {i}: unknown content part type {kind!r}")
            add([sp("<|assistant_end|>")], True)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, messages):
        """Prompt ids for generating the last assistant turn: drop it, render the rest, end with <|assistant_start|>."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (it is replaced by the completion)")
        ids, _ = self.render_conversation(messages[:-1], max_tokens=1 << 30)
        return ids + [self.special("<|assistant_start|>")]


def train(texts, vocab_size):
    """Train on an iterator of strings; vocab_size counts the special tokens."""
    import rustbpe
    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise DataError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, n_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) < n_merged:  # rustbpe stops when no pair is left to merge
        raise DataError(f"trained only {len(ranks) + len(SPECIAL_TOKENS)} of the {vocab_size} tokens asked for: the "
                        f"text has too few distinct pairs (use --vocab-size {len(ranks) + len(SPECIAL_TOKENS)}, or more text)")
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return Tokenizer(ranks, bpe.get_pattern(), specials)


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while a pickled encoding is read: it keeps the state it is given and
    runs nothing (tiktoken's own __setstate__ would build the encoding)."""

    def __setstate__(self, state):
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    """Reads a pickled tiktoken Encoding without running the pickle: the only global it resolves is Encoding itself,
    to _EncodingState; any other (os.system, builtins.eval, ...) is refused before anything is called."""

    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise DataError(f"{self.path}: refers to {module}.{name}; only a pickled tiktoken Encoding is read, and nothing in it is run")


def import_pickled(path):
    """Our Tokenizer from a pickled tiktoken Encoding (nanochat's tokenizer.pkl), read by _EncodingUnpickler."""
    try:
        with open(path, "rb") as f:
            obj = _EncodingUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # truncated, not a pickle, an opcode that needs what we refuse
        raise DataError(f"{path}: not a readable pickled tiktoken Encoding ({type(e).__name__}: {e})") from None
    state = getattr(obj, "state", None) if isinstance(obj, _EncodingState) else None
    if isinstance(state, str):
        raise DataError(f"{path}: holds tiktoken's registered encoding {state!r} by name only: load it with tiktoken")
    ok = (isinstance(state, dict) and isinstance(state.get("pat_str"), str)
          and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict)
          and all(type(k) is bytes and type(v) is int for k, v in state["mergeable_ranks"].items())
          and all(type(k) is str and type(v) is int for k, v in state["special_tokens"].items()))
    if not ok:
        raise DataError(f"{path}: not a tiktoken Encoding's state (pat_str, mergeable_ranks {{bytes: int}}, special_tokens {{str: int}})")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    ids = sorted(ranks.values()) + sorted(specials.values())
    if ids != list(range(len(ids))) or (specials and min(specials.values()) < len(ranks)) or "<|bos|>" not in specials:
        raise DataError(f"{path}: needs ranks 0..n-1, then the special tokens, <|bos|> among them (got {len(ranks)} ranks, "
                        f"specials {sorted(specials)[:12]})")
    return Tokenizer(ranks, state["pat_str"], specials)


def capped_texts(files, max_chars, doc_cap):
    """Training text: documents capped at doc_cap chars each, max_chars in total."""
    total = 0
    for doc in iter_documents(files, doc_cap=doc_cap):
        if max_chars and total + len(doc) > max_chars:
            doc = doc[:max_chars - total]
        total += len(doc)
        yield doc
        if max_chars and total >= max_chars:
            return


def reference_encodings():
    """GPT-2 and cl100k encodings if tiktoken has them cached locally; never touches the network."""
    import tiktoken
    import tiktoken.load
    real_read = tiktoken.load.read_file

    def cache_only(path):
        if "://" in path:
            raise FileNotFoundError(path)
        return real_read(path)

    tiktoken.load.read_file = cache_only
    found = {}
    try:
        for name in ("gpt2", "cl100k_base"):
            try:
                found[name] = tiktoken.get_encoding(name)
            except Exception:  # not cached: skip the comparison
                pass
    finally:
        tiktoken.load.read_file = real_read
    return found


def compression_report(tok, files):
    text = "".join(iter_documents(files))
    n_bytes = len(text.encode("utf-8"))
    if not n_bytes:
        return f"no compression report: the held-out text ({len(files)} files) is empty"
    rows = [("ours", tok.vocab_size, len(tok.encode(text)))]
    rows += [(name, enc.n_vocab, len(enc.encode_ordinary(text))) for name, enc in reference_encodings().items()]
    lines = [f"compression on {n_bytes / 1e6:.2f} MB of held-out text ({len(files)} files):",
             f"  {'tokenizer':<12} {'vocab':>7} {'tokens':>10} {'bytes/token':>12}"]
    lines += [f"  {name:<12} {vocab:>7} {n:>10} {n_bytes / n:>12.3f}" for name, vocab, n in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train a tokenizer on .txt/.jsonl/.parquet files or folders")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--exclude", nargs="*", default=[], help="globs of files to leave out (e.g. 'val_*'); they are the held-out text")
    p.add_argument("--eval-input", nargs="*", default=None, help="held-out text for the compression report (default: the excluded files)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="total characters to train on")
    p.add_argument("--doc-cap", type=int, default=10_000, help="characters taken from each document (0: whole documents)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("import", help="convert a pickled tiktoken encoding (nanochat's tokenizer.pkl) without running it")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    args = parser.parse_args()

    if args.cmd == "import":
        tok = import_pickled(args.path)
        tok.save(args.out)
        print(f"imported a {tok.vocab_size}-token tokenizer from {args.path} -> {args.out}")
        return
    files = expand_inputs(args.input, TEXT_EXTS, args.exclude)
    t0 = time.time()
    tok = train(capped_texts(files, args.max_chars, args.doc_cap), args.vocab_size)
    tok.save(args.out)
    print(f"trained a {tok.vocab_size}-token tokenizer on {len(files)} files in {time.time() - t0:.1f}s -> {args.out}")
    held_out = args.eval_input
    if held_out is None and args.exclude:
        held_out = [f for f in expand_inputs(args.input, TEXT_EXTS) if f not in set(files)] or None
    if held_out:
        print(compression_report(tok, expand_inputs(held_out, TEXT_EXTS)))


if __name__ == "__main__":
    run_cli(main)
