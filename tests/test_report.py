"""The run report (RUN_DIR/report.md, its plots) and the log's header: tiny phases run as the stack is run, in two
invocations, each report checked against the metrics.json beside it; the curve reader, the git state, the rewrite
after every phase and a report that cannot be written, in process."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import chat_eval_shards
import core_shards
import sft_shards
from conftest import ROOT, STACK_PATH, TINY_ARGS, write_eval_sources
from test_core_eval import MAX_LEN, TASKS, write_bundle
from test_rl import RL_ARGS
from test_sft import SFT_ARGS, conversations

SEPARATOR = "=" * 100  # between each invocation's source and its log lines
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER_KEYS = ["commit", "command", "versions", "device"]


@pytest.fixture(scope="module")
def pipeline(tiny_data, tok_dir, tmp_path_factory):
    """Data for every phase (CORE, SFT, chat, RL beside the pretraining shards); then `--phases pt` and
    `--phases eval,chat,sft,chat,rl` (chat before and after SFT: two checkpoints) on one run directory. Returns the
    run directory and, per invocation, its report.md, metrics.json and stdout."""
    root = tmp_path_factory.mktemp("report")
    data, run = root / "data", root / "run"
    shutil.copytree(tiny_data, data)
    core_shards.write_core(write_bundle(root / "bundle", TASKS), tok_dir, data / "core", max_len=MAX_LEN)
    (root / "conversations.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations()))
    sft_shards.write_sft([str(root / "conversations.jsonl")], str(data / "tokenizer"), str(data / "sft"), val_percent=20)
    write_eval_sources(root / "eval")
    chat_eval_shards.write_chat_eval(str(root / "eval"), tok_dir, str(data / "chat_eval"))
    chat_eval_shards.write_rl(str(root / "eval"), tok_dir, str(data / "rl"))
    snapshots = []
    for phases in (["--phases", "pt"], ["--phases", "eval,chat,sft,chat,rl", "--core-max-per-task", "4",
                                        "--chat-max-new-tokens", "8", *SFT_ARGS, *RL_ARGS]):
        r = subprocess.run([sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run), *phases],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "warning: " not in r.stdout, r.stdout[-3000:]
        snapshots.append(((run / "report.md").read_text(), json.loads((run / "metrics.json").read_text()), r.stdout))
    return run, snapshots


def expected_commit():
    """What the header's commit line starts with: the stack's own checkout's HEAD, or unknown outside a repository."""
    r = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(STACK_PATH)), "rev-parse", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def check_header(lines):
    """run_header's lines: commit (this checkout's), command, versions (this interpreter's), device."""
    assert [line.split(":")[0] for line in lines] == HEADER_KEYS, lines
    assert lines[0].startswith(f"commit: {expected_commit()}")
    assert f"torch {torch.__version__}," in lines[2] and f"python {sys.version.split()[0]}," in lines[2]


def tables(text, heading):
    """The markdown tables of the section under `heading` (a line of report.md), each a list of rows of cells: the
    header row, then the body (the alignment row left out)."""
    section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    rows = [b.splitlines() for b in section.strip().split("\n\n") if b.startswith("|")]
    return [[[c.strip() for c in row.strip("|").split("|")] for row in t[:1] + t[2:]] for t in rows]


def column(rows):
    """{first cell: second cell as a float} of a table's body."""
    return {r[0]: float(r[1]) for r in rows[1:]}


def phase_list(report):
    return [r[0] for r in tables(report, report.splitlines()[0])[0][1:]]


def environment(report):
    return report.split("## Environment\n\n```text\n")[1].split("\n```")[0].splitlines()


def check_images(report, run):
    """The images report.md links to, each a PNG of nonzero size beside it."""
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    for link in links:
        png = (run / link).read_bytes()
        width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk's, first after the signature
        assert png.startswith(PNG_SIGNATURE) and png[12:16] == b"IHDR" and width > 0 and height > 0, link
    return links


def test_log_opens_each_invocation_with_the_header(pipeline):
    run, snapshots = pipeline
    log = (run / "log.txt").read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(log) if line == SEPARATOR]
    assert len(starts) == 2
    for start, (report, _, stdout) in zip(starts, snapshots):
        header = log[start:start + len(HEADER_KEYS)]
        check_header(header)
        assert log[start + len(HEADER_KEYS)].startswith("config: {")
        assert stdout.splitlines()[:len(HEADER_KEYS)] == header
        assert environment(report) == header  # one run_header for both
    assert "--phases pt" in log[starts[0] + 1] and "--phases eval,chat,sft,chat,rl" in log[starts[1] + 1]


def test_report_after_pretraining(pipeline):
    run, [(report, metrics, _), _] = pipeline
    assert report.startswith(f"# Run report: {run.name}\n") and "last after **pt**" in report
    assert phase_list(report) == ["pt"]
    bpb = column(tables(report, "## Validation bits per byte")[0])
    assert bpb == pytest.approx({"**all**": metrics["val_bpb"], **metrics["val_bpb_by_source"]}, abs=1e-4)
    pt = dict(tables(report, "## Pretraining")[0][1:])
    assert pt["parameters"] == f"{metrics['params']:,}" and pt["in NorMuon matrices"] == f"{metrics['params_matrix']:,}"
    for heading in ("## CORE", "## SFT", "## Chat", "## RL (GSM8K)"):  # phases that have not run have no section
        assert heading not in report
    assert check_images(report, run) == ["report_pt.png"]


def test_report_after_every_phase(pipeline):
    run, [_, (report, metrics, _)] = pipeline
    assert phase_list(report) == ["pt", "eval", "sft", "chat", "rl"] and "last after **rl**" in report
    bpb = column(tables(report, "## Validation bits per byte")[0])  # the eval phase's, over every val token
    assert bpb == pytest.approx({"**all**": metrics["val_bpb"], **metrics["val_bpb_by_source"]}, abs=1e-4)
    core = column(tables(report, "## CORE")[0])
    assert core == pytest.approx({**metrics["core_per_task"], "**CORE**": metrics["core"]}, abs=1e-4)
    chat = tables(report, "## Chat")[0]
    by = metrics["chat_by_checkpoint"]
    assert chat[0] == ["task", "ckpt_000008", "sft_ckpt_000012"] == ["task", *by]
    assert [r[0] for r in chat[1:]] == [*metrics["chat_per_task"], "**ChatCORE**"]
    for j, checkpoint in enumerate(by, 1):
        got = {r[0]: float(r[j]) for r in chat[1:]}
        assert got == pytest.approx({**by[checkpoint]["chat_per_task"], "**ChatCORE**": by[checkpoint]["chatcore"]}, abs=1e-4)
    sft = tables(report, "## SFT")[0]
    assert [(r[0], int(r[1])) for r in sft[1:]] == [("start", 0), ("end", 12)]
    assert [float(r[2]) for r in sft[1:]] == pytest.approx([metrics["sft_val_loss_init"], metrics["sft_val_loss"]], abs=1e-4)
    rewards = metrics["rl_reward"]
    rl = tables(report, "## RL (GSM8K)")
    assert [float(c) for c in rl[0][1]] == pytest.approx([3, rewards[0], rewards[-1], sum(rewards) / 3, max(rewards)], abs=1e-4)
    assert column(rl[1]) == pytest.approx(metrics["gsm8k_pass_at"], abs=1e-4)
    assert sorted(check_images(report, run)) == ["report_pt.png", "report_rl.png", "report_sft.png"]


def test_read_curves_counts_a_resumed_step_once(stack, tmp_path, monkeypatch):
    """A phase resumed from its step-2 checkpoint logs steps 2 and 3 again: the later lines win; a line cut off by a
    kill is skipped. What was read plots as a PNG, or as a note without matplotlib."""
    lines = [{"step": 0, "train/loss": 5.0}, {"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 3.5},
             {"step": 3, "train/loss": 3.0}, {"step": 3, "val/bpb": 2.5, "val/loss": 3.1},
             {"step": 2, "train/loss": 3.4}, {"step": 3, "train/loss": 2.9}, {"step": 3, "val/bpb": 2.4, "val/loss": 3.0}]
    path = tmp_path / "curves.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "train/lo')
    curves = stack.read_curves(str(path))
    assert curves == {"train/loss": [(0, 5.0), (1, 4.0), (2, 3.4), (3, 2.9)], "val/bpb": [(3, 2.4)], "val/loss": [(3, 3.0)]}
    title, panels = stack.REPORT_PLOTS["pt"]
    assert stack.plot_curves(str(tmp_path / "pt.png"), title, panels, curves)
    assert (tmp_path / "pt.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not stack.plot_curves(str(tmp_path / "sft.png"), *stack.REPORT_PLOTS["sft"], curves)  # no SFT curves
    assert not (tmp_path / "sft.png").exists()
    assert stack.plot_link(str(tmp_path), "pt", curves) == "![pretraining curves](report_pt.png)"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what a machine without matplotlib raises: ImportError
    assert stack.plot_link(str(tmp_path), "pt", curves) == "_No plot: matplotlib is not installed._"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state(stack, tmp_path, monkeypatch):
    """HEAD, and dirty once a tracked file changes (an untracked one does not count); None outside a repository and
    without git."""
    state = stack.git_state.__wrapped__  # uncached
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *args: subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                                       check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (repo / "stack.py").write_text("a = 1\n")
    git("add", "stack.py")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    (repo / "untracked.txt").write_text("x")
    assert state(str(repo)) == (head, False)
    (repo / "stack.py").write_text("a = 2\n")
    assert state(str(repo)) == (head, True)
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path is found either
    assert state(str(outside)) is None
    monkeypatch.setenv("PATH", str(outside))  # no git at all
    assert state(str(repo)) is None


def test_report_rewritten_after_each_phase_and_never_ends_the_run(stack, tmp_path, monkeypatch):
    """In one invocation: each phase sees the report of the phases before it; phases without numbers get a row of
    wall time and no section; a report that cannot be written is a warning and the phases go on; rank 1 writes none."""
    cfg = stack.parse_config([*TINY_ARGS, "--run-dir", str(tmp_path / "run")])
    os.makedirs(cfg.run_dir)
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    seen, log = [], []
    report = tmp_path / "run" / "report.md"
    fake_phase = lambda *_: seen.append(phase_list(report.read_text()) if report.is_file() else None)
    for phase in ("pt", "eval", "sft"):
        monkeypatch.setitem(stack.PHASES, phase, fake_phase)
    stack.phases_to_run(["pt", "eval", "sft"], cfg, rt, log.append)
    assert seen == [None, ["pt"], ["pt", "eval"]] and phase_list(report.read_text()) == ["pt", "eval", "sft"]
    assert "##" not in report.read_text().split("## Environment")[1] and log == []
    check_header(environment(report.read_text()))
    assert list(json.loads((tmp_path / "run" / "metrics.json").read_text())["phase_time_s"]) == ["pt", "eval", "sft"]
    report.unlink()
    report.mkdir()  # os.replace onto a directory fails
    stack.phases_to_run(["pt", "eval"], cfg, rt, log.append)
    assert len(log) == 2 and all(m.startswith(f"warning: {report} not rewritten: ") for m in log) and seen[3:] == [None, None]
    cfg = stack.parse_config([*TINY_ARGS, "--run-dir", str(tmp_path / "rank1")])
    os.makedirs(cfg.run_dir)
    stack.phases_to_run(["pt"], cfg, stack.Runtime(torch.device("cpu"), torch.float32, 1, 2, "sdpa"), log.append)
    assert os.listdir(cfg.run_dir) == []
