"""Chat evaluation (categorical letter argmax over packed prompts, GSM8K by generation, ChatCORE) and the chat and
generate phases end to end on a tiny pretrained checkpoint."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, STACK_PATH, TINY_ARGS, unstamped
from test_engine import VOCAB, cpu_rt, make_model


@pytest.mark.parametrize("text,answer", [
    ("so 5 + 7 = 12.\n#### 12", "12"), ("#### 1,234 dollars", "1234"), ("####-3", "-3"), ("#### 2.50", "2.50"),
    ("#### .5", ".5"), ("the answer is 12", None), ("#### twelve", None), ("#### 7\n#### 8", "7"),
])
def test_gsm8k_answer(stack, text, answer):
    assert stack.gsm8k_answer(text) == answer


def test_categorical_packed_equals_each_prompt_alone(stack):
    """The packed choice of every prompt equals the argmax over its allowed letters of its own forward."""
    model = make_model(stack)
    windows = [4, 9, 3, 40]
    letters = [10, 11, 12, 13, 14]
    g = torch.Generator().manual_seed(5)
    prompts = [(torch.randint(0, VOCAB, (int(n),), generator=g).numpy(), int(c))
               for n, c in zip(torch.randint(3, 60, (12,), generator=g), [2, 3, 4, 5] * 3)]
    packed = stack.categorical_choices(model, prompts, letters, cpu_rt(stack), windows)
    for (tokens, n_choices), choice in zip(prompts, packed):
        ids = torch.from_numpy(tokens)
        cu = torch.full((128,), len(ids), dtype=torch.int32)
        cu[0] = 0
        with torch.no_grad():
            h = model.hidden(stack.Batch(ids, torch.cat([torch.tensor([-1]), ids[:-1]]), torch.arange(len(ids)), None, cu, len(ids)), windows, "sdpa")
            alone = model.logits(h[-1])[letters[:n_choices]].argmax().item()
        assert choice == alone < n_choices
    assert len(set(packed)) > 1


def chat_data(stack, kinds_and_golds):
    """ChatEvalData in memory: tasks of (name, kind, [(prompt, gold or answer)...])."""
    tasks, examples, tokens = [], [], []
    for name, kind, rows in kinds_and_golds:
        task = dict(name=name, kind=kind, first_example=len(examples), n_examples=len(rows),
                    random_baseline=0.25 if kind == "categorical" else 0.0)
        if kind == "generative":
            task["answers"] = [a for _, a in rows]
        for prompt, gold in rows:
            examples.append([len(tasks), len(tokens), len(prompt), gold if kind == "categorical" else -1, 4 if kind == "categorical" else 0])
            tokens += prompt
        tasks.append(task)
    return stack.ChatEvalData(tasks, np.array(tokens), np.array(examples), [10, 11, 12, 13])


def test_a_sandbox_that_cannot_run_pass_stops_chat_eval_before_generating(stack, tok_dir, monkeypatch):
    """HumanEval's programs would all fail, scoring 0 without a word: the sandbox is tried first, and a failure there
    is SandboxUnavailable (one error line from the phase), before any generation."""
    tok = stack.Tokenizer(tok_dir)
    chat = chat_data(stack, [("humaneval", "code", [([1, 6], None)])])
    chat.tasks[0]["problems"] = [{"prompt": "def f():\n", "test": "", "entry_point": "f"}]
    monkeypatch.setattr(stack, "run_sandboxed", lambda program, **kw: (False, "IndentationError: unexpected indent"))
    monkeypatch.setattr(stack.Engine, "generate", lambda *a, **kw: pytest.fail("generated before the sandbox worked"))
    with pytest.raises(stack.SandboxUnavailable, match="sandbox does not run even `pass`: IndentationError"):
        stack.evaluate_chat(make_model(stack), chat, tok, cpu_rt(stack), [None] * 4)


def test_the_sandbox_launcher_is_read_when_the_run_starts(stack, monkeypatch, tmp_path):
    """Read from the stack's file at the first use, hours into a run, it would take whatever the file holds then (an
    edit, a pull): a run with chat evaluation reads it before its first phase."""
    stack.sandbox_launcher.cache_clear()
    seen = []
    monkeypatch.setitem(stack.PHASES, "chat", lambda *_: seen.append(stack.sandbox_launcher.cache_info().currsize))
    cfg = stack.parse_config(["--preset", "cpu", "--run-dir", str(tmp_path)])
    stack.phases_to_run(["chat"], cfg, stack.Runtime(torch.device("cpu"), torch.float32, 1, 2, "sdpa"), print)
    assert seen == [1] and "sandbox_main(json.loads(sys.argv[1]))" in stack.sandbox_launcher()


def test_evaluate_chat_scores_and_chatcore(stack, tok_dir, monkeypatch):
    """Rigged answers: categorical choices and GSM8K texts are scripted; accuracies, centering, ChatCORE and
    --max-per-task follow."""
    tok = stack.Tokenizer(tok_dir)
    chat = chat_data(stack, [("arc_easy", "categorical", [([1, 2], 0), ([1, 3], 1), ([1, 4], 2), ([1, 5], 3)]),
                             ("gsm8k", "generative", [([1, 6], "12"), ([1, 7], "1234"), ([1, 8], "5")])])
    monkeypatch.setattr(stack, "categorical_choices", lambda model, prompts, letter_ids, rt, windows:
                        [{2: 0, 3: 1, 4: 0, 5: 0}[int(p[-1])] for p, _ in prompts])  # right on the first two
    replies = {6: "so #### 12", 7: "#### 1,234", 8: "no idea"}

    def generate(self, prompts, num_samples, max_new_tokens, temperature, max_rows, on_done=None):
        assert temperature == 0 and num_samples == 1 and max_rows == 16  # evaluate_chat's batch_size
        return [[stack.Sample(tok.encode(replies[p[-1]]) + [tok.special("<|assistant_end|>")], [], True)] for p in prompts]

    monkeypatch.setattr(stack.Engine, "generate", generate)
    model = make_model(stack)
    out = stack.evaluate_chat(model, chat, tok, cpu_rt(stack), [None] * 4)
    assert out["results"] == {"arc_easy": 0.5, "gsm8k": pytest.approx(2 / 3)}
    assert out["centered"]["arc_easy"] == pytest.approx((0.5 - 0.25) / 0.75)
    assert out["chatcore"] == pytest.approx(((0.5 - 0.25) / 0.75 + 2 / 3) / 2)
    assert out["correct"].tolist() == [1, 1, 0, 0, 1, 1, 0]
    two = stack.evaluate_chat(model, chat, tok, cpu_rt(stack), [None] * 4, max_per_task=2)
    assert two["correct"].tolist() == [1, 1, -1, -1, 1, 1, -1] and two["results"] == {"arc_easy": 1.0, "gsm8k": 1.0}
    table = stack.task_table(out, chat.tasks, "name", "ChatCORE")
    assert table.splitlines()[-1].split() == ["ChatCORE", f"{out['chatcore']:.4f}"]


def run_stack(data, run, *args, stdin=None):
    return subprocess.run([sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run), *args],
                          cwd=ROOT, capture_output=True, text=True, input=stdin)


def test_chat_phase_writes_chatcore(pretrained_run):
    data, run = pretrained_run
    r = run_stack(data, run, "--phases", "chat", "--chat-max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.load(open(run / "metrics.json"))
    assert set(metrics["chat_per_task"]) == {"arc_easy", "arc_challenge", "mmlu", "gsm8k"}
    assert metrics["chatcore"] == pytest.approx(np.mean([(metrics["chat_per_task"][t] - b) / (1 - b) for t, b in
                                                         [("arc_easy", 0.25), ("arc_challenge", 0.25), ("mmlu", 0.25), ("gsm8k", 0.0)]]))
    assert metrics["chat_by_checkpoint"]["ckpt_000008"]["chatcore"] == metrics["chatcore"]
    assert "ChatCORE" in r.stdout and "chat evaluation of " + str(run / "ckpt_000008") in r.stdout


def samples_of(stdout):
    """The samples --phases generate printed: the text after each `--- sample` line's stamp, up to the next sample or
    the invocation's summary line."""
    return [s.rstrip("\n") for s in unstamped(stdout).split("\ndone: ")[0].split("--- sample ")[1:]]


def test_generate_phase_prints_samples(pretrained_run):
    data, run = pretrained_run
    args = ["--phases", "generate", "--init-from", str(run / "ckpt_000008"), "--prompt", "The module", "--num-samples", "3",
            "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "20"]
    r = run_stack(data, run, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    samples = samples_of(r.stdout)
    assert [s.split(" ")[0] for s in samples] == ["1/3", "2/3", "3/3"]
    assert all(s.splitlines()[1].startswith("The module") for s in samples)
    assert samples_of(run_stack(data, run, *args).stdout) == samples  # seeded
    greedy = run_stack(data, run, *args[:-4], "--temperature", "0")
    texts = [s.split("\n", 1)[1] for s in samples_of(greedy.stdout)]
    assert len(texts) == 3 and len(set(texts)) == 1


def test_chat_cli_reads_stdin(pretrained_run):
    data, run = pretrained_run
    r = subprocess.run([sys.executable, os.path.join(ROOT, "chat_cli.py"), *TINY_ARGS, "--data-dir", str(data),
                        "--run-dir", str(run), "--prompt-format", "chat", "--max-new-tokens", "5"], cwd=ROOT,
                       capture_output=True, text=True, input="hello there\n\nanother conversation\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\n") >= 3 and "Ctrl-D" in r.stdout
    # the stack's old command for it says what replaced it
    r = run_stack(data, run, "--phases", "generate", "--prompt-format", "chat", stdin="hello\n")
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: --phases generate samples --prompt TEXT; its chat on stdin moved beside the stack: "
        + shlex.join(["python", "chat_cli.py", *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run),
                      "--prompt-format", "chat"]))


def test_chat_cli_keeps_one_conversation_until_an_empty_line(stack, pretrained_run):
    """Each reply is streamed piece by piece and its text is what the engine generated for the whole conversation so
    far: the second message's prompt holds the first exchange, the one after an empty line starts again from BOS."""
    import chat_cli
    data, run = pretrained_run
    tok = stack.data_tokenizer(str(data))
    model, _ = stack.load_model(str(run / "ckpt_000008"))
    engine = stack.Engine(model, tok, model.windows(), cpu_rt(stack))
    prompts, real_generate = [], engine.generate

    def generate(prompts_, *args, **kw):
        prompts.append(list(prompts_[0]))
        return real_generate(prompts_, *args, **kw)

    engine.generate, out = generate, []
    options = dict(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    chat_cli.chat(engine, tok, True, options, ["hi\n", "again\n", "\n", "hi\n"], out.append)
    first = stack.chat_turn(tok, [tok.bos_id], "hi")
    assert len(prompts) == 3 and prompts[0] == prompts[2] == first  # the empty line started over
    assert prompts[1][:len(first)] == first and len(prompts[1]) > len(first) + 4  # the first exchange, then "again"
    replies = [stack.reply_text(tok, real_generate([p], 1, **options)[0][0]) for p in prompts]
    assert "".join(out) == "".join(reply + "\n" for reply in replies)
