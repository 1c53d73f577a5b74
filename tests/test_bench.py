"""bench/compare.py end to end on tiny data: it trains every stack, and its table reports what each stack wrote."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import core_shards
from conftest import ROOT
from test_core_eval import MAX_LEN, TASKS, write_bundle

STACKS = ["decoderstack", "medium", "gpt2-adamw", "nanochat", "modded-nanogpt", "llama"]


# every stack at its cpu preset's model size, three steps each (the main stack's stages)
@pytest.mark.slow
def test_compare_trains_every_stack_and_tabulates_their_metrics(tiny_data, tok_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    core_shards.write_core(write_bundle(tmp_path / "bundle", TASKS), tok_dir, str(data / "core"), max_len=MAX_LEN)
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare.py"), "--data-dir", str(data),
                           "--train-tokens", "12288", "--val-tokens", "2048", "--core-max-per-task", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["stack", "params"] and lines[-1].startswith("summary: val bpb ")
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert sorted(rows) == sorted(STACKS)
    bpbs = {}
    for name in STACKS:
        metrics = json.loads((out / name / "metrics.json").read_text())
        sources = sorted(metrics["val_bpb_by_source"])
        assert sources and lines[0].split()[7:7 + len(sources)] == [s[:20] for s in sources]  # the header names the val sources
        params, _, tokens, bpb = rows[name][1:5]
        split, core = rows[name][5:5 + len(sources)], rows[name][5 + len(sources)]
        assert [float(x) for x in split] == pytest.approx([metrics["val_bpb_by_source"][s] for s in sources], abs=5e-5)
        assert int(params.replace(",", "")) == metrics["params"] and int(tokens.replace(",", "")) == metrics["train_tokens"] == 12288
        assert float(bpb) == pytest.approx(metrics["val_bpb"], abs=5e-5) and float(core) == pytest.approx(metrics["core"], abs=5e-5)
        assert metrics["core_max_per_task"] == 3
        bpbs[name] = metrics["val_bpb"]
    best = min(bpbs, key=bpbs.get)
    assert re.search(rf"; best {re.escape(best)} at 12,288 tokens$", lines[-1])


def test_serve_bench_quick_tabulates_both_servers_at_each_client_count(tok_dir):
    """bench/serve_bench.py --quick: a tiny random model served on loopback, 1 and 2 clients, against the batched and
    the one-row server; every row in the table (no timings checked), the hostile mix, the summary line last."""
    for module in ("httpx", "fastapi", "uvicorn"):
        pytest.importorskip(module)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serve_bench.py"), "--quick",
                           "--data-dir", os.path.dirname(tok_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("a tiny random model (--quick)") and "stop tokens off" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("| clients | server |"))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:header + 6]]
    assert [(c[0], c[1]) for c in cells] == [("1", "batched"), ("1", "one row"), ("2", "batched"), ("2", "one row")]
    for c in cells:
        assert int(c[2]) == int(c[0]) and c[3] == "0 (0)"  # one request per client, none failed
        assert float(c[6]) == 8.0  # stop tokens off: every reply ran to --quick's 8 tokens
    assert [c[13] for c in cells] == ["1/1", "", "2/2", ""]  # greedy: the same replies batched and one at a time
    # the 2-client load again beside a hostile client: every kind refused with its status, the poisoned sampler's
    # request alone failing (500), the normal requests without errors and with the replies they got alone
    header = next(i for i, line in enumerate(lines) if line.startswith("| load | normal requests |"))
    alone, mix = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:header + 4]]
    assert alone[:3] == ["alone", "2", "0"] and mix[:3] == ["hostile mix", "2", "0"] and mix[7] == "2/2"
    assert mix[8:] == ["1x400", "1x400", "1x413", "1x404", "1x500"]
    assert re.match(r"serve_bench: 2 clients: [\d.]+ req/s batched vs [\d.]+ one at a time \([\d.]+x\), .*; beside 5 "
                    r"hostile requests: [\d.]+x the req/s, 0 normal errors, 2/2 replies the same; 0 errors$", lines[-1])


def test_train_bench_profile_times_each_extra_removed_for_real(tiny_data, tmp_path, capsys):
    from conftest import TINY_ARGS, load_module
    from load_stack import load_stack
    bench, stack = load_module(os.path.join(ROOT, "bench", "train_bench.py"), "train_bench"), load_stack()
    flags = [a for a in TINY_ARGS if a not in ("--wandb", "disabled")]
    # the copies do none of the removed work: its parameters get no gradient, where the stack's get one
    unused = {"bigram hash": ["bigram_embed"], "smear": ["smear_gate", "smear_lambda"]}
    for name, module in [("stack", stack), *bench.without(stack, str(tmp_path)).items()]:
        model, _, p, loader = bench.stage_step(module, str(tiny_data), 0, flags)
        batch = loader.next_batch(p.batch_tokens, p.max_doc_len, len(p.mtp_weights), "cpu")
        module.train_loss(model, batch, model.windows(p.short_window, p.long_window), torch.tensor(p.mtp_weights),
                          "sdpa").backward()
        for extra, params in unused.items():
            grads = [getattr(model, n).grad for n in params]
            assert all(g is None for g in grads) if name == extra else all(g is not None for g in grads), (name, extra)
    summary = bench.profile_report(stack, str(tiny_data), flags, steps=1, warmup=0)
    out = capsys.readouterr().out
    tables = out.strip("\n").split("\n\n")
    steps = {line[:28].strip(): line[28:].split() for line in tables[0].splitlines()[2:]}
    assert sorted(steps) == sorted(["this stack", "no value embeddings", "no multi-token prediction", "no bigram hash",
                                    "no smear"])
    assert all(len(cells) == 2 * 7 for cells in steps.values())  # two stages: "f / b / o = total" each
    for cells in steps.values():
        for f, b, o, total in zip(cells[0::7], cells[2::7], cells[4::7], cells[6::7]):
            assert abs(float(f) + float(b) + float(o) - float(total)) <= 2  # each rounded to 1 ms
    costs = {line[:28].strip() for line in tables[1].splitlines()[1:-1]}
    assert re.match(r"noise: the stack's timed steps lie \d+ ms apart", tables[1].splitlines()[-1])
    assert costs == {"value embeddings", "multi-token prediction", "bigram hash", "smear"}
    ops = tables[2].splitlines()
    assert ops[0].startswith("torch.profiler, stage 1") and all(line.startswith("aten::") for line in ops[1:-1])
    assert re.match(r"matrix products: \d+% of the aten ops' self time; [\d,]+ aten op calls per step$", ops[-1])
    assert summary.startswith("eager step ") and "bigram hash" in summary and "smear" in summary


@pytest.mark.slow
def test_train_bench_compile_runs_time_eager_cold_and_warm(tiny_data):
    """Three whole pretraining runs: eager compiles nothing; compiled ones report their warm-up; the warm run reuses the
    cold one's compiled code (their bpb agree closely: 2.8851 / 2.8850 for the cpu preset, 2026-12-06). How compiled
    training compares with eager is test_pretrain's (a step's loss and gradients; a whole run's losses): eight steps
    grow a 1e-7 difference to 0.005-0.02 bpb here, depending on the machine."""
    from conftest import TINY_ARGS, load_module
    bench = load_module(os.path.join(ROOT, "bench", "train_bench.py"), "train_bench")
    lines, summary = bench.compile_runs(str(tiny_data), [a for a in TINY_ARGS if a not in ("--preset", "cpu")])
    rows = {line[:22].strip(): line[22:].split() for line in lines[1:]}
    assert list(rows) == ["eager", "compiled, cold cache", "compiled, warm cache"]
    compile_s, bpb = ({name: float(cells[i].replace(",", "")) for name, cells in rows.items()} for i in (0, 4))
    assert compile_s["eager"] == 0 and compile_s["compiled, cold cache"] > 0 and compile_s["compiled, warm cache"] > 0
    assert abs(bpb["compiled, cold cache"] - bpb["compiled, warm cache"]) < 1e-3
    assert re.match(r"compiling costs \d+ s cold, \d+ s warm and saves -?\d+ s of training: [\d.]+x eager's time cold, "
                    r"[\d.]+x warm$", summary)


def test_train_bench_first_step_compares_one_step_side_by_side(stack, tiny_data):
    """--first-step's table: eager against itself differs nowhere; against the loss doubled (gradients exactly twice
    eager's: a power of two rounds nothing) every gradient differs by exactly 1.0 relative and no zero appears on one
    side only."""
    from conftest import TINY_ARGS, load_module
    bench = load_module(os.path.join(ROOT, "bench", "train_bench.py"), "train_bench")
    flags = [a for a in TINY_ARGS if a not in ("--preset", "cpu")]
    for scale in (1.0, 2.0):
        lines, summary = bench.first_step_fork(stack, str(tiny_data), flags, lambda *a: stack.train_loss(*a) * scale)
        rows = {line.split()[0]: [float(x.replace(",", "")) for x in line.split()[1:]] for line in lines[1:]}
        assert {"attn", "lm_head", "scalar", "mlp_proj"} <= set(rows)
        assert all(r[2] == r[3] == 0 for r in rows.values())
        if scale == 1:
            assert all(r[0] == r[1] == r[4] == 0 for r in rows.values())
            assert summary.endswith("0 gradient entries exactly 0 in eager only, where the other side steps up to 0.0e+00")
        else:
            assert {r[0] for r in rows.values()} <= {0.0, 1.0} and rows["lm_head"][0] == 1.0, rows
