"""data/prepare.py --source auto (the default): the local shared data when it is there, else the hub. No test here
reaches the network: the hub download is replaced in-process, and the one subprocess that tries it runs offline."""
import os
import subprocess
import sys

import pytest

import prepare
from conftest import ROOT


def shared_layout(root, val=True):
    """Just enough of the shared/data layout for prepare.py to choose it and build its commands."""
    (root / "pretrain").mkdir(parents=True)
    (root / "pretrain" / "train_000.txt").write_text("Some training text.")
    if val:
        (root / "pretrain" / "val_000.txt").write_text("Some validation text.")
    return root


@pytest.fixture
def no_hub(monkeypatch):
    """Records the climbmix download (and returns stand-in paths) and the step commands instead of running them."""
    calls = {"download": [], "steps": []}

    def download(n_train, cache_dir):
        calls["download"].append((n_train, cache_dir))
        return [os.path.join(cache_dir, "shard_00000.parquet")], [os.path.join(cache_dir, "shard_06542.parquet")]

    def run(cmd, *a, **kw):
        calls["steps"].append(cmd[1:])
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(prepare, "download_climbmix", download)
    monkeypatch.setattr(prepare.subprocess, "run", run)
    return calls


def prepare_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["prepare.py", *map(str, argv)])
    prepare.main()


def test_auto_is_the_default_and_picks_the_local_folder(tmp_path, monkeypatch, capsys, no_hub):
    local = shared_layout(tmp_path / "shared")
    monkeypatch.setenv("DECODERSTACK_DATA", str(local))
    prepare_main(monkeypatch, "--vocab-size", "1024", "--out", tmp_path / "out")
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"--source auto: using the local shared data $DECODERSTACK_DATA={local} (it has pretrain/)"
    assert no_hub["download"] == []
    tok_step, pretrain_step = no_hub["steps"][:2]
    assert tok_step[tok_step.index("--input") + 1] == str(local / "pretrain")
    assert pretrain_step[-2:] == ["--seed", str(prepare.DEFAULT_SEED)]  # a local source is shuffled
    assert len(no_hub["steps"]) == 6


def test_auto_looks_beside_the_repository_without_the_variable(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    shared_layout(tmp_path / "shared" / "data")
    monkeypatch.delenv("DECODERSTACK_DATA", raising=False)
    monkeypatch.setattr(prepare, "REPO_ROOT", str(repo))
    source, why = prepare.resolve_source("auto")
    assert os.path.samefile(source, tmp_path / "shared" / "data")
    assert why == f"--source auto: using the local shared data {tmp_path / 'shared' / 'data'} (it has pretrain/)"
    assert prepare.resolve_source(str(repo)) == (str(repo), None)  # an explicit source is taken as given, silently


@pytest.mark.parametrize("state,reason", [("missing", "does not exist"), ("empty", "has no pretrain/ inside")])
def test_auto_picks_the_hub_when_the_local_folder_is_absent(tmp_path, monkeypatch, capsys, no_hub, state, reason):
    local = tmp_path / "shared"
    if state == "empty":
        local.mkdir()
    monkeypatch.setenv("DECODERSTACK_DATA", str(local))
    out_dir = tmp_path / "out"
    prepare_main(monkeypatch, "--vocab-size", "1024", "--out", out_dir)
    line = capsys.readouterr().out.splitlines()[0]
    assert line == f"--source auto: using the public sources from the Hugging Face hub (hf): $DECODERSTACK_DATA={local} {reason}"
    assert no_hub["download"] == [(8, str(out_dir / "downloads" / "climbmix"))]
    pretrain_step, core_step = no_hub["steps"][1:3]
    assert "--keep-order" in pretrain_step  # climbmix is shuffled already
    assert core_step[core_step.index("--bundle") + 1] == "download"


def test_explicit_source_prints_no_choice(tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.setenv("DECODERSTACK_DATA", str(shared_layout(tmp_path / "shared")))
    prepare_main(monkeypatch, "--source", "hf", "--vocab-size", "1024", "--out", tmp_path / "out")
    assert "--source auto" not in capsys.readouterr().out
    assert len(no_hub["download"]) == 1  # hf as asked, though the local folder is there


def run_cli(tmp_path, data):
    env = {**os.environ, "DECODERSTACK_DATA": str(data), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "data/prepare.py", "--vocab-size", "1024", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def test_cli_default_chooses_before_checking_the_local_folder(tmp_path):
    local = shared_layout(tmp_path / "shared", val=False)
    r = run_cli(tmp_path, local)
    assert r.returncode == 1
    assert r.stdout.splitlines()[0].startswith("--source auto: using the local shared data")
    assert r.stderr.strip().splitlines()[-1] == f"error: {local}/pretrain: no val_* files to hold out for validation"


def test_cli_hub_choice_offline_is_one_error(tmp_path):
    r = run_cli(tmp_path, tmp_path / "missing")
    assert r.returncode == 1
    assert r.stdout.splitlines()[0].startswith("--source auto: using the public sources from the Hugging Face hub (hf)")
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {prepare.CLIMBMIX_REPO}: download of shard_00000.parquet failed"), r.stderr[-2000:]
    assert last.endswith("; without network, prepare from local files: --source PATH (a folder in the shared/data "
                         "layout) or $DECODERSTACK_DATA=PATH with --source auto")  # how to point at local data
