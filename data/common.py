"""Shared pieces of the data writers: errors, atomic writes, input discovery, the token-file format.

The readers of these formats live in `decoderstack_small_pt-eval-sft.py` (its Data section); tests write with this
module and read with the stack so the two sides cannot drift. Formats are documented in data/README.md.
"""
import contextlib
import fnmatch
import glob
import gzip
import hashlib
import json
import os
import sys
import tempfile
import zlib

import numpy as np

# Token file: 256 little-endian int32 header words, then the tokens. Shared by pretrain shards, the CORE file,
# SFT shards and the chat-eval file (each directory's manifest says what the tokens are).
TOKEN_FILE_MAGIC = 20240520
TOKEN_FILE_VERSION = 1
HEADER_INTS = 256


_UMASK = os.umask(0)
os.umask(_UMASK)


class DataError(Exception):
    """Bad input or output: the message names the file and the problem. CLIs print it and exit 1."""


def run_cli(main):
    """Run a CLI entry point: a DataError becomes one `error: ...` line on stderr and exit status 1."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the final file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")


def write_npy(path, array):
    """np.save through a temp name; readers load with allow_pickle=False, so only plain dtypes are allowed."""
    array = np.ascontiguousarray(array)
    assert array.dtype != object, "object arrays would need pickle"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def write_token_file(path, tokens, vocab_size, bos_id):
    """Write tokens with the 256-int32 header {magic, version, n_tokens, bytes/token, vocab_size, bos_id}."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(f"{path}: token ids must be in [0, {vocab_size}), got range [{tokens.min()}, {tokens.max()}]")
    dtype = token_dtype(vocab_size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:6] = [TOKEN_FILE_MAGIC, TOKEN_FILE_VERSION, tokens.size, np.dtype(dtype).itemsize, vocab_size, bos_id]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())


# ---------------------------------------------------------------------------------------------------------------
# Inputs

def expand_inputs(paths, exts, exclude=()):
    """Files and folders (searched recursively) -> sorted files whose name ends in one of `exts`.
    `exclude` globs match a file's base name or its path."""
    files = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(tuple(exts))]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    excluded = lambda f: any(fnmatch.fnmatch(os.path.basename(f), g) or fnmatch.fnmatch(f, g) for g in exclude)
    files = [f for f in files if not excluded(f)]
    bad = [f for f in files if not f.endswith(tuple(exts))]
    if bad:
        raise DataError(f"{bad[0]}: unsupported file type (expected one of {', '.join(exts)})")
    if not files:
        raise DataError(f"no input files ({', '.join(exts)}) found in {', '.join(map(str, paths))}")
    return files


def read_text(path):
    """A UTF-8 file's text; a name ending in .gz is gunzipped first (HumanEval ships as .jsonl.gz)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file ({e})") from None


def iter_jsonl(path):
    """Yield (line_number, object) for each non-blank line; a malformed line is an error naming file:line."""
    # split on "\n" only: str.splitlines would also break on U+2028 and friends, which JSON strings may hold raw
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None


def _read_json_records(path):
    """Records of a .jsonl(.gz) file or a .json array, as (location, object) pairs for error messages."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        return [(f"{path}:{n}", obj) for n, obj in iter_jsonl(path)]
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records")
    return [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]


def hf_download(repo_id, patterns):
    """Local paths of the files of a Hugging Face dataset that match `patterns` (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download
    try:
        root = snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns)
    except OSError as e:  # the hub's network and cache errors are OSErrors
        raise DataError(f"{repo_id}: download failed ({e})") from None
    files = sorted(f for pattern in patterns for f in glob.glob(os.path.join(root, pattern)))
    if not files:
        raise DataError(f"{repo_id}: no files match {patterns}")
    return files


def read_records(path):
    """(location, record) pairs of a .jsonl(.gz), .json or .parquet file; location is file:line or file[index]."""
    if not path.endswith(".parquet"):
        yield from _read_json_records(path)
        return
    import pyarrow.parquet as pq
    try:
        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):  # smoltalk is too big for one to_pylist
            for row in batch.to_pylist():
                yield f"{path}[{i}]", row
                i += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError / ArrowInvalid
        raise DataError(f"{path}: unreadable parquet file ({e})") from None


TEXT_EXTS = (".txt", ".jsonl", ".parquet")


def iter_documents(files, field="text", doc_cap=None):
    """Documents from .txt (a whole file is one document), .jsonl (field `text`) and .parquet (column `text`)."""
    for path in files:
        if path.endswith(".txt"):
            docs = [read_text(path)]
        elif path.endswith(".jsonl"):
            docs = []
            for lineno, obj in iter_jsonl(path):
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string field '{field}'")
                docs.append(obj[field])
        elif path.endswith(".parquet"):
            docs = read_parquet_column(path, field)
        else:
            raise DataError(f"{path}: unsupported file type")
        for doc in docs:
            yield doc[:doc_cap] if doc_cap else doc


def read_parquet_column(path, column):
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path, columns=[column])
    except KeyError:
        raise DataError(f"{path}: missing column '{column}'") from None
    except Exception as e:  # pyarrow raises several types for corrupt files and unknown columns
        if column not in str(e):
            raise DataError(f"{path}: unreadable parquet file ({e})") from None
        raise DataError(f"{path}: missing column '{column}'") from None
    return [x if x is not None else "" for x in table.column(column).to_pylist()]
