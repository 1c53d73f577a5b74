"""data/hub.py: checksums, local-mirror round trips, verification failures, and the real HF cache code path."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import hub
from common import run_cli
from conftest import ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tree(root):
    """{relative POSIX path: bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return out


@pytest.fixture
def prepared(tmp_path):
    """A small prepared directory, plus an atomic_path leftover that must never be published."""
    rng = np.random.default_rng(0)
    files = {
        "tokenizer/tokenizer.json": b'{"version": 1}\n',
        "tokenizer/token_bytes.npy": rng.bytes(300),
        "pretrain/val_000000.bin": rng.bytes(5000),
        "pretrain/train_000001.bin": rng.bytes(7000),
        "pretrain/manifest.json": b'{"format": "pretrain"}\n',
        "sft/deep/[odd] name?.txt": b"glob characters in a name\n",
        "empty.txt": b"",
    }
    root = tmp_path / "prepared"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "pretrain" / ".manifest.json.x1y2.tmp").write_bytes(b"half-written")
    return root, files


def run(capsys, *args):
    """The CLI in-process (fast): (exit status, stdout, stderr)."""
    try:
        run_cli(lambda: hub.main([str(a) for a in args]))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(capsys, args, *needles):
    code, _, err = run(capsys, *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_local_round_trip(prepared, tmp_path, capsys):
    root, files = prepared
    mirror, out = tmp_path / "mirror", tmp_path / "nested" / "out"
    code, stdout, err = run(capsys, "upload", root, "--local", mirror)
    assert code == 0, err
    assert f"uploaded {len(files)} files" in stdout

    checksums = json.loads((root / "checksums.json").read_text())
    assert checksums == {"version": 1, "files": {
        rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for rel, data in sorted(files.items())}}
    assert list(checksums["files"]) == sorted(files)
    published = {**files, "checksums.json": (root / "checksums.json").read_bytes()}
    assert tree(mirror) == published  # the temp file stays behind

    code, stdout, err = run(capsys, "download", "--local", mirror, "--out", out)
    assert code == 0, err
    assert tree(out) == published
    assert sorted(os.listdir(out.parent)) == ["out"]  # no staging directory left beside it

    (tmp_path / "empty").mkdir()  # an existing empty directory is a valid --out
    assert run(capsys, "download", "--local", mirror, "--out", tmp_path / "empty")[0] == 0
    assert tree(tmp_path / "empty") == published


def test_reupload_replaces_mirror_exactly(prepared, tmp_path, capsys):
    root, files = prepared
    mirror = tmp_path / "mirror"
    assert run(capsys, "upload", root, "--local", mirror)[0] == 0
    (root / "pretrain" / "train_000001.bin").unlink()
    (root / "tokenizer" / "tokenizer.json").write_bytes(b'{"version": 2}\n')
    assert run(capsys, "upload", root, "--local", mirror)[0] == 0
    got = tree(mirror)
    assert "pretrain/train_000001.bin" not in got  # a stale file would be a file the repo doesn't have
    assert got["tokenizer/tokenizer.json"] == b'{"version": 2}\n'
    assert set(json.loads(got["checksums.json"])["files"]) == set(files) - {"pretrain/train_000001.bin"}
    assert sorted(os.listdir(tmp_path)) == ["mirror", "prepared"]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert_error(capsys, ["upload", root, "--local", precious], str(precious), "not a hub mirror")
    assert tree(precious) == {"notes.txt": b"keep me"}
    assert_error(capsys, ["upload", root, "--local", root / "sub"], "must not contain")
    assert_error(capsys, ["upload", root, "--local", tmp_path], "must not contain")


def test_failed_mirror_copy_keeps_old_mirror(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    mirror = tmp_path / "mirror"
    hub.upload(str(root), local=str(mirror))
    before = tree(mirror)
    (root / "pretrain" / "val_000000.bin").write_bytes(b"new")
    copies = []

    def failing_copy(src, dst):  # fail half way through, as a full disk would
        if len(copies) == 3:
            raise OSError(28, "No space left on device")
        copies.append(dst)

    monkeypatch.setattr(hub.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="No space"):
        hub.upload(str(root), local=str(mirror))
    assert tree(mirror) == before
    assert sorted(os.listdir(tmp_path)) == ["mirror", "prepared"]


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, rel, problem", [
    (flip_byte, "pretrain/val_000000.bin", "sha256 mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "pretrain/train_000001.bin", "size mismatch"),
    (lambda p: p.unlink(), "tokenizer/tokenizer.json", "missing"),
    (lambda p: p.unlink(), "checksums.json", "missing"),
    (lambda p: p.write_text("{not json"), "checksums.json", "malformed JSON"),
])
def test_damaged_mirror_is_rejected(prepared, tmp_path, capsys, damage, rel, problem):
    root, _ = prepared
    mirror, out = tmp_path / "mirror", tmp_path / "out"
    assert run(capsys, "upload", root, "--local", mirror)[0] == 0
    damage(mirror / rel)
    assert_error(capsys, ["download", "--local", mirror, "--out", out], f"{mirror}/{rel}: {problem}")
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["mirror", "prepared"]  # the staging tree is gone too


def test_download_refusals(prepared, tmp_path, capsys):
    root, _ = prepared
    mirror, out = tmp_path / "mirror", tmp_path / "out"
    assert run(capsys, "upload", root, "--local", mirror)[0] == 0
    out.mkdir()
    (out / "old.bin").write_bytes(b"x")
    assert_error(capsys, ["download", "--local", mirror, "--out", out], f"{out}: already exists and is not empty")
    assert tree(out) == {"old.bin": b"x"}
    assert_error(capsys, ["download", "--local", tmp_path / "nope", "--out", tmp_path / "o2"], "no such directory")

    # Paths in checksums.json come from the remote: one escaping the tree is refused before anything is read.
    (tmp_path / "secret").write_bytes(b"s")
    checksums = json.loads((mirror / "checksums.json").read_text())
    checksums["files"]["../secret"] = {"sha256": hashlib.sha256(b"s").hexdigest(), "bytes": 1}
    (mirror / "checksums.json").write_text(json.dumps(checksums))
    assert_error(capsys, ["download", "--local", mirror, "--out", tmp_path / "o3"], "invalid file path '../secret'")
    assert not (tmp_path / "o3").exists()


def test_upload_to_repo_publishes_exactly_the_checksummed_files(prepared, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    root, files = prepared
    calls = []

    class FakeApi:
        def create_repo(self, *args, **kwargs):
            calls.append(("create_repo", args, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", (), kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    code, stdout, err = run(capsys, "upload", root, "--repo", "org/name", "--private", "--message", "v1 data")
    assert code == 0, err
    assert "hf://datasets/org/name" in stdout
    (_, args, create), (_, _, up) = calls
    assert args == ("org/name",) and create == {"repo_type": "dataset", "exist_ok": True, "private": True}
    patterns = up.pop("allow_patterns")
    assert up == {"folder_path": str(root), "repo_id": "org/name", "repo_type": "dataset", "commit_message": "v1 data"}
    # huggingface_hub's own pattern filter, over everything in the folder, selects exactly what was checksummed.
    assert sorted(filter_repo_objects(tree(root), allow_patterns=patterns)) == sorted([*files, "checksums.json"])


def test_upload_to_repo_errors_are_one_line(prepared, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    class OfflineApi:
        def create_repo(self, *args, **kwargs):
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    assert_error(capsys, ["upload", prepared[0], "--repo", "org/name"], "hf://datasets/org/name: ", "offline mode")


def hf_cache(cache, repo_id, snapshot_files, commit=COMMIT):
    """The HF hub cache layout: blobs/, snapshots/<commit>/ symlinking into them, refs/main naming the commit."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    for rel, data in snapshot_files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline: snapshot_download reads the file verbatim
    return repo


def run_offline(tmp_path, *args):
    """The CLI in a subprocess whose huggingface_hub is offline and sees only the cache under tmp_path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "data/hub.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True)


def test_download_from_hf_cache_offline(prepared, tmp_path):
    root, files = prepared
    hub.upload(str(root), local=str(tmp_path / "mirror"))
    published = tree(tmp_path / "mirror")
    repo = hf_cache(tmp_path / "cache", "org/name", {**published, ".gitattributes": b"*.bin filter=lfs\n"})

    r = run_offline(tmp_path, "download", "--repo", "org/name", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert f"downloaded {len(files)} files" in r.stdout
    assert tree(tmp_path / "out") == published  # no .gitattributes

    rel = "pretrain/val_000000.bin"
    blob = repo / "blobs" / hashlib.sha256(files[rel]).hexdigest()
    flip_byte(blob)
    r = run_offline(tmp_path, "download", "--repo", "org/name", "--revision", COMMIT, "--out", tmp_path / "out2")
    assert r.returncode == 1
    got, want = hashlib.sha256(blob.read_bytes()).hexdigest(), hashlib.sha256(files[rel]).hexdigest()
    assert r.stderr.strip().splitlines() == [
        f"error: hf://datasets/org/name@{COMMIT}/{rel}: sha256 mismatch ({got}, checksums.json says {want})"]
    assert not (tmp_path / "out2").exists()

    r = run_offline(tmp_path, "download", "--repo", "org/other", "--out", tmp_path / "out3")
    assert r.returncode == 1 and r.stderr.startswith("error: hf://datasets/org/other: "), r.stderr
    assert not (tmp_path / "out3").exists()


def test_cli_help_and_subprocess_round_trip(prepared, tmp_path):
    root, files = prepared
    for args in ([], ["upload"], ["download"]):
        r = subprocess.run([sys.executable, "data/hub.py", *args, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout
    r = subprocess.run([sys.executable, "data/hub.py", "upload", root, "--local", tmp_path / "m"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "data/hub.py", "download", "--local", tmp_path / "m", "--out", tmp_path / "o"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in tree(tmp_path / "o").items() if k != "checksums.json"} == files


def test_a_link_out_of_the_mirror_is_refused(prepared, tmp_path, capsys):
    """Before: a mirror whose checksums.json listed a symlink to /etc/hostname handed that file back as data."""
    root, _ = prepared
    mirror, out, secret = tmp_path / "mirror", tmp_path / "out", tmp_path / "secret.txt"
    secret.write_bytes(b"a file of this machine\n")
    assert run(capsys, "upload", root, "--local", mirror)[0] == 0
    (mirror / "pretrain" / "stolen.bin").symlink_to(secret)
    table = json.loads((mirror / "checksums.json").read_text())
    table["files"]["pretrain/stolen.bin"] = {"sha256": hashlib.sha256(secret.read_bytes()).hexdigest(), "bytes": 23}
    (mirror / "checksums.json").write_text(json.dumps(table))
    assert_error(capsys, ["download", "--local", mirror, "--out", out],
                 f"{mirror}/pretrain/stolen.bin: links outside {mirror} (to {secret}); refused")
    assert not out.exists()


def test_a_table_that_leaves_a_file_out_is_refused(prepared, tmp_path, capsys):
    root, _ = prepared
    mirror, out = tmp_path / "mirror", tmp_path / "out"
    assert run(capsys, "upload", root, "--local", mirror)[0] == 0
    table = json.loads((mirror / "checksums.json").read_text())
    del table["files"]["pretrain/train_000001.bin"]
    (mirror / "checksums.json").write_text(json.dumps(table))
    assert_error(capsys, ["download", "--local", mirror, "--out", out],
                 f"{mirror}/pretrain/train_000001.bin: not listed in checksums.json (1 file(s) are not)")
    assert not out.exists()
