"""bench/ablate.py on tiny settings, as README's "Add your architecture" walks through it: the stack, a flag variant
and an edited copy of the stack (a SwiGLU MLP in place of ReLU^2) x two seeds; the table's numbers against the runs'
own metrics.json (mean, std, difference, Welch's p by an independent integration of Student's t density), finished
runs read rather than run again, a run directory of another command refused, and the copy's run made a record."""
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import ablate  # bench/ablate.py
import ablations  # bench/ablations.py
from conftest import ROOT, STACK_PATH, TINY_ARGS

ABLATE = os.path.join(ROOT, "bench", "ablate.py")
RECORD = os.path.join(ROOT, "baselines", "record.py")


def swiglu_copy(path):
    """A copy of the stack with README's "Add your architecture" edit (each replacement applies exactly once)."""
    with open(STACK_PATH) as f:
        source = ablations.edited(f.read(), ablations.SWIGLU, "SwiGLU MLP")
    with open(path, "w") as f:
        f.write(source)
    return path


def run_ablate(data, out, *extra, variants):
    args = [sys.executable, ABLATE, "--data-dir", str(data), "--seeds", "2", "--out", str(out),
            "--flags", shlex.join(TINY_ARGS), *extra]
    for v in variants:
        args += ["--variant", v]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)


def welch_p(a, b):
    """Two-sided p of Welch's t-test, the t density integrated numerically (Simpson) rather than through record.py."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    t, df = abs(mb - ma) / math.sqrt(va + vb), (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    density = lambda x: math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (1 + x * x / df) ** (-(df + 1) / 2)
    # substitute x = t + u / (1 - u), u in [0, 1): the tail becomes a finite integral
    n, h = 20_000, 1 / 20_000
    f = lambda u: density(t + u / (1 - u)) / (1 - u) ** 2 if u < 1 else 0.0
    tail = h / 3 * sum((1 if k in (0, n) else 4 if k % 2 else 2) * f(k * h) for k in range(n + 1))
    return 2 * tail


@pytest.mark.slow
def test_ablate_tables_variants_over_seeds_and_a_copy_becomes_a_record(tiny_data, tmp_path):
    out, mine = tmp_path / "ablate", swiglu_copy(tmp_path / "my_stack.py")
    variants = ["stack=", "no value embeddings=--value-embed-layers=", f"swiglu={mine}"]
    r = run_ablate(tiny_data, out, variants=variants)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines if line.startswith("| ")
                              and not line.startswith("| ---") and not line.startswith("| variant"))}
    bpb = {}
    for name in ("stack", "no value embeddings", "swiglu"):
        runs = [json.load(open(out / name / f"seed_{s}" / "metrics.json")) for s in (0, 1)]
        bpb[name] = [m["val_bpb"] for m in runs]
        mean = sum(bpb[name]) / 2
        std = math.sqrt(sum((x - mean) ** 2 for x in bpb[name]))
        assert rows[name][1] == "2" and rows[name][2] == f"{mean:.4f} ± {std:.4f}"
        assert len(set(bpb[name])) == 2  # the seeds differ
    # the flags reached the runs (no value embeddings: fewer parameters), the copy ran (its log names its code)
    params = {n: json.load(open(out / n / "seed_0" / "metrics.json"))["params"] for n in bpb}
    assert params["no value embeddings"] < params["stack"] and params["swiglu"] != params["stack"]
    assert "code: my_stack.py sha256" in (out / "swiglu" / "seed_0" / "log.txt").read_text()
    diff = sum(bpb["no value embeddings"]) / 2 - sum(bpb["stack"]) / 2
    other = rows["no value embeddings"]
    assert other[3] == f"{diff:+.4f}"
    low, high = (float(x) for x in re.fullmatch(r"\[(\S+), (\S+)\]", other[4]).groups())
    assert low < diff < high
    assert float(other[5]) == pytest.approx(welch_p(bpb["stack"], bpb["no value embeddings"]), rel=2e-3)
    assert re.match(r"ablate: 3 variants x 2 seeds in [\d.]+ min; best .*; [012] of 2 differ from stack at p < 0\.05",
                    lines[-1]) and lines[-1].endswith("ablate.md")
    assert (out / "ablate_val.png").stat().st_size > 0 and "| variant |" in (out / "ablate.md").read_text()

    # run again: every run is read, none trained again; the same table
    logs = {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*/log.txt")}
    again = run_ablate(tiny_data, out, variants=variants)
    assert again.returncode == 0 and again.stdout.splitlines()[:5] == r.stdout.splitlines()[:5]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*/log.txt")} == logs and len(logs) == 6
    # a run directory holding another command's run is refused, naming it
    refused = run_ablate(tiny_data, out, "--flags", shlex.join(TINY_ARGS + ["--val-every", "2"]), variants=variants[:1])
    assert refused.returncode == 1 and "holds a run of another command" in refused.stderr
    assert str(out / "stack" / "seed_0") in refused.stderr

    # the copy's run becomes a record: its code is the copy, diffable against the stack
    records = tmp_path / "records"
    records.mkdir()
    shutil.copy(os.path.join(ROOT, "baselines", "README.md"), records)  # its table gets the new row
    made = subprocess.run([sys.executable, RECORD, "new", "--run", str(out / "swiglu" / "seed_0"), "--name", "swiglu",
                           "--script", str(mine), "--records", str(records), "--hardware", "test"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    (record,) = [d for d in records.iterdir() if d.is_dir()]
    assert (record / "my_stack.py").read_text() == open(mine).read()
    diff = subprocess.run([sys.executable, RECORD, "diff", str(record), STACK_PATH], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert diff.returncode == 1 and "+        return x + relu2_mlp(norm(x), self.fc, self.proj)" in diff.stdout


def test_every_idea_switches_off_by_a_flag_or_an_edit_that_applies(stack, tmp_path):
    """bench/ablations.py: every idea of the table is a variant; each edit applies exactly once to today's stack (a
    stale one is an error naming it), the generated --stages flags parse to the cpu preset's stages with the idea off."""
    chosen = ablations.variants(str(tmp_path), "cpu", peers=False)
    assert [v.split("=", 1)[0] for v in chosen] == [name for name, *_ in ablations.IDEAS]
    flags = {v.split("=", 1)[0]: shlex.split(v.split("=", 1)[1]) for v in chosen}
    cpu = stack.parse_config(["--preset", "cpu"]).stages
    mtp = stack.parse_config(["--preset", "cpu", *flags["no multi-token prediction"]]).stages
    assert [(s.mtp_start, s.mtp_end) for s in mtp] == [((1.0,), (1.0,))] * len(cpu)
    assert [s.steps for s in mtp] == [s.steps for s in cpu]
    full = stack.parse_config(["--preset", "cpu", *flags["full attention"]]).stages
    assert [(s.short_window, s.long_window) for s in full] == [(s.max_doc_len, s.max_doc_len) for s in cpu]
    assert stack.parse_config(["--preset", "cpu", *flags["tied throughout"]]).untie_frac == 1.0
    copies = {name: words[0] for name, words in flags.items() if words and words[0].endswith(".py")}
    assert set(copies) == {name for name, _, edits, _ in ablations.IDEAS if edits}
    with pytest.raises(ablate.AblateError, match="no smear: its edit no longer applies"):
        ablations.edited("print()", ablations.IDEAS[3][2], "no smear")


def test_every_variant_command_parses_with_its_script_flags(tmp_path):
    """The command ablate.py builds for each row of the table, peers included, is one its script accepts: the stack's
    own flags (--overwrite, --wandb) go to the stack and its copies only (the nanochat peer has --phases too)."""
    from conftest import load_module
    for text in ablations.variants(str(tmp_path), "cpu"):
        name, script, flags = ablate.parse_variant(text)
        command = ablate.run_command(script, "DATA", 0, "RUN", ["--preset", "cpu", "--train-tokens", "122880"], flags)
        module = load_module(script, "ablate_variant_" + re.sub(r"\W", "_", name))
        cfg = module.parse_config(command[2:])
        assert (cfg.data_dir, cfg.run_dir, cfg.seed, cfg.train_tokens) == ("DATA", "RUN", 0, 122880), name
        assert ("--overwrite" in command) == (script == ablate.STACK or "/stacks/" in script), name


def one_step_losses(module, vocab_size, tokens):
    """A tiny model of `module` (a stack or an edited copy): its windows grown once (YaRN), then the training loss
    before and after one optimizer step on the same batch of several documents."""
    torch.manual_seed(0)
    cfg = module.parse_config(TINY_ARGS)
    model = module.GPT(module.ModelConfig.of(cfg, vocab_size))
    model.grow_window(16, 32)
    opt = module.make_optimizer(model, cfg)
    batch = module.make_batch(tokens, tokens[0], 32, 2, torch.device("cpu"))
    windows, mtp, losses = model.windows(16, 32), torch.tensor([1.0, 0.5]), []
    for _ in range(2):
        loss = module.train_loss(model, batch, windows, mtp, "sdpa")
        loss.backward()
        opt.step(1.0, 0.9)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_every_edited_copy_runs_and_changes_the_result(stack, tok_dir, tmp_path):
    """Each edited copy of the stack (bench/ablations.py) imports, trains a step and gives another loss than the
    stack on the same batch: the edit took effect (tests/test_ablate.py's first test trains a copy end to end)."""
    from conftest import load_module
    tok, rng = stack.Tokenizer(tok_dir), np.random.default_rng(0)
    tokens = rng.integers(0, tok.vocab_size - 1, 130)
    tokens[[0, 40, 90]] = tok.bos_id  # three documents, one longer than max_doc_len 32
    want = one_step_losses(stack, tok.vocab_size, tokens)
    chosen = ablations.variants(str(tmp_path), "cpu", peers=False)
    copies = [shlex.split(v.split("=", 1)[1])[0] for v in chosen if v.split("=", 1)[1].endswith(".py")]
    assert len(copies) == sum(1 for _, _, edits, _ in ablations.IDEAS if edits)
    for i, path in enumerate(copies):
        got = one_step_losses(load_module(path, f"ablation_{i}"), tok.vocab_size, tokens)
        assert all(math.isfinite(x) for x in got) and got != want, (path, got, want)
