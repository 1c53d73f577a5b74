"""CORE writer: every sequence is BOS + the prompt nanochat's templates render, with nanochat's continuation span;
few-shot seeds, --max-per-task, left truncation, stand-ins, bundle layouts, bad input. Written with
data/core_shards.py, read back with the stack's load_core. Expected values are built here independently: prompts
from the templates written out, tokens by encoding whole prompts, spans by comparing whole token lists."""
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from hypothesis import given, settings, strategies as st

import core_shards
from common import DataError
from conftest import ROOT, edit_json
from tokenizer import Tokenizer

MC_ROWS = [{"query": f"Question: Which fruit is number {i}?" + ("\nHint: it is sweet. " if i % 2 else ""),
            "choices": ["Apple", "Banana", "Cherry"], "gold": i % 3} for i in range(7)]
MC_ROWS[4]["query"] = "\n  Question: which one,\n  again?"  # leading whitespace: no piece boundary before it
SCHEMA_ROWS = [{"context_options": [f"Tom gave Ann {n} pears because Tom", f"Tom gave Ann {n} pears because Ann"],
                "continuation": "was hungry.", "gold": n % 2} for n in range(5)]
LM_ROWS = [{"context": f"Q: What is {i} plus {i}?\nA:" + ("  \n" if i % 3 == 0 else ""), "continuation": str(2 * i)} for i in range(8)]
LM_ROWS[5]["context"] = "\n\t" + LM_ROWS[5]["context"]  # trimmed by the template
# label, icl_task_type, num_fewshot, continuation_delimiter (None: the default), dataset_uri, rows, random baseline %
TASKS = [("mc_task", "multiple_choice", 2, "\nAnswer: ", "world/mc.jsonl", MC_ROWS, 33.3),
         ("schema_task", "schema", 1, None, "language/schema.jsonl", SCHEMA_ROWS, 50),
         ("lm_task", "language_modeling", 3, " \n", "world/lm.jsonl", LM_ROWS, 0)]  # prompt_without.strip() drops "\n" too


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_bundle(root, tasks=TASKS, layout="flat"):
    """A bundle folder (task files beside core.yaml, or under eval_data/) or an eval_bundle.zip; returns its path."""
    folder = os.path.join(root, "eval_bundle")
    data = os.path.join(folder, "eval_data") if layout != "flat" else folder
    os.makedirs(folder, exist_ok=True)
    icl = []
    for label, task_type, k, delim, uri, rows, _ in tasks:
        icl.append({"label": label, "dataset_uri": uri, "num_fewshot": [k], "icl_task_type": task_type, **({"continuation_delimiter": delim} if delim else {})})
        if rows is not None:
            write_jsonl(os.path.join(data, uri), rows)
    with open(os.path.join(folder, "core.yaml"), "w") as f:
        yaml.safe_dump({"icl_tasks": icl}, f)
    with open(os.path.join(folder, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Random baseline,Description\n")
        f.writelines(f'{label},misc,{baseline},"a task, described\non two lines"\n' for label, *_, baseline in tasks)
    if layout != "zip":
        return folder
    with zipfile.ZipFile(os.path.join(root, "eval_bundle.zip"), "w") as z:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                z.write(os.path.join(dirpath, name), os.path.relpath(os.path.join(dirpath, name), root))
    shutil.rmtree(folder)
    return os.path.join(root, "eval_bundle.zip")


# ---------------------------------------------------------------------------------------------------------------
# The expected file, built independently of the writer

def expected_example(task_type, rows, i, k, delim, tok):
    """(gold, [(prompt, BOS + its tokens, cont_start, cont_end)]) of shuffled example i, as nanochat computes them."""
    shots = [rows[j] for j in random.Random(1234 + i).sample([j for j in range(len(rows)) if j != i], k)] if k else []
    blocks = {"multiple_choice": lambda r: r["query"] + delim + r["choices"][r["gold"]],
              "schema": lambda r: r["context_options"][r["gold"]] + delim + r["continuation"],
              "language_modeling": lambda r: r["context"].strip() + delim + r["continuation"]}[task_type]
    fewshot = "".join(blocks(s) + "\n\n" for s in shots)
    item = rows[i]
    if task_type == "multiple_choice":
        prompts = [fewshot + item["query"] + delim + c for c in item["choices"]]
    elif task_type == "schema":
        prompts = [fewshot + o + delim + item["continuation"] for o in item["context_options"]]
    else:
        prompts = [(fewshot + item["context"].strip() + delim).strip(), fewshot + item["context"].strip() + delim + item["continuation"]]
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    if task_type == "language_modeling":
        assert ids[1][:len(ids[0])] == ids[0]
        return 0, [(prompts[1], ids[1], len(ids[0]), len(ids[1]))]
    if task_type == "schema":  # the common suffix
        n = next(n for n in range(min(map(len, ids)) + 1) if n == min(map(len, ids)) or len({s[-1 - n] for s in ids}) > 1)
        return item["gold"], [(p, s, len(s) - n, len(s)) for p, s in zip(prompts, ids)]
    n = next(n for n in range(min(map(len, ids)) + 1) if n == min(map(len, ids)) or len({s[n] for s in ids}) > 1)
    return item["gold"], [(p, s, n, len(s)) for p, s in zip(prompts, ids)]


def expected_core(tasks, tok, max_per_task=None):
    """tasks: [(task_type, num_fewshot, delimiter, rows in file order)] -> per task, its expected examples."""
    out = []
    for task_type, k, delim, rows in tasks:
        rows = list(rows)
        random.Random(1337).shuffle(rows)
        out.append([expected_example(task_type, rows, i, k, delim, tok) for i in range(min(len(rows), max_per_task or len(rows)))])
    return out


def assert_core_is(data, expected, stack_tok):
    """The file read by the stack holds exactly the expected sequences, left-truncated to its max_len."""
    assert len(data.tasks) == len(expected)
    n_truncated = 0
    for task_index, (task, examples) in enumerate(zip(data.tasks, expected)):
        assert task["n_examples"] == len(examples)
        for e, (gold, seqs) in enumerate(examples):
            row = data.examples[task["first_example"] + e].tolist()
            assert row[0] == task_index and row[1] == gold and row[3] == len(seqs)
            for j, (prompt, ids, start, end) in enumerate(seqs):
                got, got_start, got_end = data.sequence(row[2] + j)
                crop = max(0, len(ids) - data.max_len)
                assert got.tolist() == ids[crop:] and (got_start, got_end) == (start - crop, end - crop), (task["label"], e, j)
                if crop:
                    n_truncated += 1
                else:
                    assert stack_tok.decode(got) == "<|bos|>" + prompt
    assert data.examples[:, 2].tolist() == sorted(data.examples[:, 2].tolist())  # examples of a task are contiguous, in order
    return n_truncated


def tiny_expected(tok, max_per_task=None):
    return expected_core([(t, k, d or " ", rows) for _, t, k, d, _, rows, _ in TASKS], tok, max_per_task)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


# ---------------------------------------------------------------------------------------------------------------

def test_cli_writes_what_nanochat_evaluates(tmp_path, tok_dir, tok, stack):
    bundle, out = make_bundle(tmp_path), tmp_path / "prepared" / "core"
    result = subprocess.run([sys.executable, "data/core_shards.py", "--bundle", bundle, "--tokenizer", tok_dir, "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(label in result.stdout for label, *_ in TASKS) and "total" in result.stdout
    stack_tok = stack.Tokenizer(tok_dir)
    data = stack.load_core(str(out.parent), stack_tok)
    assert assert_core_is(data, tiny_expected(tok), stack_tok) == 0
    manifest = json.load(open(out / "manifest.json"))
    assert (manifest["format"], manifest["version"], manifest["max_len"]) == ("core", 1, 2048)
    assert (manifest["vocab_size"], manifest["bos_id"], manifest["tokenizer_sha256"]) == (tok.vocab_size, tok.bos_id, tok.sha256)
    assert [(t["label"], t["task_type"], t["num_fewshot"], t["continuation_delimiter"], t["dataset"], t["stand_in"], t["n_examples"]) for t in data.tasks] == \
        [(label, tt, k, d or " ", uri, None, len(rows)) for label, tt, k, d, uri, rows, _ in TASKS]
    assert [t["random_baseline"] for t in data.tasks] == pytest.approx([0.333, 0.5, 0.0])
    # The continuation spans cover what is scored: the choice, the shared ending, the answer.
    for task, answers in zip(data.tasks, ([r["choices"] for r in MC_ROWS], [["was hungry."] * 2] * len(SCHEMA_ROWS), [[r["continuation"]] for r in LM_ROWS])):
        shuffled = list(answers)
        random.Random(1337).shuffle(shuffled)
        for e, options in enumerate(shuffled):
            _, _, first, n = data.examples[task["first_example"] + e].tolist()
            for j, answer in enumerate(options):
                ids, start, end = data.sequence(first + j)
                assert stack_tok.decode(ids[start:end]).strip() == answer
                if task["task_type"] == "language_modeling":
                    assert stack_tok.decode(ids[start:end]) == " \n" + answer


def test_fewshot_is_seeded_by_shuffled_position(tmp_path, tok_dir, stack):
    """A literal prompt: MC example 0 after the 1337 shuffle, with the two shots Random(1234).sample picks."""
    core_shards.write_core(make_bundle(tmp_path), tok_dir, tmp_path / "core")
    stack_tok = stack.Tokenizer(tok_dir)
    data = stack.load_core(str(tmp_path), stack_tok)
    rows = list(MC_ROWS)
    random.Random(1337).shuffle(rows)
    a, b = (rows[j] for j in random.Random(1234).sample([1, 2, 3, 4, 5, 6], 2))
    literal = (f"<|bos|>{a['query']}\nAnswer: {a['choices'][a['gold']]}\n\n{b['query']}\nAnswer: {b['choices'][b['gold']]}\n\n"
               f"{rows[0]['query']}\nAnswer: Banana")
    assert stack_tok.decode(data.sequence(1)[0]) == literal
    assert core_shards.fewshot_indices(5, 7, 6) == random.Random(1239).sample([0, 1, 2, 3, 4, 6], 6)
    assert core_shards.fewshot_indices(100, 1000, 10) == random.Random(1334).sample([j for j in range(1000) if j != 100], 10)


def test_max_per_task_and_left_truncation(tmp_path, tok_dir, tok, stack):
    core_shards.write_core(make_bundle(tmp_path), tok_dir, tmp_path / "core", max_len=12, max_per_task=3)
    stack_tok = stack.Tokenizer(tok_dir)
    data = stack.load_core(str(tmp_path), stack_tok)
    assert data.max_len == 12 and len(data.examples) == 9
    assert assert_core_is(data, tiny_expected(tok, max_per_task=3), stack_tok) > 10  # few-shot still drawn from all rows
    assert (data.sequences[:, 1] + data.sequences[:, 3]).max() == 12
    # The shortest max_len that works leaves one token before the longest continuation; one less is an error.
    longest = max(end - start for task in tiny_expected(tok) for _, seqs in task for _, _, start, end in seqs)
    core = core_shards.write_core(make_bundle(tmp_path), tok_dir, tmp_path / "tight" / "core", max_len=longest + 1)
    assert core.sequences[:, 4].min() == 1
    with pytest.raises(DataError, match=f"needs a token before it within --max-len {longest} "):
        core_shards.write_core(make_bundle(tmp_path), tok_dir, tmp_path / "tighter" / "core", max_len=longest)
    assert not os.path.exists(tmp_path / "tighter")


def test_bundle_layouts_give_identical_files(tmp_path, tok_dir, monkeypatch):
    """Tasks beside core.yaml or under eval_data/, an eval_bundle.zip, and `download` (served here from a local zip)."""
    served, fetched = make_bundle(tmp_path / "served", layout="zip"), []
    monkeypatch.setattr(core_shards.urllib.request, "urlretrieve", lambda url, dest: fetched.append(url) or shutil.copy(served, dest))
    outputs = []
    for layout in ("flat", "eval_data", "zip", "download"):
        out = tmp_path / layout / "core"
        core_shards.write_core("download" if layout == "download" else make_bundle(tmp_path / layout, layout=layout), tok_dir, out)
        outputs.append([open(out / name, "rb").read() for name in ("tokens.bin", "sequences.npy", "examples.npy", "manifest.json")])
    assert all(o == outputs[0] for o in outputs) and fetched == [core_shards.EVAL_BUNDLE_URL]


STORIES = [{"id": "s1", "source": "wikipedia", "story": "Ann has a red bike.\nShe rides it daily.",
            "turns": [{"question": "What does Ann have?", "answer": "a red bike", "answers": []},
                      {"question": "How often does she ride?", "answer": "daily", "answers": []},
                      {"question": "What color?", "answer": "red", "answers": []}]},
           {"id": "s2", "source": "cnn", "story": "The market opened late.",
            "turns": [{"question": "What opened?", "answer": "The market", "answers": []},
                      {"question": "When?", "answer": "late", "answers": []}]}]


def olmes_coqa(stories):
    """The OLMES CoQA prompt of every turn (shared/data/SOURCES.md), as language_modeling rows."""
    rows = []
    for s in stories:
        for t, turn in enumerate(s["turns"]):
            context = "Passage: " + s["story"] + "\n\n"
            if t > 0:
                context += "Preceding questions:\n\n" + "".join(f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in s["turns"][:t])
            rows.append({"context": context + "Final question:\n\nQuestion: " + turn["question"] + "\nAnswer:", "continuation": turn["answer"]})
    return rows


def test_stand_ins_replace_absent_files(tmp_path, tok_dir, tok, stack):
    tasks = [("hellaswag", "multiple_choice", 1, None, "lu/hellaswag.jsonl", None, 25),
             ("squad", "language_modeling", 1, None, "rc/squad.jsonl", None, 0),
             ("coqa", "language_modeling", 0, None, "rc/coqa.jsonl", None, 0)]
    bundle = make_bundle(tmp_path, tasks)
    write_jsonl(os.path.join(bundle, "lu/hellaswag_olmes_val1000.jsonl"), MC_ROWS)
    write_jsonl(os.path.join(bundle, "rc/squad_olmes_val1000.jsonl"), LM_ROWS)
    write_jsonl(os.path.join(bundle, "rc/coqa_val_stories.jsonl"), STORIES)
    core_shards.write_core(bundle, tok_dir, tmp_path / "core")
    stack_tok = stack.Tokenizer(tok_dir)
    data = stack.load_core(str(tmp_path), stack_tok)
    coqa = olmes_coqa(STORIES)
    assert coqa[1]["context"] == ("Passage: Ann has a red bike.\nShe rides it daily.\n\nPreceding questions:\n\n"
                                  "Question: What does Ann have?\nAnswer: a red bike\n\nFinal question:\n\nQuestion: How often does she ride?\nAnswer:")
    assert_core_is(data, expected_core([("multiple_choice", 1, " ", MC_ROWS), ("language_modeling", 1, " ", LM_ROWS),
                                        ("language_modeling", 0, " ", coqa)], tok), stack_tok)
    assert [t["dataset"] for t in data.tasks] == ["lu/hellaswag_olmes_val1000.jsonl", "rc/squad_olmes_val1000.jsonl", "rc/coqa_val_stories.jsonl"]
    assert all(t["stand_in"].startswith(f"{t['label']}.jsonl is absent: ") for t in data.tasks)
    assert data.tasks[2]["n_examples"] == 5
    # the named file wins when present
    write_jsonl(os.path.join(bundle, "lu/hellaswag.jsonl"), MC_ROWS[:4])
    core = core_shards.write_core(bundle, tok_dir, tmp_path / "core")
    assert (core.tasks[0]["dataset"], core.tasks[0]["stand_in"], core.tasks[0]["n_examples"]) == ("lu/hellaswag.jsonl", None, 4)
    break_line(os.path.join(bundle, "rc/coqa_val_stories.jsonl"), 2, json.dumps({**STORIES[1], "turns": [{"question": "When?"}]}))
    with pytest.raises(DataError, match=r"rc/coqa_val_stories.jsonl:2: expected a story"):
        core_shards.write_core(bundle, tok_dir, tmp_path / "core")


def replace_in(path, old, new):
    text = open(path).read()
    assert old in text
    open(path, "w").write(text.replace(old, new))


def break_line(path, lineno, text):
    lines = open(path).read().splitlines()
    lines[lineno - 1] = text
    open(path, "w").write("\n".join(lines) + "\n")


BAD_INPUTS = {  # name: (how to break the good bundle, what the error line must contain)
    "malformed line": (lambda b: break_line(f"{b}/world/mc.jsonl", 3, '{"query": "x", '), "world/mc.jsonl:3: malformed JSON"),
    "missing field": (lambda b: break_line(f"{b}/world/mc.jsonl", 5, '{"query": "x", "gold": 0}'), "world/mc.jsonl:5: missing field 'choices'"),
    "bad gold": (lambda b: break_line(f"{b}/language/schema.jsonl", 2, json.dumps({**SCHEMA_ROWS[1], "gold": 2})), "language/schema.jsonl:2: field 'gold'"),
    "missing task file": (lambda b: os.remove(f"{b}/world/lm.jsonl"), "world/lm.jsonl: missing task file"),
    "unknown label": (lambda b: replace_in(f"{b}/eval_meta_data.csv", "lm_task,", "other_task,"), "eval_meta_data.csv: no row for task 'lm_task'"),
    "missing core.yaml": (lambda b: os.remove(f"{b}/core.yaml"), "core.yaml: missing"),
    "too few rows for few-shot": (lambda b: write_jsonl(f"{b}/world/lm.jsonl", LM_ROWS[:3]), "world/lm.jsonl: task 'lm_task' needs more than 3 rows"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_writes_nothing(case, tmp_path, tok_dir, monkeypatch, capsys):
    bundle, out = make_bundle(tmp_path), tmp_path / "out"
    breaker, message = BAD_INPUTS[case]
    breaker(bundle)
    monkeypatch.setattr(sys, "argv", ["core_shards.py", "--bundle", bundle, "--tokenizer", tok_dir, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        core_shards.run_cli(core_shards.main)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bundle}/")
    assert message in err[0]
    assert not out.exists() or not any(out.iterdir())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["\n", "\n\n", " \n", "\r\n", "\t", "  ", "\u00a0", "\u2028", "\x1c", "\x0b", "x", "Question:",
                                 "'s", "12345", "!!", ".\n", "...", " foo", "é", "東京", "\u3000", "½", "\n ", "A", ":"]), max_size=30))
def test_piece_cuts_tokenize_exactly(tok, fragments):
    """The writer tokenizes pieces cut after newlines: their tokens back to back are the whole text's tokens."""
    text = "".join(fragments)
    enc = core_shards.PieceEncoder(tok)
    assert enc.tokens(enc.split(text)) == tok.encode(text)


def test_other_split_patterns_encode_whole_texts(tok):
    """The piece cut is only proven for SPLIT_PATTERN; any other pattern must not be cut."""
    other = Tokenizer(tok.mergeable_ranks, tok.pattern + "|\\n", tok.special_tokens)
    text = "Question: a?\nAnswer: b\n\nQuestion: c?"
    assert core_shards.PieceEncoder(tok).split(text) == ["Question: a?\n", "Answer: b\n\n", "Question: c?"]
    assert core_shards.PieceEncoder(other).split(text) == [text]


def test_real_bundle(shared_data, tmp_path, tok_dir, tok, stack):
    """All 22 tasks of shared/data's bundle, 20 examples each, against prompts rendered here from the task files."""
    bundle = os.path.join(shared_data, "eval", "core")
    core_shards.write_core(bundle, tok_dir, tmp_path / "core", max_per_task=20)
    stack_tok = stack.Tokenizer(tok_dir)
    data = stack.load_core(str(tmp_path), stack_tok)
    assert len(data.tasks) == 22 and all(t["n_examples"] == 20 for t in data.tasks)
    assert {t["label"] for t in data.tasks if t["stand_in"]} == {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}
    assert {t["label"]: t["random_baseline"] for t in data.tasks}["arc_easy"] == 0.25
    stand_ins = {"hellaswag.jsonl": "hellaswag_olmes_val1000.jsonl", "squad.jsonl": "squad_olmes_val1000.jsonl"}
    tasks = []
    for t in yaml.safe_load(open(os.path.join(bundle, "core.yaml")))["icl_tasks"]:
        folder, name = os.path.split(os.path.join(bundle, t["dataset_uri"]))
        if name == "coqa.jsonl":
            rows = olmes_coqa(json.loads(line) for line in open(os.path.join(folder, "coqa_val_stories.jsonl")))
        else:
            rows = [json.loads(line) for line in open(os.path.join(folder, stand_ins.get(name, name)))]
        tasks.append((t["icl_task_type"], t["num_fewshot"][0], t.get("continuation_delimiter", " "), rows))
    assert_core_is(data, expected_core(tasks, tok, max_per_task=20), stack_tok)


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.pop("max_len"), "needs 'max_len' \\(int\\)"),
    (lambda m: m.update(tasks={}), "'tasks' must be a non-empty list"),
    (lambda m: m["tasks"][0].pop("task_type"), "task 0 needs label, task_type, first_example"),
    (lambda m: m["tasks"][1].update(random_baseline="half"), "task 1 needs"),
    (lambda m: m["tasks"][2].update(first_example=-1), "task 2 needs .* with its examples inside the"),
])
def test_a_manifest_missing_what_scoring_reads_is_one_error(tmp_path, tok_dir, stack, edit, fragment):
    out = tmp_path / "prepared" / "core"
    core_shards.write_core(make_bundle(tmp_path), tok_dir, str(out))
    path = edit_json(out / "manifest.json", edit)
    with pytest.raises(stack.DataFormatError, match=f"{path}: {fragment}"):
        stack.load_core(str(out.parent), stack.Tokenizer(tok_dir))
