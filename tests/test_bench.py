"""bench/compare.py end to end on tiny data: it trains every stack, and its table reports what each stack wrote."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import core_shards
from conftest import ROOT
from test_core_eval import MAX_LEN, TASKS, write_bundle

STACKS = ["decoderstack", "gpt2-adamw", "nanochat", "modded-nanogpt"]


# ~25 s alone on 2 cores: four stacks at their cpu preset's model size, three steps each (the main stack's stages)
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
