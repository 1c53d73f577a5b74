"""Publish a prepared data directory as a Hugging Face dataset repo (or a local mirror of one) and fetch it back.

    python data/hub.py upload DIR (--repo ID | --local MIRROR) [--private] [--message MSG]
    python data/hub.py download (--repo ID [--revision REV] | --local MIRROR) --out DIR

`upload` writes DIR/checksums.json (sha256 and size of every file) and publishes exactly those files plus
checksums.json. `download` copies the listed files into a directory beside --out, checks each one's size and
sha256, and renames the tree into place only when all of them match: --out is either complete and verified or
absent. A local mirror has the layout the dataset repo has, so tests and air-gapped machines use the same code.
Files are only hashed and copied here, never parsed (so nothing downloaded is ever unpickled).
"""
import argparse
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from common import DataError, run_cli, sha256_file, write_json

CHECKSUMS = "checksums.json"
CHECKSUMS_VERSION = 1
HUB_DIRS = {".git", ".cache"}  # the Hub refuses both; .cache/huggingface is also where HF keeps download metadata
HUB_FILES = {".gitattributes"}  # the Hub adds it to every repo


def _is_temp(name):
    return name.startswith(".") and name.endswith(".tmp")  # the names atomic_path and _staging give temporaries


# ---------------------------------------------------------------------------------------------------------------
# Checksums: shared by both directions and both kinds of remote

def list_files(root):
    """Relative POSIX paths of the files to publish, sorted; checksums.json, temporaries and HUB_DIRS left out."""
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in HUB_DIRS and not _is_temp(d)]
        files += [Path(os.path.relpath(os.path.join(dirpath, n), root)).as_posix() for n in names if not _is_temp(n)]
    return sorted(f for f in files if f != CHECKSUMS)


def compute_checksums(root):
    files = {rel: {"sha256": sha256_file(os.path.join(root, rel)), "bytes": os.path.getsize(os.path.join(root, rel))}
             for rel in list_files(root)}
    return {"version": CHECKSUMS_VERSION, "files": files}


def read_checksums(root, label):
    """The `files` table of root/checksums.json, with every path checked to stay inside the tree."""
    path = os.path.join(root, CHECKSUMS)
    if not os.path.isfile(path):
        raise DataError(f"{label}/{CHECKSUMS}: missing (not uploaded with data/hub.py?)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{label}/{CHECKSUMS}: malformed JSON ({e})") from None
    if not isinstance(data, dict) or data.get("version") != CHECKSUMS_VERSION or not isinstance(data.get("files"), dict):
        raise DataError(f"{label}/{CHECKSUMS}: expected {{'version': {CHECKSUMS_VERSION}, 'files': {{...}}}}")
    for rel, entry in data["files"].items():
        # The paths come from the remote: one like "../x" would read or write outside the trees we control.
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or not parts or ".." in parts or "\\" in rel or parts[0] in HUB_DIRS:
            raise DataError(f"{label}/{CHECKSUMS}: invalid file path {rel!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            raise DataError(f"{label}/{CHECKSUMS}: entry for {rel!r} needs 'sha256' and 'bytes'")
    return data["files"]


def copy_verified(src, dst, files, label, within):
    """Copy each listed file from src into dst and check the copy, so what is verified is what gets kept. Every
    source must resolve inside `within` (a mirror's own tree; for the HF cache, the repo's folder, whose snapshot
    links point into its blobs/): a link out of it would copy some other file of this machine into the download."""
    within = os.path.realpath(within)
    for rel, entry in files.items():
        source, target = os.path.join(src, rel), os.path.join(dst, rel)
        if not os.path.isfile(source):
            raise DataError(f"{label}/{rel}: missing (listed in {CHECKSUMS})")
        if os.path.commonpath([os.path.realpath(source), within]) != within:
            raise DataError(f"{label}/{rel}: links outside {label} (to {os.path.realpath(source)}); refused")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)  # follows the HF cache's symlinks into blobs/
        if (size := os.path.getsize(target)) != entry["bytes"]:
            raise DataError(f"{label}/{rel}: size mismatch ({size} bytes, {CHECKSUMS} says {entry['bytes']})")
        if (digest := sha256_file(target)) != entry["sha256"]:
            raise DataError(f"{label}/{rel}: sha256 mismatch ({digest}, {CHECKSUMS} says {entry['sha256']})")


def _staging(path):
    """A private directory beside `path` (same filesystem, so renames out of it are atomic); remove when done."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)


def _nested(a, b):
    a, b = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([a, b]) in (a, b)


# ---------------------------------------------------------------------------------------------------------------
# Remote vs local mirror: the only place the two differ

def _push_remote(root, files, repo, private, message):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    api = HfApi()
    try:
        # private=None leaves visibility to the Hub (an organisation may default to private); exist_ok keeps an
        # existing repo's visibility as it is.
        api.create_repo(repo, repo_type="dataset", exist_ok=True, private=private or None)
        # Exactly the checksummed files: escaped, since allow_patterns are globs and a name may contain [ * ?.
        api.upload_folder(folder_path=root, repo_id=repo, repo_type="dataset", commit_message=message,
                          allow_patterns=[glob.escape(f) for f in files])
    except (OSError, HFValidationError) as e:  # HTTP, connection and offline-mode errors are all OSErrors
        raise DataError(f"hf://datasets/{repo}: {e}") from None


def _push_local(root, files, mirror):
    # Replacing a directory deletes it: only ever replace an empty one or an earlier mirror.
    replaceable = os.path.isdir(mirror) and (not os.listdir(mirror) or os.path.isfile(os.path.join(mirror, CHECKSUMS)))
    if os.path.exists(mirror) and not replaceable:
        raise DataError(f"{mirror}: exists and is not a hub mirror (no {CHECKSUMS}); refusing to replace it")
    staging = _staging(mirror)
    try:
        tree, old = os.path.join(staging, "tree"), os.path.join(staging, "old")
        for rel in files:
            os.makedirs(os.path.dirname(os.path.join(tree, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(root, rel), os.path.join(tree, rel))
        # Directories cannot be renamed over non-empty ones: park the old mirror, then move the new one in.
        if os.path.exists(mirror):
            os.rename(mirror, old)
        try:
            os.rename(tree, mirror)
        except OSError:
            if os.path.exists(old):
                os.rename(old, mirror)
            raise
    finally:
        shutil.rmtree(staging)


def _fetch_remote(repo, revision, label):
    """The snapshot folder in the HF cache. Not local_dir: offline, snapshot_download(local_dir=...) never looks in
    the cache (it only hands back local_dir itself if that is already non-empty), so a machine with a warm cache and
    no network could not download. The snapshot is only read: copy_verified copies out of it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    try:
        return snapshot_download(repo_id=repo, repo_type="dataset", revision=revision)
    except (OSError, HFValidationError) as e:  # not found, gated, offline without a cached snapshot, ...
        raise DataError(f"{label}: {e}") from None


def _fetch_local(mirror):
    if not os.path.isdir(mirror):
        raise DataError(f"{mirror}: no such directory")
    return mirror


# ---------------------------------------------------------------------------------------------------------------
# Commands

def upload(root, repo=None, local=None, private=False, message=None):
    """Write root/checksums.json and publish; returns the checksums table."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory")
    checksums = compute_checksums(root)
    if not checksums["files"]:
        raise DataError(f"{root}: no files to upload")
    write_json(os.path.join(root, CHECKSUMS), checksums)
    files = [*checksums["files"], CHECKSUMS]
    if repo:
        _push_remote(root, files, repo, private, message)
    else:
        local = os.path.abspath(local)
        if _nested(root, local):  # replacing the mirror would delete (part of) the source, or copy into itself
            raise DataError(f"{local}: the mirror and {root} must not contain one another")
        _push_local(root, files, local)
    return checksums


def download(out, repo=None, revision=None, local=None):
    """Fetch, verify every file listed in checksums.json, then rename the verified tree to `out`."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise DataError(f"{out}: already exists and is not empty")
    if repo:
        label = f"hf://datasets/{repo}" + (f"@{revision}" if revision else "")
        src = _fetch_remote(repo, revision, label)
    else:
        label = src = _fetch_local(os.path.abspath(local))
    files = read_checksums(src, label)
    # a table that leaves files out would pass them off as verified data, or leave them behind unnoticed
    unlisted = sorted(set(list_files(src)) - set(files) - HUB_FILES)
    if unlisted:
        raise DataError(f"{label}/{unlisted[0]}: not listed in {CHECKSUMS} ({len(unlisted)} file(s) are not): "
                        "re-upload with data/hub.py")
    staging = _staging(out)
    try:
        tree = os.path.join(staging, "tree")  # made with the usual permissions (mkdtemp's are 0700)
        os.mkdir(tree)
        copy_verified(src, tree, files, label, src if local else os.path.dirname(os.path.dirname(src)))
        shutil.copyfile(os.path.join(src, CHECKSUMS), os.path.join(tree, CHECKSUMS))
        try:
            os.rename(tree, out)  # also replaces an empty directory
        except OSError:
            raise DataError(f"{out}: already exists and is not empty") from None
    finally:
        shutil.rmtree(staging)
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("upload", help="write DIR/checksums.json and publish DIR",
                             description="Write DIR/checksums.json, then upload DIR to a dataset repo or replace a local mirror.")
    up.add_argument("dir", metavar="DIR", help="a prepared data directory")
    where = up.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", metavar="ID", help="dataset repo id, e.g. ORG/NAME (created if missing)")
    where.add_argument("--local", metavar="MIRROR", help="a directory replaced by a copy laid out like the repo")
    up.add_argument("--private", action="store_true", help="create the repo private (--repo only)")
    up.add_argument("--message", default="Upload prepared data", help="commit message (--repo only)")

    down = commands.add_parser("download", help="fetch a dataset repo or mirror into DIR, checksums verified",
                               description="Fetch, verify every file against checksums.json, then move into --out.")
    where = down.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", metavar="ID", help="dataset repo id (read from the HF cache when offline)")
    where.add_argument("--local", metavar="MIRROR", help="a mirror written by `upload --local`")
    down.add_argument("--revision", metavar="REV", help="branch, tag or commit of the repo (default: main)")
    down.add_argument("--out", metavar="DIR", required=True, help="must not exist or be empty")

    args = parser.parse_args(argv)
    if args.command == "upload":
        if args.local and args.private:
            up.error("--private only applies to --repo")
        checksums = upload(args.dir, args.repo, args.local, args.private, args.message)
        n_bytes = sum(e["bytes"] for e in checksums["files"].values())
        print(f"uploaded {len(checksums['files'])} files ({n_bytes:,} bytes) + {CHECKSUMS} to "
              f"{'hf://datasets/' + args.repo if args.repo else os.path.abspath(args.local)}")
    else:
        if args.local and args.revision:
            down.error("--revision only applies to --repo")
        files = download(args.out, args.repo, args.revision, args.local)
        print(f"downloaded {len(files)} files ({sum(e['bytes'] for e in files.values()):,} bytes) into {args.out}, checksums verified")


if __name__ == "__main__":
    run_cli(main)
