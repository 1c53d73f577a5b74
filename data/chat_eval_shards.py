"""Chat-model evaluation prompts -> one token file: ARC-Easy, ARC-Challenge, MMLU (categorical), GSM8K (generative),
HumanEval (code, optional).

    python data/chat_eval_shards.py --input PATH|hf --tokenizer DIR/tokenizer --out DIR/chat_eval [--max-per-task N]
    python data/chat_eval_shards.py --rl --input PATH|hf --tokenizer DIR/tokenizer --out DIR/rl

--rl writes GSM8K's training questions in the same format (one generative task, "gsm8k"): the RL phase's prompts.

PATH is a folder in the shared layout (arc/ARC-Easy-Test.jsonl, arc/ARC-Challenge-Test.jsonl, mmlu/test/*_test.csv,
gsm8k/test.jsonl, and HumanEval if humaneval/HumanEval.jsonl.gz is there); `hf` downloads the same test sets from
Hugging Face (ai2_arc, cais/mmlu, openai/gsm8k, openai/openai_humaneval parquet).
Every prompt is the chat template up to <|assistant_start|>. Categorical prompts are nanochat's multiple-choice text
and are scored by the logits of the letter tokens; GSM8K prompts are the bare question, graded against the number
after '####'; HumanEval prompts are the problem's code prompt, graded by running its tests on the completion (the
stack does that, in a sandboxed subprocess). Each task's examples are shuffled with a fixed seed, so --max-per-task N
is a fair sample of the task.
"""
import argparse
import csv
import glob
import io
import os
import random
import string
import time

import numpy as np

from common import DataError, hf_download, read_records, read_text, run_cli, write_json, write_npy, write_token_file
from tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: the code kind (HumanEval) and its problems
LETTERS = string.ascii_uppercase
SHUFFLE_SEED = 42
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def arc_example(rec):
    """-> (question, choices, gold). Shared layout: question{stem, choices[{text, label}]}; HF: question, choices{text, label}."""
    q = rec["question"]
    if isinstance(q, dict):
        stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:
        stem, texts, labels = q, list(rec["choices"]["text"]), list(rec["choices"]["label"])
    if rec["answerKey"] not in labels:
        raise ValueError(f"answerKey {rec['answerKey']!r} is not among the choice labels {labels}")
    return stem, texts, labels.index(rec["answerKey"])  # labels may be 1-5: letters go by position, A-E


def mmlu_example(rec):
    choices, answer = list(rec["choices"]), rec["answer"]
    if not (isinstance(answer, int) and 0 <= answer < len(choices)):
        raise ValueError(f"answer {answer!r} is not a choice index 0..{len(choices) - 1}")
    return rec["question"], choices, answer


def gsm8k_example(rec):
    """-> (question, reference answer): the number after '####', commas removed (as nanochat grades it)."""
    _, marker, final = rec["answer"].rpartition("####")
    if not marker:
        raise ValueError("the answer has no '#### <number>' line")
    return rec["question"], final.strip().replace(",", "")


def humaneval_example(rec):
    """-> (prompt, problem): the user turn is the code prompt (signature + docstring), as in nanochat; the problem is
    what the grader runs: completion + test + check(entry_point)."""
    problem = {key: rec[key] for key in ("task_id", "prompt", "entry_point", "test")}
    if not all(isinstance(v, str) and v for v in problem.values()):
        raise ValueError("task_id, prompt, entry_point and test must be non-empty strings")
    return problem["prompt"], problem


# name, kind, example parser, files in the shared layout, (Hugging Face dataset, its files)
TASKS = [
    ("arc_easy", "categorical", arc_example, "arc/ARC-Easy-Test.jsonl", ("allenai/ai2_arc", "ARC-Easy/test-*.parquet")),
    ("arc_challenge", "categorical", arc_example, "arc/ARC-Challenge-Test.jsonl", ("allenai/ai2_arc", "ARC-Challenge/test-*.parquet")),
    ("mmlu", "categorical", mmlu_example, "mmlu/test/*_test.csv", ("cais/mmlu", "all/test-*.parquet")),
    ("gsm8k", "generative", gsm8k_example, "gsm8k/test.jsonl", ("openai/gsm8k", "main/test-*.parquet")),
    ("humaneval", "code", humaneval_example, "humaneval/HumanEval.jsonl.gz", ("openai/openai_humaneval", "openai_humaneval/test-*.parquet")),
]
RL_TASKS = [("gsm8k", "generative", gsm8k_example, "gsm8k/train.jsonl", ("openai/gsm8k", "main/train-*.parquet"))]
OPTIONAL_TASKS = {"humaneval"}  # left out when a local source does not have them
REFERENCES = {"generative": "answers", "code": "problems"}  # the manifest list that holds each kind's references


def read_mmlu_csv(path):
    """(file:line, {question, choices, answer}) per row of an MMLU csv with the header question,choice0..3,answer."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))  # quoted fields may span lines
    try:
        if next(reader, None) != MMLU_HEADER:
            raise DataError(f"{path}:1: expected the header {','.join(MMLU_HEADER)}")
        start = reader.line_num + 1
        for row in reader:
            loc, start = f"{path}:{start}", reader.line_num + 1
            if not row:
                continue
            if len(row) != len(MMLU_HEADER):
                raise DataError(f"{loc}: expected {len(MMLU_HEADER)} columns, got {len(row)}")
            answer = int(row[-1]) if row[-1].isdigit() else row[-1]  # anything else is reported by mmlu_example
            yield loc, {"question": row[0], "choices": row[1:-1], "answer": answer}
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def task_records(source, local_pattern, hf):
    """(location, record) pairs of one task, from the shared layout under `source` or from Hugging Face."""
    files = hf_download(hf[0], [hf[1]]) if source == "hf" else sorted(glob.glob(os.path.join(source, local_pattern)))
    if not files:
        raise DataError(f"{os.path.join(source, local_pattern)}: no such file")
    for path in files:
        yield from read_mmlu_csv(path) if path.endswith(".csv") else read_records(path)


def multiple_choice_text(question, letters, choices):
    """nanochat's multiple-choice prompt. The letter follows its choice after '=' with no space, so that the prompt
    holds the very token the answer is ("A", not " A"); small models bind the letter to the choice better this way."""
    lines = [f"Multiple Choice question: {question}"] + [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def render_example(tok, kind, parsed):
    """-> (prompt ids, gold, n_choices, reference). The assistant turn we pass is what render_for_completion drops."""
    if kind in REFERENCES:
        question, reference = parsed
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        return tok.render_for_completion(messages), -1, 0, reference
    question, choices, gold = parsed
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{len(choices)} choices (expected 2..{len(LETTERS)})")
    letters = LETTERS[:len(choices)]
    messages = [{"role": "user", "content": multiple_choice_text(question, letters, choices)}, {"role": "assistant", "content": letters[gold]}]
    return tok.render_for_completion(messages), gold, len(choices), None


def letter_token_ids(tok, letters):
    """The answer of a categorical task is the argmax over these ids, so every letter must be exactly one token."""
    encoded = [tok.encode(letter) for letter in letters]
    for letter, ids in zip(letters, encoded):
        if len(ids) != 1:
            raise DataError(f"letter {letter!r} encodes to {len(ids)} tokens with this tokenizer; categorical scoring needs one")
    return [ids[0] for ids in encoded]


def write_chat_eval(source, tok_dir, out_dir, max_per_task=None, task_list=TASKS):
    """Render every task (all rows are checked, the first max_per_task shuffled ones kept), then write out_dir."""
    tok = Tokenizer.load(tok_dir)
    if source != "hf" and not os.path.isdir(source):
        raise DataError(f"{source}: not a folder (expected the shared eval layout, or 'hf')")
    tasks, prompts, rows = [], [], []
    offset = 0
    for name, kind, parse, local_pattern, hf in task_list:
        if name in OPTIONAL_TASKS and source != "hf" and not glob.glob(os.path.join(source, local_pattern)):
            continue
        task_index, examples = len(tasks), []
        for loc, rec in task_records(source, local_pattern, hf):
            try:
                examples.append(render_example(tok, kind, parse(rec)))
            except (KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{loc}: malformed {name} record ({type(e).__name__}: {e})") from None
            except ValueError as e:
                raise DataError(f"{loc}: {e}") from None
        random.Random(SHUFFLE_SEED).shuffle(examples)
        examples = examples[:max_per_task]
        if not examples:
            raise DataError(f"{name}: no examples in {source}")
        task = {"name": name, "kind": kind, "first_example": len(rows), "n_examples": len(examples),
                "random_baseline": float(np.mean([1 / n for _, _, n, _ in examples])) if kind == "categorical" else 0.0}
        if kind in REFERENCES:
            task[REFERENCES[kind]] = [reference for *_, reference in examples]
        tasks.append(task)
        for ids, gold, n_choices, _ in examples:
            rows.append((task_index, offset, len(ids), gold, n_choices))
            prompts.append(ids)
            offset += len(ids)
    letters = list(LETTERS[:max(r[4] for r in rows)])
    manifest = {"format": "chat_eval", "version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                "tokenizer_sha256": tok.sha256, "letters": letters, "letter_ids": letter_token_ids(tok, letters), "tasks": tasks}
    write_token_file(os.path.join(out_dir, "tokens.bin"), np.concatenate(prompts), tok.vocab_size, tok.bos_id)
    write_npy(os.path.join(out_dir, "examples.npy"), np.array(rows, dtype=np.int64).reshape(-1, 5))
    write_json(os.path.join(out_dir, "manifest.json"), manifest)  # last, after the files it describes
    return manifest, offset


def write_rl(source, tok_dir, out_dir, max_per_task=None):
    """GSM8K's training questions, in the chat-eval format, for the RL phase."""
    return write_chat_eval(source, tok_dir, out_dir, max_per_task, RL_TASKS)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder in the shared eval layout, or 'hf'")
    parser.add_argument("--tokenizer", required=True, help="DIR/tokenizer written by data/tokenizer.py")
    parser.add_argument("--out", required=True, help="DIR/chat_eval (DIR/rl with --rl)")
    parser.add_argument("--rl", action="store_true", help="write GSM8K's training questions for the RL phase instead")
    parser.add_argument("--max-per-task", type=int, default=None, help="keep the first N shuffled examples of each task")
    args = parser.parse_args()
    if args.max_per_task is not None and args.max_per_task < 1:
        parser.error("--max-per-task must be at least 1")
    t0 = time.time()
    manifest, n_tokens = (write_rl if args.rl else write_chat_eval)(args.input, args.tokenizer, args.out, args.max_per_task)
    for t in manifest["tasks"]:
        print(f"{t['name']:<14} {t['kind']:<12} {t['n_examples']:>6,} examples, random baseline {t['random_baseline']:.3f}")
    print(f"wrote {args.out} ({n_tokens:,} tokens, letters {''.join(manifest['letters'])}) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
