"""CPU training speed of the `cpu` preset (eager and compiled) and its sample efficiency against the plain GPT-2 +
AdamW baseline (models/gpt2-adamw) trained on the same data and tokens; with --profile, where a step's time goes.

    python bench/train_bench.py --data-dir runs/data [--skip-runs] [--profile] [--compile-runs] [--first-step]

--profile, eager, per stage of the cpu preset (each 50 of its 150 steps), on the stage's first batches, the variants'
steps taken in turn:
- forward, backward and optimizer ms per step (the median of --profile-steps);
- what each extra of this stack over a plain GPT costs, as the step's ms with it removed for real (no work done,
  unlike bench/ablations.py's quality edits, which multiply a term by 0): value embeddings and multi-token prediction
  by their flags, the bigram hash and smear by edits of a copy (REMOVED);
- torch.profiler over the first stage's steps: the ops taking the most self CPU time, and the share of matrix
  products (compute) against everything else (elementwise ops, copies, casts, dispatch: overhead at this size).
--compile-runs: the cpu preset's whole pretraining three times: eager, compiled with an empty compile cache (cold:
TORCHINDUCTOR_CACHE_DIR a new folder) and compiled again with that cache (warm: inductor's FX graph and AOTAutograd
caches, which every run uses at its default place, ~/.cache or /tmp/torchinductor_USER); each run's compile seconds
(pt_compile_time_s, the warm-up before the timed loop), training seconds, tok/s and val bpb: whether compiling pays.
--first-step: where an eager and a compiled run part: one optimizer step of the cpu preset from the same weights and
batch with each side's gradients; per parameter label, the largest relative difference of the gradients and of the
updates, and the entries whose gradient is exactly 0 on one side only, with the largest step the other side takes
there (Adam, eps 1e-10, makes a gradient of ~1e-10 a step of ~lr).
Prints one table per part and a last summary line. Timings vary +-30% on shared machines: run it alone.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import ablations  # noqa: E402  its edit helper and generated --stages flags
from load_stack import STACK, load_stack  # noqa: E402

BASELINE = os.path.join(ROOT, "models", "gpt2-adamw", "train_gpt2.py")
# edits removing an extra's work (its lookups and its term), for timing only; (old, new) exact replacements
REMOVED = {
    "bigram hash": [("        bigram = lookup(self.bigram_ids(ids, prev_ids), self.bigram_embed)\n", ""),
                    ("            x = a * x + b * x0 + c * bigram\n", "            x = a * x + b * x0\n")],
    "smear": [("        before = lookup(prev_ids.clamp(min=0), embed)\n"
               "        before = torch.where((prev_ids >= 0)[..., None], before, torch.zeros_like(before))\n"
               "        e = e + self.smear_lambda * torch.sigmoid(e[..., :GATE_DIMS] @ self.smear_gate)[..., None] * before\n",
               "")],
}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")  # what counts as compute below


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


def stage_step(stack, data_dir, stage, flags=()):
    """(model, optimizer, plan, a loader at the data's start) for steps of the cpu preset's stage `stage`."""
    cfg = stack.parse_config(["--preset", "cpu", "--data-dir", data_dir, *flags])
    tok = stack.Tokenizer(os.path.join(data_dir, "tokenizer"))
    torch.manual_seed(0)
    model = stack.GPT(stack.ModelConfig.of(cfg, tok.vocab_size))
    stages = stack.scaled_stages(cfg)
    p = stack.plan_step(cfg, stages, sum(s.steps for s in stages[:stage]))
    loader = stack.PretrainLoader(stack.pretrain_shards(data_dir, tok, "train"), tok, 0, 1)
    return model, stack.make_optimizer(model, cfg), p, loader


def split_ms(variants, data_dir, stage, steps=4, warmup=2):
    """{name: ([forward, backward, optimizer] ms, range ms)} of one step of the stage for variants [(name, module,
    flags)], their steps taken in turn (a drift of the machine's speed hits all alike): the median of `steps` after
    `warmup`, eager, and how far the slowest and fastest of them lay apart (the noise a difference must beat)."""
    states = {name: stage_step(module, data_dir, stage, flags) for name, module, flags in variants}
    times = {name: [] for name in states}
    for _ in range(warmup + steps):
        for name, module, _ in variants:
            model, opt, p, loader = states[name]
            batch = loader.next_batch(p.batch_tokens, p.max_doc_len, len(p.mtp_weights), "cpu")
            t0 = time.perf_counter()
            loss = module.train_loss(model, batch, model.windows(p.short_window, p.long_window),
                                     torch.tensor(p.mtp_weights), "sdpa")
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step(p.lr_factor, 0.95)
            opt.zero_grad()
            times[name].append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return {name: ([1000 * t for t in sorted(ts[warmup:], key=sum)[len(ts[warmup:]) // 2]],
                   1000 * (max(map(sum, ts[warmup:])) - min(map(sum, ts[warmup:])))) for name, ts in times.items()}


def load_copy(source, name, folder):
    """The stack's source, edited, imported as module `name` (dataclasses need it in sys.modules)."""
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without(stack, folder):
    """{extra: a copy of the stack without its work (REMOVED), written to folder and imported}."""
    with open(stack.__file__, encoding="utf-8") as f:
        source = f.read()
    try:
        return {name: load_copy(ablations.edited(source, edits, f"REMOVED[{name!r}]"),
                                "train_bench_no_" + name.replace(" ", "_"), folder) for name, edits in REMOVED.items()}
    except ablations.ablate.AblateError as e:
        sys.exit(f"error: {e}")


def top_ops(stack, data_dir, flags=(), stage=0, steps=3, n=12):
    """(rows (op, self ms per step, calls per step, share), matmul share, ops per step) of torch.profiler's view."""
    from torch.profiler import ProfilerActivity, profile
    model, opt, p, loader = stage_step(stack, data_dir, stage, flags)
    weights, windows = torch.tensor(p.mtp_weights), model.windows(p.short_window, p.long_window)

    def step():
        batch = loader.next_batch(p.batch_tokens, p.max_doc_len, len(p.mtp_weights), "cpu")
        stack.train_loss(model, batch, windows, weights, "sdpa").backward()
        opt.step(p.lr_factor, 0.95)
        opt.zero_grad()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [(e.key, e.self_cpu_time_total / 1000 / steps, e.count / steps, e.self_cpu_time_total / total) for e in events[:n]]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total
    return rows, matmul, sum(e.count for e in events) / steps


def profile_report(stack, data_dir, flags=(), steps=4, warmup=2):
    """Print the three --profile tables (flags: more for every step, e.g. a smaller model); returns the summary's words."""
    cfg = stack.parse_config(["--preset", "cpu", *flags])
    n_stages = len(cfg.stages)
    mtp_flag = "--stages=" + json.dumps([{**stack.dataclasses.asdict(s), "mtp_start": [1.0], "mtp_end": [1.0]}
                                         for s in cfg.stages])  # these flags' stages (ablations.stages_flag: a preset's)
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("this stack", stack, ()), ("no value embeddings", stack, ("--value-embed-layers=",)),
                    ("no multi-token prediction", stack, (mtp_flag,))]
        variants += [(f"no {name}", module, ()) for name, module in without(stack, tmp).items()]
        variants = [(name, module, (*flags, *more)) for name, module, more in variants]
        per_stage = [split_ms(variants, data_dir, stage, steps, warmup) for stage in range(n_stages)]
        ms = {name: [stage[name][0] for stage in per_stage] for name, _, _ in variants}
        noise = sum(stage["this stack"][1] for stage in per_stage) / n_stages
    print(f"\n{'eager ms per step':<28}" + "".join(f" {'stage ' + str(i + 1):>22}" for i in range(n_stages)))
    print(f"{'':<28}" + f" {'fwd / bwd / opt':>22}" * n_stages)
    for name, per_stage in ms.items():
        cells = [f"{f:.0f} / {b:.0f} / {o:.0f} = {f + b + o:.0f}" for f, b, o in per_stage]
        print(f"{name:<28}" + "".join(f" {c:>22}" for c in cells))
    base = [sum(t) for t in ms["this stack"]]
    print(f"\n{'cost of each extra':<28} {'ms per step, mean of stages':>28} {'share of the step':>18}")
    costs = {}
    for name, per_stage in list(ms.items())[1:]:
        cost = sum(b - sum(t) for b, t in zip(base, per_stage)) / n_stages
        costs[name[3:]] = cost
        print(f"{name[3:]:<28} {cost:>28.1f} {cost / (sum(base) / n_stages):>17.0%}")
    print(f"noise: the stack's timed steps lie {noise:.0f} ms apart (mean over stages): a smaller cost is not resolved")
    rows, matmul, n_ops = top_ops(stack, data_dir, flags, steps=max(1, steps - 1))
    print(f"\n{'torch.profiler, stage 1':<54} {'self ms/step':>12} {'calls/step':>10} {'share':>6}")
    for op, self_ms, calls, share in rows:
        print(f"{op[:54]:<54} {self_ms:>12.1f} {calls:>10.0f} {share:>6.0%}")
    print(f"matrix products: {matmul:.0%} of the aten ops' self time; {n_ops:,.0f} aten op calls per step")
    extras = ", ".join(f"{name} {cost:.0f} ms" for name, cost in costs.items())
    return (f"eager step {sum(base) / n_stages:.0f} ms (mean of stages), extras {extras} (noise {noise:.0f} ms); "
            f"matmuls {matmul:.0%} of op time")


def run(cmd, run_dir, env=None):
    t0 = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    return metrics, time.time() - t0


def compile_runs(data_dir, flags=()):
    """(table lines, summary) of the cpu preset's pretraining eager, compiled cold and compiled warm (see above);
    flags: more of the stack's (the tests' tiny model)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor")}
        for name, flag in (("eager", "--no-compile"), ("compiled, cold cache", "--compile"),
                           ("compiled, warm cache", "--compile")):
            run_dir = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
            m, wall = run([sys.executable, STACK, "--preset", "cpu", "--data-dir", data_dir, "--run-dir", run_dir,
                           "--wandb", "disabled", *flags, flag], run_dir, env)
            rows.append((name, m["pt_compile_time_s"], m["pt_train_time_s"], m["tok_per_s"], m["val_bpb"], wall))
    lines = [f"{'cpu preset pretraining':<22} {'compile s':>9} {'train s':>8} {'sum s':>7} {'tok/s':>7} {'val bpb':>8} {'wall s':>7}"]
    lines += [f"{n:<22} {c:>9.1f} {t:>8.1f} {c + t:>7.1f} {tps:>7,.0f} {bpb:>8.4f} {w:>7.0f}" for n, c, t, tps, bpb, w in rows]
    (_, _, eager, _, _, _), (_, cold, cold_t, _, _, _), (_, warm, warm_t, _, _, _) = rows
    summary = (f"compiling costs {cold:.0f} s cold, {warm:.0f} s warm and saves {eager - warm_t:.0f} s of training: "
               f"{(cold + cold_t) / eager:.2f}x eager's time cold, {(warm + warm_t) / eager:.2f}x warm")
    return lines, summary


def first_step_fork(stack, data_dir, flags=(), other=None):
    """(table lines, summary): eager against `other` (default: torch.compile of train_loss) over one optimizer step
    from the same weights (see above); flags: more of the stack's (the tests' tiny model)."""
    import copy
    cfg = stack.parse_config(["--preset", "cpu", "--data-dir", data_dir, *flags])
    tok = stack.Tokenizer(os.path.join(data_dir, "tokenizer"))
    torch.manual_seed(0)
    base = stack.GPT(stack.ModelConfig.of(cfg, tok.vocab_size))
    stages = stack.scaled_stages(cfg)
    _, p, T, _, _, _ = next(stack.pretrain_steps(cfg, stages, 1))
    batch = stack.PretrainLoader(stack.pretrain_shards(data_dir, tok, "train"), tok, 0, 1).next_batch(
        T, p.max_doc_len, len(p.mtp_weights), "cpu")
    sides = []
    for fn in (stack.train_loss, other or torch.compile(stack.train_loss)):
        model = copy.deepcopy(base)
        opt = stack.make_optimizer(model, cfg)
        fn(model, batch, model.windows(p.short_window, p.long_window), torch.tensor(p.mtp_weights), "sdpa").backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        opt.step(p.lr_factor, stack.muon_momentum(0, stack.total_steps(stages)))
        sides.append((grads, {n: q.detach() - b.detach() for (n, q), b in zip(model.named_parameters(), base.parameters())}))
    (ga, ua), (gb, ub) = sides
    rel = lambda a, b: float((a - b).norm() / b.norm()) if b.norm() > 0 else (0.0 if a.norm() == 0 else float("inf"))
    rows = {}  # label -> [gradient diff, update diff, entries 0 in eager only, in the other only, the other's step there]
    for n in ga:
        row, lone = rows.setdefault(stack.param_label(n), [0.0, 0.0, 0, 0, 0.0]), (ga[n] == 0) & (gb[n] != 0)
        row[0], row[1] = max(row[0], rel(gb[n], ga[n])), max(row[1], rel(ub[n], ua[n]))
        row[2], row[3] = row[2] + int(lone.sum()), row[3] + int(((gb[n] == 0) & (ga[n] != 0)).sum())
        row[4] = max(row[4], float(ub[n][lone].abs().max()) if lone.any() else 0.0)
    lines = [f"{'first step, label':<18} {'gradient':>9} {'update':>9} {'0 eager only':>13} {'0 other only':>13} "
             f"{'its step there':>15}"]
    lines += [f"{label:<18} {g:>9.1e} {u:>9.1e} {a:>13,} {b:>13,} {m:>15.1e}" for label, (g, u, a, b, m) in sorted(rows.items())]
    alike = [r for r in rows.values() if not r[2]]
    summary = (f"one step from the same weights: where no gradient is 0 on one side only, gradients within "
               f"{max(r[0] for r in alike):.1e} and updates within {max(r[1] for r in alike):.1e} relative; "
               f"{sum(r[2] for r in rows.values())} gradient entries exactly 0 in eager only, where the other side "
               f"steps up to {max(r[4] for r in rows.values()):.1e}")
    return lines, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a prepared data directory (data/prepare.py)")
    parser.add_argument("--skip-runs", action="store_true", help="only measure speed, skip the two training runs")
    parser.add_argument("--profile", action="store_true", help="where a step's time goes (see above)")
    parser.add_argument("--profile-steps", type=int, default=6, help="timed steps per variant and stage (after 2 more)")
    parser.add_argument("--compile-runs", action="store_true", help="the whole pretraining eager, compiled cold and warm")
    parser.add_argument("--first-step", action="store_true", help="where eager and compiled part: one step's updates")
    args = parser.parse_args()
    stack = load_stack()
    eager, compiled = training_speed(stack, args.data_dir, False), training_speed(stack, args.data_dir, True)
    print(f"{'cpu preset training step':<28} {'tok/s':>8}")
    print(f"{'eager':<28} {eager:>8,.0f}")
    print(f"{'torch.compile (inductor)':<28} {compiled:>8,.0f}")
    summary = f"summary: cpu preset {eager:,.0f} tok/s eager, {compiled:,.0f} tok/s compiled"
    if args.profile:
        summary += "; " + profile_report(stack, args.data_dir, steps=args.profile_steps)
    if args.compile_runs:
        lines, part = compile_runs(args.data_dir)
        print("\n" + "\n".join(lines))
        summary += "; " + part
    if args.first_step:
        lines, part = first_step_fork(stack, args.data_dir)
        print("\n" + "\n".join(lines))
        summary += "; " + part
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
