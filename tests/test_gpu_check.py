"""bench/gpu_check.py, the one-shot GPU check, as a dry run on CPU (small shapes, fp32, kernels interpreted): every
check runs and passes or says why it is skipped, the results file holds every row, the table and summary print."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def test_gpu_check_help():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--device" in out.stdout and "kv_cache" in out.stdout and "2^31" in out.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself for --device cpu
    out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.load(open(tmp_path / "gpu_check.json"))
    rows = results["rows"]
    assert {r["check"] for r in rows} == {"environment", "kernels", "fp8", "attention", "kv_cache", "decode", "train"}
    assert {r["status"] for r in rows} <= {"ok", "skip"}
    skipped = {r["item"] for r in rows if r["status"] == "skip"}
    assert skipped == {"flex", "fa3", "fa2"}  # no CPU backward, no CUDA: said, not faked
    kernels = [r for r in rows if r["check"] == "kernels"]
    assert len(kernels) == 6 and all(r["error"] < 1e-4 and r["ms"] > 0 for r in kernels)
    assert results["env"]["attention_auto"] == "sdpa" and results["env"]["torch"]
    train = next(r for r in rows if r["check"] == "train")
    assert train["tok_per_s"] > 0 and "loss" in train["detail"]
    served = next(r for r in rows if r["item"].startswith("served requests together"))
    assert served["error"] == 0  # the server's batch: four requests decoding together get what each gets alone
    assert out.stdout.strip().splitlines()[-1].startswith("gpu_check: 20 ok, 0 failed, 0 timed out, 3 skipped")
