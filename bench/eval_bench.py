"""Evaluation and inference speed from a `cpu` preset checkpoint: CORE examples/s packed vs one example per forward,
decoding tok/s with the KV cache vs recomputing the whole prefix, generation tok/s at batch 1, 4 and 16.

    python bench/eval_bench.py --data-dir runs/data --checkpoint runs/cpu/ckpt_000150

Prints one table per part and a last summary line. Timings vary +-30% on shared machines.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

from load import load_stack



def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def core_speed(stack, model, core, rt, windows, per_task):
    """Examples/s of the packed CORE path and of one forward per sequence, on the same examples (decisions must agree)."""
    packed, t_packed = timed(lambda: stack.evaluate_core(model, core, rt, windows, per_task, 8192))
    chosen = np.flatnonzero(packed["correct"] >= 0)
    alone, t_alone = timed(lambda: [stack.evaluate_example_alone(model, core, int(e), rt, windows) for e in chosen])
    if [bool(a) for a in alone] != [bool(packed["correct"][e]) for e in chosen]:
        sys.exit("error: packed and one-by-one CORE decisions differ")
    return len(chosen), t_packed, t_alone


@torch.no_grad()
def decode_speed(stack, model, windows, prompt_len, new_tokens):
    """tok/s generating new_tokens greedy tokens after a prompt: with the cache vs a full forward per token."""
    ids = torch.randint(0, model.vocab_size, (prompt_len,)).tolist()

    def cached():
        cache = stack.KVCache(model, 1, prompt_len + new_tokens, "cpu", torch.float32)
        logits = model.decode(torch.tensor([ids]), cache, windows, last_only=True)
        for _ in range(new_tokens - 1):
            logits = model.decode(logits[:, -1].argmax(-1, keepdim=True), cache, windows, last_only=True)

    recompute_tokens = min(new_tokens, 16)  # the same work per token whatever the count: keep the slow path short

    def recomputed():
        seq = list(ids)
        for _ in range(recompute_tokens):
            t = torch.tensor(seq)
            cu = torch.full((128,), len(seq), dtype=torch.int32)
            cu[0] = 0
            h = model.hidden(stack.Batch(t, torch.cat([torch.tensor([-1]), t[:-1]]), torch.arange(len(seq)), None, cu, len(seq)), windows, "sdpa")
            seq.append(int(model.logits(h[-1]).argmax()))

    return new_tokens / timed(cached)[1], recompute_tokens / timed(recomputed)[1]


def generation_speed(stack, engine, tok, batch, new_tokens):
    """Generated tokens/s of the engine sampling `batch` rows of one prompt (stops disabled: every row runs full length)."""
    prompt = [tok.bos_id, *tok.encode("Once upon a time, in a small town by the sea,")]
    out, seconds = timed(lambda: engine.generate([prompt], batch, new_tokens, temperature=1.0, top_k=50))
    return sum(len(s.tokens) for s in out[0]) / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="runs/data")
    ap.add_argument("--checkpoint", default="", help="a checkpoint directory (default: the latest in runs/cpu)")
    ap.add_argument("--core-per-task", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    stack = load_stack()
    cfg = stack.parse_config(["--preset", "cpu", "--data-dir", args.data_dir, "--init-from", args.checkpoint or
                              (stack.latest_checkpoint("runs/cpu") or "")])
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    tok = stack.Tokenizer(os.path.join(args.data_dir, "tokenizer"))
    model, _, path = stack.trained_model(cfg, rt, tok)
    windows = model.windows()
    print(f"checkpoint {path}, {sum(p.numel() for p in model.parameters()):,} parameters, {torch.get_num_threads()} threads")

    n, t_packed, t_alone = core_speed(stack, model, stack.load_core(args.data_dir, tok), rt, windows, args.core_per_task)
    print(f"\nCORE, {n} examples ({args.core_per_task} per task), same decisions both ways")
    print(f"{'path':<24} {'seconds':>8} {'examples/s':>11}")
    print(f"{'packed varlen':<24} {t_packed:>8.1f} {n / t_packed:>11.1f}")
    print(f"{'one per forward':<24} {t_alone:>8.1f} {n / t_alone:>11.1f}")

    print(f"\ndecoding {args.new_tokens} tokens after a prompt, batch 1 (greedy)")
    print(f"{'prompt tokens':<14} {'cache tok/s':>11} {'recompute tok/s':>16} {'speedup':>8}")
    speedups = []
    for prompt_len in (16, 256, 1024):
        cached, recomputed = decode_speed(stack, model, windows, prompt_len, args.new_tokens)
        speedups.append(cached / recomputed)
        print(f"{prompt_len:<14} {cached:>11.0f} {recomputed:>16.0f} {cached / recomputed:>7.1f}x")

    engine = stack.Engine(model, tok, windows, rt)
    engine.stops = set()
    print(f"\nengine generation, {args.new_tokens} new tokens per row (top-k 50 sampling)")
    print(f"{'batch':<6} {'tok/s':>8}")
    rates = {}
    for batch in (1, 4, 16):
        rates[batch] = generation_speed(stack, engine, tok, batch, args.new_tokens)
        print(f"{batch:<6} {rates[batch]:>8.0f}")
    print(f"\nsummary: CORE packed {t_alone / t_packed:.1f}x faster than one example per forward; KV-cache decoding "
          f"{speedups[0]:.1f}-{speedups[-1]:.1f}x faster than recomputing; generation {rates[1]:.0f} / {rates[4]:.0f} / "
          f"{rates[16]:.0f} tok/s at batch 1 / 4 / 16")


if __name__ == "__main__":
    main()
