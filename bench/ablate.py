"""Ablations with significance: variants of the stack (or other stacks), each trained over --seeds on one prepared data
directory and one token budget; one table of val bpb (mean +- std, and by val source), the difference from the first
variant with its 95% interval and Welch's t-test p, tok/s and wall time; a plot of the val curves and final bpb; a
summary line.

    python bench/ablate.py --data-dir runs/data --seeds 3 --out runs/ablate \\
        --variant "stack=" --variant "no value embeddings=--value-embed-layers=" \\
        --variant "swiglu=runs/my_stack.py" --variant "gpt2-adamw=models/gpt2-adamw/train_gpt2.py"

A variant is NAME=FLAGS (the stack with those flags added) or NAME=SCRIPT FLAGS (another stack file: an edited copy of
the stack, or a peer in models/). The first variant is the reference. Every run gets --data-dir, --seed S, --run-dir
OUT/NAME/seed_S, then --flags (default: --preset cpu; e.g. add --train-tokens N to shrink every run alike), then the
variant's flags; the stack and its copies (told by Config's overwrite field) train only (--phases pt: val bpb over every
val token comes with it). A finished run (its metrics.json has val_bpb, its ablate.json the same command) is read, not
run again; a run directory holding another command's run is an error. Writes OUT/ablate.md (the table, the command, the
machine, the date) and OUT/ablate_val.png (each variant's final val bpb, mean +- std over seeds, beside its val curve,
the mean over seeds, where the runs validated more than once), and prints the table and a last summary line. Runs one
after another (2 cores: one run at a time is fastest).
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "baselines"))
from record import parse_curves, read_log, t_cdf  # noqa: E402  Student's t, the log's val curve

STACK = os.path.join(ROOT, "decoderstack_small_pt-eval-sft.py")
STACK_LIKE = re.compile(r"^\s+overwrite: bool\b", re.M)  # the stack's Config (a copy's too); peers have no such flag
CONFIDENCE = 0.95


class AblateError(Exception):
    """A bad variant, a failed run or a run directory that holds something else; the message says which."""


def parse_variant(text):
    """NAME=FLAGS or NAME=SCRIPT FLAGS -> (name, script path, [flags])."""
    name, eq, spec = text.partition("=")
    if not eq or not name.strip() or "/" in name:
        raise AblateError(f"--variant {text!r}: expected NAME=FLAGS or NAME=SCRIPT FLAGS (a name without '/')")
    words = shlex.split(spec)
    if words and words[0].endswith(".py"):
        script = os.path.abspath(words[0])
        if not os.path.isfile(script):
            raise AblateError(f"--variant {name}: {words[0]}: no such file")
        return name.strip(), script, words[1:]
    return name.strip(), STACK, words


def run_command(script, data_dir, seed, run_dir, flags, variant_flags):
    stack_like = STACK_LIKE.search(open(script, encoding="utf-8").read()) is not None
    own = ["--phases", "pt", "--overwrite", "--wandb", "disabled"] if stack_like else []
    return [sys.executable, script, "--data-dir", data_dir, "--seed", str(seed), "--run-dir", run_dir, *own,
            *flags, *variant_flags]


def finished(run_dir, command):
    """The run's metrics if it finished with this command; None if it has not run (or did not finish)."""
    marker, metrics = os.path.join(run_dir, "ablate.json"), os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(marker):
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise AblateError(f"{run_dir}: holds files but no ablate.json: not a run of bench/ablate.py (another --out?)")
        return None
    with open(marker) as f:
        recorded = json.load(f)
    if recorded.get("command") != command[1:]:
        raise AblateError(f"{run_dir}: holds a run of another command ({shlex.join(recorded.get('command', []))}); "
                          "delete it or choose another --out")
    if recorded.get("seconds") is None or not os.path.isfile(metrics):
        return None  # started, not finished: run again
    with open(metrics) as f:
        values = json.load(f)
    return {**values, "wall_s": recorded["seconds"]} if isinstance(values.get("val_bpb"), float) else None


def run(run_dir, command):
    """Train one (variant, seed) unless it has finished already; its metrics.json, with wall_s."""
    done = finished(run_dir, command)
    if done is not None:
        return done
    shutil.rmtree(run_dir, ignore_errors=True)  # a started run: ours (its ablate.json says so), begun again
    os.makedirs(run_dir)
    marker = os.path.join(run_dir, "ablate.json")
    with open(marker, "w") as f:
        json.dump({"command": command[1:], "seconds": None}, f)
    t0 = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise AblateError(f"{run_dir}: {shlex.join(command[1:3])} ... failed (exit {result.returncode}):\n"
                          f"{result.stderr[-2000:]}")
    with open(marker, "w") as f:
        json.dump({"command": command[1:], "seconds": time.time() - t0}, f)
    return finished(run_dir, command)


def mean_std(values):
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan"))


def t_quantile(q, df):
    """t with P(T <= t) = q, by bisection on t_cdf."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def welch(a, b):
    """Welch's t-test of mean(b) - mean(a): (difference, half-width of its CONFIDENCE interval, two-sided p). Fewer
    than two runs on a side, or no spread on either: the interval and p are nan."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = mb - ma
    if len(a) < 2 or len(b) < 2 or sa ** 2 / len(a) + sb ** 2 / len(b) == 0:
        return diff, float("nan"), float("nan")
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    t = diff / se
    return diff, t_quantile(0.5 + CONFIDENCE / 2, df) * se, 2 * (1 - t_cdf(abs(t), df))


def mean_curve(run_dirs):
    """[(step, mean val bpb)] over the runs, at the steps every run logged."""
    curves = [{step: bpb for step, bpb, *_ in parse_curves(read_log(d)[1]).val} for d in run_dirs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [(s, sum(c[s] for c in curves) / len(curves)) for s in steps]


def plot(curves, finals, out):
    """The val curves (mean over seeds) where a run evaluated more than once, beside each variant's final val bpb,
    mean ± std over seeds (a short budget evaluates once, at its end: then the second panel alone)."""
    from matplotlib.figure import Figure
    drawn = {name: curve for name, curve in curves.items() if len(curve) > 1}
    fig = Figure(figsize=(11 if drawn else 6, 0.3 * len(finals) + 1.6), layout="constrained")
    axes = fig.subplots(1, 2 if drawn else 1, squeeze=False)[0]
    if drawn:
        for name, curve in drawn.items():
            axes[0].plot(*zip(*curve), "o-", ms=3, label=name)
        axes[0].set(xlabel="step", ylabel="val bits per byte (mean over seeds)", title="val bpb by variant")
        axes[0].grid(alpha=0.3)
        axes[0].legend(fontsize=8)
    ax, names = axes[-1], list(finals)[::-1]  # the reference on top
    ax.errorbar([finals[n][0] for n in names], range(len(names)), fmt="o", capsize=3,
                xerr=[0 if math.isnan(finals[n][1]) else finals[n][1] for n in names])
    ax.axvline(finals[names[-1]][0], color="gray", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="final val bits per byte (mean ± std over seeds)", title="final val bpb")
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(out + ".tmp.png", dpi=110)
    os.replace(out + ".tmp.png", out)


def table(variants, results):
    """The markdown table: one row per variant (the first is the reference)."""
    sources = sorted({s for runs in results.values() for m in runs for s in (m.get("val_bpb_by_source") or {})})
    head = ["variant", "runs", "val bpb", "Δ vs " + variants[0][0], f"{CONFIDENCE:.0%} interval of Δ", "p (Welch)",
            *(f"bpb {s}" for s in sources), "tok/s", "wall per run"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    reference = [m["val_bpb"] for m in results[variants[0][0]]]
    for name, *_ in variants:
        runs = results[name]
        bpb = [m["val_bpb"] for m in runs]
        mean, std = mean_std(bpb)
        diff, half, p = welch(reference, bpb)
        by_source = [mean_std([m["val_bpb_by_source"][s] for m in runs if s in (m.get("val_bpb_by_source") or {})] or
                              [float("nan")])[0] for s in sources]
        first = name == variants[0][0]
        lines.append("| " + " | ".join([
            name, str(len(runs)), f"{mean:.4f} ± {std:.4f}", "" if first else f"{diff:+.4f}",
            "" if first or math.isnan(half) else f"[{diff - half:+.4f}, {diff + half:+.4f}]",
            "" if first or math.isnan(p) else f"{p:.3g}", *(f"{b:.4f}" for b in by_source),
            f"{mean_std([m['tok_per_s'] for m in runs])[0]:,.0f}",
            f"{mean_std([m['wall_s'] for m in runs])[0] / 60:.1f} min"]) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="a prepared data directory (data/prepare.py)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=FLAGS or NAME=SCRIPT FLAGS (repeat; the "
                    "first is the reference; default: the stack alone)")
    ap.add_argument("--seeds", type=int, default=3, help="runs per variant, seeds --first-seed, --first-seed + 1, ...")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--flags", default="--preset cpu", help="flags every run gets before its variant's")
    ap.add_argument("--out", default="runs/ablate", help="the runs (OUT/NAME/seed_S), ablate.md and ablate_val.png")
    args = ap.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant or ["stack="]]
        if len({name for name, *_ in variants}) < len(variants):
            raise AblateError("two variants have the same name")
        if args.seeds < 1:
            raise AblateError("--seeds must be at least 1")
        out, data_dir, flags = os.path.abspath(args.out), os.path.abspath(args.data_dir), shlex.split(args.flags)
        results, dirs, t0 = {}, {}, time.time()
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        for name, script, variant_flags in variants:
            results[name], dirs[name] = [], []
            for seed in seeds:
                run_dir = os.path.join(out, name, f"seed_{seed}")
                command = run_command(script, data_dir, seed, run_dir, flags, variant_flags)
                print(f"{name}, seed {seed}: {shlex.join(command[1:])}", file=sys.stderr, flush=True)
                results[name].append(run(run_dir, command))
                dirs[name].append(run_dir)
    except AblateError as e:
        sys.exit(f"error: {e}")
    lines = table(variants, results)
    print("\n".join(lines))
    plot({name: mean_curve(dirs[name]) for name, *_ in variants},
         {name: mean_std([m["val_bpb"] for m in results[name]]) for name, *_ in variants},
         os.path.join(out, "ablate_val.png"))
    stamp = f"{datetime.date.today()}, {platform.node() or 'this machine'}, {os.cpu_count()} CPUs"
    with open(os.path.join(out, "ablate.md.tmp"), "w") as f:
        f.write(f"`python bench/ablate.py {shlex.join((argv if argv is not None else sys.argv[1:]))}` ({stamp})\n\n"
                + "\n".join(lines) + "\n\n![val bpb by variant](ablate_val.png)\n")
    os.replace(os.path.join(out, "ablate.md.tmp"), os.path.join(out, "ablate.md"))
    reference = [m["val_bpb"] for m in results[variants[0][0]]]
    differ = [name for name, *_ in variants[1:] if welch(reference, [m["val_bpb"] for m in results[name]])[2] < 0.05]
    best = min(results, key=lambda name: mean_std([m["val_bpb"] for m in results[name]])[0])
    print(f"\nablate: {len(variants)} variants x {args.seeds} seeds in {(time.time() - t0) / 60:.1f} min; best {best} "
          f"({mean_std([m['val_bpb'] for m in results[best]])[0]:.4f} bpb); {len(differ)} of {len(variants) - 1} differ "
          f"from {variants[0][0]} at p < 0.05{': ' + ', '.join(differ) if differ else ''}; {out}/ablate.md")


if __name__ == "__main__":
    main()
