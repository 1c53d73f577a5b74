"""Checkpoints and run directories under faults: an earlier run's checkpoints, a second run on the same directory, a
corrupt or truncated checkpoint, a crash's leftovers, a full disk. Each case fails with one clear error line (or
recovers, saying so), and never loses the last good checkpoint."""
import dataclasses
import errno
import json
import os
import re
import shutil

import pytest
import torch

from conftest import TINY_ARGS
from test_pretrain import final_weights, run_stack

FOUR_STEPS = ["--stages", "[[4, 1024, 128, 32, 64, 1.0, [1], [1]]]"]


def last_error(proc):
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_fresh_run_refuses_an_earlier_runs_checkpoints_unless_overwrite(stack, pretrained_run, tmp_path):
    data, pretrained = pretrained_run
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    log_before = (run / "log.txt").read_bytes()
    refused = run_stack(str(data), run, *FOUR_STEPS)
    assert refused.returncode == 1
    assert last_error(refused) == (f"error: {run}: holds checkpoints of an earlier run (ckpt_000008); pass --resume to "
                                   "continue it, --overwrite to replace it, or another --run-dir")
    assert (run / "log.txt").read_bytes() == log_before and (run / "ckpt_000008").is_dir()  # nothing written
    # what used to happen: ckpt_000004 was pruned as it was written (the old run's 8 sorted after it), latest dangled
    replaced = run_stack(str(data), run, *FOUR_STEPS, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert list(stack.checkpoints(str(run), "pt")) == [4]
    assert stack.latest_checkpoint(str(run)) == str(run / "ckpt_000004")
    assert stack.verify_checkpoint(str(run / "ckpt_000004"), stack.CHECKPOINT_FILES)["step"] == 4


def test_pruning_keeps_the_newest_by_step_number(stack, tok_dir, tmp_path):
    cfg = stack.parse_config(TINY_ARGS + ["--run-dir", str(tmp_path)])
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    model = stack.GPT(stack.ModelConfig.of(cfg, stack.Tokenizer(tok_dir).vocab_size))
    opt = stack.make_optimizer(model, cfg)
    for step in (999_998, 999_999):
        (tmp_path / f"ckpt_{step}").mkdir()
    stack.save_checkpoint(cfg, rt, 1_000_000, model, opt, {})
    # by name, ckpt_1000000 sorts before ckpt_999998: the old pruning kept the two 6-digit ones and deleted the new
    assert set(os.listdir(tmp_path)) == {"ckpt_999999", "ckpt_1000000", "latest", "latest_pt"}


def test_keep_checkpoints_sets_how_many_of_a_phase_are_kept(stack, tok_dir, tmp_path):
    cfg = stack.parse_config(TINY_ARGS + ["--run-dir", str(tmp_path), "--keep-checkpoints", "3"])
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    model = stack.GPT(stack.ModelConfig.of(cfg, stack.Tokenizer(tok_dir).vocab_size))
    opt = stack.make_optimizer(model, cfg)
    for step in range(1, 6):
        stack.save_checkpoint(cfg, rt, step, model, opt, {}, phase="sft")
    stack.save_checkpoint(cfg, rt, 1, model, opt, {}, phase="rl")
    assert list(stack.checkpoints(str(tmp_path), "sft")) == [3, 4, 5] and list(stack.checkpoints(str(tmp_path), "rl")) == [1]
    stack.save_checkpoint(dataclasses.replace(cfg, keep_checkpoints=1), rt, 6, model, opt, {}, phase="sft")
    assert list(stack.checkpoints(str(tmp_path), "sft")) == [6]


def test_overwriting_a_later_phase_trains_it_again_from_the_earlier_phases_checkpoint(stack, pretrained_run, tmp_path):
    """--overwrite of sft deletes the sft (and rl) checkpoints; `latest` then names the pretraining checkpoint the
    new sft starts from, instead of dangling."""
    data, pretrained = pretrained_run
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    (run / "sft_ckpt_000003").mkdir()
    (run / "latest_sft").write_text("sft_ckpt_000003")
    (run / "latest").write_text("sft_ckpt_000003")
    with open(run / "curves.jsonl", "a") as f:  # the earlier sft's and rl's curves, beside pretraining's
        f.write('{"step": 3, "sft/loss": 2.5}\n{"step": 1, "rl/reward": 0.5}\n{"step": 3, "sft/val_loss": 2.7}\n')
        f.write('3\n["not", "ours"]\n{"step": 4, "sft/l')  # JSON that is not an object, and a torn last line
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", str(data), "--run-dir", str(run), "--phases", "sft", "--overwrite"])
    stack.claim_run_dir(cfg, ["sft"]).close()
    assert not (run / "sft_ckpt_000003").exists() and not (run / "latest_sft").exists()
    assert stack.latest_checkpoint(str(run)) == str(run / "ckpt_000008")
    curves = [json.loads(line) for line in open(run / "curves.jsonl")]
    assert curves and all(set(c) - {"step"} <= {"train/loss", "train/tok_per_s", "val/bpb", "val/loss"} for c in curves)


def test_a_second_run_on_a_run_dir_in_use_is_refused(stack, tiny_data, tmp_path):
    cfg = stack.parse_config(TINY_ARGS + ["--run-dir", str(tmp_path / "run")])
    lock = stack.claim_run_dir(cfg, ["pt"])  # this process holds it, as a run in progress would
    try:
        second = run_stack(tiny_data, tmp_path / "run", *FOUR_STEPS)
        assert second.returncode == 1
        assert last_error(second) == f"error: {tmp_path / 'run'}: run directory in use by pid {os.getpid()} (one run per --run-dir)"
        assert not (tmp_path / "run" / "log.txt").exists()
    finally:
        lock.close()
    after = run_stack(tiny_data, tmp_path / "run", *FOUR_STEPS)  # released: the directory is free again
    assert after.returncode == 0, after.stderr[-2000:]


def test_a_corrupt_newest_checkpoint_is_named_and_resume_falls_back(stack, tiny_data, tmp_path):
    full = run_stack(tiny_data, tmp_path / "full", "--checkpoint-every", "2")
    assert full.returncode == 0, full.stderr[-2000:]
    assert list(stack.checkpoints(str(tmp_path / "full"), "pt")) == [6, 8]
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "full", run)
    flip_a_byte(run / "ckpt_000008" / "model.safetensors")  # loaded silently before checksums
    gen = run_stack(tiny_data, run, "--phases", "generate", "--prompt", "The", "--max-new-tokens", "4")
    assert gen.returncode == 1
    assert last_error(gen) == (f"error: {run}/ckpt_000008/model.safetensors: sha256 differs from the one in "
                               "state.json (truncated or corrupt)")
    resumed = run_stack(tiny_data, run, "--checkpoint-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"warning: cannot resume from {run}/ckpt_000008: " in resumed.stdout
    assert f"resumed from {run}/ckpt_000006 at step 6" in resumed.stdout
    want, got = final_weights(tmp_path / "full"), final_weights(run)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # steps 6-7 again, exactly


def test_resume_with_no_checkpoint_that_loads_is_one_error(stack, pretrained_run, tmp_path):
    data, pretrained = pretrained_run
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    optim = run / "ckpt_000008" / "optim.pt"
    os.truncate(optim, os.path.getsize(optim) // 2)
    out = run_stack(str(data), run, "--resume")
    assert out.returncode == 1
    assert f"warning: cannot resume from {run}/ckpt_000008: {optim}: sha256 differs" in out.stdout
    assert last_error(out) == f"error: {run}: no pt checkpoint to resume from loads (ckpt_000008)"


def test_a_crashs_leftovers_are_removed_at_start(pretrained_run, tmp_path):
    data, pretrained = pretrained_run
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    (run / "ckpt_000010.tmp").mkdir()
    (run / "ckpt_000010.tmp" / "model.safetensors").write_bytes(b"half")
    for name in ("latest.tmp", "metrics.json.tmp"):
        (run / name).write_text("half")
    out = run_stack(str(data), run, "--resume")  # already at its last step: nothing to train
    assert out.returncode == 0 and "nothing to do" in out.stdout
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_a_failed_save_keeps_the_previous_checkpoint(stack, tiny_data, tmp_path, monkeypatch):
    cfg = stack.parse_config(TINY_ARGS + ["--data-dir", tiny_data, "--run-dir", str(tmp_path), "--checkpoint-every", "2"])
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    real_save, saves = torch.save, []

    def disk_fills_up(obj, path, *args, **kwargs):  # the second checkpoint's optimizer state hits a full disk
        saves.append(path)
        if len(saves) == 2:
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(stack.CheckpointError) as error:
        stack.phase_pt(cfg, rt, stack.Logger(cfg, rt))
    assert str(error.value) == (f"{tmp_path}/ckpt_000004: could not write the checkpoint (No space left on device); "
                                f"the latest is still {tmp_path}/ckpt_000002")
    assert stack.latest_checkpoint(str(tmp_path)) == stack.latest_checkpoint(str(tmp_path), "pt") == str(tmp_path / "ckpt_000002")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] and list(stack.checkpoints(str(tmp_path), "pt")) == [2]
    model = stack.GPT(stack.ModelConfig.of(cfg, stack.Tokenizer(os.path.join(tiny_data, "tokenizer")).vocab_size))
    assert stack.load_checkpoint(str(tmp_path / "ckpt_000002"), model, stack.make_optimizer(model, cfg))["step"] == 2


def test_only_an_invocation_that_trained_and_finished_writes_config_json(pretrained_run, tmp_path):
    """Every invocation, a failing one too, used to rewrite config.json: the run directory then described a run
    that never happened. Each invocation's config is in log.txt; config.json is the last one that trained and ended."""
    data, pretrained = pretrained_run
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    before = (run / "config.json").read_bytes()
    failed = run_stack(str(data), run, "--phases", "sft", "--seed", "7")  # this data directory has no sft/
    assert failed.returncode == 1 and "sft/manifest.json: missing" in last_error(failed)
    evaluated = run_stack(str(data), run, "--phases", "chat", "--chat-max-per-task", "1", "--seed", "8")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (run / "config.json").read_bytes() == before
    log = (run / "log.txt").read_text()
    assert '"seed": 7' in log and '"seed": 8' in log


def test_a_checkpoint_from_before_model_configs_is_refused(stack, pretrained_run, tmp_path):
    """Checkpoints used to store the pretraining run's whole Config (stages as positional lists) and no model; they are
    no longer read (README: Checkpoints and the run directory): one error naming the file, from load_model and from a phase; the retired
    --phases convert says so."""
    import json
    data, pretrained = pretrained_run
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    path = run / "ckpt_000008"
    today = json.loads((path / "state.json").read_text())
    old = {k: v for k, v in today.items() if k not in ("model", "run")} | {"config": today["run"]}
    (path / "state.json").write_text(json.dumps(old))
    message = f"{path}/state.json: not a checkpoint's state (step, model); checkpoints written before 2026-12-01 carry no model and are not read"
    with pytest.raises(stack.CheckpointError, match=re.escape(message)):
        stack.load_model(str(path))
    out = run_stack(str(data), run, "--phases", "eval", "--init-from", str(path))
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [f"error: {message}"]
    out = run_stack(str(data), run, "--phases", "convert", "--init-from", str(path))
    assert out.returncode == 1 and out.stderr.strip() == ("error: --phases convert is gone: checkpoints written before "
                                                          "2026-12-01 are not read (README: Checkpoints and the run "
                                                          "directory)")


def test_load_model_needs_only_the_checkpoint_and_reads_its_state_once(stack, pretrained_run, monkeypatch):
    """The model used to be rebuilt from the command line's Config joined with the checkpoint's, a tokenizer for
    vocab_size and a replay of the schedule for the windows, reading state.json up to three times."""
    data, run = pretrained_run
    path = str(run / "ckpt_000008")
    reads = []
    real_read_json = stack.read_json
    monkeypatch.setattr(stack, "read_json", lambda p: reads.append(os.path.basename(p)) or real_read_json(p))
    model, state = stack.load_model(path)
    assert reads == ["state.json"] and state["step"] == 8 and state["run"]["phases"] == "pt"
    cfg = stack.parse_config(TINY_ARGS)
    last = cfg.stages[-1]
    assert model.cfg == stack.ModelConfig.of(cfg, stack.Tokenizer(os.path.join(data, "tokenizer")).vocab_size)
    assert (model.cfg.short_window, model.cfg.long_window, model.cfg.max_doc_len) == (last.short_window, last.long_window, last.max_doc_len)
    assert model.windows() == model.windows(last.short_window, last.long_window)
