"""CPU training speed of the `cpu` preset (eager and compiled) and its sample efficiency against the plain GPT-2 +
AdamW baseline (models/gpt2-adamw) trained on the same data and tokens.

    python bench/train_bench.py --data-dir runs/data [--skip-runs]

Prints one table per part and a last summary line. Timings vary +-30% on shared machines.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from load_stack import STACK, load_stack  # noqa: E402

BASELINE = os.path.join(ROOT, "models", "gpt2-adamw", "train_gpt2.py")


def training_speed(stack, data_dir, compile_, steps=6, warmup=2):
    """tok/s of forward + backward + optimizer steps of the cpu preset's last stage, after `warmup` steps."""
    cfg = stack.parse_config(["--preset", "cpu", "--data-dir", data_dir])
    tok = stack.Tokenizer(os.path.join(data_dir, "tokenizer"))
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, tok.vocab_size))
    opt = stack.make_optimizer(model, cfg)
    loader = stack.PretrainLoader(stack.pretrain_shards(data_dir, tok, "train"), tok, 0, 1)
    p = stack.plan_step(cfg, stack.scaled_stages(cfg), stack.total_steps(cfg.stages) - 1)
    loss_fn = torch.compile(stack.train_loss) if compile_ else stack.train_loss
    weights = torch.tensor(p.mtp_weights)
    windows = model.windows(p.short_window, p.long_window)
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = loader.next_batch(p.batch_tokens, p.max_doc_len, len(p.mtp_weights), "cpu")
        loss_fn(model, batch, windows, weights, "sdpa").backward()
        opt.step(p.lr_factor, 0.95)
        opt.zero_grad()
    return steps * p.batch_tokens / (time.perf_counter() - t0)


def run(cmd, run_dir):
    t0 = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    return metrics, time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a prepared data directory (data/prepare.py)")
    parser.add_argument("--skip-runs", action="store_true", help="only measure speed, skip the two training runs")
    args = parser.parse_args()
    stack = load_stack()
    eager, compiled = training_speed(stack, args.data_dir, False), training_speed(stack, args.data_dir, True)
    print(f"{'cpu preset training step':<28} {'tok/s':>8}")
    print(f"{'eager':<28} {eager:>8,.0f}")
    print(f"{'torch.compile (inductor)':<28} {compiled:>8,.0f}")
    summary = f"summary: cpu preset {eager:,.0f} tok/s eager, {compiled:,.0f} tok/s compiled"
    if not args.skip_runs:
        with tempfile.TemporaryDirectory() as tmp:
            ours_dir, base_dir = os.path.join(tmp, "ours"), os.path.join(tmp, "gpt2")
            ours, ours_s = run([sys.executable, STACK, "--preset", "cpu", "--data-dir", args.data_dir, "--run-dir", ours_dir,
                                "--wandb", "disabled"], ours_dir)
            base, base_s = run([sys.executable, BASELINE, "--preset", "cpu", "--data-dir", args.data_dir, "--run-dir", base_dir,
                                "--train-tokens", str(ours["train_tokens"]), "--core-max-per-task", "0"], base_dir)
        print(f"\n{'stack':<22} {'params':>11} {'matrix params':>14} {'tokens':>9} {'val bpb':>8} {'tok/s':>7} {'wall s':>7}")
        for name, m, secs in (("decoderstack (cpu)", ours, ours_s), ("gpt2-adamw (cpu)", base, base_s)):
            print(f"{name:<22} {m['params']:>11,} {m['params_matrix']:>14,} {m['train_tokens']:>9,} {m['val_bpb']:>8.4f} {m['tok_per_s']:>7,.0f} {secs:>7.0f}")
        summary += f"; val bpb {ours['val_bpb']:.4f} vs gpt2-adamw {base['val_bpb']:.4f} at {ours['train_tokens']:,} tokens"
    print(summary)


if __name__ == "__main__":
    main()
