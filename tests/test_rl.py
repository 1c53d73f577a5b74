"""GSM8K RL mechanics: group advantages, gradients only through sampled tokens, no update when every sample earns
the same reward, pass@k, and the rl phase end to end on a tiny checkpoint."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, STACK_PATH, TINY_ARGS
from test_engine import VOCAB, cpu_rt, make_model


def test_advantages_are_zero_mean_per_question(stack):
    for rewards in ([1, 0, 0, 1, 1, 0, 0, 0], [0] * 8, [1] * 4, [1, 0]):
        a = stack.group_advantages(rewards)
        assert abs(float(a.sum())) < 1e-6
        assert torch.equal(a, torch.tensor(rewards, dtype=torch.float32) - np.mean(rewards))


def rollouts(stack):
    """Two questions, two samples each; sample tokens with mask 0 stand for forced calculator output."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()
    p1, p2 = rand(7), rand(4)
    return [(p1, stack.Sample(rand(6), [1, 1, 0, 0, 1, 1], True), 0.5),
            (p1, stack.Sample(rand(3), [1, 1, 1], False), -0.5),
            (p2, stack.Sample(rand(5), [1, 0, 0, 0, 1], True), 1.0),
            (p2, stack.Sample(rand(2), [1, 1], True), -1.0)]


def test_gradient_flows_only_through_sampled_tokens(stack, monkeypatch):
    model = make_model(stack)
    hidden = model.hidden
    captured = []

    def keep_h(*args, **kwargs):
        h = hidden(*args, **kwargs)
        h.retain_grad()
        captured.append(h)
        return h

    monkeypatch.setattr(model, "hidden", keep_h)
    rs = rollouts(stack)
    loss = stack.policy_gradient_loss(model, rs, [4, 9, 3, 40], cpu_rt(stack), n_tokens=11)
    loss.backward()
    grad_rows = captured[0].grad.abs().sum(-1) > 0
    expected, offset = torch.zeros_like(grad_rows), 0
    for prompt, sample, _ in rs:
        for i, m in enumerate(sample.mask):
            expected[offset + len(prompt) + i - 1] = bool(m)  # the row predicting sample token i
        offset += len(prompt) + len(sample.tokens)
    assert torch.equal(grad_rows, expected) and int(expected.sum()) == 11
    # and the loss is exactly -sum(advantage * log p) / n_tokens, computed row by row
    manual = 0.0
    with torch.no_grad():
        for prompt, sample, adv in rs:
            seq = torch.tensor(prompt + sample.tokens)
            cu = torch.full((128,), len(seq), dtype=torch.int32)
            cu[0] = 0
            logp = model.logits(hidden(stack.Batch(seq, torch.cat([torch.tensor([-1]), seq[:-1]]), torch.arange(len(seq)),
                                                   None, cu, len(seq)), [4, 9, 3, 40], "sdpa")).log_softmax(-1)
            for i, m in enumerate(sample.mask):
                if m:
                    manual -= adv * float(logp[len(prompt) + i - 1, sample.tokens[i]])
    assert loss.item() == pytest.approx(manual / 11, rel=1e-4)


def test_equal_rewards_give_no_update(stack):
    """Every sample right (or every one wrong): advantages are 0, gradients are 0 and the optimizer leaves every
    weight as it was."""
    model = make_model(stack)
    model.untie()
    opt = stack.make_optimizer(model, stack.Config())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rs = [(p, s, float(a)) for (p, s, _), a in zip(rollouts(stack), stack.group_advantages([1, 1, 1, 1]))]
    stack.policy_gradient_loss(model, rs, [None] * 4, cpu_rt(stack), n_tokens=11).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    opt.step(1.0, 0.95)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_pass_at_k(stack, tok_dir, monkeypatch):
    """pass@j: the fraction of questions with a right answer among the first j samples."""
    tok = stack.Tokenizer(tok_dir)
    from test_chat_eval import chat_data
    chat = chat_data(stack, [("gsm8k", "generative", [([1, 6], "1"), ([1, 7], "2"), ([1, 8], "3")])])
    replies = {6: ["#### 0", "#### 1", "#### 1"], 7: ["#### 2", "x", "y"], 8: ["no", "no", "no"]}

    class Engine:
        def generate(self, prompts, k, *args, **kwargs):
            return [[stack.Sample(tok.encode(replies[p[-1]][i]), [], False) for i in range(k)] for p in prompts]

    cfg = stack.RLConfig(max_new_tokens=4)
    got = stack.gsm8k_pass_at_k(Engine(), tok, chat, chat.tasks[0], [0, 1, 2], 3, cfg, cpu_rt(stack), 0)
    assert got == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3)}


RL_ARGS = ["--rl-steps", "3", "--rl-questions-per-step", "2", "--rl-samples", "4", "--rl-max-new-tokens", "8",
           "--rl-eval-every", "2", "--rl-eval-questions", "2", "--rl-eval-samples", "3"]


def test_rl_phase_reports_reward_and_pass_at_k(pretrained_run, tmp_path):
    data, pretrained = pretrained_run
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    r = subprocess.run([sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run),
                        "--phases", "rl", *RL_ARGS], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.load(open(run / "metrics.json"))
    assert len(metrics["rl_reward"]) == 3 and all(0 <= x <= 1 for x in metrics["rl_reward"])
    assert list(metrics["gsm8k_pass_at"]) == ["1", "2", "3"]
    values = list(metrics["gsm8k_pass_at"].values())
    assert values == sorted(values)  # pass@j never falls with j
    assert open(run / "latest").read() == "rl_ckpt_000003" and "pass@3" in r.stdout


@pytest.mark.slow
def test_chat_and_rl_on_two_gloo_ranks_match_one_process(pretrained_run, tmp_path):
    """Under torchrun the chat eval and RL split their questions over the ranks and add up to the same numbers."""
    from test_pretrain import free_port
    data, pretrained = pretrained_run
    out = {}
    for name, launcher in (("one", ()), ("two", ("-m", "torch.distributed.run", "--nproc_per_node=2",
                                                 f"--master-port={free_port()}", "--master-addr=127.0.0.1"))):
        shutil.copytree(pretrained, tmp_path / name)
        r = subprocess.run([sys.executable, *launcher, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir",
                            str(tmp_path / name), "--phases", "chat,rl", "--chat-max-new-tokens", "8", *RL_ARGS],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = json.load(open(tmp_path / name / "metrics.json"))
    for key in ("chat_per_task", "rl_reward", "gsm8k_pass_at"):
        assert out["two"][key] == pytest.approx(out["one"][key]), key


def test_rl_resume_matches_uninterrupted(stack, pretrained_run, tmp_path, monkeypatch):
    """Interrupted in step 3 (checkpoints every 2 steps), resumed: the same rewards, pass@k and bit-identical weights."""
    data, pretrained = pretrained_run
    rt = cpu_rt(stack)
    runs = {}
    for name in ("full", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(pretrained, runs[name])
    args = TINY_ARGS + ["--data-dir", str(data), *RL_ARGS, "--rl-steps", "4", "--checkpoint-every", "2"]
    cfg = lambda name, *extra: stack.parse_config(args + ["--run-dir", str(runs[name]), *extra])
    stack.phase_rl(cfg("full"), rt, stack.Logger(cfg("full"), rt))
    real, calls = stack.policy_gradient_loss, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 3:  # one batch a step: step 3 dies
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(stack, "policy_gradient_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stack.phase_rl(cfg("killed"), rt, stack.Logger(cfg("killed"), rt))
    monkeypatch.setattr(stack, "policy_gradient_loss", real)
    assert open(runs["killed"] / "latest_rl").read() == "rl_ckpt_000002"
    stack.phase_rl(cfg("killed", "--resume"), rt, stack.Logger(cfg("killed", "--resume"), rt))
    assert f"rl: resumed from {runs['killed']}/rl_ckpt_000002 at step 2" in open(runs["killed"] / "log.txt").read()
    ma, mb = (json.load(open(runs[n] / "metrics.json")) for n in ("full", "killed"))
    assert ma["rl_reward"] == mb["rl_reward"] and len(ma["rl_reward"]) == 4 and ma["gsm8k_pass_at"] == mb["gsm8k_pass_at"]
    from safetensors.torch import load_file
    wa, wb = (load_file(str(runs[n] / "rl_ckpt_000004" / "model.safetensors")) for n in ("full", "killed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    again = stack.parse_config(args + ["--run-dir", str(runs["killed"]), "--resume"])
    stack.phase_rl(again, rt, stack.Logger(again, rt))
    assert "rl: nothing to do: run already at step 4 of 4" in open(runs["killed"] / "log.txt").read()
