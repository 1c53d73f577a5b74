"""The run report (report.py: RUN_DIR/report.md, its plots) and the log's opening lines: tiny phases run as the stack
is run, in two invocations, report.py after each, each report checked against the metrics.json beside it; the curve
reader, the git state, the phase times recorded after every phase (and a metrics.json that cannot take them), in
process."""
import hashlib
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
import report  # noqa: E402  report.py beside the stack
from test_core_eval import MAX_LEN, TASKS, write_bundle
from test_rl import RL_ARGS
from test_sft import SFT_ARGS, conversations

SEPARATOR = "=" * 100  # between each invocation's code lines and its header
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER_KEYS = ["commit", "command", "versions", "device"]


def data_for_every_phase(root, tiny_data, tok_dir):
    """ROOT/data: the tiny pretraining data with CORE, SFT, chat-eval and RL data beside it."""
    data = root / "data"
    shutil.copytree(tiny_data, data)
    core_shards.write_core(write_bundle(root / "bundle", TASKS), tok_dir, data / "core", max_len=MAX_LEN)
    (root / "conversations.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations()))
    sft_shards.write_sft([str(root / "conversations.jsonl")], str(data / "tokenizer"), str(data / "sft"), val_percent=20)
    write_eval_sources(root / "eval")
    chat_eval_shards.write_chat_eval(str(root / "eval"), tok_dir, str(data / "chat_eval"))
    chat_eval_shards.write_rl(str(root / "eval"), tok_dir, str(data / "rl"))
    return data


@pytest.fixture(scope="module")
def pipeline(tiny_data, tok_dir, tmp_path_factory):
    """Data for every phase (CORE, SFT, chat, RL beside the pretraining shards); then `--phases pt` and
    `--phases eval,chat,sft,chat,rl` (chat before and after SFT: two checkpoints) on one run directory, report.py after
    each. Returns the run directory and, per invocation, its report.md, metrics.json and stdout."""
    root = tmp_path_factory.mktemp("report")
    data, run = data_for_every_phase(root, tiny_data, tok_dir), root / "run"
    snapshots = []
    for phases in (["--phases", "pt"], ["--phases", "eval,chat,sft,chat,rl", "--core-max-per-task", "4",
                                        "--chat-max-new-tokens", "8", *SFT_ARGS, *RL_ARGS]):
        r = subprocess.run([sys.executable, STACK_PATH, *TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run), *phases],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "warning: " not in r.stdout, r.stdout[-3000:]
        written = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), "--run-dir", str(run)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
        assert written.returncode == 0 and written.stdout == f"wrote {run / 'report.md'}\n", written.stderr[-3000:]
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


def checkpoint_list(report):
    return [r[1] for r in tables(report, report.splitlines()[0])[0][1:]]


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


def test_log_opens_each_invocation_with_its_code_and_header(pipeline):
    """Each invocation's log opens with a line naming the stack by its sha256 and where the run keeps that source
    (once for both: the same code), the separator, then the header and config; its other lines carry the time since
    it started, and its last line names metrics.json and report.md."""
    run, snapshots = pipeline
    log = (run / "log.txt").read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(log) if line == SEPARATOR]
    assert len(starts) == 2
    source = open(STACK_PATH, "rb").read()
    digest = hashlib.sha256(source).hexdigest()
    kept = f"code/{digest[:16]}/{os.path.basename(STACK_PATH)}"
    for start, (report_text, metrics, stdout) in zip(starts, snapshots):
        assert log[start - 2] == f"code: {os.path.basename(STACK_PATH)} sha256 {digest} ({kept})"
        header = log[start:start + len(HEADER_KEYS)]
        check_header(header)
        assert log[start + len(HEADER_KEYS)].startswith("config: {")
        assert stdout.splitlines()[:len(HEADER_KEYS)] == header
        assert metrics["environment"] == header == environment(report_text)
        rest = stdout.splitlines()[len(HEADER_KEYS) + 1:]
        stamped = [line.split("] ", 1)[1] for line in rest if re.match(r"\[\d+:\d\d:\d\d\] ", line)]
        assert len(stamped) > 5 and not [line for line in rest if line.startswith(("step ", "sft step ", "rl step ",
                                                                                      "val bpb", "done: "))]
        assert re.fullmatch(rf"\[\d+:\d\d:\d\d\] done: .*\. Results: {run}/metrics\.json; the report: python report\.py "
                            rf"--run-dir {run} writes {run}/report\.md", rest[-1])
    assert (run / kept).read_bytes() == source and os.listdir(run / "code") == [digest[:16]]
    assert "--phases pt" in log[starts[0] + 1] and "--phases eval,chat,sft,chat,rl" in log[starts[1] + 1]
    assert os.path.getsize(run / "log.txt") < len(source) / 2  # the source is kept beside the log, not in it


def test_report_after_pretraining(pipeline):
    run, [(report, metrics, _), _] = pipeline
    assert report.startswith(f"# Run report: {run.name}\n") and "1 phases run, last **pt**" in report
    assert phase_list(report) == ["pt"] and checkpoint_list(report) == ["ckpt_000008"]
    bpb = column(tables(report, "## Validation bits per byte")[0])
    assert bpb == pytest.approx({"**all**": metrics["val_bpb"], **metrics["val_bpb_by_source"]}, abs=1e-4)
    pt = dict(tables(report, "## Pretraining")[0][1:])
    assert pt["parameters"] == f"{metrics['params']:,}" and pt["in NorMuon matrices"] == f"{metrics['params_matrix']:,}"
    for heading in ("## CORE", "## SFT", "## Chat", "## RL (GSM8K)"):  # phases that have not run have no section
        assert heading not in report
    assert check_images(report, run) == ["report_pt.png"]


def test_report_after_every_phase(pipeline):
    run, [_, (report, metrics, _)] = pipeline
    # every phase that ran, chat twice: after pretraining and after SFT
    assert phase_list(report) == ["pt", "eval", "chat", "sft", "chat", "rl"] and "last **rl**" in report
    assert checkpoint_list(report) == ["ckpt_000008"] * 3 + ["sft_ckpt_000012"] * 2 + ["rl_ckpt_000003"]
    assert [t["phase"] for t in metrics["phase_time_s"]] == phase_list(report)
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


def test_read_curves_counts_a_resumed_step_once(tmp_path, monkeypatch):
    """A phase resumed from its step-2 checkpoint logs steps 2 and 3 again: the later lines win; a line cut off by a
    kill is skipped. What was read plots as a PNG, or as a note without matplotlib."""
    lines = [{"step": 0, "train/loss": 5.0}, {"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 3.5},
             {"step": 3, "train/loss": 3.0}, {"step": 3, "val/bpb": 2.5, "val/loss": 3.1},
             {"step": 2, "train/loss": 3.4}, {"step": 3, "train/loss": 2.9}, {"step": 3, "val/bpb": 2.4, "val/loss": 3.0}]
    path = tmp_path / "curves.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "train/lo')
    curves = report.read_curves(str(path))
    assert curves == {"train/loss": [(0, 5.0), (1, 4.0), (2, 3.4), (3, 2.9)], "val/bpb": [(3, 2.4)], "val/loss": [(3, 3.0)]}
    title, panels = report.REPORT_PLOTS["pt"]
    assert report.plot_curves(str(tmp_path / "pt.png"), title, panels, curves)
    assert (tmp_path / "pt.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not report.plot_curves(str(tmp_path / "sft.png"), *report.REPORT_PLOTS["sft"], curves)  # no SFT curves
    assert not (tmp_path / "sft.png").exists()
    assert report.plot_link(str(tmp_path), "pt", curves) == "![pretraining curves](report_pt.png)"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what a machine without matplotlib raises: ImportError
    assert report.plot_link(str(tmp_path), "pt", curves) == "_No plot: matplotlib is not installed._"


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


def test_phase_times_recorded_after_each_phase_and_never_end_the_run(stack, tmp_path, monkeypatch):
    """In one invocation: each phase sees the times of the phases before it in metrics.json, with the invocation's
    header; a metrics.json that cannot take them is a warning and the phases go on; rank 1 writes none. report.py
    renders phases without numbers as rows of wall time and no section."""
    cfg = stack.parse_config([*TINY_ARGS, "--run-dir", str(tmp_path / "run")])
    os.makedirs(cfg.run_dir)
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    seen, log = [], []
    metrics = tmp_path / "run" / "metrics.json"
    fake_phase = lambda *_: seen.append([t["phase"] for t in json.loads(metrics.read_text())["phase_time_s"]]
                                        if metrics.is_file() else None)
    for phase in ("pt", "eval", "sft"):
        monkeypatch.setitem(stack.PHASES, phase, fake_phase)
    times = stack.phases_to_run(["pt", "eval", "sft"], cfg, rt, log.append)
    assert [phase for phase, _ in times] == ["pt", "eval", "sft"] and log == []
    assert seen == [None, ["pt"], ["pt", "eval"]]
    assert [t["phase"] for t in json.loads(metrics.read_text())["phase_time_s"]] == ["pt", "eval", "sft"]
    check_header(json.loads(metrics.read_text())["environment"])
    report.write_report(cfg.run_dir)
    text = (tmp_path / "run" / "report.md").read_text()
    assert phase_list(text) == ["pt", "eval", "sft"] and "##" not in text.split("## Environment")[1]
    check_header(environment(text))
    metrics.unlink()
    metrics.mkdir()  # os.replace onto a directory fails
    stack.phases_to_run(["pt", "eval"], cfg, rt, log.append)
    assert len(log) == 2 and all(m.startswith(f"warning: {metrics}: ") for m in log) and seen[3:] == [None, None]
    cfg = stack.parse_config([*TINY_ARGS, "--run-dir", str(tmp_path / "rank1")])
    os.makedirs(cfg.run_dir)
    stack.phases_to_run(["pt"], cfg, stack.Runtime(torch.device("cpu"), torch.float32, 1, 2, "sdpa"), log.append)
    assert os.listdir(cfg.run_dir) == []


def test_phase_times_of_a_run_before_the_list_are_kept(stack, tmp_path):
    """metrics.json from before 2026-12-06 held phase_time_s as {phase: seconds}: the report shows those phases, and
    the next phase's time joins them instead of replacing them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"phase_time_s": {"pt": 300.0, "eval": 90.0}}))
    report.write_report(str(run))
    assert phase_list((run / "report.md").read_text()) == ["pt", "eval"]
    cfg = stack.parse_config([*TINY_ARGS, "--run-dir", str(run)])
    stack.record_phase_time(cfg, stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa"), "sft", None, 60.0, [])
    assert [t["phase"] for t in json.loads((run / "metrics.json").read_text())["phase_time_s"]] == ["pt", "eval", "sft"]


def test_report_py_refuses_a_run_without_metrics(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), "--run-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path}/metrics.json: missing (run the stack's phases on {tmp_path} first)"
    assert os.listdir(tmp_path) == []
