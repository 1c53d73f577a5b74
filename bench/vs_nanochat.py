"""This stack against nanochat itself, on one machine in one run: the same pretraining text and tokenizer size, models
of the same depth and width trained on the same tokens; val bpb over every val token, training tok/s, CORE
examples/s, decoding tok/s and SFT tok/s for both. One table and a last summary line (ratios ours / nanochat).

    python bench/vs_nanochat.py --nanochat-dir DIR [--nanochat-python PATH] [--data-dir runs/data] [--steps 150]
                                [--sft-steps 40] [--core-per-task 20] [--out DIR]

DIR is a checkout of karpathy/nanochat, run as it is (never copied here) with NANOCHAT_BASE_DIR set to a fresh
folder under --out (a temporary directory by default), which this script first fills in nanochat's layouts from the
sources of --data-dir: base_data_climbmix/shard_00000.parquet holds the training documents of our prepared shards
(cut and shuffled as data/pretrain_shards.py did; checked against the first tokens of our train shard) and the last
shard the val documents; eval_bundle/ the CORE tasks (our stand-ins for the three absent files written under the
names core.yaml gives); task_data/ our SFT conversations as the hub tables chat_sft reads (smol-smoltalk: all but
GSM8K; openai/gsm8k: GSM8K's), so nothing is downloaded. Each side then runs as a subprocess, one at a time:

    ours      decoderstack_small_pt-eval-sft.py --preset cpu --phases pt (--train-tokens steps x 4,096), then CORE
              and the engine in this process from its checkpoint, then --phases sft (--sft-steps x 4,096 tokens)
    nanochat  scripts.tok_train --vocab-size 8192; scripts.base_train --depth 4 --aspect-ratio 48 --head-dim 64
              --window-pattern SSSL --max-seq-len 512 --device-batch-size 8 --total-batch-size 4096 --num-iterations
              steps; scripts.base_eval --eval core --max-per-task N; a probe (PROBE, below) that calls nanochat's
              evaluate_bpb and Engine on its checkpoint; scripts.chat_sft --num-iterations sft-steps

Both models: 4 layers, width 192, 3 heads of 64, windows 128 / 512 with the last layer full, 4,096 tokens a step.
Training tok/s is each script's own measure: ours over every step (the cpu preset runs eager), nanochat's after its
first 10 steps (as its log's total time; the first compiles). val bpb: ours scores each target from the tokens before
it in its document piece (at most 512) in rows of 4,096; nanochat's probe, from the tokens before it in its row of
the model's 512-token context, the val stream cut into such rows (the model compiled, as base_train evaluates it).
CORE: the same first N examples of each task (both shuffle with Random(1337)), ours packed from pre-tokenized data,
nanochat's rendered, tokenized and forwarded one example at a time as its base_eval does; nanochat draws the few
shots among those N (hence N above 10), ours among all of the task's examples. Decoding: each engine samples
(temperature 1, top-k 50) --new-tokens tokens a row after the same text cut to --prompt-tokens tokens, timed from the
prefill on, the fastest of --repeats runs; ours with compiled steps (--no-decode-compile: eager; nanochat's engine
runs eager, it has no compiled path).

Time to target: the fewest steps at which our cpu preset, its schedule rescaled to that many steps (as a record
shortens its schedule), ends at or below nanochat's final val bpb, found by fresh runs (steps_to_target: to 5% of the
steps) against nanochat's time for its --steps steps. Both times count every step with its compile, and no evaluation:
ours is the run's pt_train_time_s + pt_compile_time_s (the cpu preset runs eager: no compile), nanochat's the sum of
base_train's per-step dt, the first steps' compile included (its own "Total training time" leaves out steps 0-10).
About 31 minutes on 2 cores with the defaults (2026-12-06): 15 for the table (the cpu preset's 150 + 40 steps), 15
for the time to target's ~5 shorter pretraining runs (each ~2 minutes with its full val evaluation).
Timings vary +-30% on shared machines: run it alone; the log warns when other processes took CPU time during a
part, and the table's first line says how much in all.
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STACK = os.path.join(ROOT, "decoderstack_small_pt-eval-sft.py")
sys.path[:0] = [ROOT, os.path.join(ROOT, "data")]  # load_stack.py and the data writers, when imported by path (the tests)

STEP_TOKENS = 4096  # tokens per optimizer step on both sides: the cpu preset's, pretraining and SFT
NANOCHAT_MODEL = ["--depth", "4", "--aspect-ratio", "48", "--head-dim", "64", "--max-seq-len", "512", "--device-batch-size", "8"]
NANOCHAT_FILES = ("scripts/base_train.py", "scripts/base_eval.py", "scripts/tok_train.py", "scripts/chat_sft.py",
                  "nanochat/engine.py", "nanochat/loss_eval.py", "nanochat/dataset.py", "tasks/common.py")
PROMPT_TEXT = ("The history of science is the study of the development of science, including both the natural and "
               "social sciences. Science is a body of empirical, theoretical, and practical knowledge about the "
               "natural world, produced by scientists who observe, explain and predict. ") * 64

# Run with nanochat's Python in the checkout, argv[1] a JSON object: parameter counts, val bpb over every val target
# once (nanochat's evaluate_bpb on rows of the model's context, the model compiled as base_train's evaluations run it;
# the padding after the last target has -1 targets, which it skips) and the engine's best tok/s of `repeats` runs.
# The last line of stdout is one JSON object.
PROBE = r"""
import json, sys, time
import pyarrow.parquet as pq
import torch
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
device = torch.device("cpu")
model, tok, meta = load_model("base", device, phase="eval", model_tag=args["model_tag"])
out = {"params": sum(p.numel() for p in model.parameters()), "params_matrix": model.num_scaling_params()["transformer_matrices"]}
bos, T = tok.get_bos_token_id(), meta["model_config"]["sequence_len"]
docs = pq.read_table(args["val"], columns=["text"]).column("text").to_pylist()
stream = torch.tensor([t for ids in tok.encode(docs, prepend=bos) for t in ids])
n = len(stream) - 1
rows = -(-n // T)
inputs, targets = torch.full((rows * T,), bos), torch.full((rows * T,), -1)
inputs[:n], targets[:n] = stream[:-1], stream[1:]
inputs, targets = inputs.view(rows, T), targets.view(rows, T)
batches = [(inputs[i:i + 8], targets[i:i + 8]) for i in range(0, rows, 8)]
if len(batches[-1][0]) < 8:  # pad the last batch to the others' shape: one compiled graph
    pad = 8 - len(batches[-1][0])
    batches[-1] = (torch.cat([batches[-1][0], torch.full((pad, T), bos)]), torch.cat([batches[-1][1], torch.full((pad, T), -1)]))
token_bytes = get_token_bytes(device)
t0 = time.perf_counter()
out["val_bpb"] = evaluate_bpb(torch.compile(model, dynamic=False), batches, len(batches), token_bytes)
out["val_seconds"] = time.perf_counter() - t0
out["val_bytes"] = int(token_bytes[stream[1:]].sum())
engine = Engine(model, tok)
prompt = tok.encode(args["prompt_text"], prepend=bos)[:args["prompt_tokens"]]
for b in args["batch_sizes"]:
    for _ in engine.generate(prompt, num_samples=b, max_tokens=8, temperature=1.0, top_k=50):
        pass  # warm-up
    for _ in range(args["repeats"]):
        t0, steps = time.perf_counter(), 0
        for _ in engine.generate(prompt, num_samples=b, max_tokens=args["new_tokens"], temperature=1.0, top_k=50):
            steps += 1  # every row computes every step, done or not: all rows count
        rate = b * steps / (time.perf_counter() - t0)
        if rate > out.get(f"decode_tok_s@{b}", 0):
            out[f"decode_tok_s@{b}"], out[f"decode_steps@{b}"] = rate, steps
print(json.dumps(out))
"""


class StepFailed(Exception):
    """A subprocess of one side failed; the message holds its log's tail."""


# ---------------------------------------------------------------------------------------------------------------
# The table (pure: canned inputs in tests/test_vs_nanochat.py)

def metric_rows(batch_sizes, core_per_task):
    """(key, label, format, summary name or None) of each table row; rows with a summary name are ratios worth a
    headline. CORE's value gets no ratio: a centered score near chance can be negative or zero."""
    return [
        ("params", "parameters", "{:,.0f}", None),
        ("params_matrix", "block matrix parameters", "{:,.0f}", None),
        ("train_tokens", "training tokens", "{:,.0f}", None),
        ("val_bpb", "val bpb, every val token (lower is better)", "{:.4f}", "val bpb"),
        ("train_tok_s", "pretraining tok/s", "{:,.0f}", "pretraining tok/s"),
        ("core", f"CORE ({core_per_task} per task)" if core_per_task > 0 else "CORE (every example)", "{:.4f}", None),
        ("core_examples_s", "CORE examples/s", "{:.2f}", "CORE examples/s"),
        *[(f"decode_tok_s@{b}", f"decoding tok/s, batch {b}", "{:,.0f}", f"decoding tok/s at batch {b}") for b in batch_sizes],
        ("sft_tok_s", "SFT tok/s", "{:,.0f}", "SFT tok/s"),
        ("train_s", "pretraining s, every step (compile in)", "{:,.1f}", None),
        ("target_steps", "steps to nanochat's final val bpb", "{:,.0f}", None),
        ("target_s", "seconds to nanochat's final val bpb", "{:,.1f}", "time to nanochat's bpb"),
    ]


def ratio(ours, theirs):
    """ours / theirs, or None when either is missing or theirs is 0."""
    return ours / theirs if ours is not None and theirs else None


def table(ours, theirs, rows):
    """Lines of the table of dicts `ours` and `theirs` (key -> number; a missing key or None prints n/a) over `rows`
    (metric_rows), then one `summary:` line of the headline ratios."""
    show = lambda fmt, v: "n/a" if v is None else fmt.format(v)
    width = max(len(label) for _, label, _, _ in rows)
    lines = [f"{'':<{width}} {'decoderstack':>13} {'nanochat':>13} {'ours/nanochat':>14}"]
    for key, label, fmt, headline in rows:
        a, b = ours.get(key), theirs.get(key)
        r = ratio(a, b) if key != "core" else None
        lines.append(f"{label:<{width}} {show(fmt, a):>13} {show(fmt, b):>13} {show('{:.2f}x', r):>14}")
    parts = [f"{name} {show('{:.2f}x', ratio(ours.get(key), theirs.get(key)))}" for key, _, _, name in rows if name]
    lines.append("summary: ours/nanochat " + ", ".join(parts) + " (bpb: below 1 is better; speeds: above 1 is faster)")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Running things

def run(cmd, log_path, cwd=ROOT, env=None):
    """Run cmd with stdout and stderr into log_path; its text, or StepFailed with the tail of the log."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd[:3]) + (" ..." if len(cmd) > 3 else "") + "\n")
        log.flush()
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    with open(log_path) as f:
        text = f.read()
    if code:
        raise StepFailed(f"{os.path.basename(log_path)}: exit {code}\n{text[-3000:]}")
    return text


class Progress:
    def __init__(self):
        self.t0 = time.time()

    def elapsed(self):
        return time.time() - self.t0

    def __call__(self, msg):
        print(f"[{time.time() - self.t0:5.0f}s] {msg}", file=sys.stderr, flush=True)


def others_cpu_seconds():
    """CPU seconds the machine has spent outside this process and the children it waited for (Linux /proc/stat;
    None elsewhere): what other work took from the timings."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _, _, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    t = os.times()
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK") - (t.user + t.system + t.children_user + t.children_system)


def attempt(out, progress, name, fn):
    """out.update(fn()); a failed part leaves its numbers missing (n/a) and says why, the others still run (a bug
    or a changed API in the stack, which runs in this process, included: minutes of the other parts are not lost).
    Other processes' CPU time during the part is added to out["others_cpu_s"] and said when it is large."""
    progress(name)
    t0, others0 = time.time(), others_cpu_seconds()
    try:
        out.update(fn())
    except StepFailed as e:
        progress(f"error: {name} failed: {e}")
        out.setdefault("failed", []).append(name)
    except Exception:
        progress(f"error: {name} failed:\n{traceback.format_exc()[-3000:]}")
        out.setdefault("failed", []).append(name)
    if others0 is not None:
        others = others_cpu_seconds() - others0
        out["others_cpu_s"] = out.get("others_cpu_s", 0.0) + others
        if others > 0.1 * (time.time() - t0) * os.cpu_count():
            progress(f"warning: other processes took {others:.0f} CPU-s of {(time.time() - t0) * os.cpu_count():.0f} during it: its timings are low")


def step_times(log_text, skip=10):
    """dt (seconds) of nanochat's training step lines numbered above `skip`: both scripts add dt to their total
    training time only from there (the first steps compile and warm up)."""
    return [float(dt) / 1000 for step, dt in re.findall(r"^step (\d+)\D.*?\| dt: ([\d.]+)ms", log_text, re.M) if int(step) > skip]


def steps_to_target(bpb_at, target, max_steps, measured=None, min_steps=3, tolerance=0.05):
    """The fewest pretraining steps whose run (the cpu preset's schedule rescaled to that many steps, as a record
    shortens it) ends at or below `target` val bpb, to within `tolerance` x the steps. max_steps must reach it (else
    None); then a quarter of the passing count until one misses; then regula falsi in log steps (bpb falls about
    linearly in log tokens at this scale), each guess kept inside the middle 80% of the bracket so that it shrinks.
    bpb_at(steps) runs one; `measured` ({steps: bpb}) saves reruns. Returns (steps or None, {steps: bpb} of all)."""
    runs = dict(measured or {})

    def misses(steps):
        if steps not in runs:
            runs[steps] = bpb_at(steps)
        return runs[steps] > target

    if misses(max_steps):
        return None, runs
    hi, lo = max_steps, None
    while lo is None:  # hi passes; find a count that misses
        steps = max(min_steps, hi // 4)
        if steps == hi:
            return hi, runs
        lo, hi = (steps, hi) if misses(steps) else (None, steps)
    while hi - lo > max(1, tolerance * hi):
        a, b = math.log(lo), math.log(hi)
        x = a + (b - a) * (runs[lo] - target) / (runs[lo] - runs[hi])  # runs[lo] > target >= runs[hi]
        x = min(max(x, a + 0.1 * (b - a)), b - 0.1 * (b - a))
        steps = min(max(round(math.exp(x)), lo + 1), hi - 1)
        lo, hi = (steps, hi) if misses(steps) else (lo, steps)
    return hi, runs


# ---------------------------------------------------------------------------------------------------------------
# nanochat's NANOCHAT_BASE_DIR, filled from the sources of our prepared data

def source_path(path):
    """A path in one of our manifests: absolute, or relative to where data/prepare.py ran (the repo root, usually)."""
    for candidate in (path, os.path.join(ROOT, path)):
        if os.path.exists(candidate):
            return candidate
    sys.exit(f"error: {path} (named in the data directory's manifest) not found")


def pretrain_documents(data_dir):
    """(train documents in our train shards' order, val documents) of a prepared data directory, rebuilt from the
    text its manifest names exactly as data/pretrain_shards.py built them, and checked against our shards."""
    import numpy as np
    from pretrain_shards import documents
    from tokenizer import Tokenizer
    with open(os.path.join(data_dir, "pretrain", "manifest.json")) as f:
        m = json.load(f)
    files = {split: [source_path(p) for p in m["sources"][split]] for split in ("train", "val")}
    train, val = (list(documents(files[s], m["max_doc_chars"], [0] * len(files[s]))) for s in ("train", "val"))
    if m["seed"] is not None:  # pretrain_shards.shuffled: one permutation of the document indices
        order = list(range(len(train)))
        random.Random(m["seed"]).shuffle(order)
        train = [train[i] for i in order]
    counts = {s: sum(x["n_docs"] for x in m["shards"] if x["split"] == s) for s in ("train", "val")}
    if (len(train), len(val)) != (counts["train"], counts["val"]):
        sys.exit(f"error: rebuilt {len(train)} train / {len(val)} val documents, {data_dir}/pretrain holds "
                 f"{counts['train']} / {counts['val']}: its sources changed since it was prepared")
    tok = Tokenizer.load(os.path.join(data_dir, "tokenizer"))
    head = [t for d in train[:3] for t in (tok.bos_id, *tok.encode(d))]
    first = next(x["file"] for x in m["shards"] if x["split"] == "train")
    stored = np.fromfile(os.path.join(data_dir, "pretrain", first), dtype="<u2" if tok.vocab_size <= 65536 else "<u4",
                         offset=256 * 4, count=len(head))
    if stored.tolist() != head:
        sys.exit(f"error: the rebuilt training documents do not start as {first} does: not the same order")
    return train, val


def write_parquet(path, columns, row_group_size=1024):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def hub_table(base, repo, subset, split, columns):
    """One table where tasks/common.py's load_hub_dataset looks before downloading: its manifest says it is there."""
    folder = os.path.join(base, "task_data", repo.replace("/", "--"), subset, split)
    os.makedirs(folder)
    write_parquet(os.path.join(folder, "00000.parquet"), columns)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(["00000.parquet"], f)


def sft_tables(base, data_dir):
    """Our SFT conversations (rebuilt from the sources of DATA/sft as data/sft_shards.py split them) as the tables
    chat_sft reads: GSM8K's records as openai/gsm8k (nanochat renders their calculator calls as we do), the rest as
    smol-smoltalk; MMLU's test table empty (only its val mixture reads it, and the bench sets no val tokens)."""
    import pyarrow as pa
    from common import read_records
    from sft_shards import check_conversation, split_of, to_conversations
    with open(os.path.join(data_dir, "sft", "manifest.json")) as f:
        m = json.load(f)
    chats, gsm8k = {"train": [], "val": []}, {"train": [], "val": []}
    for source in m["sources"]:
        for _, rec in read_records(source_path(source["file"])):
            for messages in to_conversations(rec):
                split = split_of(check_conversation(messages), 5)  # data/prepare.py's --val-percent
                if "question" in rec and "answer" in rec:
                    gsm8k[split].append({"question": rec["question"], "answer": rec["answer"]})
                else:
                    chats[split].append([{"role": x["role"], "content": x["content"]} for x in messages])
    n = {s: len(chats[s]) + len(gsm8k[s]) for s in chats}
    if n != {s: m["splits"][s]["n_convs"] for s in n}:
        sys.exit(f"error: rebuilt {n} SFT conversations, {data_dir}/sft holds another split")
    for ours, theirs in (("train", "train"), ("val", "test")):
        hub_table(base, "HuggingFaceTB/smol-smoltalk", "default", theirs, {"messages": chats[ours]})
        hub_table(base, "openai/gsm8k", "main", theirs, {k: [r[k] for r in gsm8k[ours]] for k in ("question", "answer")})
    hub_table(base, "cais/mmlu", "all", "test", {"question": pa.array([], pa.string()), "choices": pa.array([], pa.list_(pa.string())),
                                                 "answer": pa.array([], pa.int64()), "subject": pa.array([], pa.string())})
    return {"sft_train_convs": n["train"]}


def fill_base_dir(base, data_dir, core_bundle):
    """NANOCHAT_BASE_DIR's inputs: pretraining parquet shards, the CORE eval bundle, the SFT tables. Returns facts
    the runs need: val shard path, per-task CORE row counts, document counts."""
    from core_shards import load_task, read_config
    train, val = pretrain_documents(data_dir)
    shards = os.path.join(base, "base_data_climbmix")  # nanochat/dataset.py's DATA_DIR: sorted shards, the last is val
    os.makedirs(shards)
    write_parquet(os.path.join(shards, "shard_00000.parquet"), {"text": train})
    write_parquet(os.path.join(shards, "shard_00001.parquet"), {"text": val})
    bundle = os.path.join(base, "eval_bundle")
    for name in ("core.yaml", "eval_meta_data.csv"):
        os.makedirs(bundle, exist_ok=True)
        shutil.copyfile(os.path.join(core_bundle, name), os.path.join(bundle, name))
    core_rows = {}
    for spec in read_config(core_bundle):  # each task under the name core.yaml gives it, stand-ins included
        rows, _, _ = load_task(core_bundle, spec)
        path = os.path.join(bundle, "eval_data", spec["dataset"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for _, row in rows)
        core_rows[spec["label"]] = len(rows)
    return {"val_shard": os.path.join(shards, "shard_00001.parquet"), "core_rows": core_rows, "train_docs": len(train),
            "val_docs": len(val), "val_bytes": sum(len(d.encode("utf-8")) for d in val), **sft_tables(base, data_dir)}


# ---------------------------------------------------------------------------------------------------------------
# The two sides

def ours_pretrain(args, run_dir, log_path, steps):
    """metrics.json of a fresh cpu-preset pretraining run of `steps` steps (the schedule rescaled to them), a subprocess."""
    run([sys.executable, STACK, "--preset", "cpu", "--data-dir", args.data_dir, "--run-dir", run_dir, "--wandb",
         "disabled", "--phases", "pt", "--train-tokens", str(steps * STEP_TOKENS)], log_path,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def pretrain_seconds(metrics):
    """A run's pretraining time as the stack reports it: every step, compile included, evaluation pauses not."""
    return metrics["pt_train_time_s"] + metrics["pt_compile_time_s"]


def run_ours(args, work, progress):
    """Numbers of this stack: pt as a subprocess, CORE and decoding in this process from its checkpoint, then SFT."""
    out, run_dir = {}, os.path.join(work, "ours")
    stack_cmd = [sys.executable, STACK, "--preset", "cpu", "--data-dir", args.data_dir, "--run-dir", run_dir,
                 "--wandb", "disabled"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    def pretrain():
        m = ours_pretrain(args, run_dir, os.path.join(work, "ours_pt.log"), args.steps)
        return {"params": m["params"], "params_matrix": m["params_matrix"], "train_tokens": m["train_tokens"],
                "val_bpb": m["val_bpb"], "train_tok_s": m["tok_per_s"], "train_s": pretrain_seconds(m)}

    def core_and_decoding():
        import numpy as np
        import torch
        from load_stack import load_stack
        torch.set_num_threads(args.threads)
        stack = load_stack()
        cfg = stack.parse_config(["--preset", "cpu", "--data-dir", args.data_dir, "--init-from", stack.latest_checkpoint(run_dir)])
        rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
        tok = stack.Tokenizer(os.path.join(args.data_dir, "tokenizer"))
        model, _, _ = stack.trained_model(cfg, rt)
        windows = model.windows()
        core = stack.load_core(args.data_dir, tok)
        t0 = time.perf_counter()
        result = stack.evaluate_core(model, core, rt, windows, args.core_per_task, cfg.core_batch_tokens)
        seconds = time.perf_counter() - t0
        numbers = {"core": result["core"], "core_examples_s": int((np.asarray(result["correct"]) >= 0).sum()) / seconds}
        engine = stack.Engine(model, tok, windows, rt, compile=args.decode_compile)  # compiled: the warm-ups compile
        engine.stops = set()  # every row runs full length
        prompt = [tok.bos_id, *tok.encode(PROMPT_TEXT)][:args.prompt_tokens]
        for b in args.batch_sizes:
            engine.generate([prompt], b, 8, temperature=1.0, top_k=50)  # warm-up
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                samples = engine.generate([prompt], b, args.new_tokens, temperature=1.0, top_k=50)[0]
                rate = sum(len(s.tokens) for s in samples) / (time.perf_counter() - t0)
                numbers[f"decode_tok_s@{b}"] = max(rate, numbers.get(f"decode_tok_s@{b}", 0))
        return numbers

    def sft():
        run(stack_cmd + ["--phases", "sft", "--sft-steps", str(args.sft_steps), "--sft-batch-tokens", str(STEP_TOKENS)],
            os.path.join(work, "ours_sft.log"), env=env)
        with open(os.path.join(run_dir, "metrics.json")) as f:
            m = json.load(f)
        return {"sft_tok_s": m["sft_steps"] * STEP_TOKENS / m["sft_train_time_s"]}

    attempt(out, progress, f"ours: pt, {args.steps} steps x {STEP_TOKENS:,} tokens", pretrain)
    if "train_tok_s" in out:
        attempt(out, progress, f"ours: CORE ({args.core_per_task} per task) and decoding", core_and_decoding)
        attempt(out, progress, f"ours: sft, {args.sft_steps} steps x {STEP_TOKENS:,} tokens", sft)
    return out


def preset_steps(steps):
    """The steps the cpu preset takes for --train-tokens steps x 4,096: each stage rescaled and rounded (47 -> 48)."""
    from load_stack import load_stack
    stack = load_stack()
    return stack.total_steps(stack.scaled_stages(stack.parse_config(["--preset", "cpu", "--train-tokens",
                                                                     str(steps * STEP_TOKENS)])))


def time_to_target(args, work, ours, target, progress):
    """Our steps and seconds to nanochat's final val bpb: steps_to_target over fresh cpu-preset runs, each scoring every
    val token at its end, the run of --steps steps (ours) reused, a count that the preset rounds to one already run
    not run again; each run's time is pretrain_seconds', its steps those it took."""
    done = {preset_steps(args.steps): (ours["val_bpb"], ours["train_s"])}  # steps taken -> (val bpb, seconds)

    def bpb_at(steps):
        taken = preset_steps(steps)
        if taken not in done:
            m = ours_pretrain(args, os.path.join(work, f"ours_{taken}_steps"), os.path.join(work, f"ours_pt_{taken}.log"),
                              steps)
            done[taken] = m["val_bpb"], pretrain_seconds(m)
            progress(f"ours: {taken} steps: val bpb {m['val_bpb']:.4f} in {done[taken][1]:.1f} s (nanochat's: {target:.4f})")
        return done[taken][0]

    steps, runs = steps_to_target(bpb_at, target, args.steps, {args.steps: ours["val_bpb"]})
    if steps is None:
        progress(f"ours: {args.steps} steps end at val bpb {ours['val_bpb']:.4f}, above nanochat's {target:.4f}")
        return {}
    return {"target_steps": preset_steps(steps), "target_s": done[preset_steps(steps)][1], "target_runs": len(done)}


def run_nanochat(args, work, facts, progress):
    """Numbers of nanochat's own scripts (and PROBE) with NANOCHAT_BASE_DIR = work/nanochat_base."""
    out, py = {}, args.nanochat_python
    env = {**os.environ, "NANOCHAT_BASE_DIR": os.path.join(work, "nanochat_base"), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONDONTWRITEBYTECODE": "1", "WANDB_MODE": "disabled",  # nothing written into the checkout
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # compile in the process: no worker pool that others_cpu_seconds can't see
    script = lambda name, *flags: run([py, "-m", f"scripts.{name}", *flags], os.path.join(work, f"nanochat_{name}.log"),
                                      cwd=args.nanochat_dir, env=env)

    def pretrain():
        text = script("base_train", "--device-type", "cpu", *NANOCHAT_MODEL, "--window-pattern", args.window_pattern,
                      "--total-batch-size", str(STEP_TOKENS), "--num-iterations", str(args.steps), "--eval-every", "-1",
                      "--core-metric-every", "-1", "--sample-every", "-1")
        dts, every = step_times(text), step_times(text, skip=-1)  # tok/s as base_train's; its time, every step
        tokens = re.search(r"Total number of training tokens: ([\d,]+)", text)
        return {"train_tokens": int(tokens.group(1).replace(",", "")), "train_tok_s": STEP_TOKENS * len(dts) / sum(dts),
                "train_s": sum(every), "target_steps": len(every), "target_s": sum(every)}

    def core():
        text = script("base_eval", "--device-type", "cpu", "--eval", "core", "--max-per-task", str(args.core_per_task))
        seconds = sum(float(t) for t in re.findall(r"\| time: ([\d.]+)s", text))  # per task: render, tokenize, forward
        n = sum(min(rows, args.core_per_task) if args.core_per_task > 0 else rows for rows in facts["core_rows"].values())
        return {"core": float(re.search(r"CORE metric: (-?[\d.]+)", text).group(1)), "core_examples_s": n / seconds}

    def probe():
        spec = {"model_tag": "d4", "val": facts["val_shard"], "threads": args.threads, "prompt_text": PROMPT_TEXT,
                "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch_sizes": args.batch_sizes,
                "repeats": args.repeats}
        text = run([py, "-c", PROBE, json.dumps(spec)], os.path.join(work, "nanochat_probe.log"), cwd=args.nanochat_dir, env=env)
        numbers = json.loads(text.strip().splitlines()[-1])
        if numbers["val_bytes"] != facts["val_bytes"]:
            progress(f"warning: nanochat's val targets hold {numbers['val_bytes']:,} bytes, the val text {facts['val_bytes']:,}")
        for b in args.batch_sizes:
            if numbers[f"decode_steps@{b}"] < args.new_tokens:
                progress(f"note: nanochat's engine stopped batch {b} after {numbers[f'decode_steps@{b}']} tokens "
                         "(every row sampled <|bos|>); its tok/s counts the steps it ran")
        return numbers

    def sft():
        # batch geometry and learning rates come from the base checkpoint (512 x 8 rows = 4,096 tokens a step)
        text = script("chat_sft", "--device-type", "cpu", "--num-iterations", str(args.sft_steps), "--eval-every", "-1",
                      "--eval-tokens", "0", "--chatcore-every", "-1", "--mmlu-epochs", "0", "--gsm8k-epochs", "1")
        dts = step_times(text)
        return {"sft_tok_s": STEP_TOKENS * len(dts) / sum(dts)}

    def tokenizer():
        script("tok_train", "--vocab-size", "8192")  # on the train shards, nanochat's defaults otherwise
        return {}

    attempt(out, progress, "nanochat: tok_train, vocab 8192", tokenizer)
    if "failed" not in out:
        attempt(out, progress, f"nanochat: base_train, {args.steps} steps x {STEP_TOKENS:,} tokens", pretrain)
    if "train_tok_s" in out:
        attempt(out, progress, f"nanochat: base_eval CORE ({args.core_per_task} per task)", core)
        attempt(out, progress, "nanochat: probe (val bpb, parameters, decoding)", probe)
        attempt(out, progress, f"nanochat: chat_sft, {args.sft_steps} steps x {STEP_TOKENS:,} tokens", sft)
    return out


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanochat-dir", required=True, help="a checkout of karpathy/nanochat (read, never written)")
    parser.add_argument("--nanochat-python", default=sys.executable,
                        help="a Python with nanochat's dependencies (torch, rustbpe, tiktoken, pyarrow, jinja2, pyyaml, filelock, psutil)")
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "runs", "data"), help="prepared by data/prepare.py (pretrain/, core/, sft/)")
    parser.add_argument("--core-bundle", default=os.path.join(ROOT, "..", "shared", "data", "eval", "core"),
                        help="the CORE tasks (core.yaml, eval_meta_data.csv, task files) for nanochat's eval bundle")
    parser.add_argument("--steps", type=int, default=150, help=f"pretraining steps of {STEP_TOKENS:,} tokens on both sides")
    parser.add_argument("--sft-steps", type=int, default=40, help=f"SFT steps of {STEP_TOKENS:,} tokens on both sides")
    parser.add_argument("--core-per-task", type=int, default=20,
                        help="CORE examples per task (0: all); above the largest few-shot count, which nanochat draws from these")
    parser.add_argument("--window-pattern", default="SSSL", help="nanochat's --window-pattern (SSSL: short windows but the last layer, as ours)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,16", help="decoding batch sizes, comma-separated")
    parser.add_argument("--decode-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="our engine with compiled decode steps (the stack's --decode-compile); nanochat's has none")
    parser.add_argument("--time-to-target", action=argparse.BooleanOptionalAction, default=True,
                        help="after both sides: our fewest steps (and seconds) to nanochat's final val bpb (~5 more runs)")
    parser.add_argument("--repeats", type=int, default=3, help="decoding runs per batch size; the fastest counts (shared machines)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides")
    parser.add_argument("--out", help="keep the runs and logs here (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    missing = [f for f in NANOCHAT_FILES if not os.path.isfile(os.path.join(args.nanochat_dir, f))]
    if missing:
        parser.error(f"--nanochat-dir {args.nanochat_dir}: not a nanochat checkout (no {missing[0]})")
    if not (os.path.isfile(args.nanochat_python) and os.access(args.nanochat_python, os.X_OK)):
        parser.error(f"--nanochat-python {args.nanochat_python}: not an executable file")
    for part in ("pretrain/manifest.json", "core/manifest.json", "sft/manifest.json", "tokenizer/tokenizer.json"):
        if not os.path.isfile(os.path.join(args.data_dir, part)):
            parser.error(f"--data-dir {args.data_dir}: no {part} (prepare it with data/prepare.py)")
    if not os.path.isfile(os.path.join(args.core_bundle, "core.yaml")):
        parser.error(f"--core-bundle {args.core_bundle}: no core.yaml")
    from core_shards import read_config
    shots = max(spec["num_fewshot"] for spec in read_config(args.core_bundle))
    if 0 < args.core_per_task <= shots:  # nanochat's core_eval samples a task's shots among its first N examples only
        parser.error(f"--core-per-task {args.core_per_task}: nanochat needs more than the largest few-shot count ({shots}), or 0 (all)")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r}: expected whole numbers, comma-separated")
    if min(args.steps, args.sft_steps, args.prompt_tokens, args.new_tokens, args.repeats, *args.batch_sizes) < 1:
        parser.error("--steps, --sft-steps, --prompt-tokens, --new-tokens, --repeats and --batch-sizes must be 1 or more")
    if min(args.steps, args.sft_steps) <= 10:  # base_train and chat_sft time only the steps after their 10th
        parser.error("--steps and --sft-steps must be more than 10: nanochat times the steps after its first 10")
    if args.prompt_tokens + args.new_tokens > 512:
        parser.error("--prompt-tokens + --new-tokens must fit the models' 512-token context")
    args.nanochat_dir, args.data_dir = os.path.abspath(args.nanochat_dir), os.path.abspath(args.data_dir)
    return args


def check_nanochat_python(args):
    """nanochat's imports, before anything long runs: one clear error instead of a traceback minutes in."""
    probe = "import nanochat.gpt, nanochat.engine, nanochat.dataloader, rustbpe, tiktoken, pyarrow, jinja2, yaml, psutil"
    result = subprocess.run([args.nanochat_python, "-c", probe], cwd=args.nanochat_dir, capture_output=True, text=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(f"error: {args.nanochat_python} cannot import nanochat's dependencies in {args.nanochat_dir}: {last}")


def main():
    args = parse_args()
    check_nanochat_python(args)
    progress = Progress()
    with tempfile.TemporaryDirectory(prefix="vs_nanochat.") as tmp:
        work = os.path.abspath(args.out) if args.out else tmp
        os.makedirs(work, exist_ok=True)
        if os.listdir(work):
            sys.exit(f"error: --out {work} is not empty")
        progress(f"writing nanochat's inputs into {work}/nanochat_base")
        facts = fill_base_dir(os.path.join(work, "nanochat_base"), args.data_dir, args.core_bundle)
        progress(f"same text: {facts['train_docs']:,} train / {facts['val_docs']:,} val documents "
                 f"({facts['val_bytes']:,} val bytes); {facts['sft_train_convs']:,} SFT train conversations")
        ours = run_ours(args, work, progress)
        theirs = run_nanochat(args, work, facts, progress)
        if args.time_to_target and "train_s" in ours and theirs.get("val_bpb") is not None:
            attempt(ours, progress, f"ours: time to nanochat's val bpb {theirs['val_bpb']:.4f}",
                    lambda: time_to_target(args, work, ours, theirs["val_bpb"], progress))
        progress("done")
    others = sum(side.get("others_cpu_s", 0.0) for side in (ours, theirs))
    print(f"this machine: {os.cpu_count()} CPUs, {args.threads} torch threads, other processes {others:.0f} CPU-s "
          f"during the {progress.elapsed() / 60:.0f}-minute run; pretraining {args.steps} x {STEP_TOKENS:,} "
          f"tokens, SFT {args.sft_steps} x {STEP_TOKENS:,}; CORE {args.core_per_task or 'all'} per task; decoding "
          f"{args.new_tokens} tokens after {args.prompt_tokens}")
    print("\n".join(table(ours, theirs, metric_rows(args.batch_sizes, args.core_per_task))))
    sys.exit(1 if ours.get("failed") or theirs.get("failed") else 0)


if __name__ == "__main__":
    main()
