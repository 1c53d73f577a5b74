"""The data foundation end to end on the shared data: prepare every format, move it through a hub mirror, check it
with data/check.py (the stack's readers)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_prepare_mirror_and_check(shared_data, tmp_path, stack):
    data = tmp_path / "data"
    r = run("data/prepare.py", "--source", shared_data, "--vocab-size", "8192", "--out", data, "--shard-tokens", "4000000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(data)) == ["chat_eval", "core", "pretrain", "rl", "sft", "tokenizer"]
    pretrain = json.load(open(data / "pretrain" / "manifest.json"))
    assert [s["file"] for s in pretrain["shards"]][:2] == ["val_000000.bin", "train_000001.bin"] and len(pretrain["shards"]) >= 3

    mirror, copy = tmp_path / "mirror", tmp_path / "downloaded"
    assert run("data/hub.py", "upload", data, "--local", mirror).returncode == 0
    r = run("data/hub.py", "download", "--local", mirror, "--out", copy)
    assert r.returncode == 0, r.stderr

    r = run("data/check.py", "--preset", "cpu", "--data-dir", copy)
    assert r.returncode == 0, r.stderr
    assert "is complete and consistent" in r.stdout
    assert "core: 22 tasks" in r.stdout
    for name in ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"):
        assert name in r.stdout
    assert "rl: gsm8k 7473" in r.stdout  # GSM8K's training split, the RL questions


def test_data_check_names_the_missing_part(tmp_path, tok_dir):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(tok_dir, data / "tokenizer")
    r = run("data/check.py", "--data-dir", data)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {data}/pretrain/manifest.json: missing"
    # the stack's old --phases data says what replaced it, checking nothing
    r = run("decoderstack_small_pt-eval-sft.py", "--data-dir", data, "--phases", "data")
    assert r.returncode == 1 and r.stderr.strip() == ("error: --phases data moved beside the stack (it imports it); run "
                                                      f"the other phases first, then: python data/check.py --data-dir {data}")


def test_config_presets_and_overrides(stack):
    cfg = stack.parse_config(["--preset", "gpu1", "--seed=3", "--data-dir", "/x"])
    assert (cfg.preset, cfg.seed, cfg.data_dir, cfg.run_dir) == ("gpu1", 3, "/x", "runs/gpu1")
    with pytest.raises(SystemExit):
        stack.parse_config(["--preset", "tpu"])
    with pytest.raises(SystemExit):
        stack.parse_config(["--no-such-field=1"])
    with pytest.raises(SystemExit):  # no abbreviations: --phase is not --phases
        stack.parse_config(["--phase", "pt"])


@pytest.mark.parametrize("preset,world_size", [("h100x8", 8), ("gpu1", 1), ("colab", 1), ("cpu", 1), ("cpu", 2)])
def test_every_stage_batch_splits_into_micro_batches(stack, preset, world_size):
    """phase_pt stops at a stage whose batch is not world_size x micro-batch x accumulation: catch it here, not on
    the GPU."""
    cfg = stack.parse_config(["--preset", preset])
    for batch in (s.batch_tokens for s in stack.scaled_stages(cfg)):
        T = min(cfg.micro_batch_tokens, batch // world_size)
        assert batch % (world_size * T) == 0, (preset, batch, T)
    T = min(cfg.micro_batch_tokens, cfg.sft.batch_tokens // world_size)
    assert cfg.sft.batch_tokens % (world_size * T) == 0, (preset, "sft")
