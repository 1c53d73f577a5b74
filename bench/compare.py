"""Every stack at its `cpu` preset on the same data and token budget: one table of val bpb, CORE, tok/s and params.

    python bench/compare.py --data-dir runs/data [--core-max-per-task 50] [--train-tokens N --val-tokens N] [--out DIR]

Trains one after another the main stack (--phases pt,eval), the medium stack (nanochat's GPT and recipe in the main
stack's frame: its depth-4 cpu twin), models/gpt2-adamw, models/nanochat,
models/modded-nanogpt and models/llama, each with --preset cpu (150 steps x 4,096 tokens = 614,400 tokens; val bpb
over every val token once, and per val source), then CORE over the first --core-max-per-task examples of each task.
About 30 minutes on 2 cores for the first four
(2026-12-02); the Llama peer adds one more run of about the gpt2 peer's size (not timed on an idle machine).
--train-tokens / --val-tokens shrink every run alike for a quick check (--val-tokens sizes the evaluations during
training; the final one scores every val token). Prints the table and a last summary line. Timings vary
+-30% on shared machines: run it alone.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACKS = [  # name, script, extra arguments
    ("decoderstack", os.path.join(ROOT, "decoderstack_small_pt-eval-sft.py"), ["--phases", "pt,eval", "--wandb", "disabled"]),
    ("medium", os.path.join(ROOT, "decoderstack_medium_pt-eval-sft.py"), ["--phases", "pt,eval", "--wandb", "disabled"]),
    ("gpt2-adamw", os.path.join(ROOT, "models", "gpt2-adamw", "train_gpt2.py"), []),
    ("nanochat", os.path.join(ROOT, "models", "nanochat", "train_nanochat.py"), []),
    ("modded-nanogpt", os.path.join(ROOT, "models", "modded-nanogpt", "train_modded.py"), []),
    ("llama", os.path.join(ROOT, "models", "llama", "train_llama.py"), []),
]


def run(script, args, run_dir):
    """Train one stack; (metrics, wall seconds), or (None, seconds) with the error's tail printed."""
    t0 = time.time()
    result = subprocess.run([sys.executable, script, *args, "--run-dir", run_dir], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        print(f"error: {os.path.relpath(script, ROOT)} failed (exit {result.returncode}):\n{result.stderr[-2000:]}", file=sys.stderr)
        return None, time.time() - t0
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f), time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a prepared data directory (data/prepare.py) with pretrain/ and core/")
    parser.add_argument("--core-max-per-task", type=int, default=50, help="CORE examples per task (0: no CORE)")
    parser.add_argument("--train-tokens", type=int, help="override every stack's training tokens (default: the cpu presets' 614,400)")
    parser.add_argument("--val-tokens", type=int, help="override every stack's val tokens (default: the cpu presets' 131,072)")
    parser.add_argument("--out", help="keep the run directories here (default: a temporary directory)")
    args = parser.parse_args()
    common = ["--preset", "cpu", "--data-dir", os.path.abspath(args.data_dir)]
    for flag, value in (("--train-tokens", args.train_tokens), ("--val-tokens", args.val_tokens)):
        if value is not None:
            common += [flag, str(value)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.abspath(args.out) if args.out else tmp
        for name, script, extra in STACKS:
            core = ["--core-max-per-task", str(args.core_max_per_task)]
            if args.core_max_per_task == 0 and name in ("decoderstack", "medium"):
                extra = ["--phases", "pt", "--wandb", "disabled"]  # its eval phase is CORE (bpb comes with pt)
            print(f"training {name} ...", file=sys.stderr, flush=True)
            metrics, seconds = run(script, common + extra + core, os.path.join(out, name))
            rows.append((name, metrics, seconds))

    sources = sorted({name for _, m, _ in rows if m for name in m.get("val_bpb_by_source", {})})
    print(f"{'stack':<16} {'params':>11} {'matrix params':>14} {'tokens':>9} {'val bpb':>8} "
          + "".join(f"{source[:20]:>21}" for source in sources) + f" {'CORE':>8} {'tok/s':>7} {'wall s':>7}")
    for name, m, seconds in rows:
        if m is None:
            print(f"{name:<16} {'failed':>11}")
            continue
        core = f"{m['core']:>8.4f}" if m.get("core") is not None else f"{'n/a':>8}"
        split = "".join(f"{m['val_bpb_by_source'][s]:>21.4f}" if s in m.get("val_bpb_by_source", {}) else f"{'n/a':>21}" for s in sources)
        print(f"{name:<16} {m['params']:>11,} {m['params_matrix']:>14,} {m['train_tokens']:>9,} {m['val_bpb']:>8.4f} "
              f"{split} {core} {m['tok_per_s']:>7,.0f} {seconds:>7.0f}")
    done = [(name, m) for name, m, _ in rows if m is not None]
    summary = "summary: val bpb " + ", ".join(f"{name} {m['val_bpb']:.4f}" for name, m in done)
    if done:
        best = min(done, key=lambda nm: nm[1]["val_bpb"])
        summary += f"; best {best[0]} at {best[1]['train_tokens']:,} tokens"
    if len(done) < len(rows):
        summary += f"; {len(rows) - len(done)} failed"
    print(summary)
    sys.exit(0 if len(done) == len(rows) else 1)


if __name__ == "__main__":
    main()
