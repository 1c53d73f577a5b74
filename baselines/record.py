"""Records: freeze a finished run, verify a claim over several seeds, diff the code of two records, plot loss curves.

    python baselines/record.py new --run RUN_DIR --name NAME [--track cpu] [--hardware "2-core AMD EPYC"]
                                   [--verify LOG LOG ... --target X [--metric val_bpb|val_loss]]
    python baselines/record.py verify LOG [LOG ...] --target X [--metric val_bpb|val_loss]
    python baselines/record.py diff A [B]
    python baselines/record.py plot RUN_OR_LOG [RUN_OR_LOG ...] --out curves.png

`new` copies into baselines/<date>_<track>_<name>/ the code that ran (every file the run's log.txt names by its
sha256, kept in RUN_DIR/code/; logs written before 2026-12-06 hold the stack's source itself), the full log, the
resolved config, metrics.json, a loss-curve plot and record.json, then adds a row to the table of baselines/README.md.
The folder appears whole or not at all, and an existing record is never overwritten. `verify` reads the final
validation metric of each log (runs with different seeds) and tests one-sided whether their mean is below the target
(modded-nanogpt's rule: a record needs p < 0.01); it exits 1 when p >= 0.01. `diff` prints a unified diff of the
code of two records, runs, logs or scripts, file by file (B defaults to the working copies of A's files) and exits 1
when they differ, like `git diff --no-index`. `plot` draws the train loss and val bpb of several runs on one figure.
"""
import argparse
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STACK = "decoderstack_small_pt-eval-sft.py"
SEPARATOR = "=" * 100  # the stack writes its code lines (older logs: its source), then this line, at each invocation's start
README_HEADER = "| date | track | hardware | time | val bpb | CORE | ChatCORE | steps | tokens | folder |"
P_THRESHOLD = 0.01

TRAIN_RE = re.compile(r"^step (\d+)/(\d+) loss (\S+) ")
# a val line may end in a note: what was scored (every val token, a subset) and the per-source split; n/a: no bpb
VAL_RE = re.compile(r"^step (\d+)/(\d+) val bpb (\S+) val loss (\S+)(?: \(.*\))?(?: peak memory .*)?\s*$")
EVAL_RE = re.compile(r"^val bpb (\S+) val loss (\S+)(?: \(.*\))?\s*$")  # --phases eval of the final checkpoint
CONFIG_RE = re.compile(r"^config: (\{.*\})\s*$")
CODE_RE = re.compile(r"^code: (\S+) sha256 ([0-9a-f]{64}) \((\S+)\)$")  # a file that ran, kept at that path of RUN_DIR
STAMP_RE = re.compile(r"^\[\d+:\d\d:\d\d\] ")  # the time since the invocation started, before each line after its header


class RecordError(Exception):
    """A problem with the input; main() prints it as one `error: ...` line and exits 2."""


# ---------------------------------------------------------------------------------------------------------------
# Reading logs


@dataclasses.dataclass
class Invocation:
    """One run of the script appended to a log: the code it ran ({file name: source}; None where the log holds none,
    or its files were not read) and its log lines, time stamps taken off."""
    code: dict | None
    lines: list
    digests: dict = None  # {file name: sha256} the code lines name (logs from before 2026-12-06 have none)

    @property
    def source(self):
        """The stack's own source (the only file logs from before 2026-12-06 hold)."""
        return None if self.code is None else self.code.get(STACK, next(iter(self.code.values()), None))

    @property
    def config(self):
        for line in self.lines:
            m = CONFIG_RE.match(line)
            if m:
                return json.loads(m.group(1))
        return None


@dataclasses.dataclass
class Curves:
    train: list        # [(step, loss)], by step (a step logged again after a resume keeps its last value)
    val: list          # [(step, bpb, loss)], by step
    total_steps: int | None
    final_bpb: float | None     # of the last step's validation, or of a later `--phases eval`; None if unfinished
    final_loss: float | None


def read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # byte-exact: no newline translation
            return f.read()
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e})") from None


def split_log(text, directory=None):
    """The invocations of a log.txt. Each invocation of the stack appends its code lines (`code: NAME sha256 HASH
    (PATH)`, one per file), a line of 100 '=', its header and config, then its time-stamped log lines; an invocation
    from before 2026-12-06 appended its full source instead of the code lines, starting at a line equal to the first
    line of the log (the script's docstring). With `directory` (the log's), the files the code lines name are read
    from it (PATH, or NAME beside the log in a record folder) and checked against their sha256. A log that does not
    start with code (e.g. a peer stack's) is one invocation without any."""
    lines = [line.rstrip("\r\n") for line in text.splitlines(keepends=True)]
    seps = [i for i, line in enumerate(lines) if line == SEPARATOR]
    if not seps or any(CONFIG_RE.match(line) for line in lines[:seps[0]]):
        return [Invocation(None, [STAMP_RE.sub("", line, count=1) for line in lines])]
    opened_by_code = bool(CODE_RE.match(lines[0]))

    def old_start(line):  # an old invocation's source begins as the log does, or (after code lines) as the stack
        return line.startswith('"""DecoderStack') if opened_by_code else line == lines[0]

    heads, last = [], -1  # (first line of an invocation's code, its separator)
    for sep in seps:
        start = sep
        while start > last + 1 and CODE_RE.match(lines[start - 1]):
            start -= 1
        if start == sep:  # an old invocation's source
            start = next((i for i in range(sep - 1, last, -1) if old_start(lines[i])), None)
            if start is None:
                continue  # a separator inside a source
        heads.append((start, sep))
        last = sep
    raw = text.splitlines(keepends=True)
    invocations = []
    for k, (start, sep) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        body = [STAMP_RE.sub("", line, count=1) for line in lines[sep + 1:end]]
        named = [CODE_RE.match(line) for line in lines[start:sep]]
        if all(named):
            digests = {m.group(1): m.group(2) for m in named}
            code = read_code(directory, [m.groups() for m in named]) if directory is not None else None
            invocations.append(Invocation(code, body, digests))
        else:
            source = "".join(raw[start:sep])
            invocations.append(Invocation({STACK: source[:-1] if source.endswith("\n") else source}, body))  # + "\n"
    return invocations


def read_code(directory, files):
    """{name: source} of the (name, sha256, path) a log's code lines name: RUN_DIR/path, or the file of that name
    beside the log (a record folder), whichever has the sha256."""
    code = {}
    for name, digest, path in files:
        for candidate in (os.path.join(directory, path), os.path.join(directory, name)):
            if os.path.isfile(candidate) and hashlib.sha256(read_bytes(candidate)).hexdigest() == digest:
                code[name] = read_bytes(candidate).decode("utf-8")
                break
        else:
            raise RecordError(f"{os.path.join(directory, path)}: missing, or not the code the log names (sha256 {digest[:16]}...)")
    return code


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def number(text):
    """A logged value; n/a (no bpb where token bytes are unknown) is nan."""
    return math.nan if text == "n/a" else float(text)


def parse_curves(invocations):
    train, val, total, evaluated = {}, {}, None, None
    for inv in invocations:
        for line in inv.lines:
            m = TRAIN_RE.match(line) or VAL_RE.match(line)
            if m:
                step, total, evaluated = int(m.group(1)), int(m.group(2)), None  # training went on after any eval
                if m.re is TRAIN_RE:
                    train[step] = float(m.group(3))
                else:
                    val[step] = (number(m.group(3)), float(m.group(4)))
                continue
            m = EVAL_RE.match(line)
            if m:
                evaluated = (number(m.group(1)), float(m.group(2)))
    final = evaluated or val.get(total, (None, None))  # only the last step's validation is the run's result
    return Curves(sorted(train.items()), [(s, b, l) for s, (b, l) in sorted(val.items())], total, *final)


def log_path(path):
    """RUN_DIR or a record folder -> its log.txt; a file is taken as a log."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.txt")
    if not os.path.isfile(path):
        raise RecordError(f"{path}: no such log")
    return path


def read_log(path, with_code=False):
    """(the log's path, its invocations), with the code they ran when with_code."""
    path = log_path(path)
    return path, split_log(read_text(path), os.path.dirname(path) if with_code else None)


def final_metric(path, metric):
    path, invocations = read_log(path)
    curves = parse_curves(invocations)
    value = curves.final_bpb if metric == "val_bpb" else curves.final_loss
    if value is None:
        raise RecordError(f"{path}: no validation result of the last step (did the run finish?)")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Statistics: Student's t distribution through the regularized incomplete beta function


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), evaluated
    where it converges fast (x below (a + 1) / (a + b + 2), else through I_x(a, b) = 1 - I_{1-x}(b, a))."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return math.exp(log_front) * f / a


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom: tail = I_{df/(df+t^2)}(df/2, 1/2) / 2."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@dataclasses.dataclass
class TTest:
    n: int
    mean: float
    std: float        # sample standard deviation (n - 1 in the denominator)
    target: float
    t: float
    p: float          # one-sided: H1 is mean < target


def one_sided_ttest(values, target):
    """scipy.stats.ttest_1samp(values, target, alternative="less"), as modded-nanogpt checks a record."""
    n = len(values)
    if n < 2:
        raise RecordError(f"a t-test needs at least 2 runs, got {n}")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if std == 0:
        t = -math.inf if mean < target else (math.inf if mean > target else 0.0)
        p = 0.0 if mean < target else (1.0 if mean > target else 0.5)
    else:
        t = (mean - target) / (std / math.sqrt(n))
        p = t_cdf(t, n - 1)
    return TTest(n, mean, std, target, t, p)


def verify_report(logs, target, metric):
    values = [final_metric(p, metric) for p in logs]
    test = one_sided_ttest(values, target)
    width = max(len(p) for p in logs)
    lines = [f"{'log':<{width}}  {metric}"]
    lines += [f"{p:<{width}}  {v:.4f}" for p, v in zip(logs, values)]
    lines.append(f"n {test.n}  mean {test.mean:.4f}  std {test.std:.4f}  target {target:.4f}  "
                 f"t {test.t:.3f} (df {test.n - 1})  one-sided p {test.p:.3g} (H1: mean < target)")
    verdict = "holds" if test.p < P_THRESHOLD else "is NOT shown"
    lines.append(f"the claim {metric} < {target} {verdict} at p < {P_THRESHOLD}")
    return test, values, "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, nothing shown, works under any backend)


def plot_runs(runs, out=None, labels=None, title=None):
    """Train loss and val bpb against step for each RUN_DIR / record / log in `runs`; saved to `out` if given.
    Returns the matplotlib Figure."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        path, invocations = read_log(run)
        curves = parse_curves(invocations)
        label = labels[i] if labels else run_label(path)
        if curves.train:
            line, = ax_train.plot(*zip(*curves.train), label=label, lw=1.2)
            color = line.get_color()
        else:
            color = None
        if curves.val:
            steps, bpb, _ = zip(*curves.val)
            ax_val.plot(steps, bpb, "o-", label=label, color=color, ms=3)
    ax_train.set(xlabel="step", ylabel="train loss (nats, as logged)", title="train loss")
    ax_val.set(xlabel="step", ylabel="val bits per byte", title="val bpb")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = f"{out}.tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    return fig


def run_label(log):
    """A run's name for legends: its folder (RUN_DIR/log.txt -> RUN_DIR's name)."""
    log = os.path.abspath(log)
    return os.path.basename(os.path.dirname(log)) if os.path.basename(log) == "log.txt" else os.path.basename(log)


# ---------------------------------------------------------------------------------------------------------------
# new


def ran_pt(inv):
    return inv.config is not None and "pt" in str(inv.config.get("phases", "")).split(",")


def run_code(invocations, log, allow_mixed=False):
    """The one code ({file name: source}) all invocations of a run ran (a record is one program), None where the log
    holds none. With allow_mixed, runs whose later phases ran other code are accepted: the code of the (last)
    pretraining invocation is the record's."""
    codes = [inv.code for inv in invocations if inv.code is not None]
    if not codes:
        return None
    if any(c != codes[0] for c in codes[1:]):
        if not allow_mixed:
            raise RecordError(f"{log}: the run's {len(codes)} invocations ran different code; a record is one program "
                              "(rerun the phases with one version of the script, or pass --allow-mixed-code to keep the "
                              "pretraining invocation's code)")
        pt = [inv.code for inv in invocations if inv.code is not None and ran_pt(inv)]
        return (pt or codes)[-1]
    return codes[0]


def detect_hardware(metrics):
    """'8x NVIDIA H100 80GB HBM3' from nvidia-smi on a CUDA run, else '2-core <CPU model>'."""
    if str(metrics.get("device", "")).startswith("cuda"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20, check=True).stdout.split("\n")
            names = [n.strip() for n in names if n.strip()]
            n = int(metrics.get("world_size", 1))
            if names:
                return f"{n}x {names[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
        return f"{metrics.get('world_size', 1)}x GPU"
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core {model or 'CPU'}"


def format_duration(seconds):
    if seconds is None:
        return "—"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def readme_row(meta):
    cells = [meta["date"], meta["track"], meta["hardware"].replace("|", "/"), format_duration(meta["train_time_s"]),
             fmt(meta["val_bpb"], ".4f"), fmt(meta["core"], ".4f"), fmt(meta["chatcore"], ".4f"),
             fmt(meta["steps"], ","), fmt(meta["train_tokens"], ","), f"[{meta['folder']}]({meta['folder']}/)"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def add_readme_row(readme, row):
    """The README text with `row` appended to the records table (found by its header line)."""
    lines = readme.splitlines()
    try:
        i = next(k for k, line in enumerate(lines) if line.strip() == README_HEADER)
    except StopIteration:
        raise RecordError(f"no records table (header '{README_HEADER}') in the README") from None
    end = i + 1
    while end < len(lines) and lines[end].lstrip().startswith("|"):
        end += 1
    lines.insert(end, row)
    return "\n".join(lines) + "\n"


def write_text_atomic(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def new_record(run, name, track="cpu", hardware=None, records=HERE, script=None, date=None, verify_logs=(),
               target=None, metric="val_bpb", allow_mixed_code=False, out=print):
    """Freeze RUN_DIR into records/<date>_<track>_<name>/ and add its README row; returns the folder."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", track):
        raise RecordError(f"--name and --track may hold letters, digits, '.', '_' and '-' (got {name!r}, {track!r})")
    date = date or datetime.date.today().isoformat()
    folder = f"{date}_{track}_{name}"
    final = os.path.join(records, folder)
    if os.path.lexists(final):
        raise RecordError(f"{final}: already exists; a record is never overwritten (choose another --name)")
    readme = os.path.join(records, "README.md")
    readme_text = read_text(readme)
    add_readme_row(readme_text, "")  # fail now, not after the folder is written, when the table is missing
    log, invocations = read_log(run, with_code=True)
    run_dir = os.path.dirname(log)
    curves = parse_curves(invocations)
    if curves.final_bpb is None:
        raise RecordError(f"{log}: no validation result (did the run finish?)")
    metrics_path = os.path.join(run_dir, "metrics.json")
    try:
        metrics = json.loads(read_text(metrics_path))
    except json.JSONDecodeError as e:
        raise RecordError(f"{metrics_path}: malformed JSON ({e})") from None
    if "val_bpb" not in metrics:
        raise RecordError(f"{metrics_path}: no val_bpb (not a finished pretraining run?)")

    script = script or os.path.join(ROOT, STACK)
    code = run_code(invocations, log, allow_mixed_code)
    if code is None:  # a log without the code (peer stacks log only their config): take the named script
        code = {STACK: read_text(script)}
        out(f"note: {log} does not hold the code; the record keeps {script} as it is now")
    # the stack (the first file) under the working script's name, the files beside it under their own: each checked
    # against the file of that name beside the working script
    stack_name = next(iter(code))
    code = {(os.path.basename(script) if name == stack_name else name): text for name, text in code.items()}
    matches = True
    for name, text in code.items():
        working_path = os.path.join(os.path.dirname(os.path.abspath(script)), name)
        working = read_text(working_path) if os.path.isfile(working_path) else None
        matches = matches and working == text
        if working is None:
            out(f"note: {working_path} not found; the record keeps the code from the log")
        elif working == text:
            out(f"the code in the log is identical to {working_path}")
        else:
            changed = sum(1 for line in difflib.unified_diff(text.splitlines(), working.splitlines(), n=0)
                          if line[:1] in "+-" and not line.startswith(("+++", "---")))
            out(f"note: {working_path} has changed since the run ({changed} lines differ); the record keeps the code "
                "that ran (see `record.py diff`)")
    pt_configs = [inv.config for inv in invocations if ran_pt(inv)]
    config = pt_configs[-1] if pt_configs else None
    if config is None:
        config_path = os.path.join(run_dir, "config.json")
        config = json.loads(read_text(config_path)) if os.path.isfile(config_path) else {}

    verification = None
    if verify_logs:
        if target is None:
            raise RecordError("--verify needs --target")
        test, values, report = verify_report(list(verify_logs), target, metric)
        out(report)
        if test.p >= P_THRESHOLD:
            raise RecordError(f"the seeds do not show {metric} < {target} at p < {P_THRESHOLD} (p = {test.p:.3g}); no record written")
        verification = {"metric": metric, "target": target, "values": values, **dataclasses.asdict(test)}

    in_repo = lambda path: (lambda rel: rel if not rel.startswith("..") else os.path.abspath(path))(os.path.relpath(os.path.abspath(path), ROOT))
    meta = {
        "name": name, "track": track, "date": date, "folder": folder,
        "hardware": hardware or detect_hardware(metrics),
        "script": os.path.basename(script), "script_path": in_repo(script),  # relative to the checkout when inside it
        "script_sha256": sha256(code[os.path.basename(script)]),
        "files": {name: sha256(text) for name, text in code.items()},  # every file of the code that ran
        "matches_working_script": matches, "run_dir": in_repo(run_dir),
        "val_bpb": metrics.get("val_bpb"), "final_val_loss": curves.final_loss, "core": metrics.get("core"),
        "chatcore": metrics.get("chatcore"), "steps": curves.total_steps, "train_tokens": metrics.get("train_tokens"),
        "train_time_s": metrics.get("pt_train_time_s"), "params": metrics.get("params"),
        "invocations": [{"phases": (inv.config or {}).get("phases"), "code_sha256": inv.source and sha256(inv.source),
                         "files": inv.digests} for inv in invocations],
        "seed": config.get("seed"), "preset": config.get("preset"), "verification": verification,
    }

    os.makedirs(records, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{folder}.", suffix=".tmp", dir=records)
    try:
        for name, text in code.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8", newline="") as f:
                f.write(text)
        shutil.copyfile(log, os.path.join(tmp, "log.txt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(json.dumps(config, indent=1) + "\n")
        shutil.copyfile(metrics_path, os.path.join(tmp, "metrics.json"))
        plot_runs([log], os.path.join(tmp, "loss.png"), labels=[folder], title=f"{folder}: val bpb {metrics['val_bpb']:.4f}")
        if verification:
            os.mkdir(os.path.join(tmp, "seeds"))
            for i, seed_log in enumerate(verify_logs):
                shutil.copyfile(log_path(seed_log), os.path.join(tmp, "seeds", f"{i}_{run_label(log_path(seed_log))}.log.txt"))
            with open(os.path.join(tmp, "verify.txt"), "w") as f:
                f.write(verify_report(list(verify_logs), target, metric)[2] + "\n")
        with open(os.path.join(tmp, "record.json"), "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if os.path.lexists(final):
            raise RecordError(f"{final}: already exists; a record is never overwritten")
        os.rename(tmp, final)  # the folder appears whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        write_text_atomic(readme, add_readme_row(read_text(readme), readme_row(meta)))
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # no folder without its row
        raise
    out(f"wrote {final} and its row in {readme}:\n{readme_row(meta)}")
    return final


# ---------------------------------------------------------------------------------------------------------------
# diff


def code_of(path):
    """(label, {file name: source}, the stack's path in the repo or None) of a record folder, a run directory, a log
    or a script; the label is the folder or log the files lie in, or the script."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "record.json")):
        meta = json.loads(read_text(os.path.join(path, "record.json")))
        names = meta.get("files") or [meta["script"]]  # records before 2026-12-06 keep the stack alone
        return os.path.normpath(path), {n: read_text(os.path.join(path, n)) for n in names}, meta.get("script_path")
    if os.path.isdir(path) or not path.endswith(".py"):
        log, invocations = read_log(path, with_code=True)
        code = run_code(invocations, log, allow_mixed=True)  # mixed: the pretraining code
        if code is None:
            raise RecordError(f"{log}: the log does not hold the code")
        return os.path.normpath(os.path.dirname(log)), code, None
    return os.path.normpath(os.path.dirname(path) or "."), {os.path.basename(path): read_text(path)}, None


def diff_label(side, path):
    """git's a/PATH, b/PATH for paths below the current directory; others as they are."""
    rel = os.path.relpath(os.path.abspath(path))
    return f"{side}/{rel}" if not rel.startswith("..") else os.path.abspath(path)


def diff_code(a, b=None):
    """Unified diff (as text) of the code of a and b, file by file (the stack first, under either's name); b
    defaults to the working copies of a's files (the stack at its path in the repo)."""
    where_a, code_a, script_path = code_of(a)
    if b is None:
        stack = script_path if script_path and os.path.isabs(script_path) else os.path.join(ROOT, script_path or STACK)
        stack_name = next(iter(code_a))
        b = {name: stack if name == stack_name else os.path.join(os.path.dirname(stack), name) for name in code_a}
        code_b = {name: read_text(p) if os.path.isfile(p) else "" for name, p in b.items()}
        where_b = {name: p for name, p in b.items()}
    else:
        root_b, code_b, _ = code_of(b)
        where_b = {name: os.path.join(root_b, name) for name in code_b}
    # the stacks of a and b pair up whatever their names (a record keeps it under the name of the script it ran as)
    first_a, first_b = next(iter(code_a)), next(iter(code_b))
    pairs = [(first_a, first_b)] + [(n, n) for n in sorted(set(code_a) | set(code_b)) if n not in (first_a, first_b)]
    out = []
    for name_a, name_b in pairs:
        text_a, text_b = code_a.get(name_a, ""), code_b.get(name_b, "")
        label_b = where_b.get(name_b, os.path.join(os.path.dirname(where_b[first_b]), name_b))
        for line in difflib.unified_diff(text_a.splitlines(keepends=True), text_b.splitlines(keepends=True),
                                         fromfile=diff_label("a", os.path.join(where_a, name_a)),
                                         tofile=diff_label("b", label_b)):
            out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    new = commands.add_parser("new", help="freeze a finished run into a record folder and add its README row")
    new.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run (log.txt, metrics.json, config.json)")
    new.add_argument("--name", required=True, help="short name of the record, e.g. baseline")
    new.add_argument("--track", default="cpu", help="cpu, 8xh100, 1gpu, colab, ... (default cpu)")
    new.add_argument("--hardware", help="as it should read in the table (default: detected on this machine)")
    new.add_argument("--date", help="YYYY-MM-DD (default today)")
    new.add_argument("--script", help=f"the working script the run's code is checked against (default {STACK})")
    new.add_argument("--records", default=HERE, help="records folder with the README table (default baselines/)")
    new.add_argument("--verify", nargs="+", metavar="LOG", default=[], help="logs of the seed runs: refuse unless they show p < 0.01")
    new.add_argument("--target", type=float, help="with --verify: the value the mean must be below")
    new.add_argument("--metric", choices=("val_bpb", "val_loss"), default="val_bpb")
    new.add_argument("--allow-mixed-code", action="store_true",
                     help="accept a run whose later phases (e.g. eval) ran other code; the record keeps the pretraining code")

    ver = commands.add_parser("verify", help="mean, std and one-sided t-test p of the final metric of several runs")
    ver.add_argument("logs", nargs="+", metavar="LOG", help="log.txt files or run directories (one per seed)")
    ver.add_argument("--target", type=float, required=True)
    ver.add_argument("--metric", choices=("val_bpb", "val_loss"), default="val_bpb")

    dif = commands.add_parser("diff", help="unified diff of the code of two records (or a record and the working script)")
    dif.add_argument("a", help="a record folder, run directory, log.txt or .py file")
    dif.add_argument("b", nargs="?", help="the same kinds (default: the working copy of a's script)")

    plo = commands.add_parser("plot", help="loss curves of several runs on one figure")
    plo.add_argument("runs", nargs="+", metavar="RUN_OR_LOG", help="run directories, record folders or log files")
    plo.add_argument("--out", required=True, help="PNG to write")
    plo.add_argument("--labels", nargs="+", help="legend labels, one per run (default: folder names)")
    plo.add_argument("--title")

    args = parser.parse_args(argv)
    try:
        if args.command == "new":
            new_record(args.run, args.name, args.track, args.hardware, args.records, args.script, args.date,
                       args.verify, args.target, args.metric, args.allow_mixed_code)
        elif args.command == "verify":
            test, _, report = verify_report(args.logs, args.target, args.metric)
            print(report)
            return 0 if test.p < P_THRESHOLD else 1
        elif args.command == "diff":
            text = diff_code(args.a, args.b)
            sys.stdout.write(text)
            return 1 if text else 0
        else:
            if args.labels and len(args.labels) != len(args.runs):
                raise RecordError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
            plot_runs(args.runs, args.out, args.labels, args.title)
            print(f"wrote {args.out}")
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
