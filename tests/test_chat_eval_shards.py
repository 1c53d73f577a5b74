"""Chat-eval file: written by data/chat_eval_shards.py, read by the stack; prompts, golds, answers, problems, bad rows."""
import csv
import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import chat_eval_shards
from common import DataError
from conftest import ROOT, edit_json

MMLU_CSV = ('question,choice0,choice1,choice2,choice3,answer\n'
            '"Which, with a comma?",one,"two ""quoted""","three\nlines",four,2\n'
            'Plain?,a,b,c,d,0\n')


def arc_row(stem, texts, labels, key):
    return {"id": stem, "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]}, "answerKey": key}


@pytest.fixture
def eval_dir(tmp_path):
    """A tiny folder in the shared eval layout."""
    root = tmp_path / "eval"
    for d in ("arc", "mmlu/test", "gsm8k"):
        (root / d).mkdir(parents=True)
    easy = [arc_row("Sky color?", ["red", "blue", "green", "pink"], list("ABCD"), "B"),
            arc_row("Numeric labels?", ["x", "y", "z"], ["1", "2", "3"], "3")]
    challenge = [arc_row("Five choices?", ["p", "q", "r", "s", "t"], list("ABCDE"), "E")]
    (root / "arc/ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in easy))
    (root / "arc/ARC-Challenge-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in challenge))
    (root / "mmlu/test/astronomy_test.csv").write_text(MMLU_CSV)
    (root / "mmlu/test/virology_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nLast?,w,x,y,z,3\n")
    (root / "gsm8k/test.jsonl").write_text(
        json.dumps({"question": "How much in total?", "answer": "500*2 = <<500*2=1000>>1000\n#### 1,234"}) + "\n" +
        json.dumps({"question": "How many left?", "answer": "Five.\n#### 5 "}) + "\n")
    return root


# Tiny HumanEval problems in the file's schema (canonical_solution is read but not kept).
HUMANEVAL = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n", "entry_point": f"f{i}",
              "canonical_solution": f"    return x + {i}\n", "test": f"\n\ndef check(candidate):\n    assert candidate(1) == {1 + i}\n"}
             for i in range(3)]


def write_humaneval(eval_dir, records=HUMANEVAL):
    (eval_dir / "humaneval").mkdir(exist_ok=True)
    with gzip.open(eval_dir / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def code_prompt(prompt):
    return f"<|bos|><|user_start|>{prompt}<|user_end|><|assistant_start|>"


def mc_prompt(question, choices):
    lines = "".join(f"- {c}={l}\n" for c, l in zip(choices, "ABCDE"))
    return (f"<|bos|><|user_start|>Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."
            "<|user_end|><|assistant_start|>")


EXPECTED = {  # task: {decoded prompt: (gold, n_choices) or reference answer}
    "arc_easy": {mc_prompt("Sky color?", ["red", "blue", "green", "pink"]): (1, 4), mc_prompt("Numeric labels?", ["x", "y", "z"]): (2, 3)},
    "arc_challenge": {mc_prompt("Five choices?", list("pqrst")): (4, 5)},
    "mmlu": {mc_prompt("Which, with a comma?", ["one", 'two "quoted"', "three\nlines", "four"]): (2, 4),
             mc_prompt("Plain?", list("abcd")): (0, 4), mc_prompt("Last?", list("wxyz")): (3, 4)},
    "gsm8k": {"<|bos|><|user_start|>How much in total?<|user_end|><|assistant_start|>": "1234",
              "<|bos|><|user_start|>How many left?<|user_end|><|assistant_start|>": "5"},
}


def read_back(stack, tok, data_dir):
    """{task: {decoded prompt: (gold, n_choices) or answer}} from the stack's reader, checking the row layout."""
    data = stack.load_chat_eval(str(data_dir), tok)
    got, next_offset = {}, 0
    for t_index, task in enumerate(data.tasks):
        got[task["name"]] = {}
        for j in range(task["n_examples"]):
            i = task["first_example"] + j
            assert data.examples[i, 0] == t_index and data.examples[i, 1] == next_offset  # contiguous, back to back
            ids, gold, n_choices = data.prompt(i)
            next_offset += len(ids)
            text = tok.decode(ids)
            assert ids[-1] == tok.special("<|assistant_start|>") and (ids == tok.special("<|assistant_start|>")).sum() == 1
            if task["kind"] != "categorical":
                assert (gold, n_choices) == (-1, 0)
            references = {"generative": "answers", "code": "problems"}.get(task["kind"])
            got[task["name"]][text] = task[references][j] if references else (gold, n_choices)
    assert next_offset == len(data.tokens)
    return data, got


def run_cli(*args):
    return subprocess.run([sys.executable, "data/chat_eval_shards.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_cli_roundtrip_through_stack_reader(eval_dir, tok_dir, tmp_path, stack):
    """The folder has no humaneval/: the optional code task is left out."""
    result = run_cli("--input", eval_dir, "--tokenizer", tok_dir, "--out", tmp_path / "chat_eval")
    assert result.returncode == 0, result.stderr
    assert "mmlu" in result.stdout and "letters ABCDE" in result.stdout
    tok = stack.Tokenizer(tok_dir)
    data, got = read_back(stack, tok, tmp_path)
    assert got == EXPECTED
    assert [(t["name"], t["kind"], t["n_examples"]) for t in data.tasks] == [
        ("arc_easy", "categorical", 2), ("arc_challenge", "categorical", 1), ("mmlu", "categorical", 3), ("gsm8k", "generative", 2)]
    assert [t["random_baseline"] for t in data.tasks] == pytest.approx([(1 / 4 + 1 / 3) / 2, 1 / 5, 1 / 4, 0])
    assert "answers" not in data.tasks[0]
    manifest = json.load(open(tmp_path / "chat_eval" / "manifest.json"))
    assert manifest["letters"] == list("ABCDE") and data.letter_ids == [tok.encode(l)[0] for l in "ABCDE"]
    assert manifest["tokenizer_sha256"] == tok.sha256 and manifest["format"] == "chat_eval"


def test_max_per_task_keeps_a_prefix_of_the_shuffled_examples(eval_dir, tok_dir, tmp_path, stack):
    write_humaneval(eval_dir)
    tok = stack.Tokenizer(tok_dir)
    chat_eval_shards.write_chat_eval(str(eval_dir), tok_dir, str(tmp_path / "all" / "chat_eval"))
    chat_eval_shards.write_chat_eval(str(eval_dir), tok_dir, str(tmp_path / "one" / "chat_eval"), max_per_task=1)
    full, _ = read_back(stack, tok, tmp_path / "all")
    one, _ = read_back(stack, tok, tmp_path / "one")
    assert [t["n_examples"] for t in one.tasks] == [1, 1, 1, 1, 1]
    for task_full, task_one in zip(full.tasks, one.tasks):
        (ids_full, *gold_full), (ids_one, *gold_one) = full.prompt(task_full["first_example"]), one.prompt(task_one["first_example"])
        assert np.array_equal(ids_full, ids_one) and gold_full == gold_one
    assert one.tasks[3]["answers"] == full.tasks[3]["answers"][:1]
    assert one.tasks[4]["problems"] == full.tasks[4]["problems"][:1]


def test_humaneval_is_a_code_task(eval_dir, tok_dir, tmp_path, stack):
    write_humaneval(eval_dir)
    manifest, _ = chat_eval_shards.write_chat_eval(str(eval_dir), tok_dir, str(tmp_path / "chat_eval"))
    data, got = read_back(stack, stack.Tokenizer(tok_dir), tmp_path)
    assert manifest["version"] == 2 and {name: got[name] for name in EXPECTED} == EXPECTED  # the other tasks as before
    task = data.tasks[4]
    assert (task["name"], task["kind"], task["n_examples"], task["random_baseline"]) == ("humaneval", "code", 3, 0.0)
    assert "answers" not in task and not any("problems" in t for t in data.tasks[:4])
    # the user turn is the prompt itself; problems[j] belongs to example j (read_back pairs them)
    assert got["humaneval"] == {code_prompt(r["prompt"]): {k: r[k] for k in ("task_id", "prompt", "entry_point", "test")} for r in HUMANEVAL}
    order = [r["task_id"] for r in HUMANEVAL]
    random.Random(42).shuffle(order)
    assert [p["task_id"] for p in task["problems"]] == order  # shuffled like every task
    rows = data.examples[task["first_example"]:]
    assert len(rows) == 3 and (rows[:, 0] == 4).all() and (rows[:, 3] == -1).all() and (rows[:, 4] == 0).all()


def test_bad_humaneval_files_name_file_and_line(eval_dir, tok_dir, tmp_path):
    path = eval_dir / "humaneval" / "HumanEval.jsonl.gz"
    no_test = {k: v for k, v in HUMANEVAL[1].items() if k != "test"}
    for records, where, fragment in [([HUMANEVAL[0], no_test], ":2:", "malformed humaneval record (KeyError: 'test')"),
                                     ([{**HUMANEVAL[0], "entry_point": None}], ":1:", "must be non-empty strings")]:
        write_humaneval(eval_dir, records)
        with pytest.raises(DataError) as e:
            chat_eval_shards.write_chat_eval(str(eval_dir), tok_dir, str(tmp_path / "out" / "chat_eval"))
        assert str(e.value).startswith(f"{path}{where} ") and fragment in str(e.value), str(e.value)
    for corrupt in (b"not gzip", gzip.compress(json.dumps(HUMANEVAL[0]).encode())[:-12]):  # garbage, truncated
        path.write_bytes(corrupt)
        with pytest.raises(DataError, match="corrupt gzip file"):
            chat_eval_shards.write_chat_eval(str(eval_dir), tok_dir, str(tmp_path / "out" / "chat_eval"))
    assert not (tmp_path / "out").exists()


def test_hf_schemas(monkeypatch, tok_dir, tmp_path, stack):
    """`--input hf` reads Hugging Face's parquet schemas; the download itself is replaced by local files."""
    tables = {
        ("allenai/ai2_arc", "ARC-Easy/test-*.parquet"): {"id": ["e"], "question": ["Sky color?"], "answerKey": ["B"],
                                                        "choices": [{"text": ["red", "blue", "green", "pink"], "label": list("ABCD")}]},
        ("allenai/ai2_arc", "ARC-Challenge/test-*.parquet"): {"id": ["c"], "question": ["Numeric labels?"], "answerKey": ["3"],
                                                             "choices": [{"text": ["x", "y", "z"], "label": ["1", "2", "3"]}]},
        ("cais/mmlu", "all/test-*.parquet"): {"question": ["Plain?"], "subject": ["virology"], "choices": [list("abcd")], "answer": [0]},
        ("openai/gsm8k", "main/test-*.parquet"): {"question": ["How much in total?"], "answer": ["<<500*2=1000>>1000\n#### 1,234"]},
        ("openai/openai_humaneval", "openai_humaneval/test-*.parquet"): {k: [HUMANEVAL[0][k]] for k in HUMANEVAL[0]},
    }

    def fake_download(repo_id, patterns):
        path = tmp_path / f"{len(os.listdir(tmp_path))}.parquet"
        pq.write_table(pa.table(tables[repo_id, patterns[0]]), path)
        return [str(path)]

    monkeypatch.setattr(chat_eval_shards, "hf_download", fake_download)
    chat_eval_shards.write_chat_eval("hf", tok_dir, str(tmp_path / "chat_eval"))
    _, got = read_back(stack, stack.Tokenizer(tok_dir), tmp_path)
    assert got == {"arc_easy": {mc_prompt("Sky color?", ["red", "blue", "green", "pink"]): (1, 4)},
                   "arc_challenge": {mc_prompt("Numeric labels?", ["x", "y", "z"]): (2, 3)},
                   "mmlu": {mc_prompt("Plain?", list("abcd")): (0, 4)},
                   "gsm8k": {"<|bos|><|user_start|>How much in total?<|user_end|><|assistant_start|>": "1234"},
                   "humaneval": {code_prompt(HUMANEVAL[0]["prompt"]): {k: HUMANEVAL[0][k] for k in ("task_id", "prompt", "entry_point", "test")}}}


def test_letters_must_be_single_tokens():
    class SplitsB:  # a tokenizer that needs two tokens for "B"
        def encode(self, text):
            return [1, 2] if text == "B" else [ord(text)]
    assert chat_eval_shards.letter_token_ids(SplitsB(), ["A"]) == [65]
    with pytest.raises(DataError, match="letter 'B' encodes to 2 tokens"):
        chat_eval_shards.letter_token_ids(SplitsB(), ["A", "B"])


BAD_ROWS = {  # name: (file, content, location, message fragment)
    "arc_key": ("arc/ARC-Easy-Test.jsonl", json.dumps(arc_row("Q", ["a", "b"], ["1", "2"], "1")) + "\n" + json.dumps(arc_row("Q", ["a", "b"], ["1", "2"], "C")) + "\n",
                ":2:", "answerKey 'C' is not among the choice labels ['1', '2']"),
    "arc_json": ("arc/ARC-Challenge-Test.jsonl", '{"id": 1,\n', ":1:", "malformed JSON"),
    "mmlu_columns": ("mmlu/test/astronomy_test.csv", MMLU_CSV + "Short?,a,b,c\n", ":5:", "expected 6 columns, got 4"),
    "mmlu_answer": ("mmlu/test/virology_test.csv", "question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,4\n", ":2:", "answer 4 is not a choice index 0..3"),
    "mmlu_letter": ("mmlu/test/virology_test.csv", "question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,B\n", ":2:", "answer 'B' is not a choice index"),
    "mmlu_header": ("mmlu/test/virology_test.csv", "Q,a,b,c,d,A\n", ":1:", "expected the header question,choice0"),
    "gsm8k_marker": ("gsm8k/test.jsonl", json.dumps({"question": "Q", "answer": "The answer is 5."}) + "\n", ":1:", "no '#### <number>' line"),
    "gsm8k_field": ("gsm8k/test.jsonl", json.dumps({"question": "Q", "solution": "#### 5"}) + "\n", ":1:", "malformed gsm8k record (KeyError: 'answer')"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_rows_name_file_and_line(name, eval_dir, tok_dir, tmp_path):
    file, content, where, fragment = BAD_ROWS[name]
    (eval_dir / file).write_text(content)
    with pytest.raises(DataError) as e:
        chat_eval_shards.write_chat_eval(str(eval_dir), tok_dir, str(tmp_path / "out" / "chat_eval"))
    assert str(e.value).startswith(f"{eval_dir / file}{where} ") and fragment in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_bad_row_is_one_error_line_and_no_output(eval_dir, tok_dir, tmp_path):
    file, content, where, fragment = BAD_ROWS["mmlu_columns"]
    (eval_dir / file).write_text(content)
    result = run_cli("--input", eval_dir, "--tokenizer", tok_dir, "--out", tmp_path / "out" / "chat_eval")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: {eval_dir / file}{where} {fragment}\n"
    assert not (tmp_path / "out").exists()
    result = run_cli("--input", eval_dir / "nope", "--tokenizer", tok_dir, "--out", tmp_path / "out" / "chat_eval")
    assert result.returncode == 1 and result.stderr.startswith(f"error: {eval_dir / 'nope'}: not a folder")


def test_real_eval_data(shared_data, tok_dir, tmp_path, stack):
    manifest, _ = chat_eval_shards.write_chat_eval(os.path.join(shared_data, "eval"), tok_dir, str(tmp_path / "chat_eval"), max_per_task=20)
    tok = stack.Tokenizer(tok_dir)
    data = stack.load_chat_eval(str(tmp_path), tok)
    assert [(t["name"], t["n_examples"]) for t in data.tasks] == [("arc_easy", 20), ("arc_challenge", 20), ("mmlu", 20), ("gsm8k", 20), ("humaneval", 20)]
    assert all(0.19 < t["random_baseline"] < 0.34 for t in data.tasks[:3]) and data.tasks[3]["random_baseline"] == data.tasks[4]["random_baseline"] == 0
    assert all(a.lstrip("-").replace(".", "").isdigit() for a in data.tasks[3]["answers"])
    with open(os.path.join(shared_data, "eval", "mmlu", "test", "abstract_algebra_test.csv"), newline="") as f:
        first_rows = [row[0] for row in csv.reader(f)][1:21]
    mmlu = [tok.decode(data.prompt(data.tasks[2]["first_example"] + j)[0]) for j in range(20)]
    assert sum(any(q in p for p in mmlu) for q in first_rows) < 5, "a shuffled sample, not the first file's rows"
    for i in range(len(data.examples)):
        ids, gold, n_choices = data.prompt(i)
        text = tok.decode(ids)
        assert text.startswith("<|bos|><|user_start|>") and text.endswith("<|user_end|><|assistant_start|>")
        if n_choices:
            assert 0 <= gold < n_choices and text.count("=") >= n_choices and f"={'ABCDE'[n_choices - 1]}\n\nRespond only" in text


def test_real_humaneval(shared_data, eval_dir, tok_dir, tmp_path, stack):
    """All 164 problems of the shared file (beside the tiny fixture tasks, to stay fast)."""
    os.symlink(os.path.join(shared_data, "eval", "humaneval"), eval_dir / "humaneval")
    chat_eval_shards.write_chat_eval(str(eval_dir), tok_dir, str(tmp_path / "chat_eval"))
    tok = stack.Tokenizer(tok_dir)
    data = stack.load_chat_eval(str(tmp_path), tok)
    task = data.tasks[4]
    assert (task["name"], task["kind"], task["n_examples"], task["random_baseline"]) == ("humaneval", "code", 164, 0.0)
    assert sorted(p["task_id"] for p in task["problems"]) == sorted(f"HumanEval/{i}" for i in range(164))
    for j, p in enumerate(task["problems"]):
        ids, gold, n_choices = data.prompt(task["first_example"] + j)
        assert ids[-1] == tok.special("<|assistant_start|>") and tok.decode(ids) == code_prompt(p["prompt"])
        assert (gold, n_choices) == (-1, 0) and f"def {p['entry_point']}(" in p["prompt"] and "def check(candidate)" in p["test"]


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.pop("tasks"), "'tasks' must be a non-empty list"),
    (lambda m: m.pop("letter_ids"), r"needs 'letter_ids' \(a list of ints\)"),
    (lambda m: m["tasks"][1].pop("kind"), "task 1 needs name, kind, first_example, n_examples, random_baseline"),
    (lambda m: m["tasks"][0].update(n_examples=10**6), "task 0 needs .* with its examples inside the 11 rows"),
    (lambda m: m["tasks"][2].update(kind="essay"), "task 2 has kind 'essay'; known: categorical, generative, code"),
    (lambda m: m["tasks"][3]["answers"].pop(), r"task 3 \(generative\) needs 'answers': one str per example"),
    (lambda m: m["tasks"][4]["problems"][0].pop("test"), "task 4: every problem needs 'prompt', 'test' and 'entry_point'"),
])
def test_a_manifest_missing_what_scoring_reads_is_one_error(eval_dir, tok_dir, tmp_path, stack, edit, fragment):
    """Before: a KeyError or TypeError in the middle of an evaluation, naming no file."""
    write_humaneval(eval_dir)
    chat_eval_shards.write_chat_eval(str(eval_dir), tok_dir, str(tmp_path / "chat_eval"))
    path = edit_json(tmp_path / "chat_eval" / "manifest.json", edit)
    with pytest.raises(stack.DataFormatError, match=f"{path}: {fragment}"):
        stack.load_chat_eval(str(tmp_path), stack.Tokenizer(tok_dir))
