"""CORE eval bundle -> every CORE sequence, rendered and tokenized exactly as nanochat's CORE evaluation does it.

    python data/core_shards.py --bundle PATH --tokenizer DIR/tokenizer --out DIR/core [--max-len 2048] [--max-per-task N]

--bundle is a folder holding core.yaml and eval_meta_data.csv with the task files under eval_data/ (nanochat's
eval_bundle layout) or beside core.yaml (the shared/data layout), an eval_bundle.zip, or the word `download`
(fetches nanochat's eval_bundle.zip). Tasks whose file is absent use the stand-ins of shared/data (STAND_INS).
Everything is built in memory before any file is written, and each file is written through a temporary name.
Format: data/README.md, section "CORE".
"""
import argparse
import contextlib
import csv
import dataclasses
import io
import os
import random
import re
import tempfile
import time
import urllib.request
import zipfile

import numpy as np
import yaml

from common import DataError, iter_jsonl, read_text, run_cli, token_dtype, write_json, write_npy, write_token_file
from tokenizer import SPLIT_PATTERN, Tokenizer

FORMAT_VERSION = 1
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# The fields each task type's template reads; options come before gold, which indexes them.
REQUIRED = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
            "language_modeling": ("context", "continuation")}


# ---------------------------------------------------------------------------------------------------------------
# Bundle and task files

@contextlib.contextmanager
def open_bundle(spec):
    """Yield the folder holding core.yaml: `spec` itself, or an eval_bundle.zip (given or downloaded) extracted."""
    if os.path.isdir(spec):
        yield spec
        return
    with tempfile.TemporaryDirectory() as tmp:
        if spec == "download" and not os.path.exists(spec):
            print(f"downloading {EVAL_BUNDLE_URL}")
            spec = os.path.join(tmp, "eval_bundle.zip")
            try:
                urllib.request.urlretrieve(EVAL_BUNDLE_URL, spec)
            except OSError as e:
                raise DataError(f"{EVAL_BUNDLE_URL}: download failed ({e})") from None
        if not os.path.isfile(spec):
            raise DataError(f"{spec}: no such file or directory")
        try:
            with zipfile.ZipFile(spec) as z:
                z.extractall(os.path.join(tmp, "bundle"))
        except zipfile.BadZipFile:
            raise DataError(f"{spec}: neither a folder nor a zip file") from None
        found = sorted((root for root, _, names in os.walk(os.path.join(tmp, "bundle")) if "core.yaml" in names), key=lambda r: r.count(os.sep))
        if not found:
            raise DataError(f"{spec}: no core.yaml inside")
        yield found[0]


def read_config(bundle):
    """core.yaml's tasks joined with eval_meta_data.csv's random baselines (percent there, a fraction here)."""
    cfg_path, meta_path = os.path.join(bundle, "core.yaml"), os.path.join(bundle, "eval_meta_data.csv")
    for path in (cfg_path, meta_path):
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing")
    try:
        cfg = yaml.safe_load(read_text(cfg_path))
    except yaml.YAMLError as e:
        raise DataError(f"{cfg_path}: malformed YAML ({e})") from None
    tasks = cfg.get("icl_tasks") if isinstance(cfg, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise DataError(f"{cfg_path}: expected a non-empty 'icl_tasks' list")
    meta = csv.DictReader(io.StringIO(read_text(meta_path), newline=""))
    if not {"Eval Task", "Random baseline"} <= set(meta.fieldnames or ()):
        raise DataError(f"{meta_path}: expected columns 'Eval Task' and 'Random baseline'")
    baselines = {row["Eval Task"]: row["Random baseline"] for row in meta}
    specs = []
    for i, task in enumerate(tasks):
        try:
            label, uri, task_type, k = task["label"], task["dataset_uri"], task["icl_task_type"], task["num_fewshot"][0]
        except (KeyError, TypeError, IndexError):
            raise DataError(f"{cfg_path}: icl_tasks[{i}] needs label, dataset_uri, icl_task_type and num_fewshot: [k]") from None
        delim = task.get("continuation_delimiter", " ")
        if task_type not in REQUIRED:
            raise DataError(f"{cfg_path}: task '{label}' has icl_task_type {task_type!r}, expected one of {', '.join(REQUIRED)}")
        if type(k) is not int or k < 0 or not isinstance(delim, str):
            raise DataError(f"{cfg_path}: task '{label}' needs num_fewshot: [k] with k >= 0 and a string continuation_delimiter")
        if label not in baselines:
            raise DataError(f"{meta_path}: no row for task '{label}' (column 'Eval Task')")
        try:
            baseline = float(baselines[label]) / 100
        except ValueError:
            raise DataError(f"{meta_path}: task '{label}' has a non-numeric 'Random baseline' {baselines[label]!r}") from None
        specs.append({"label": label, "task_type": task_type, "num_fewshot": k, "continuation_delimiter": delim,
                      "random_baseline": baseline, "dataset": uri})
    return specs


def check_row(row, task_type, where):
    """The fields the templates read, with usable types (jinja would quietly render a missing field as '')."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    options = "choices" if task_type == "multiple_choice" else "context_options"
    for key in REQUIRED[task_type]:
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' ({task_type} rows need {', '.join(REQUIRED[task_type])})")
        value = row[key]
        if key == "gold":
            ok, kind = type(value) is int and 0 <= value < len(row[options]), f"an index into '{options}'"
        elif key == options:
            ok, kind = isinstance(value, list) and value and all(isinstance(v, str) for v in value), "a non-empty list of strings"
        else:
            ok, kind = isinstance(value, str), "a string"
        if not ok:
            raise DataError(f"{where}: field '{key}' must be {kind}")


def jsonl_rows(path):
    return [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path)]


def coqa_rows(path):
    """One language_modeling row per turn of each story, with the OLMES CoQA prompt (shared/data/SOURCES.md); the
    answer follows core.yaml's default delimiter ' ', which gives OLMES's target ' ' + answer."""
    rows = []
    for lineno, story in iter_jsonl(path):
        if not (isinstance(story, dict) and isinstance(story.get("story"), str) and isinstance(story.get("turns"), list) and all(
                isinstance(t, dict) and isinstance(t.get("question"), str) and isinstance(t.get("answer"), str) for t in story["turns"])):
            raise DataError(f"{path}:{lineno}: expected a story {{\"story\": str, \"turns\": [{{\"question\": str, \"answer\": str}}, ...]}}")
        history = ""
        for t, turn in enumerate(story["turns"]):
            preceding = f"Preceding questions:\n\n{history}" if t else ""
            context = f"Passage: {story['story']}\n\n{preceding}Final question:\n\nQuestion: {turn['question']}\nAnswer:"
            rows.append((f"{path}:{lineno} turn {t}", {"context": context, "continuation": turn["answer"]}))
            history += f"Question: {turn['question']}\nAnswer: {turn['answer']}\n\n"
    return rows


# core.yaml names three files of which no public copy under 4 MiB exists; shared/data holds stand-ins beside them.
STAND_INS = {
    "hellaswag.jsonl": ("hellaswag_olmes_val1000.jsonl", "1000 OLMES validation rows, same format", jsonl_rows),
    "squad.jsonl": ("squad_olmes_val1000.jsonl", "1000 OLMES validation rows, different prompt wording: not comparable to published CORE", jsonl_rows),
    "coqa.jsonl": ("coqa_val_stories.jsonl", "validation stories, one row per turn with the OLMES prompt", coqa_rows),
}


def load_task(root, spec):
    """(rows as (location, row) pairs, file read, stand-in note or None) of one task."""
    path, stand_in, read = os.path.join(root, spec["dataset"]), None, jsonl_rows
    name = os.path.basename(path)
    if not os.path.isfile(path) and name in STAND_INS:
        alt, why, alt_read = STAND_INS[name]
        if os.path.isfile(os.path.join(os.path.dirname(path), alt)):
            path, stand_in, read = os.path.join(os.path.dirname(path), alt), f"{name} is absent: {alt} ({why})", alt_read
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing task file (task '{spec['label']}')")
    rows = read(path)
    for where, row in rows:
        check_row(row, spec["task_type"], where)
    if len(rows) <= spec["num_fewshot"]:
        raise DataError(f"{path}: task '{spec['label']}' needs more than {spec['num_fewshot']} rows (its few-shot count), found {len(rows)}")
    return rows, os.path.relpath(path, root), stand_in


# ---------------------------------------------------------------------------------------------------------------
# Rendering (nanochat's jinja templates in core_eval.py, as plain strings) and tokenization

def fewshot_indices(i, n, k):
    """nanochat's random.Random(1234 + i).sample([j for j in range(n) if j != i], k) without the O(n) list: sample
    only draws positions in its population, so drawing from range(n - 1) and stepping over i gives the same indices."""
    return [j + (j >= i) for j in random.Random(1234 + i).sample(range(n - 1), k)]


def render(task_type, item, shots, delim):
    """Prompts of one example: few-shot blocks each ending in a blank line, then the item. multiple_choice: one per
    choice; schema: one per context option; language_modeling: [prompt without the continuation, stripped; with it]."""
    if task_type == "multiple_choice":
        head = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots) + item["query"] + delim
        return [head + choice for choice in item["choices"]]
    if task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        return [head + option + delim + item["continuation"] for option in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots) + item["context"].strip() + delim
    return [head.strip(), head + item["continuation"]]


# A cut after "\n" and before a non-space character: no alternative of SPLIT_PATTERN matches across it (letter, digit
# and punctuation runs take newlines only at their end, whitespace runs then stop at their last newline) and none
# looks at the character after it differently, so a text's regex chunks, and so its tokens, are its pieces' back to back.
PIECE_CUT = re.compile(r"(?<=\n)(?=\S)")


class PieceEncoder:
    """tok.encode for the prompts of one task, which repeat most of their text (every row recurs as a few-shot block,
    an example's context recurs in each of its prompts): texts are cut into independently tokenized pieces and each
    distinct piece is encoded once (pieces are short lines, so a loop beats encode_batch's per-text thread overhead).
    Only exact for SPLIT_PATTERN: a tokenizer with another pattern gets whole texts encoded."""

    def __init__(self, tok):
        self.encode, self.cache, self.cut = tok.encode, {}, tok.pattern == SPLIT_PATTERN

    def split(self, text):
        return PIECE_CUT.split(text) if self.cut else [text]

    def tokens(self, pieces):
        ids = []
        for piece in pieces:
            if piece not in self.cache:
                self.cache[piece] = self.encode(piece)
            ids += self.cache[piece]
        return ids


def common_prefix_len(seqs):
    """nanochat's find_common_length (direction 'left'; pass reversed sequences for 'right')."""
    shortest = min(map(len, seqs))
    return next((i for i in range(shortest) if any(s[i] != seqs[0][i] for s in seqs)), shortest)


def tokenize_example(task_type, prompts, enc, bos, where):
    """Token segments of one example, a and b, and its sequences as (a index, b index, cont_start, cont_end):
    sequence = a ++ b = BOS + the prompt's tokens. Shared pieces are compared as strings, so only the text after
    them is compared token by token."""
    pieces = [enc.split(p) for p in prompts]
    if task_type == "multiple_choice":  # the continuation starts at the common token prefix
        m = common_prefix_len(pieces)
        rests = [enc.tokens(p[m:]) for p in pieces]
        k = common_prefix_len(rests)
        a = [bos, *enc.tokens(pieces[0][:m]), *rests[0][:k]]
        return [a], [r[k:] for r in rests], [(0, j, len(a), len(a) + len(r) - k) for j, r in enumerate(rests)]
    if task_type == "schema":  # the continuation is the common token suffix (which, as in nanochat, may reach BOS)
        m = common_prefix_len([p[::-1] for p in pieces])
        rests = [[bos, *enc.tokens(p[:len(p) - m])] for p in pieces]
        k = common_prefix_len([r[::-1] for r in rests])
        b = rests[0][len(rests[0]) - k:] + enc.tokens(pieces[0][len(pieces[0]) - m:])
        a_segs = [r[:len(r) - k] for r in rests]
        return a_segs, [b], [(j, 0, len(a), len(a) + len(b)) for j, a in enumerate(a_segs)]
    without, with_ = (enc.tokens(p) for p in pieces)
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise DataError(f"{where}: the tokens of the prompt without its continuation are not a prefix of the prompt's tokens")
    return [[bos, *with_]], [[]], [(0, 0, 1 + len(without), 1 + len(with_))]


@dataclasses.dataclass
class Core:
    tasks: list            # manifest task entries
    tokens: np.ndarray     # the segments back to back
    sequences: np.ndarray  # [n_seq, 6] offset_a, len_a, offset_b, len_b, cont_start, cont_end
    examples: np.ndarray   # [n_ex, 4] task, gold, first sequence, number of sequences
    max_len: int


def build_core(bundle, tok, max_len=2048, max_per_task=None):
    """Every task of the bundle rendered, tokenized, left-truncated to max_len and laid out in two-segment form."""
    root = os.path.join(bundle, "eval_data") if os.path.isdir(os.path.join(bundle, "eval_data")) else bundle
    segments, n_tokens, sequences, examples, tasks, dtype = [], 0, [], [], [], token_dtype(tok.vocab_size)
    for task_index, spec in enumerate(read_config(bundle)):
        rows, dataset, stand_in = load_task(root, spec)
        random.Random(1337).shuffle(rows)  # as nanochat, so --max-per-task N takes the same first N
        n_examples = len(rows) if max_per_task is None else min(len(rows), max_per_task)
        tasks.append({**spec, "dataset": dataset, "stand_in": stand_in, "first_example": len(examples), "n_examples": n_examples})
        enc, task_type = PieceEncoder(tok), spec["task_type"]
        for i in range(n_examples):
            where, item = rows[i]
            shots = [rows[j][1] for j in fewshot_indices(i, len(rows), spec["num_fewshot"])]
            prompts = render(task_type, item, shots, spec["continuation_delimiter"])
            a_segs, b_segs, seqs = tokenize_example(task_type, prompts, enc, tok.bos_id, where)
            offsets = []
            for seg in a_segs + b_segs:
                segments.append(np.array(seg, dtype=dtype))
                offsets.append(n_tokens)
                n_tokens += len(seg)
            examples.append((task_index, 0 if task_type == "language_modeling" else item["gold"], len(sequences), len(seqs)))
            for ai, bi, start, end in seqs:
                len_a, len_b = len(a_segs[ai]), len(b_segs[bi])
                crop = max(0, len_a + len_b - max_len)  # left truncation: keep the last max_len tokens, moving a's start
                if start - crop < 1:
                    raise DataError(f"{where}: the continuation needs a token before it within --max-len {max_len} (it starts at {start} of {len_a + len_b} tokens)")
                sequences.append((offsets[ai] + crop, len_a - crop, offsets[len(a_segs) + bi], len_b, start - crop, end - crop))
    return Core(tasks, np.concatenate(segments), np.array(sequences, dtype=np.int64).reshape(-1, 6),
                np.array(examples, dtype=np.int64).reshape(-1, 4), max_len)


def save_core(core, tok, out_dir):
    write_token_file(os.path.join(out_dir, "tokens.bin"), core.tokens, tok.vocab_size, tok.bos_id)
    write_npy(os.path.join(out_dir, "sequences.npy"), core.sequences)
    write_npy(os.path.join(out_dir, "examples.npy"), core.examples)
    write_json(os.path.join(out_dir, "manifest.json"), {  # last: readers start from the manifest
        "format": "core", "version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
        "tokenizer_sha256": tok.sha256, "max_len": core.max_len, "tasks": core.tasks})


def write_core(bundle, tok_dir, out_dir, max_len=2048, max_per_task=None):
    """--bundle spec -> out_dir; returns the Core written."""
    tok = Tokenizer.load(tok_dir)
    with open_bundle(bundle) as bundle_dir:
        core = build_core(bundle_dir, tok, max_len, max_per_task)
    save_core(core, tok, out_dir)
    return core


def summary(core):
    """Per-task table: examples, sequences, tokens the evaluation forwards (stored shared segments count once on disk)."""
    lines = [f"{'task':<34} {'type':<17} {'shots':>5} {'examples':>8} {'sequences':>9} {'tokens':>12}  stand-in"]
    lengths = core.sequences[:, 1] + core.sequences[:, 3]
    totals = np.zeros(3, dtype=np.int64)
    for t in core.tasks:
        ex = core.examples[t["first_example"]:t["first_example"] + t["n_examples"]]
        n_seq = int(ex[:, 3].sum())
        row = np.array([len(ex), n_seq, lengths[ex[0, 2]:ex[0, 2] + n_seq].sum()])
        totals += row
        lines.append(f"{t['label']:<34} {t['task_type']:<17} {t['num_fewshot']:>5} {row[0]:>8,} {row[1]:>9,} {row[2]:>12,}  {t['stand_in'] or '-'}")
    lines.append(f"{'total':<34} {'':<17} {'':>5} {totals[0]:>8,} {totals[1]:>9,} {totals[2]:>12,}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="folder with core.yaml, an eval_bundle.zip, or 'download'")
    parser.add_argument("--tokenizer", required=True, help="DIR/tokenizer written by data/tokenizer.py")
    parser.add_argument("--out", required=True, help="DIR/core")
    parser.add_argument("--max-len", type=int, default=2048, help="longer sequences keep their last max-len tokens")
    parser.add_argument("--max-per-task", type=int, default=None, help="write only the first N shuffled examples of each task")
    args = parser.parse_args()
    if args.max_len < 2 or (args.max_per_task is not None and args.max_per_task < 1):
        parser.error("--max-len must be at least 2 and --max-per-task at least 1")
    t0 = time.time()
    core = write_core(args.bundle, args.tokenizer, args.out, args.max_len, args.max_per_task)
    print(summary(core))
    size = os.path.getsize(os.path.join(args.out, "tokens.bin"))
    print(f"wrote {args.out} in {time.time() - t0:.1f}s: {len(core.tokens):,} stored tokens (tokens.bin {size / 1e6:.1f} MB), max_len {args.max_len}")


if __name__ == "__main__":
    run_cli(main)
