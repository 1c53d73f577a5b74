"""CORE evaluation: packed varlen batches decide every example exactly as one forward per sequence does (whatever
the batch boundaries), nanochat's rule for empty continuations, the accuracy / centered / CORE arithmetic, the
rank split, the table, and a run over the real 22 tasks. CORE files are written with data/core_shards.py."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import core_shards
import tokenizer
from conftest import ROOT, STACK_PATH, TINY_ARGS
from eval_bench import evaluate_example_alone  # bench/: the one-sequence-per-forward reference

MC_ROWS = [{"query": f"Question: Which fruit is number {i} in the list of all the fruits we saw?",
            "choices": ["Apple", "Banana", "Cherry"], "gold": i % 3} for i in range(8)]
# One choice's tokens are the common prefix of all: its continuation is empty (nanochat: mean loss NaN).
MC_ROWS += [{"query": "Question: What do we bake?", "choices": ["Apple", "Apple pie", "Apple tart"], "gold": 0},
            {"query": "Question: What else do we bake?", "choices": ["Apple pie", "Apple", "Apple tart"], "gold": 1}]
SCHEMA_ROWS = [{"context_options": [f"Tom gave Ann {n} pears because Tom", f"Tom gave Ann {n} pears because Ann"],
                "continuation": "was hungry after the long walk.", "gold": n % 2} for n in range(6)]
LM_ROWS = [{"context": f"Q: What is {i} plus {i}, written out?\nA:", "continuation": f"{2 * i} exactly"} for i in range(8)]
# label, type, shots, delimiter, file, rows, random baseline (percent)
TASKS = [("mc", "multiple_choice", 2, "\nAnswer: ", "mc.jsonl", MC_ROWS, 33.3),
         ("schema", "schema", 1, " ", "schema.jsonl", SCHEMA_ROWS, 50),
         ("lm", "language_modeling", 2, " ", "lm.jsonl", LM_ROWS, 0)]
MAX_LEN = 112  # the longer multiple_choice sequences are left-truncated (they do not start with BOS)


def write_bundle(folder, tasks):
    os.makedirs(folder, exist_ok=True)
    for _, _, _, _, name, rows, _ in tasks:
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    icl = [{"label": label, "dataset_uri": name, "num_fewshot": [k], "icl_task_type": kind, "continuation_delimiter": delim}
           for label, kind, k, delim, name, _, _ in tasks]
    with open(os.path.join(folder, "core.yaml"), "w") as f:
        yaml.safe_dump({"icl_tasks": icl}, f)
    with open(os.path.join(folder, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Random baseline\n" + "".join(f"{label},{b}\n" for label, *_, b in tasks))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on two shared cores mostly wait for each other; these models are tiny."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def core(stack, tok_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("core_eval")
    core_shards.write_core(write_bundle(root / "bundle", TASKS), tok_dir, root / "data" / "core", max_len=MAX_LEN)
    return stack.load_core(str(root / "data"), stack.Tokenizer(tok_dir))


def tiny_model(stack, vocab_size, seed=0):
    """TINY_ARGS's GPT with its zero-initialised output projections and bigram table randomised, so no block is
    the identity; the smear switched on, so a document start (prev_ids) shows in every layer; logits spread out."""
    torch.manual_seed(seed)
    model = stack.GPT(stack.ModelConfig.of(stack.parse_config(TINY_ARGS), vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".o", ".proj")) or name == "bigram_embed":
                p.normal_(0, 0.02)
        model.smear_lambda.fill_(1.0)
        model.lm_head.normal_(0, 0.1)  # logits that vary with the hidden state
    return model


@pytest.fixture(scope="module")
def model(stack, tok_dir):
    return tiny_model(stack, stack.Tokenizer(tok_dir).vocab_size)


def cpu_rt(stack, rank=0, world_size=1):
    return stack.Runtime(torch.device("cpu"), torch.float32, rank, world_size, "sdpa")


def windows_of(model):
    """Layer 0's window is shorter than every sequence; layer 1's reaches back to each sequence's first token."""
    return model.windows(16, MAX_LEN)


def examples_of(core, label):
    t = next(t for t in core.tasks if t["label"] == label)
    return range(t["first_example"], t["first_example"] + t["n_examples"])


def alone_scores(model, stack, seq, windows):
    """Independent oracle: one sequence as the only document, logits at every position, the continuation sliced."""
    tokens, start, end = seq
    ids = torch.from_numpy(tokens)
    cu = torch.tensor([0] + [len(ids)] * 127, dtype=torch.int32)
    h = model.hidden(stack.Batch(ids, torch.cat([torch.tensor([-1]), ids[:-1]]), torch.arange(len(ids)), None, cu, len(ids)), windows, "sdpa")
    logits = model.logits(h)[start - 1:end - 1]
    return F.cross_entropy(logits, ids[start:end], reduction="none").mean().item(), bool((logits.argmax(-1) == ids[start:end]).all())


@torch.no_grad()
def test_packed_scores_equal_each_sequence_alone(stack, core, model, tok_dir, monkeypatch):
    """Mean continuation loss and greedy correctness of every sequence, all packed into one forward, against the
    oracle above. The file has left-truncated sequences, sequences longer than a window, empty continuations."""
    seqs = [core.sequence(i) for i in range(len(core.sequences))]
    bos = stack.Tokenizer(tok_dir).bos_id
    assert any(t[0] != bos for t, _, _ in seqs) and any(t[0] == bos for t, _, _ in seqs)
    assert min(len(t) for t, _, _ in seqs) > min(windows_of(model))
    attention, forwarded = stack.attention, []

    def checked_attention(q, k, v, cu_seqlens, max_seqlen, window, scale, backend, branches):
        assert cu_seqlens.dtype == torch.int32 and len(cu_seqlens) == 128
        assert max_seqlen >= int(cu_seqlens.diff().max())  # FA sizes its grid with it, SDPA its key bands
        forwarded.append(q.size(0))
        return attention(q, k, v, cu_seqlens, max_seqlen, window, scale, backend, branches)

    monkeypatch.setattr(stack, "attention", checked_attention)
    packed = stack.core_scores_packed(model, seqs, cpu_rt(stack), windows_of(model))
    # a multiple_choice example whose choices share one stored context went through the model with it once
    saved = sum((n - 1) * int(core.sequences[first, 1]) for _, _, first, n in core.examples.tolist()
                if n > 1 and len({tuple(core.sequences[s, :2]) for s in range(first, first + n)}) == 1)
    assert saved > 300 and forwarded[0] <= sum(len(t) for t, _, _ in seqs) - saved
    alone = [alone_scores(model, stack, seq, windows_of(model)) for seq in seqs]
    np.testing.assert_allclose([p[0] for p in packed], [a[0] for a in alone], rtol=2e-6, equal_nan=True)  # fp32 noise: ~2e-7
    assert [p[1] for p in packed] == [a[1] for a in alone]
    empty = [i for i, (_, start, end) in enumerate(seqs) if start == end]
    assert len(empty) == 2 and all(np.isnan(packed[i][0]) for i in empty)


@pytest.mark.parametrize("batch_tokens", [10**6, 300, 1])  # one forward; boundaries inside tasks and examples; one sequence each
def test_packed_decisions_equal_example_alone(stack, core, model, batch_tokens, monkeypatch):
    """The invariant: whatever the packing, every example is decided as evaluate_example_alone decides it."""
    forwards = []
    packed_scores = stack.core_scores_packed
    monkeypatch.setattr(stack, "core_scores_packed", lambda m, seqs, *a: forwards.append(len(seqs)) or packed_scores(m, seqs, *a))
    rt = cpu_rt(stack)
    out = stack.evaluate_core(model, core, rt, windows_of(model), batch_tokens=batch_tokens)
    alone = [int(evaluate_example_alone(stack, model, core, e, rt, windows_of(model))) for e in range(len(core.examples))]
    assert out["correct"].tolist() == alone
    assert 0 < sum(alone[e] for e in examples_of(core, "mc")) < len(examples_of(core, "mc"))  # decisions are not all alike
    assert sum(forwards) == len(core.sequences)
    if batch_tokens == 300:  # 2-3 sequences per forward: forwards end inside examples, and in the middle of tasks
        ends = set(np.cumsum(forwards).tolist())
        assert any(first < end < first + n for _, _, first, n in core.examples.tolist() for end in ends)
        assert len(forwards) > 2 * len(core.tasks)
    if batch_tokens == 1:
        assert forwards == [1] * len(core.sequences)


def test_empty_continuation_follows_nanochat(stack, core, model):
    """nanochat scores choice i by losses[si-1:ei-1].mean(): NaN for an empty continuation, and picks
    mean_losses.index(min(mean_losses)). min() keeps its first element until a smaller one comes: a NaN first
    choice always wins, a NaN later one never does (unlike torch.argmin or np.nanargmin)."""
    nan = float("nan")
    decide = lambda losses, gold: stack.core_decision("multiple_choice", gold, losses, None)
    assert decide([nan, 1.0, 0.5], 0) and decide([nan, nan], 0)
    assert decide([1.0, nan, 0.5], 2) and decide([0.2, nan, 0.5], 0) and not decide([1.0, nan, 0.5], 1)
    assert decide([0.5, 0.5, 0.7], 0) and decide([0.6, 0.5, 0.5], 1)  # ties: the first
    assert stack.core_decision("language_modeling", 0, [2.0], [True]) and not stack.core_decision("language_modeling", 0, [0.0], [False])
    # the two bundle rows built for this: "Apple" is the common prefix of all choices, first (gold 0) and second (gold 1)
    out = stack.evaluate_core(model, core, cpu_rt(stack), windows_of(model))
    mc = list(examples_of(core, "mc"))
    assert [core.sequence(s)[1] == core.sequence(s)[2] for e in mc[-2:] for s in range(core.examples[e, 2], core.examples[e, 2] + 3)] == \
        [True, False, False, False, True, False]
    assert out["correct"][mc[-2]] == 1 and out["correct"][mc[-1]] == 0


class NextTokenOracle:
    """Hidden state = the id of the token `shift` ahead in the packed buffer; logits put all mass on it. shift=1 is a
    perfect language model within a sequence (the last position, which sees the next sequence, is never scored)."""

    def __init__(self, model, shift):
        self.model, self.shift = model, shift

    def hidden(self, batch, *args, **kwargs):
        return torch.roll(batch.inputs, -self.shift)[:, None].float()

    def logits(self, h):
        return F.one_hot(h[:, 0].long(), self.model.vocab_size).float() * 20


@pytest.mark.parametrize("shift,accuracy", [(1, 1.0), (0, 0.0)])
def test_rigged_model_is_perfect_on_language_modeling(stack, core, model, monkeypatch, shift, accuracy):
    oracle = NextTokenOracle(model, shift)
    monkeypatch.setattr(model, "hidden", oracle.hidden)
    monkeypatch.setattr(model, "logits", oracle.logits)
    rt = cpu_rt(stack)
    for batch_tokens in (10**6, 300):
        out = stack.evaluate_core(model, core, rt, windows_of(model), batch_tokens=batch_tokens)
        assert out["results"]["lm"] == accuracy and out["centered"]["lm"] == accuracy  # random baseline 0
    assert all(evaluate_example_alone(stack, model, core, e, rt, windows_of(model)) == bool(accuracy) for e in examples_of(core, "lm"))


def test_accuracy_centered_and_core_arithmetic(stack, core, model):
    out = stack.evaluate_core(model, core, cpu_rt(stack), windows_of(model), max_per_task=5)
    correct = out["correct"]
    assert correct.dtype == np.int8 and set(correct.tolist()) <= {-1, 0, 1}
    baselines = {"mc": 0.333, "schema": 0.5, "lm": 0.0}
    centered = {}
    for label, n in (("mc", 10), ("schema", 6), ("lm", 8)):
        rows = correct[list(examples_of(core, label))]
        assert (rows[:5] >= 0).all() and (rows[5:] == -1).all() and len(rows) == n  # the first 5 only
        accuracy = sum(rows[:5]) / 5
        assert out["results"][label] == pytest.approx(accuracy, abs=1e-12)
        centered[label] = (accuracy - baselines[label]) / (1 - baselines[label])
    assert out["centered"] == pytest.approx(centered, abs=1e-12)
    assert out["core"] == pytest.approx(sum(centered.values()) / 3, abs=1e-12)
    everything = stack.evaluate_core(model, core, cpu_rt(stack), windows_of(model), max_per_task=-1)
    assert (everything["correct"] >= 0).all() and (everything["correct"][correct >= 0] == correct[correct >= 0]).all()


def test_ranks_take_strided_examples_and_sum(stack, core, model, monkeypatch):
    """Two ranks, run one after the other: all_reduce is replaced by a recorder that adds rank 0's vector into
    rank 1's (a SUM over two ranks), so rank 1 ends with what one process computes."""
    reduced = []

    def fake_all_reduce(t, op=None):
        assert t.is_contiguous() and op is None
        if reduced:
            t += reduced[0]
        reduced.append(t.clone())

    monkeypatch.setattr(stack.dist, "all_reduce", fake_all_reduce)
    one = stack.evaluate_core(model, core, cpu_rt(stack), windows_of(model), max_per_task=7)
    assert not reduced  # one process: no collective
    two = [stack.evaluate_core(model, core, cpu_rt(stack, rank, 2), windows_of(model), max_per_task=7) for rank in (0, 1)]
    assert (two[1]["correct"] == one["correct"]).all() and two[1]["core"] == one["core"]
    # rank 0 scored only examples 0, 2, 4, 6 of each task: everything else it leaves at 0 (wrong) before the sum
    rank0 = reduced[0].numpy()
    for t in core.tasks:
        for i, e in enumerate(examples_of(core, t["label"])):
            if i % 2 or i >= 7:
                assert rank0[e] == 0
            else:
                assert rank0[e] == one["correct"][e]


def test_table_marks_stand_ins(stack, core, model):
    out = stack.evaluate_core(model, core, cpu_rt(stack), windows_of(model), max_per_task=4)
    core.tasks[1] = {**core.tasks[1], "stand_in": "schema.jsonl is absent: a stand-in"}
    try:
        table = stack.task_table(out, core.tasks, "label", "CORE")
    finally:
        core.tasks[1] = {**core.tasks[1], "stand_in": None}
    lines = table.splitlines()
    assert len(lines) == 5
    for line, t in zip(lines[1:4], core.tasks):
        label = t["label"]
        assert line.split()[:4] == [label, "4", f"{out['results'][label]:.4f}", f"{out['centered'][label]:.4f}"]
        assert line.endswith("(stand-in)") == (label == "schema")
    assert lines[-1].split() == ["CORE", f"{out['core']:.4f}"]


def test_real_core_tasks(stack, shared_data, tmp_path):
    """All 22 tasks of shared/data's bundle (4 examples each), a tokenizer trained on a slice of the pretraining
    text, a tiny random model: every task scored, centered values within their possible range, stand-ins marked."""
    text = open(os.path.join(shared_data, "pretrain", "val_wikitext2.txt"), encoding="utf-8").read()[:300_000]
    tok_dir = tmp_path / "tokenizer"
    tokenizer.train(iter(text.split("\n\n")), 1024).save(tok_dir)
    core_shards.write_core(os.path.join(shared_data, "eval", "core"), str(tok_dir), tmp_path / "core", max_per_task=4)
    data = stack.load_core(str(tmp_path), stack.Tokenizer(str(tok_dir)))
    model = tiny_model(stack, 1024)
    out = stack.evaluate_core(model, data, cpu_rt(stack), model.windows(32, 128), max_per_task=4, batch_tokens=8192)
    assert len(data.tasks) == 22 and len(out["results"]) == 22 and (out["correct"] >= 0).sum() == 88
    for t in data.tasks:
        b, c = t["random_baseline"], out["centered"][t["label"]]
        assert 0 <= b < 1 and -b / (1 - b) - 1e-9 <= c <= 1
    assert -1 <= out["core"] <= 1
    table = stack.task_table(out, data.tasks, "label", "CORE")
    marked = {line.split()[0] for line in table.splitlines() if line.endswith("(stand-in)")}
    assert marked == {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}
    assert table.splitlines()[-1].startswith("CORE")


def test_pt_then_eval_phase_writes_core_metrics(tiny_data, tok_dir, tmp_path):
    """--phases pt,eval: the eval phase rebuilds the model from the checkpoint's own config and adds CORE."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    core_shards.write_core(write_bundle(tmp_path / "bundle", TASKS), tok_dir, data / "core", max_len=MAX_LEN)
    r = subprocess.run([sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run),
                        "--phases", "pt,eval", "--core-max-per-task", "4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.load(open(run / "metrics.json"))
    assert set(metrics["core_per_task"]) == {"mc", "schema", "lm"} and metrics["core_max_per_task"] == 4
    assert metrics["core"] == pytest.approx(np.mean(list(metrics["core_per_task"].values())))
    assert "evaluating " + str(run / "ckpt_000008") in r.stdout and "CORE" in r.stdout


@torch.no_grad()
def test_eval_scores_a_bundle_of_your_own_without_bpb(stack, tok_dir, pretrained_run, tmp_path):
    """A user's own multiple-choice bundle, written by data/core_shards.py --bundle into a data directory holding only
    tokenizer/ and core/: --phases eval scores it without bpb, prints the task's accuracy and writes each example's
    choice, the option each sequence alone scores lowest."""
    data, run = tmp_path / "mine", pretrained_run[1]
    shutil.copytree(tok_dir, data / "tokenizer")
    bundle = write_bundle(tmp_path / "bundle", [("mine", "multiple_choice", 0, "\nAnswer: ", "mine.jsonl", MC_ROWS, 33.3)])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "core_shards.py"), "--bundle", str(bundle),
                        "--tokenizer", str(data / "tokenizer"), "--out", str(data / "core")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, STACK_PATH, *TINY_ARGS, "--phases", "eval", "--data-dir", str(data), "--run-dir",
                        str(out), "--init-from", str(run / "ckpt_000008")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"(no bpb: {data} has no pretrain/)" in r.stdout and "val bpb" not in r.stdout
    table = next(line for line in r.stdout.splitlines() if line.split()[:1] == ["mine"])
    rows = [json.loads(line) for line in (out / "core_examples.jsonl").read_text().splitlines()]
    assert [(x["task"], x["example"]) for x in rows] == [("mine", i) for i in range(len(MC_ROWS))]
    assert sorted(x["gold"] for x in rows) == sorted(r["gold"] for r in MC_ROWS)  # the file is shuffled
    assert table.split()[1:3] == [str(len(rows)), f"{sum(x['correct'] for x in rows) / len(rows):.4f}"]
    model, _ = stack.load_model(str(run / "ckpt_000008"))
    core = stack.load_core(str(data), stack.Tokenizer(tok_dir))
    for x, e in zip(rows, examples_of(core, "mine")):
        first, n = int(core.examples[e, 2]), int(core.examples[e, 3])
        losses = [alone_scores(model, stack, core.sequence(s), model.windows())[0] for s in range(first, first + n)]
        assert x["choice"] == losses.index(min(losses)) and x["correct"] == (x["choice"] == x["gold"])
    assert json.load(open(out / "metrics.json"))["core_per_task"].keys() == {"mine"}
