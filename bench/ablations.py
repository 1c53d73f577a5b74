"""The stack's ideas removed one at a time, and the peer stacks, as bench/ablate.py variants: README's ablation table.

    python bench/ablations.py --data-dir runs/data --seeds 3 --train-tokens 122880 --out runs/ablations
    python bench/ablations.py --data-dir runs/data --only "stack,no smear" --seeds 2       # some rows

Each idea is off in its plain-transformer form: through a flag where a flag is the natural form (IDEAS' flags), else
through a small edit of a copy of the stack (IDEAS' edits: exact text replacements, each applying exactly once to
today's stack, or this script stops; tests/test_ablate.py runs every edited copy). The copies are written to
OUT/stacks/; every run then goes through bench/ablate.py (resumable: finished runs are read, not rerun), with
--preset (cpu), --train-tokens and --core-max-per-task 0 for all, val bpb over every val token. The table's last
line is ablate.py's summary.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
import ablate  # noqa: E402
from load_stack import load_stack  # noqa: E402

# a SwiGLU MLP of the ReLU^2 MLP's size (3 matrices of 2/3 the width): README's "Add your architecture" edit too
SWIGLU = [
    ("        self.fc = nn.Parameter(torch.empty(cfg.mlp_mult * dim, dim).uniform_(-bound, bound))",
     "        self.fc = nn.Parameter(torch.empty(2 * (cfg.mlp_mult * dim * 2 // 3), dim).uniform_(-bound, bound))"),
    ("        self.proj = nn.Parameter(torch.zeros(dim, cfg.mlp_mult * dim))",
     "        self.proj = nn.Parameter(torch.zeros(dim, cfg.mlp_mult * dim * 2 // 3))"),
    ("        return x + relu2_mlp(norm(x), self.fc, self.proj)",
     "        gate, up = (norm(x) @ self.fc.T).chunk(2, dim=-1)\n        return x + (F.silu(gate) * up) @ self.proj.T"),
]
# (name, flags, edits, what it means); a term multiplied by 0 keeps its parameters in the graph (zero gradients)
IDEAS = [
    ("stack", "", [], "everything on: the reference"),
    ("no value embeddings", "--value-embed-layers=", [], "no layer adds a value embedding of the token"),
    ("no bigram hash", "", [("            x = a * x + b * x0 + c * bigram",
                             "            x = a * x + b * x0 + 0 * c * bigram")],
     "the hashed (previous token, token) embedding is not added to the residual stream"),
    ("no smear", "", [("        e = e + self.smear_lambda * torch.sigmoid(",
                       "        e = e + 0 * self.smear_lambda * torch.sigmoid(")],
     "a token's embedding takes no share of the previous token's"),
    ("no U-net skips", "", [("                x = x + self.skip_weights[L - 1 - i] * skips.pop()",
                             "                x = x + 0 * self.skip_weights[L - 1 - i] * skips.pop()")],
     "the second half's blocks get no skip from the first half's"),
    ("no multi-token prediction", "@mtp", [], "the next-token loss alone in every stage"),
    ("no softcap", "--softcap=[4000,0,1000]", [],
     "logits 4000 * sigmoid(z / 1000) = 2000 + z - z^3 / 1.2e7 + ...: z shifted by a constant (softmax-invariant), "
     "the cubic term 2e-3 at |z| = 30"),
    ("full attention", "@windows", [], "every layer's window is the stage's document length (no sliding windows)"),
    ("no YaRN", "", [("        self.attn_scale.mul_(self.rotary.yarn(old_window, new_window))",
                      "        pass  # ablation: the window grows, its rotary frequencies and attention scale do not")],
     "windows grow without stretching the rotary frequencies or the attention scale"),
    ("tied throughout", "--untie-frac=1", [], "embedding and lm_head share weights for the whole run (no untie step)"),
    ("Adam for the matrices", "", [('    return {"attn": muon(), "mlp_fc": muon(), "mlp_proj": muon(4.0),',
                                    '    return {"attn": adam((0.9, 0.95)), "mlp_fc": adam((0.9, 0.95)), '
                                    '"mlp_proj": adam((0.9, 0.95)),')],
     "the blocks' matrices train with Adam (0.9, 0.95) at Adam's lr instead of NorMuon"),
    ("SwiGLU MLP", "", SWIGLU, "a gated MLP of the same size instead of ReLU^2"),
    ("no document masking", "", [("    starts = [s for a, b in zip([0] + doc_start, doc_start + [T]) for s in range(a, b, max_doc_len)]",
                                  "    starts = list(range(0, T, max_doc_len))  # ablation: attention crosses documents")],
     "attention segments ignore document starts (smear and bigram still restart at BOS)"),
]
PEERS = [("gpt2-adamw", "models/gpt2-adamw/train_gpt2.py"), ("nanochat", "models/nanochat/train_nanochat.py"),
         ("modded-nanogpt", "models/modded-nanogpt/train_modded.py"), ("llama", "models/llama/train_llama.py")]


def edited(source, edits, name):
    """source with each (old, new) replaced; an old that is not there exactly once is an error naming the idea."""
    for old, new in edits:
        if source.count(old) != 1:
            raise ablate.AblateError(f"{name}: its edit no longer applies to the stack ({source.count(old)} matches "
                                     f"for {old.strip()[:60]!r}): update bench/ablations.py")
        source = source.replace(old, new)
    return source


def stages_flag(stack, preset, change):
    """--stages=JSON of the preset's stages, each changed by change(stage dict)."""
    stages = stack.PRESETS[preset].get("stages", stack.Config().stages)
    return "--stages=" + json.dumps([list(change(stack.dataclasses.asdict(s)).values()) for s in stages],
                                    separators=(",", ":"))


def variants(out, preset="cpu", only=None, peers=True):
    """ablate.py --variant values: the ideas (edited copies written to OUT/stacks/), then the peers."""
    stack = load_stack()
    generated = {  # flags that depend on the preset's stages
        "@mtp": stages_flag(stack, preset, lambda s: {**s, "mtp_start": [1.0], "mtp_end": [1.0]}),
        "@windows": stages_flag(stack, preset, lambda s: {**s, "short_window": s["max_doc_len"],
                                                          "long_window": s["max_doc_len"]}),
    }
    with open(stack.__file__, encoding="utf-8") as f:
        source = f.read()
    os.makedirs(os.path.join(out, "stacks"), exist_ok=True)
    chosen = []
    for name, flags, edits, _ in IDEAS:
        if only and name not in only:
            continue
        script = ""
        if edits:
            script = os.path.join(out, "stacks", name.replace(" ", "_").replace("^", "") + ".py")
            with open(script, "w", encoding="utf-8") as f:
                f.write(edited(source, edits, name))
        chosen.append(f"{name}={script} {generated.get(flags, flags)}".strip())
    for name, path in PEERS if peers else []:
        if (not only or name in only) and os.path.isfile(os.path.join(ROOT, path)):
            chosen.append(f"{name}={os.path.join(ROOT, path)}")
    return chosen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="a prepared data directory (data/prepare.py)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--preset", default="cpu", help="every run's preset (the peers' too)")
    ap.add_argument("--train-tokens", type=int, default=0, help="every run's training tokens (0: the preset's)")
    ap.add_argument("--only", default="", help="comma-separated names of the rows to run (default: all)")
    ap.add_argument("--no-peers", action="store_true", help="the stack's ideas only")
    ap.add_argument("--flags", default="", help="more flags for every run, after those above")
    ap.add_argument("--out", default="runs/ablations")
    args = ap.parse_args(argv)
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    try:
        chosen = variants(os.path.abspath(args.out), args.preset, only, not args.no_peers)
    except ablate.AblateError as e:
        sys.exit(f"error: {e}")
    flags = f"--preset {args.preset} --core-max-per-task 0" + (f" --train-tokens {args.train_tokens}" if args.train_tokens
                                                                else "") + (f" {args.flags}" if args.flags else "")
    ablate.main(["--data-dir", args.data_dir, "--seeds", str(args.seeds), "--out", args.out, "--flags", flags,
                 *(x for v in chosen for x in ("--variant", v))])


if __name__ == "__main__":
    main()
