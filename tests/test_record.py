"""baselines/record.py: log parsing (the stack's real log format: code lines naming files kept by hash, time-stamped
lines; logs before 2026-12-06 with the source inside; several invocations, resumes), the t distribution
against closed forms and tables, verify's verdict and exit code, new (folder contents, README row, no overwrite,
verification of seeds), diff and plot."""
import hashlib
import json
import math
import os
import shutil

import pytest

from conftest import ROOT, STACK_PATH, load_module

record = load_module(os.path.join(ROOT, "baselines", "record.py"), "record")
SEP = "=" * 100
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stack_source():
    with open(STACK_PATH, encoding="utf-8") as f:
        return f.read()


def invocation_text(source, config, lines):
    """What one invocation of the stack appended to log.txt before 2026-12-06: source, separator, then log lines."""
    return source + "\n" + SEP + "\n" + f"config: {json.dumps(config)}\n" + "".join(line + "\n" for line in lines)


def coded_invocation(run_dir, files, config, lines):
    """What one invocation of the stack appends to log.txt now: a code line per file it ran ({name: source}, each kept
    under RUN_DIR/code/ by its sha256), the separator, a header line, the config, then its lines time-stamped."""
    code = []
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).hexdigest()
        kept = os.path.join("code", digest[:16], name)
        os.makedirs(os.path.join(run_dir, "code", digest[:16]), exist_ok=True)
        with open(os.path.join(run_dir, kept), "w", encoding="utf-8") as f:
            f.write(text)
        code.append(f"code: {name} sha256 {digest} ({kept})\n")
    stamped = "".join(f"[0:00:{i % 60:02d}] {line}\n" for i, line in enumerate(lines))
    return "".join(code) + SEP + "\ncommit: x\n" + f"config: {json.dumps(config)}\n" + stamped


def pt_lines(total, val_every, bpb_at, loss_at, log_every=5, start=0):
    lines = [f"model: 1,234 parameters (567 in NorMuon matrices), {total} steps, attention backend sdpa, device cpu, "
             "dtype torch.float32, world size 1"]
    for step in range(start, total):
        if step % log_every == 0 or step == total - 1:
            lines.append(f"step {step + 1}/{total} loss {loss_at(step + 1):.4f} lr 1.000 2,000 tok/s eta 0.1 min")
        if (step + 1) % val_every == 0 or step == total - 1:
            lines.append(f"step {step + 1}/{total} val bpb {bpb_at(step + 1):.4f} val loss {bpb_at(step + 1) * 2.4:.4f}")
    return lines


def make_run(path, final_bpb, source=None, seed=0, total=20, eval_phase=False, metrics=None):
    """A finished run directory as the stack leaves it: log.txt (source + lines), config.json, metrics.json."""
    source = stack_source() if source is None else source
    os.makedirs(path, exist_ok=True)
    config = {"preset": "cpu", "run_dir": str(path), "phases": "pt", "seed": seed}
    bpb_at = lambda s: final_bpb + 0.5 * (total - s) / total
    text = invocation_text(source, config, pt_lines(total, 10, bpb_at, lambda s: 9 - 4 * s / total))
    if eval_phase:
        text += invocation_text(source, {**config, "phases": "eval"},
                                [f"evaluating {path}/ckpt_{total:06d}", f"val bpb {final_bpb:.4f} val loss {final_bpb * 2.4:.4f}",
                                 "CORE                                                  -0.0370", "eval took 3s"])
    with open(os.path.join(path, "log.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    m = {"val_bpb": final_bpb, "train_tokens": total * 4096, "params": 1234, "pt_train_time_s": 355.2, "device": "cpu",
         "world_size": 1, **({"core": -0.037} if eval_phase else {}), **(metrics or {})}
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    return str(path)


@pytest.fixture
def records(tmp_path):
    """A records folder holding a copy of baselines/README.md (the real table header)."""
    d = tmp_path / "records"
    d.mkdir()
    shutil.copyfile(os.path.join(ROOT, "baselines", "README.md"), d / "README.md")
    return str(d)


# ---- parsing --------------------------------------------------------------------------------------------------------

def test_split_log_recovers_each_invocations_exact_source_and_lines(tmp_path):
    run = make_run(tmp_path / "run", 2.2961, eval_phase=True)
    invocations = record.split_log(open(os.path.join(run, "log.txt"), encoding="utf-8").read())
    assert len(invocations) == 2
    assert invocations[0].source == stack_source() and invocations[1].source == stack_source()
    assert [inv.config["phases"] for inv in invocations] == ["pt", "eval"]
    assert invocations[0].lines[1].startswith("model: ") and invocations[1].lines[-1] == "eval took 3s"
    curves = record.parse_curves(invocations)
    assert curves.total_steps == 20
    assert [s for s, _ in curves.train] == [1, 6, 11, 16, 20]
    assert curves.train[0][1] == pytest.approx(9 - 4 / 20, abs=1e-4)
    assert [(s, b) for s, b, _ in curves.val] == [(10, 2.5461), (20, 2.2961)]
    assert (curves.final_bpb, curves.final_loss) == (2.2961, pytest.approx(2.2961 * 2.4, abs=1e-4))


def test_split_log_reads_the_files_the_code_lines_name(tmp_path):
    """Today's log: each invocation names its files by sha256 (the stack and a sibling it loaded), kept under
    RUN_DIR/code/; the lines lose their time stamps; the files are read and checked when asked for. An old
    invocation (the source inside) after a new one still splits."""
    run = tmp_path / "run"
    run.mkdir()
    files = {os.path.basename(STACK_PATH): '"""stack"""\nx = 1\n', "kernels.py": "y = 2\n"}
    text = coded_invocation(run, files, {"phases": "pt"}, pt_lines(10, 5, lambda s: 2.7, lambda s: 6.0))
    text += coded_invocation(run, files, {"phases": "eval"}, ["val bpb 2.6000 val loss 6.1000 (every val token)"])
    (run / "log.txt").write_text(text)
    _, invocations = record.read_log(str(run), with_code=True)
    assert [inv.config["phases"] for inv in invocations] == ["pt", "eval"] and invocations[0].code == files
    assert invocations[0].source == files[os.path.basename(STACK_PATH)] and invocations[1].lines[-1].startswith("val bpb")
    assert set(invocations[0].digests) == set(files) and record.split_log(text)[0].code is None  # not read
    curves = record.parse_curves(invocations)
    assert curves.train[0] == (1, 6.0) and curves.final_bpb == 2.6 and curves.final_loss == 6.1
    old_and_new = invocation_text('"""stack"""\nx = 1\n', {"phases": "pt"}, ["step 1/9 loss 5.0000 lr 1.000 2 tok/s"]) + text
    assert [inv.config["phases"] for inv in record.split_log(old_and_new, str(run))] == ["pt", "pt", "eval"]
    # an older stack (its source in the log) run on a directory today's stack began: its own invocation, its own code
    new_and_old = text + invocation_text('"""DecoderStack: old"""\nx = 0\n', {"phases": "eval"}, ["val bpb 2.5 val loss 6"])
    invocations = record.split_log(new_and_old, str(run))
    assert [inv.config["phases"] for inv in invocations] == ["pt", "eval", "eval"]
    assert invocations[2].source == '"""DecoderStack: old"""\nx = 0\n' and invocations[1].lines[-1].startswith("val bpb 2.6")
    (run / "code" / hashlib.sha256(b"y = 2\n").hexdigest()[:16] / "kernels.py").write_text("y = 3\n")
    with pytest.raises(record.RecordError, match="kernels.py: missing, or not the code the log names"):
        record.read_log(str(run), with_code=True)


def test_new_from_a_stack_run_under_another_name(tmp_path, records):
    """A stack copied and run as train.py: its record keeps it under the working script's name."""
    run = make_run(tmp_path / "run", 2.3)
    (tmp_path / "run" / "log.txt").write_text(coded_invocation(tmp_path / "run", {"train.py": stack_source()},
                                                               {"phases": "pt"}, pt_lines(20, 10, lambda s: 2.3, lambda s: 6.0)))
    assert record.main(["new", "--run", run, "--name", "renamed", "--records", records, "--hardware", "h"]) == 0
    folder = next(os.path.join(records, n) for n in os.listdir(records) if n.endswith("_cpu_renamed"))
    assert open(os.path.join(folder, os.path.basename(STACK_PATH))).read() == stack_source()


def test_new_and_diff_keep_every_file_that_ran(tmp_path, records, capsys):
    """A record of a run whose stack loaded a sibling keeps both files (record.json lists them); diff shows each."""
    stack_name = os.path.basename(STACK_PATH)
    runs = []
    for name, y in (("a", 2), ("b", 3)):
        run = make_run(tmp_path / name, 2.3)
        files = {stack_name: stack_source(), "kernels.py": f"y = {y}\n"}
        (tmp_path / name / "log.txt").write_text(coded_invocation(tmp_path / name, files, {"phases": "pt", "seed": 0},
                                                                  pt_lines(20, 10, lambda s: 2.3, lambda s: 6.0)))
        assert record.main(["new", "--run", run, "--name", name, "--records", records, "--date", "2026-01-01",
                            "--hardware", "h"]) == 0
        runs.append(run)
    rec_a, rec_b = (os.path.join(records, f"2026-01-01_cpu_{n}") for n in "ab")
    assert open(os.path.join(rec_a, "kernels.py")).read() == "y = 2\n"
    assert open(os.path.join(rec_a, stack_name)).read() == stack_source()
    meta = json.load(open(os.path.join(rec_a, "record.json")))
    assert list(meta["files"]) == [stack_name, "kernels.py"] and meta["invocations"][0]["files"] == meta["files"]
    capsys.readouterr()
    assert record.main(["diff", rec_a, rec_b]) == 1
    assert capsys.readouterr().out.splitlines() == [f"--- {rec_a}/kernels.py", f"+++ {rec_b}/kernels.py", "@@ -1 +1 @@",
                                                    "-y = 2", "+y = 3"]
    assert record.main(["diff", rec_b, runs[0]]) == 1 and "+y = 2" in capsys.readouterr().out  # a run: from its log


def test_source_lines_never_parse_as_metrics():
    """The stack's own code holds the log format strings; only the lines after the separator count."""
    source = stack_source() + 'step 3/9 loss 1.0000 lr 1.000 x\nstep 9/9 val bpb 0.1000 val loss 0.2000\n'
    text = invocation_text(source, {"phases": "pt"}, ["step 1/9 loss 5.0000 lr 1.000 2 tok/s eta 0.1 min"])
    curves = record.parse_curves(record.split_log(text))
    assert curves.train == [(1, 5.0)] and curves.val == [] and curves.final_bpb is None


def test_val_lines_with_their_notes_parse():
    """The stack's val lines end in what was scored, the per-source split and the peak memory; without token bytes
    bpb is n/a (nan) and the loss still counts."""
    lines = ["step 5/10 val bpb 3.0123 val loss 7.2133 (subset: 128,058 of 443,450 targets, spread over the stream; a.txt 2.2329; b.txt 3.3340) peak memory 1.5 GiB",
             "step 10/10 val bpb 2.8705 val loss 6.9350 (every val token; a.txt 2.0037; b.txt 3.1976)",
             "val bpb n/a val loss 6.5000 (every val token)"]
    curves = record.parse_curves(record.split_log(invocation_text("print(1)\n", {"phases": "pt,eval"}, lines)))
    assert curves.val == [(5, 3.0123, 7.2133), (10, 2.8705, 6.935)]
    assert math.isnan(curves.final_bpb) and curves.final_loss == 6.5  # --phases eval's line is the result
    broken = record.parse_curves(record.split_log(invocation_text("print(1)\n", {"phases": "pt"}, ["step 10/10 val bpb 2.8 val loss 6.9 trailing"])))
    assert broken.val == []  # only the stack's own notes may follow


def test_resumed_run_keeps_the_last_value_of_each_step_and_unfinished_runs_have_no_result():
    src = "print('hi')\n"
    first = pt_lines(20, 10, lambda s: 3.0, lambda s: 8.0)[:3]  # killed after step 6
    text = invocation_text(src, {"phases": "pt"}, first)
    assert record.parse_curves(record.split_log(text)).final_bpb is None  # the step-10 validation never happened
    resumed = ["resumed from run/ckpt_000005 at step 5"] + pt_lines(20, 10, lambda s: 2.0 + s / 100, lambda s: 7.0, start=5)[1:]
    curves = record.parse_curves(record.split_log(text + invocation_text(src, {"phases": "pt"}, resumed)))
    assert dict(curves.train)[1] == 8.0 and dict(curves.train)[6] == 7.0
    assert curves.final_bpb == 2.2


def test_log_without_source(tmp_path):
    """Peer stacks (models/gpt2-adamw) log their config and metrics but not their code."""
    text = f"config: {json.dumps({'preset': 'cpu'})}\n" + "\n".join(pt_lines(10, 5, lambda s: 2.7, lambda s: 6.0)) + "\n"
    invocations = record.split_log(text)
    assert len(invocations) == 1 and invocations[0].source is None and invocations[0].config == {"preset": "cpu"}
    assert record.parse_curves(invocations).final_bpb == 2.7


def test_invocations_that_ran_different_code_are_refused(tmp_path, records):
    src = "'''a docstring line'''\nx = 1\n"
    text = invocation_text(src, {"phases": "pt"}, pt_lines(10, 5, lambda s: 2.7, lambda s: 6.0))
    text += invocation_text(src.replace("x = 1", "x = 2"), {"phases": "eval"}, ["val bpb 2.7000 val loss 6.0000"])
    invocations = record.split_log(text)
    assert len(invocations) == 2 and invocations[1].source.endswith("x = 2\n")
    with pytest.raises(record.RecordError, match="different code"):
        record.run_code(invocations, "log.txt")
    assert record.run_code(invocations, "log.txt", allow_mixed=True) == {record.STACK: src}  # the pretraining invocation's
    run = tmp_path / "run"
    make_run(run, 2.7)
    (run / "log.txt").write_text(text)
    assert record.main(["new", "--run", str(run), "--name", "mixed", "--records", records, "--hardware", "h"]) == 2
    assert record.main(["new", "--run", str(run), "--name", "mixed", "--records", records, "--hardware", "h",
                        "--allow-mixed-code"]) == 0
    folder = next(os.path.join(records, n) for n in os.listdir(records) if n.endswith("_cpu_mixed"))
    assert open(os.path.join(folder, os.path.basename(STACK_PATH))).read() == src
    meta = json.load(open(os.path.join(folder, "record.json")))
    assert len({inv["code_sha256"] for inv in meta["invocations"]}) == 2


# ---- the t distribution -----------------------------------------------------------------------------------------

def test_betainc_closed_forms():
    for x in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        for a in (0.5, 1.0, 2.5, 7.0):
            assert record.betainc(a, 1.0, x) == pytest.approx(x ** a, abs=1e-14)          # I_x(a, 1) = x^a
            assert record.betainc(1.0, a, x) == pytest.approx(1 - (1 - x) ** a, abs=1e-14)  # I_x(1, b) = 1 - (1-x)^b
    for a in (0.5, 3.0, 40.0):
        assert record.betainc(a, a, 0.5) == pytest.approx(0.5, abs=1e-14)                 # symmetry
    # I_x(1/2, 1/2) = (2/pi) asin(sqrt(x))
    for x in (0.1, 0.5, 0.9):
        assert record.betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-13)


@pytest.mark.parametrize("t", [-12.0, -3.4641016, -1.0, -0.25, 0.0, 0.4, 1.7, 5.0, 30.0])
def test_t_cdf_closed_forms(t):
    F = record.t_cdf
    assert F(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)              # Cauchy
    assert F(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-13)
    u = t / math.sqrt(3)
    assert F(t, 3) == pytest.approx(0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi, abs=1e-13)
    w = 1 + t * t / 4
    assert F(t, 4) == pytest.approx(0.5 + 3 / 8 * t / math.sqrt(w) * (1 - t * t / (12 * w)), abs=1e-13)
    assert F(t, 7) + F(-t, 7) == pytest.approx(1.0, abs=1e-14)


# Quantiles of Student's t to 6 decimals (standard tables, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2): P(T <= t) = q.
TABLE = [(0.95, 1, 6.313752), (0.95, 10, 1.812461), (0.975, 5, 2.570582), (0.975, 30, 2.042272), (0.99, 2, 6.964557),
         (0.99, 3, 4.540703), (0.99, 4, 3.746947), (0.99, 9, 2.821438), (0.99, 20, 2.527977), (0.995, 8, 3.355387),
         (0.995, 60, 2.660283)]


@pytest.mark.parametrize("q,df,t", TABLE)
def test_t_cdf_matches_tables(q, df, t):
    assert record.t_cdf(t, df) == pytest.approx(q, abs=1e-6)  # 6 decimals of t: P is off by < 5e-7 x density
    assert record.t_cdf(-t, df) == pytest.approx(1 - q, abs=1e-6)


def test_t_cdf_tends_to_the_normal():
    for t in (-2.326, -1.0, 0.5, 3.0):
        assert record.t_cdf(t, 1e7) == pytest.approx(0.5 * (1 + math.erf(t / math.sqrt(2))), abs=1e-6)


def test_one_sided_ttest_by_hand():
    # [1, 2, 3] against 4: mean 2, s = 1, t = -2 sqrt(3), df 2: p = 1/2 - sqrt(3)/sqrt(14)
    r = record.one_sided_ttest([1.0, 2.0, 3.0], 4.0)
    assert (r.n, r.mean, r.std) == (3, 2.0, 1.0)
    assert r.t == pytest.approx(-2 * math.sqrt(3))
    assert r.p == pytest.approx(0.5 - math.sqrt(3) / math.sqrt(14), abs=1e-13)  # 0.037089
    # above the target: p > 1/2
    assert record.one_sided_ttest([3.0, 3.2, 3.1], 3.0).p > 0.5
    # no spread: decided by the mean alone
    assert record.one_sided_ttest([2.0, 2.0], 2.5).p == 0.0 and record.one_sided_ttest([2.0, 2.0], 1.5).p == 1.0
    with pytest.raises(record.RecordError, match="at least 2"):
        record.one_sided_ttest([2.0], 3.0)


def test_verify_cli(tmp_path, capsys):
    runs = [make_run(tmp_path / f"s{i}", bpb, seed=i) for i, bpb in enumerate([2.2955, 2.2961, 2.2967])]
    assert record.main(["verify", *runs, "--target", "2.30"]) == 0
    out = capsys.readouterr().out
    # mean 2.2961, s = 0.0006, t = -0.0039 / (0.0006 / sqrt 3) = -11.26, df 2 -> p = 1/2 + t / (2 sqrt(t^2 + 2))
    t = -0.0039 / (0.0006 / math.sqrt(3))
    p = 0.5 + t / (2 * math.sqrt(t * t + 2))
    assert "n 3  mean 2.2961  std 0.0006  target 2.3000" in out and f"p {p:.3g}" in out and "holds" in out
    assert record.main(["verify", *runs, "--target", "2.297"]) == 1  # p ~ 0.06
    assert "NOT shown" in capsys.readouterr().out
    assert record.main(["verify", *[os.path.join(r, "log.txt") for r in runs], "--target", "2.6", "--metric", "val_loss"]) == 1
    assert record.main(["verify", runs[0], "--target", "2.3"]) == 2
    assert "at least 2" in capsys.readouterr().err


# ---- new -------------------------------------------------------------------------------------------------------------

def test_new_freezes_a_run_and_adds_its_row(tmp_path, records, capsys):
    run = make_run(tmp_path / "run", 2.2961, eval_phase=True, metrics={"chatcore": 0.0123})
    readme_before = open(os.path.join(records, "README.md")).read()
    table = readme_before.splitlines()[readme_before.splitlines().index(record.README_HEADER) + 2:]
    rows = next(i for i, line in enumerate(table + [""]) if not line.startswith("|"))  # records already in the table
    assert record.main(["new", "--run", run, "--name", "baseline", "--records", records, "--date", "2026-01-02",
                        "--hardware", "2-core AMD EPYC"]) == 0
    assert "identical to" in capsys.readouterr().out
    folder = os.path.join(records, "2026-01-02_cpu_baseline")
    script = os.path.basename(STACK_PATH)
    assert sorted(os.listdir(folder)) == sorted([script, "log.txt", "config.json", "metrics.json", "loss.png", "record.json"])
    assert open(os.path.join(folder, script), encoding="utf-8").read() == stack_source()
    assert open(os.path.join(folder, "log.txt"), "rb").read() == open(os.path.join(run, "log.txt"), "rb").read()
    assert json.load(open(os.path.join(folder, "config.json")))["phases"] == "pt"  # the pretraining invocation's
    assert json.load(open(os.path.join(folder, "metrics.json"))) == json.load(open(os.path.join(run, "metrics.json")))
    assert open(os.path.join(folder, "loss.png"), "rb").read(8) == PNG_MAGIC
    meta = json.load(open(os.path.join(folder, "record.json")))
    assert meta["matches_working_script"] and meta["steps"] == 20
    assert [inv["phases"] for inv in meta["invocations"]] == ["pt", "eval"]
    row = "| 2026-01-02 | cpu | 2-core AMD EPYC | 5m55s | 2.2961 | -0.0370 | 0.0123 | 20 | 81,920 | [2026-01-02_cpu_baseline](2026-01-02_cpu_baseline/) |"
    readme = open(os.path.join(records, "README.md")).read()
    lines = readme.splitlines()
    header = lines.index(record.README_HEADER)
    assert lines[header + 2 + rows] == row and readme.replace(row + "\n", "") == readme_before  # appended last
    assert not [n for n in os.listdir(records) if n.startswith(".")]  # no temporaries left

    # a second record goes below the first; the same name again is refused and changes nothing
    other = make_run(tmp_path / "run2", 2.2500)
    assert record.main(["new", "--run", other, "--name", "second", "--records", records, "--date", "2026-01-03",
                        "--hardware", "x"]) == 0
    lines = open(os.path.join(records, "README.md")).read().splitlines()
    assert lines[header + 2 + rows] == row and lines[header + 3 + rows].startswith("| 2026-01-03 | cpu | x | 5m55s | 2.2500 | — | — |")
    before = open(os.path.join(records, "README.md")).read()
    assert record.main(["new", "--run", other, "--name", "baseline", "--records", records, "--date", "2026-01-02"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert open(os.path.join(records, "README.md")).read() == before
    assert open(os.path.join(folder, "metrics.json")).read() == open(os.path.join(run, "metrics.json")).read()


def test_new_keeps_the_code_that_ran_when_the_script_changed(tmp_path, records, capsys):
    working = tmp_path / "stack.py"
    working.write_text('"""doc"""\nx = 2\n')
    run = make_run(tmp_path / "run", 2.3, source='"""doc"""\nx = 1\n')
    assert record.main(["new", "--run", run, "--name", "old", "--records", records, "--script", str(working),
                        "--hardware", "h"]) == 0
    assert "has changed since the run (2 lines differ)" in capsys.readouterr().out
    folder = next(os.path.join(records, n) for n in os.listdir(records) if n.endswith("_cpu_old"))
    assert open(os.path.join(folder, "stack.py")).read() == '"""doc"""\nx = 1\n'
    assert json.load(open(os.path.join(folder, "record.json")))["matches_working_script"] is False


def test_new_with_seed_verification(tmp_path, records, capsys):
    runs = [make_run(tmp_path / f"s{i}", bpb, seed=i) for i, bpb in enumerate([2.2955, 2.2961, 2.2967])]
    before = open(os.path.join(records, "README.md")).read()
    # not significant: no folder, no row
    assert record.main(["new", "--run", runs[0], "--name", "weak", "--records", records, "--hardware", "h",
                        "--verify", *runs, "--target", "2.297"]) == 2
    assert "no record written" in capsys.readouterr().err
    assert sorted(os.listdir(records)) == ["README.md"] and open(os.path.join(records, "README.md")).read() == before
    assert record.main(["new", "--run", runs[0], "--name", "strong", "--records", records, "--hardware", "h",
                        "--verify", *runs, "--target", "2.30"]) == 0
    folder = next(os.path.join(records, n) for n in os.listdir(records) if n.endswith("_cpu_strong"))
    assert sorted(os.listdir(os.path.join(folder, "seeds"))) == ["0_s0.log.txt", "1_s1.log.txt", "2_s2.log.txt"]
    assert "holds at p < 0.01" in open(os.path.join(folder, "verify.txt")).read()
    v = json.load(open(os.path.join(folder, "record.json")))["verification"]
    assert v["n"] == 3 and v["values"] == [2.2955, 2.2961, 2.2967] and v["p"] < 0.01


def test_new_refuses_unfinished_runs_and_missing_tables(tmp_path, records, capsys):
    run = make_run(tmp_path / "run", 2.3)
    with open(os.path.join(run, "log.txt"), "a") as f:  # a resumed invocation that died before its last validation
        f.write(invocation_text(stack_source(), {"phases": "pt"}, ["step 21/40 loss 3.0000 lr 1.000 1 tok/s eta 1 min"]))
    assert record.main(["new", "--run", run, "--name", "x", "--records", records]) == 2
    assert "no validation result" in capsys.readouterr().err
    run = make_run(tmp_path / "nometrics", 2.3)
    os.remove(os.path.join(run, "metrics.json"))
    assert record.main(["new", "--run", run, "--name", "x", "--records", records]) == 2
    assert "metrics.json: no such file" in capsys.readouterr().err
    assert sorted(os.listdir(records)) == ["README.md"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "README.md").write_text("# no table\n")
    assert record.main(["new", "--run", make_run(tmp_path / "ok", 2.3), "--name", "x", "--records", str(bare)]) == 2
    assert "no records table" in capsys.readouterr().err
    assert os.listdir(bare) == ["README.md"]


def test_new_from_a_real_run_of_the_stack(pretrained_run, records, capsys):
    """The stack's actual log (tiny run, 8 steps): curves, the final bpb and the code all come out of it."""
    _, run = pretrained_run
    assert record.main(["new", "--run", str(run), "--name", "tiny", "--records", records, "--hardware", "h"]) == 0
    assert "identical to" in capsys.readouterr().out
    folder = next(os.path.join(records, n) for n in os.listdir(records) if n.endswith("_cpu_tiny"))
    meta = json.load(open(os.path.join(folder, "record.json")))
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert meta["steps"] == 8 and meta["val_bpb"] == metrics["val_bpb"]
    curves = record.parse_curves(record.split_log(open(os.path.join(run, "log.txt"), encoding="utf-8").read()))
    assert [s for s, _ in curves.train] == list(range(1, 9)) and [s for s, _, _ in curves.val] == [4, 8]
    assert curves.final_bpb == pytest.approx(metrics["val_bpb"], abs=5e-5)
    assert open(os.path.join(folder, os.path.basename(STACK_PATH)), encoding="utf-8").read() == stack_source()


# ---- diff and plot -----------------------------------------------------------------------------------------------------

def test_diff_between_records_and_against_the_working_script(tmp_path, records, capsys, monkeypatch):
    working = tmp_path / "stack.py"
    working.write_text('"""doc"""\nx = 1\ny = 2\n')
    run_a = make_run(tmp_path / "a", 2.3, source='"""doc"""\nx = 1\ny = 2\n')
    run_b = make_run(tmp_path / "b", 2.2, source='"""doc"""\nx = 1\ny = 3\n')
    for run, name in ((run_a, "a"), (run_b, "b")):
        assert record.main(["new", "--run", run, "--name", name, "--records", records, "--script", str(working),
                            "--date", "2026-01-01", "--hardware", "h"]) == 0
    rec_a, rec_b = (os.path.join(records, f"2026-01-01_cpu_{n}") for n in "ab")
    capsys.readouterr()
    assert record.main(["diff", rec_a, rec_b]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == [f"--- {rec_a}/stack.py", f"+++ {rec_b}/stack.py", "@@ -1,3 +1,3 @@",
                                ' """doc"""', " x = 1", "-y = 2", "+y = 3"]
    monkeypatch.chdir(records)  # paths below the current directory get git's a/ and b/
    assert record.main(["diff", "2026-01-01_cpu_a", "2026-01-01_cpu_b"]) == 1
    assert capsys.readouterr().out.startswith("--- a/2026-01-01_cpu_a/stack.py\n+++ b/2026-01-01_cpu_b/stack.py\n")
    assert record.main(["diff", rec_a]) == 0 and capsys.readouterr().out == ""  # same as the working script
    assert record.main(["diff", rec_b]) == 1 and f"+++ {working}" in capsys.readouterr().out
    assert record.main(["diff", rec_b, run_a]) == 1  # a run directory: its code comes from its log
    assert "+y = 2" in capsys.readouterr().out


def test_plot_writes_a_png_of_several_runs(tmp_path, capsys):
    runs = [make_run(tmp_path / f"r{i}", 2.3 - i / 10) for i in range(3)]
    out = tmp_path / "plots" / "curves.png"
    assert record.main(["plot", *runs, os.path.join(runs[0], "log.txt"), "--out", str(out), "--title", "t"]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert not [n for n in os.listdir(out.parent) if n != "curves.png"]
    fig = record.plot_runs(runs[:2])
    assert [l.get_label() for l in fig.axes[1].get_lines()] == ["r0", "r1"]
    assert record.main(["plot", *runs, "--out", str(out), "--labels", "one"]) == 2
