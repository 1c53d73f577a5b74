"""A preset's run on paper: model, tokens, steps, FLOPs, the optimizer's memory per rank, and the wall time it would
take at assumed MFUs. Nothing runs on a GPU: the times are estimates from stated assumptions, not measurements
(bench/gpu_check.py measures tok/s, MFU and peak memory where a GPU is lent).

    python bench/paper.py --stack medium --preset h100x8 --vocab-size 32768   # nanochat's time-to-GPT-2 run
    python bench/paper.py --stack small --preset h100x8 --vocab-size 50257    # modded-nanogpt's 124M track

FLOPs per step are the stack's training_flops (6 per token per matmul weight, 12 per head dim per attended pair) with
every document max_doc_len long (real documents are shorter: fewer attention pairs, so this is an upper bound on
attention's share). Memory counts what the optimizer keeps: fp32 weights and gradients on every rank, the optimizer
state sharded over the ranks as NorMuonAdam shards it (large groups split, small ones whole); activations are for
the GPU to measure. The last line is the summary.
"""
import argparse
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_stack import load_stack  # noqa: E402

H100_BF16 = 989e12  # dense bf16 tensor-core peak of an H100 SXM, FLOP/s (the stack's PEAK_BF16_FLOPS)


def paper(stack, cfg, vocab_size, world_size, mfus=(0.3, 0.4, 0.5)):
    """{name: value} of the run cfg describes, on world_size GPUs."""
    try:
        with torch.device("meta"):  # shapes only: no memory
            model = stack.GPT(stack.ModelConfig.of(cfg, vocab_size))
    except RuntimeError:  # the small stack's GPT reads its buffers' values when built: on the CPU, then
        model = stack.GPT(stack.ModelConfig.of(cfg, vocab_size))
    takes_vocab = "vocab_size" in inspect.signature(stack.scaled_stages).parameters
    stages = stack.scaled_stages(cfg, vocab_size) if takes_vocab else stack.scaled_stages(cfg)
    flops, tokens = 0.0, 0
    for stage in stages:
        windows = model.windows(stage.short_window, stage.long_window)
        per_batch = stack.training_flops(model, windows, [stage.max_doc_len] * (stage.batch_tokens // stage.max_doc_len))
        flops, tokens = flops + stage.steps * per_batch, tokens + stage.steps * stage.batch_tokens
    params = sum(p.numel() for p in model.parameters())
    opt = stack.make_optimizer(model, cfg)
    state = sum(t.numel() for g in opt.groups for t in g.state.values())  # one rank's (world 1: everything)
    sharded = sum(t.numel() / (world_size if g.spec.kind == "normuon" or t.numel() >= 16384 else 1)
                  for g in opt.groups for t in g.state.values())
    out = dict(params=params, tokens=tokens, steps=sum(s.steps for s in stages), flops=flops,
               flops_per_token=flops / tokens, weights_grads_gib=2 * 4 * params / 2**30,
               optimizer_state_gib=4 * state / 2**30, optimizer_state_per_rank_gib=4 * sharded / 2**30)
    for mfu in mfus:
        out[f"hours_at_mfu_{round(mfu * 100)}"] = flops / (world_size * H100_BF16 * mfu) / 3600
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", default="medium", choices=["small", "medium"])
    ap.add_argument("--preset", default="h100x8")
    ap.add_argument("--vocab-size", type=int, default=32768, help="the tokenizer's (nanochat: 32,768; GPT-2: 50,257)")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("flags", nargs="*", help="more of the stack's flags, after --, e.g. -- --depth 26")
    args = ap.parse_args(argv)
    stack = load_stack(args.stack)
    cfg = stack.parse_config(["--preset", args.preset, *args.flags])
    r = paper(stack, cfg, args.vocab_size, args.world_size)
    rows = [("parameters", f"{r['params']:,}"), ("training tokens", f"{r['tokens']:,}"), ("steps", f"{r['steps']:,}"),
            ("FLOPs per token (fwd + bwd)", f"{r['flops_per_token']:.3e}"), ("FLOPs in all", f"{r['flops']:.3e}"),
            ("fp32 weights + gradients per rank", f"{r['weights_grads_gib']:.1f} GiB"),
            ("optimizer state, whole / per rank", f"{r['optimizer_state_gib']:.1f} / {r['optimizer_state_per_rank_gib']:.1f} GiB")]
    rows += [(f"{args.world_size} x H100 at MFU {k.rsplit('_', 1)[1]}% (assumed)", f"{v:.2f} h")
             for k, v in r.items() if k.startswith("hours_at_mfu_")]
    print(f"{args.stack} stack, --preset {args.preset}, vocabulary {args.vocab_size:,}, {args.world_size} ranks "
          f"({' '.join(args.flags)})")
    for name, value in rows:
        print(f"  {name:<42} {value:>22}")
    print(f"paper: {r['flops']:.3e} FLOPs, {r['hours_at_mfu_40']:.2f} h on {args.world_size} x H100 at an assumed 40% MFU "
          f"(not measured)")


if __name__ == "__main__":
    main()
