"""The run report: RUN_DIR/report.md and its plots (report_<phase>.png), rendered from what the stack writes in the
run directory, metrics.json (every phase's results, the phases' wall times, the environment) and curves.jsonl (what
the loops log each step).

    python report.py --preset cpu           # runs/cpu/report.md
    python report.py --run-dir runs/gpu1

Run it after any phase, as often as you like: it rewrites the whole report from the files each time. Plots need
matplotlib (without it the report says so and has the rest).
"""
import argparse
import json
import os
import sys
import time

from load_stack import load_stack

ds = load_stack()

# report_<phase>.png: (title, panels), each panel the curves drawn together; a name ending in @ is a prefix (every k)
REPORT_PLOTS = {"pt": ("pretraining", (("train/loss",), ("val/bpb",))),
                "sft": ("SFT", (("sft/loss", "sft/val_loss"),)),
                "rl": ("RL", (("rl/reward",), ("rl/pass@",)))}


def read_curves(path):
    """{name: [(step, value), ...] by step} of a curves.jsonl (Logger.metrics). A step logged again, by a phase resumed
    from an earlier checkpoint, keeps its last line's value; a line cut off by a kill (and what was appended to it)
    is skipped."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                values = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = values.pop("step")
            for name, value in values.items():
                by_step.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in by_step.items()}


def md_table(header, rows):
    """A GitHub markdown table, the first column left-aligned and the others right: floats to 4 decimals, ints with
    thousands separators, None as n/a, anything else as str."""
    def cell(v):
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
    lines = [header, [":--"] + ["--:"] * (len(header) - 1), *rows]
    return "\n".join("| " + " | ".join(map(cell, row)) + " |" for row in lines)


def plot_curves(path, title, panels, curves):
    """report_<phase>.png at path (REPORT_PLOTS): a panel per group of curves, each vs step; written whole. Draws with
    Agg through matplotlib's Figure (no pyplot: no global backend), imported here: without matplotlib a run only
    lacks plots. Returns whether there was anything to draw."""
    points = {name: [(s, v) for s, v in series if v is not None] for name, series in curves.items()}
    groups = [[n for p in panel for n in points if points[n] and (n == p or p.endswith("@") and n.startswith(p))]
              for panel in panels]
    groups = [g for g in groups if g]
    if not groups:
        return False
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(5 * len(groups), 3.5), layout="constrained")
    for ax, group in zip(fig.subplots(1, len(groups), squeeze=False)[0], groups):
        for name in group:
            ax.plot(*zip(*points[name]), marker="o", markersize=3, label=name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path + ".tmp", format="png", dpi=100)
    os.replace(path + ".tmp", path)
    return True


def plot_link(run_dir, phase, curves):
    """The markdown image of the phase's curves ("" when it has none)."""
    title, panels = REPORT_PLOTS[phase]
    name = f"report_{phase}.png"
    try:
        drawn = plot_curves(os.path.join(run_dir, name), title, panels, curves)
    except ImportError:
        return "_No plot: matplotlib is not installed._"
    return f"![{title} curves]({name})" if drawn else ""


def write_report(run_dir):
    """RUN_DIR/report.md (and its plots), written whole (tmp + rename) from the run directory's metrics.json (every
    invocation's phases add to it) and curves.jsonl, so it covers a run resumed or split over invocations. A section
    per kind of result, absent without one; the environment is that of the last invocation that ran a phase."""
    file = lambda name: os.path.join(run_dir, name)
    m = ds.read_metrics(run_dir)
    curves = read_curves(file("curves.jsonl")) if os.path.isfile(file("curves.jsonl")) else {}
    times = ds.phase_times(m)
    last = f", last **{times[-1]['phase']}**" if times else ""
    parts = [f"# Run report: {os.path.basename(os.path.abspath(run_dir))}",
             f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `report.py` from `metrics.json` and "
             f"`curves.jsonl` ({len(times)} phases run{last}); the full log is `log.txt`.",
             md_table(["phase", "checkpoint", "wall time"], [[t["phase"], t["checkpoint"] or "", ds.duration(t["seconds"])]
                                                            for t in times]),
             "## Environment", "```text\n" + "\n".join(m.get("environment", ["(not recorded)"])) + "\n```"]
    if "params" in m:
        memory = m["peak_memory_gib"]
        parts += ["## Pretraining", md_table(["", "value"], [
            ["parameters", m["params"]], ["in NorMuon matrices", m["params_matrix"]],
            ["training tokens", m["train_tokens"]], ["tokens/s", round(m["tok_per_s"])],
            ["training time (no eval, no checkpoints)", ds.duration(m["pt_train_time_s"])],
            ["compile time", f"{ds.duration(m['pt_compile_time_s'])}, {m['pt_compile_graphs']} graphs"],
            ["peak memory", None if memory is None else f"{memory:.1f} GiB"]]), plot_link(run_dir, "pt", curves)]
    if "val_bpb" in m:
        parts += ["## Validation bits per byte",
                  f"Scored {m['val_scored']}: val loss {m['val_loss']:.4f} over {m['val_loss_tokens']:,} tokens.",
                  md_table(["source", "bpb"], [["**all**", m["val_bpb"]], *m["val_bpb_by_source"].items()])]
    if "core" in m:
        n = m["core_max_per_task"]
        parts += ["## CORE", "Centered accuracy (0: chance, 1: all right) on "
                  f"{'every example' if n <= 0 else f'the first {n} examples'} of each task.",
                  md_table(["task", "centered"], [*m["core_per_task"].items(), ["**CORE**", m["core"]]])]
    if "sft_val_loss" in m:
        start = [["start", 0, m["sft_val_loss_init"]]] if "sft_val_loss_init" in m else []  # absent if resumed
        parts += ["## SFT", f"Training time {ds.duration(m['sft_train_time_s'])} (no eval, no checkpoints).",
                  md_table(["", "step", "val loss"], start + [["end", m["sft_steps"], m["sft_val_loss"]]]),
                  plot_link(run_dir, "sft", curves)]
    if "chat_by_checkpoint" in m:
        by = m["chat_by_checkpoint"]
        tasks = list(dict.fromkeys(t for values in by.values() for t in values["chat_per_task"]))
        parts += ["## Chat", "Accuracy per task, a column per checkpoint evaluated; ChatCORE: the mean centered accuracy.",
                  md_table(["task", *by], [[t, *(v["chat_per_task"].get(t) for v in by.values())] for t in tasks]
                           + [["**ChatCORE**", *(v["chatcore"] for v in by.values())]])]
    if "gsm8k_pass_at" in m:
        r = m["rl_reward"]
        rewards = md_table(["steps", "first reward", "last reward", "mean", "max"],
                           [[len(r), r[0], r[-1], sum(r) / len(r), max(r)]]) if r else ""  # none with --rl-steps 0
        parts += ["## RL (GSM8K)", rewards,
                  md_table(["k", "pass@k (test)"], list(m["gsm8k_pass_at"].items())), plot_link(run_dir, "rl", curves)]
    ds.write_text_atomic(file("report.md"), "\n\n".join(p for p in parts if p) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=ds.Config.preset, choices=list(ds.PRESETS),
                        help="the run directory is the preset's (default %(default)s)")
    parser.add_argument("--run-dir", help="the run directory (default: the preset's)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or ds.PRESETS[args.preset].get("run_dir", ds.Config.run_dir)
    if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
        sys.exit(f"error: {os.path.join(run_dir, 'metrics.json')}: missing (run the stack's phases on {run_dir} first)")
    try:
        write_report(run_dir)
    except ds.DataFormatError as e:
        sys.exit(f"error: {e}")
    except KeyError as e:  # a metrics.json written by a stack older than this report
        sys.exit(f"error: {os.path.join(run_dir, 'metrics.json')}: no {e} (written by an older stack?)")
    print(f"wrote {os.path.join(run_dir, 'report.md')}")


if __name__ == "__main__":
    main()
