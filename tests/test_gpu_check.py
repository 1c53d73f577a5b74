"""bench/gpu_check.py, the one-shot GPU check, as a dry run on CPU (small shapes, fp32, kernels interpreted): every
check runs and passes or says why it is skipped, the results file holds every row, the table and summary print; the
training run comes first and keeps its box whatever the --budget; a missing module skips what needs it, by name."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself for --device cpu


def test_gpu_check_help():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--device" in out.stdout and "kv_cache" in out.stdout and "2^31" in out.stdout
    assert out.stdout.index("  train ") < out.stdout.index("  kernels ")  # the training numbers first


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=900, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.load(open(tmp_path / "gpu_check.json"))
    rows = results["rows"]
    assert list(dict.fromkeys(r["check"] for r in rows)) == ["environment", "train", "kernels", "fp8", "attention",
                                                            "kv_cache", "decode", "warmup"]
    assert {r["status"] for r in rows} <= {"ok", "skip"}
    skipped = {r["item"] for r in rows if r["status"] == "skip"}
    assert skipped == {"flex", "fa3", "fa2"}  # no CPU backward, no CUDA: said, not faked
    kernels = [r for r in rows if r["check"] == "kernels"]
    assert len(kernels) == 6 and all(r["error"] < 1e-4 and r["ms"] > 0 for r in kernels)
    assert results["env"]["attention_auto"] == "sdpa" and results["env"]["torch"] and results["env"]["missing"] == []
    for check in ("train", "warmup"):
        run = next(r for r in rows if r["check"] == check)
        assert run["tok_per_s"] > 0 and "loss" in run["detail"]
    decode = {r["item"].split(" (")[0]: r for r in rows if r["check"] == "decode"}
    # logits step by step against one forward of the same tokens: the compiled steps' and four requests batched
    assert decode["compiled steps == one forward"]["error"] < 1e-5 and "n/a (CPU)" in decode["compiled steps == one forward"]["detail"]
    assert decode["served requests together == one forward each"]["error"] < 1e-5
    assert os.path.isdir(tmp_path / "cache" / "inductor")  # the compile caches a rerun reuses
    assert out.stdout.strip().splitlines()[-1].startswith("gpu_check: 22 ok, 0 failed, 0 timed out, 3 skipped, 0 cut")


@pytest.mark.slow
def test_gpu_check_dry_run_of_the_medium_stack(tmp_path):
    """--stack medium: every check on the medium stack's model (its cpu twin here), FP8's said to be absent there."""
    out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--stack", "medium", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.load(open(tmp_path / "gpu_check.json"))["rows"]
    assert {r["item"]: r["detail"] for r in rows if r["status"] == "skip"} == {
        "lm_head": "this stack has no FP8", **{b: next(r["detail"] for r in rows if r["item"] == b) for b in ("flex", "fa3", "fa2")}}
    assert all(r["status"] in ("ok", "skip") for r in rows) and len([r for r in rows if r["check"] == "kernels"]) == 6
    runs = {r["check"]: r for r in rows if r["check"] in ("train", "warmup")}
    assert "16 steps" in runs["train"]["item"] and "4 steps" in runs["warmup"]["item"]
    assert all(r["tok_per_s"] > 0 for r in runs.values())
    assert out.stdout.strip().splitlines()[-1].startswith("gpu_check: 20 ok, 0 failed, 0 timed out, 4 skipped, 0 cut")


@pytest.mark.slow
def test_a_tiny_budget_still_trains(tmp_path):
    """--budget 60: environment and train get their boxes; the later checks get what is left or are skipped."""
    out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--out", str(tmp_path), "--budget", "60"],
                         capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    rows = json.load(open(tmp_path / "gpu_check.json"))["rows"]
    train = [r for r in rows if r["check"] == "train"]
    assert len(train) == 1 and train[0]["status"] == "ok" and train[0]["tok_per_s"] > 0, out.stdout[-3000:]
    assert any(r["detail"].startswith("out of the --budget of 60s") for r in rows)
    assert {r["status"] for r in rows} <= {"ok", "skip", "cut"} and out.returncode == 0
    assert out.stdout.strip().splitlines()[-1].startswith("gpu_check: ")


def test_a_missing_module_skips_what_needs_it(tmp_path):
    """A GPU image may lack tiktoken (the stack's tokenizer): the training checks are skipped naming it; nothing runs."""
    block = ("import runpy, sys; sys.modules['tiktoken'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", block, SCRIPT, "--device", "cpu", "--out", str(tmp_path), "--only",
                          "environment,train"], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.load(open(tmp_path / "gpu_check.json"))["rows"]
    assert [r["detail"] for r in rows if r["check"] == "train"] == ["needs tiktoken, not installed here"]
    modules = next(r for r in rows if r["item"] == "modules the checks need")
    assert modules["detail"] == "missing tiktoken: train, warmup will be skipped"
