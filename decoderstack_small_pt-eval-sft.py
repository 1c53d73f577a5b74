"""DecoderStack: one file that pretrains a decoder on pre-tokenized shards, evaluates it (bits per byte, CORE),
fine-tunes it for chat (SFT), evaluates the chat model, improves it on GSM8K (RL) and generates with a KV cache. Data
is prepared by the scripts in data/ (data/README.md).

Run (--help lists every flag and the phases; README has the rest):
    8xH100 record:  torchrun --nproc_per_node=8 decoderstack_small_pt-eval-sft.py --preset h100x8 --data-dir DIR
    one GPU, Colab, CPU:  python decoderstack_small_pt-eval-sft.py --preset gpu1|colab|cpu --data-dir DIR \\
                              --phases pt,eval,sft,chat,rl
    modded-nanogpt's FineWeb (GPT-2 ids), converted once: python data/llmc.py --src data/fineweb10B --tokenizer gpt2;
        then --data-dir data/fineweb10B --val-final-tokens 10485760 (its val loss's tokens)
Any setting: --name=value (--flag / --no-flag for booleans, JSON for tuples).

Contents, in the order data flows; each phase's loop comes right after its parts
    1. Settings: the schedule's stages, Config and its groups, presets, flags   9. Pretraining: schedule, loss, phase_pt
    2. Runtime: device, precision, ranks                                        10. Evaluation: bpb, CORE; phase_eval
    3. Kernels: Triton beside their PyTorch references                          11. Inference: KV cache; phase_generate
    4. Attention over packed documents: FA3 / FA2 / flex / SDPA                 12. Chat eval, HumanEval's sandbox; chat
    5. Model: ModelConfig (stored with the weights), GPT                        13. Chat SFT: masked loss; phase_sft
    6. Optimizer: NorMuon (Polar Express) + Adam                                14. GSM8K RL: policy gradient; phase_rl
    7. Data: readers of every format, the pretraining loader                    15. The phase table and main
    8. The run: log.txt, metrics.json, checkpoints, the run directory
Beside this file, importing it (it never imports them): serve.py (an OpenAI-compatible server, chat.html), chat_cli.py
(a chat in the terminal), export.py (hf/: a Hugging Face folder), report.py (RUN_DIR/report.md), data/check.py.
"""
import argparse
import ast
import base64
import builtins
import collections
import ctypes
import dataclasses
import functools
import glob
import hashlib
import inspect
import json
import math
import operator
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. Macs: every kernel falls back to its PyTorch reference
    triton = None


# =============================================================================================================
# 1. Settings: the stages of the schedule, Config and its per-phase groups, presets, the flags

@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pretraining schedule (modded-nanogpt's TrainingStage); --stages is a JSON list of them."""
    steps: int
    batch_tokens: int    # global tokens per step
    max_doc_len: int     # a longer document is trained on in pieces of this length
    short_window: int    # attention windows of the short and the long layers
    long_window: int
    lr_mul: float
    mtp_start: tuple     # weights of the next-token, 2-ahead, ... losses at the stage's start and at its end; they
    mtp_end: tuple       # move linearly within the stage

    @classmethod
    def of(cls, value):
        if isinstance(value, Stage):
            return value
        names = [f.name for f in dataclasses.fields(cls)]
        fields = dict(zip(names, value)) if isinstance(value, (list, tuple)) and len(value) == len(names) else value
        if not isinstance(fields, dict) or sorted(fields) != sorted(names):
            raise ValueError(f"a stage needs exactly {', '.join(names)}, got {value!r}")
        return cls(**{**fields, "mtp_start": tuple(fields["mtp_start"]), "mtp_end": tuple(fields["mtp_end"])})

SOFTCAP = (23.0, 5.0, 7.5)  # logits u = A * sigmoid((z + B) / C): bounded to (0, 23), as in modded-nanogpt

# Each phase's own settings are a small dataclass, a group of Config; on the command line a group's fields are flags
# like any other, named with the group's prefix (--sft-steps is SFTConfig.steps). Every field's comment is its --help.
@dataclasses.dataclass
class SFTConfig:
    """SFT (--phases sft): fine-tune the latest checkpoint on the sft/ conversations"""
    prefix = "sft_"
    steps: int = 500                # optimizer steps
    batch_tokens: int = 393216      # global tokens per step: whole conversations packed, the rest padding
    lr_mul: float = 0.8             # SFT lr = --muon-lr / --adam-lr times this (nanochat: 0.8)
    warmup_frac: float = 0.0        # linear lr warmup over this first fraction of the steps
    cooldown_frac: float = 0.5      # then flat, then a linear decay to 0 over this last fraction (nanochat's shape)
    momentum_warmup: int = 300      # NorMuon momentum 0.85 -> 0.95 over these steps (the optimizer starts fresh)
    eval_every: int = 100           # steps between SFT evaluations (also at the start and the end)
    val_tokens: int = 4_194_304     # val conversation tokens per evaluation (masked loss on their supervised tokens)
    chat_max_per_task: int = 0      # chat-eval examples per task at each SFT evaluation but the first (0: none)

@dataclasses.dataclass
class RLConfig:
    """GSM8K RL (--phases rl): on-policy policy gradient, nanochat's recipe, from the latest checkpoint"""
    prefix = "rl_"
    steps: int = 60                 # optimizer steps
    questions_per_step: int = 16    # training questions per step, over all ranks
    samples: int = 16               # samples per question: the group whose mean reward is the baseline
    max_new_tokens: int = 256       # tokens a sample may generate
    temperature: float = 1.0        # sampling temperature of the rollouts and of pass@k
    top_k: int = 50                 # top-k of the rollouts and of pass@k
    lr_mul: float = 0.05            # RL lr = --muon-lr / --adam-lr times this, decaying linearly to 0
    batch_tokens: int = 16384       # tokens per training forward
    eval_every: int = 20            # steps between pass@k evaluations (also at the start and the end)
    eval_questions: int = 400       # held-out GSM8K test questions for pass@k
    eval_samples: int = 8           # k of pass@1..k

@dataclasses.dataclass
class SampleConfig:
    """sampling (--phases generate; the defaults of serve.py's requests)"""
    prefix = ""
    prompt: str = ""                # --phases generate: sample for this text; without it, chat on stdin
    prompt_format: str = "auto"     # auto: a user turn for SFT/RL checkpoints, plain text for base models | chat | text
    num_samples: int = 1            # samples of --prompt
    max_new_tokens: int = 256       # tokens a sample may generate
    temperature: float = 0.8        # 0: greedy
    top_k: int = 50                 # 0: off
    top_p: float = 1.0              # 1: off
    min_p: float = 0.0              # 0: off
    decode_compile: bool = False    # the engine's decode steps through torch.compile (CUDA graphs on GPUs; unmeasured
                                    # there): on 2 CPU cores 1.5-2x faster at batch 1, after 6-40 s compiling

@dataclasses.dataclass
class Config:
    # run
    preset: str = "h100x8"          # defaults for a machine: h100x8 | gpu1 | colab | cpu (PRESETS)
    data_dir: str = "runs/data"     # written by data/prepare.py (or data/llmc.py: llm.c shards, modded's FineWeb)
    vocab_size: int = 0             # 0: the data's tokenizer's; else checked against it
    bos_id: int = -1                # -1: the data's tokenizer's; else checked against it
    run_dir: str = "runs/h100x8"    # checkpoints, log.txt, metrics.json, curves.jsonl
    phases: str = "pt"              # comma-separated, run in order (the list below)
    seed: int = 0                   # weights, data order, sampling
    resume: bool = False            # continue from the last checkpoint in run_dir
    overwrite: bool = False         # a fresh pt/sft/rl run replaces run_dir's checkpoints of that phase and later ones
    init_from: str = ""             # start from (or evaluate, serve) this checkpoint instead of the run's latest
    compile: bool = True            # torch.compile the training losses
    attn_backend: str = "auto"      # auto | fa3 | fa2 | flex | sdpa
    dtype: str = "auto"             # activations (PRECISION, in Runtime): auto | bf16 | fp32 | fp16 (no training)
    wandb: str = "auto"             # auto: online when WANDB_API_KEY is set, else disabled | offline | disabled
    # model (modded-nanogpt track-1 scale)
    n_layers: int = 11              # transformer blocks
    model_dim: int = 768            # width of the residual stream
    n_heads: int = 6                # attention heads
    head_dim: int = 128             # dims per head
    mlp_mult: int = 4               # MLP hidden width = mlp_mult x model_dim
    vocab_multiple: int = 128       # embedding rows padded to a multiple: matmul-friendly shapes
    long_window_layers: str = "3,10"         # layers with the stage's long window (the others: its short one)
    value_embed_layers: str = "1,2,8,9,10"   # layers whose values add a value embedding of the token
    bigram_rows_per_vocab: float = 7.5       # rows of the hashed (previous token, token) embedding per vocab entry
    attn_scale: float = 0.1         # softmax scale of the QK-normed attention (grown by YaRN with the window)
    softcap: tuple = SOFTCAP        # logits A * sigmoid((z + B) / C), as JSON [A, B, C]
    fp8: bool = True                # FP8 lm_head matmuls in training, where the GPU has them (sm89+)
    # schedule
    stages: tuple = (  # the stages of pretraining, in order: a JSON list of Stage objects or of lists in its order
        Stage(423, 131072, 896, 128, 384, 1.0, mtp_start=(1.0, 0.5, 0.25), mtp_end=(1.0, 0.5, 0.0)),
        Stage(424, 262144, 2048, 384, 896, 1.52, mtp_start=(1.0, 0.5), mtp_end=(1.0, 0.0)),
        Stage(423, 393216, 2048, 640, 1408, 1.73, mtp_start=(1.0,), mtp_end=(1.0,)),
        Stage(15, 393216, 2048, 768, 1664, 1.73, mtp_start=(1.0,), mtp_end=(1.0,)))
    micro_batch_tokens: int = 49152  # tokens per rank per forward; gradient accumulation makes up the batch
    train_tokens: int = 0            # 0: as the stages say; N: rescale every stage's steps to N tokens in total
    lr_warmup_steps: int = 0         # linear lr warmup (modded-nanogpt needs none)
    cooldown_frac: float = 0.6       # lr is flat, then decays linearly to final_lr over this last fraction
    final_lr: float = 0.15           # lr factor at the last step
    untie_frac: float = 0.667        # embed and lm_head share weights until this fraction of the steps
    # optimizer: NorMuon for the blocks' matrices, Adam for the rest (optimizer_labels: each parameter's multipliers)
    muon_lr: float = 0.023           # NorMuon's base lr
    muon_wd: float = 0.028           # NorMuon's cautious weight decay (applied as lr x wd)
    adam_lr: float = 0.008           # Adam's base lr
    adam_wd: float = 0.006           # Adam's cautious weight decay (applied as lr x wd)
    # logging, evaluation during pretraining, checkpoints
    log_every: int = 10              # steps between training log lines (pt and sft)
    val_every: int = 250             # steps between val bpb evaluations (also after the last)
    val_tokens: int = 10_485_760     # val targets per evaluation during training, spread over the whole val stream;
                                     # the last step's (and --phases eval's) scores every val token once
    val_final_tokens: int = 0        # N: the last evaluation scores the first N val tokens instead (modded-nanogpt's
                                     # rule: 10,485,760 of its FineWeb val shard)
    checkpoint_every: int = 0        # steps between checkpoints (0: only at the end); pt, sft and rl
    keep_checkpoints: int = 2        # the newest N checkpoints of each phase are kept
    # evaluation of a trained model
    core_max_per_task: int = -1      # CORE examples per task in --phases eval (-1: all)
    core_batch_tokens: int = 32768   # tokens per packed CORE (and categorical chat-eval) forward
    chat_max_per_task: int = -1      # chat-eval examples per task in --phases chat (-1: all)
    chat_batch_size: int = 16        # GSM8K and HumanEval problems generated together
    chat_max_new_tokens: int = 512   # tokens a chat-eval answer may generate
    sandbox: str = "isolated"        # HumanEval's model-written code: isolated (refused where Linux namespaces are
                                     # not to be had) | weak (no namespaces; says what it lacks; README: Security)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def __post_init__(self):  # --stages JSON and configs read back from JSON give dicts or lists
        self.stages = tuple(Stage.of(s) for s in self.stages)
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), dict):
                setattr(self, f.name, f.default_factory(**getattr(self, f.name)))
        for name in ("model_dim", "vocab_multiple") if self.fp8 else ():  # CUDA's _scaled_mm: dims multiples of 16
            if (value := getattr(self, name)) % 16:
                nearest = " or ".join(str(v) for v in (value // 16 * 16, value // 16 * 16 + 16) if v)
                raise ValueError(f"--fp8 (on by default) needs --{name.replace('_', '-')} a multiple of 16, got {value}: "
                                 f"use {nearest}, or --no-fp8")

PRESETS = {  # flag name -> value
    "h100x8": dict(run_dir="runs/h100x8"),
    # the same model and tokens on one GPU: 32K-token forwards accumulate to every stage's batch (49152 divides none)
    "gpu1": dict(run_dir="runs/gpu1", micro_batch_tokens=32768),
    # T4/L4-class: no FA3 or FP8; a smaller model that fits 16 GB in fp32 where bf16 is missing
    "colab": dict(run_dir="runs/colab", fp8=False, n_layers=8, model_dim=512, n_heads=4, micro_batch_tokens=16384,
                  long_window_layers="3,7", value_embed_layers="1,2,5,6,7", train_tokens=100_000_000),
    # a tiny model that pretrains in about 5 minutes on 2 CPU cores (fp32)
    "cpu": dict(run_dir="runs/cpu", n_layers=4, model_dim=192, n_heads=3, head_dim=64, long_window_layers="3",
                value_embed_layers="1,2,3", bigram_rows_per_vocab=2.0, micro_batch_tokens=4096,
                stages=(Stage(50, 4096, 256, 64, 128, 1.0, mtp_start=(1.0, 0.5, 0.25), mtp_end=(1.0, 0.5, 0.0)),
                        Stage(50, 4096, 512, 128, 256, 1.0, mtp_start=(1.0, 0.5), mtp_end=(1.0, 0.0)),
                        Stage(50, 4096, 512, 128, 512, 1.0, mtp_start=(1.0,), mtp_end=(1.0,))),
                val_every=75, val_tokens=131072, checkpoint_every=50, log_every=10, compile=False,
                core_max_per_task=50, core_batch_tokens=8192, chat_max_per_task=50, chat_max_new_tokens=256,
                sft_steps=40, sft_batch_tokens=4096, sft_lr_mul=2.0, sft_momentum_warmup=20, sft_eval_every=20,
                sft_val_tokens=32768, rl_steps=8, rl_questions_per_step=4, rl_samples=8, rl_max_new_tokens=128,
                rl_batch_tokens=8192, rl_eval_every=4, rl_eval_questions=16, rl_eval_samples=4),
}

def flags(cls):
    """{flag name: (group or None, the dataclass declaring it, field)}: the fields, a group's under its prefix."""
    out = {}
    for f in dataclasses.fields(cls):
        group = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        out.update({group.prefix + g.name: (f.name, group, g) for g in dataclasses.fields(group)} if group else
                   {f.name: (None, cls, f)})
    return out

@functools.cache
def field_help(cls):
    """{field: [help: its comment + comment lines at its column; heading: the 4-space comment above, else the doc]}"""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source to read (e.g. the file is gone): flags without help
        return {}
    helps, column, heading = {}, -1, (cls.__doc__ or "").split("\n")[0]  # column -1: no field's comment goes on
    for line in lines:
        field, more = re.match(r"\s+(\w+): [^#]*?(#\s*(.*))?$", line), re.match(r"(\s+)#\s*(.*)$", line)
        if field:
            name, column = field.group(1), line.find("#")
            helps[name] = [field.group(3) or "", heading]
        elif more and len(more.group(1)) == column:
            helps[name][0] += " " + more.group(2)
        elif more and len(more.group(1)) == 4:
            heading, column = more.group(2), -1
        elif line.strip():
            column = -1
    return helps

def parse_flags(argv=None, classes=(), **parser_args):
    """An instance per dataclass in `classes` (Config first), from one flat set of flags over --preset's defaults."""
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                     usage="%(prog)s [--preset NAME] [--NAME=VALUE ...]", **parser_args)
    where, headings = {}, {}  # flag name -> (index of its class, group, field name); heading -> argument group
    for i, cls in enumerate(classes):
        for name, (group, owner, f) in flags(cls).items():
            where[name] = (i, group, f.name)
            text, heading = field_help(owner).get(f.name, ["", ""])
            if heading not in headings:
                headings[heading] = parser.add_argument_group(heading or None)
            flag, default, add = f"--{name.replace('_', '-')}", f.default, headings[heading].add_argument
            shown = json.dumps(default, default=dataclasses.astuple) if isinstance(default, tuple) else repr(default)
            text = f"{text} (default {shown})".replace("%", "%%")
            if isinstance(default, bool):
                add(flag, dest=name, nargs="?", const=True, default=None, type=parse_bool, help=text, metavar="BOOL")
                add(f"--no-{flag[2:]}", dest=name, action="store_const", const=False, help=argparse.SUPPRESS)
            else:
                add(flag, dest=name, default=None, help=text, metavar=type(default).__name__.upper(),
                    type=parse_tuple if isinstance(default, tuple) else type(default))
    args = parser.parse_args(argv)
    preset = args.preset or Config.preset
    if preset not in PRESETS:
        parser.error(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset, **{k: v for k, v in vars(args).items() if v is not None}}
    if values.get("sandbox", Config.sandbox) not in SANDBOX_MODES:
        parser.error(f"unknown --sandbox {values['sandbox']!r}; choose from {', '.join(SANDBOX_MODES)}")
    settings = [{} for _ in classes]  # per class: {field: value}, a group's as {group: {field: value}}
    for name, value in values.items():
        i, group, field = where[name]
        (settings[i].setdefault(group, {}) if group else settings[i])[field] = value
    try:
        return [cls(**values) for cls, values in zip(classes, settings)]  # Config.__post_init__ makes the groups
    except ValueError as e:  # e.g. a --stages entry that is not a stage
        parser.error(str(e))

def parse_config(argv=None):
    """The stack's Config from the command line (parse_flags); --help lists every flag and the phases."""
    phases = "\n".join(f"  {name:9} {(fn.__doc__ or '').split(chr(10))[0]}" for name, fn in PHASES.items())
    return parse_flags(argv, [Config], description=__doc__.split("\n\n")[0], epilog=(
        f"phases (--phases, comma-separated, run in order):\n{phases}\n"
        "eval, sft, chat, rl and generate start from --init-from, else RUN_DIR's latest checkpoint; each appends to\n"
        "RUN_DIR/log.txt. Beside this file, taking these flags (and their own): serve.py (an OpenAI-compatible server),\n"
        "chat_cli.py (a chat in the terminal), export.py (a Hugging Face folder), data/check.py (checks a data\n"
        "directory); report.py --run-dir DIR writes DIR/report.md."))[0]

def parse_bool(text):
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")

def parse_tuple(text):
    try:
        return freeze(json.loads(text))
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r} ({e.msg})") from None

def freeze(value):
    """JSON lists -> nested tuples, the form of the tuple fields of Config."""
    return tuple(freeze(x) for x in value) if isinstance(value, list) else value

def parse_ints(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


# =============================================================================================================
# 2. Runtime

# PRECISION, the file's one dtype policy (modded-nanogpt runs its whole model in bf16; so does this one):
# - Parameters and optimizer state are fp32 master copies; the optimizer computes in fp32 but for Polar Express (the
#   bulk of its work, in matmuls), which iterates in bf16 wherever the Triton kernels run.
# - Activations are in rt.dtype: bf16 on sm80+ GPUs, else fp32 (CPUs run bf16 matmuls 50-150x slower; pre-Ampere GPUs,
#   T4 or V100, would need loss scaling for fp16, which training lacks: --dtype fp16 is for inference). autocast(rt) is
#   the switch, around every forward (training, evaluation, decoding): GPT.hidden casts its embedding lookups to its
#   dtype, so the residual stream and every matmul, Triton kernel and attention call see one dtype.
# - Norms compute in fp32 and return x's dtype (CUDA autocast runs rms_norm in fp32 since torch 2.12, CPU autocast does
#   not: doing it ourselves makes both agree). The lm_head writes bf16 logits (FP8 on sm89+ in training); softcap,
#   losses and log-probs are fp32. Other fp32 matmuls (fp32 runs, eval of fp32 models) use TF32 tensor cores.

@dataclasses.dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype    # activation dtype (PRECISION above)
    rank: int
    world_size: int
    backend: str          # attention backend
    precision: str = ""   # why rt.dtype (pick_dtype), for the log

    @property
    def master(self):
        return self.rank == 0

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def native_bf16(device):
    """bf16 in hardware: sm80+ GPUs. (torch.cuda.is_bf16_supported() alone says True on a T4, through emulation.)"""
    return torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)

def pick_dtype(device, requested="auto"):
    device = torch.device(device)
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unknown --dtype {requested!r}; choose auto, {', '.join(DTYPES)}")
        return DTYPES[requested], f"--dtype {requested}"
    if native_bf16(device):
        return torch.bfloat16, "bf16: native on this GPU"
    if device.type == "cuda":
        return torch.float32, "fp32: this GPU has no native bf16 (fp16 training would need loss scaling)"
    return torch.float32, f"fp32: bf16 matmuls are slow on {device.type}"

def init_runtime(cfg):
    """The device (cuda -> mps -> cpu; FORCE_DEVICE overrides, e.g. FORCE_DEVICE=cpu on a GPU machine), dtype, ranks."""
    if os.environ.get("FORCE_DEVICE"):
        device = torch.device(os.environ["FORCE_DEVICE"])
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype, why = pick_dtype(device, cfg.dtype)
    return Runtime(device, dtype, rank, world_size, select_attention_backend(device, cfg.attn_backend), why)

def sum_over_ranks(t, rt, op=None):
    if rt.world_size > 1:
        assert t.is_contiguous()  # gloo reduces the wrong memory for non-contiguous tensors
        dist.all_reduce(t, **({} if op is None else {"op": op}))
    return t

def autocast(rt):
    if rt.dtype == torch.float32:
        return torch.autocast(rt.device.type, enabled=False)
    return torch.autocast(rt.device.type, dtype=rt.dtype)

def require_training_dtype(rt, phase):
    if rt.dtype == torch.float16:
        raise ValueError(f"{phase}: fp16 training needs loss scaling, which this stack does not do; use --dtype bf16 "
                         "(sm80+ GPUs) or fp32 (fp16 serves eval, chat and generate)")


# =============================================================================================================
# 3. Kernels. Each op has a PyTorch reference (`*_reference`: the CPU/MPS path and the test oracle), a Triton launcher
# (`*_triton`: one tile config, `block*` keywords vary it) and a dispatcher (the plain name) picking Triton for CUDA
# tensors on sm80+ (bf16 tl.dot). Operands share one dtype, bf16 or fp32 (TF32); dots accumulate in fp32. Tests run the
# launchers on CPU under TRITON_INTERPRET=1, fp32 and bf16, where dots upcast (its bf16 tl.dot is wrong: triton#11584).

def _use_triton(t):
    return triton is not None and t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 0)

UPCAST = os.environ.get("TRITON_INTERPRET") == "1"  # read when triton reads it (decoration); a constexpr: no GPU code

# --- A @ A^T and b*A + c*(A @ A^T) (A symmetric), batched: the bulk of a Polar Express (Muon) iteration. Only tiles on
# or below the diagonal are computed, each stored twice (in place and mirrored): half a matmul's FLOPs, exact symmetry.
if triton is not None:
    @triton.jit
    def _sym_matmul_kernel(a_ptr, c_ptr, M, K, stride_ab, stride_am, stride_ak, stride_cb, stride_cm, stride_cn,
                           b, c, ADD_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        batch, pid_m, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        if pid_n > pid_m:  # upper triangle: written as the mirror of tile (pid_n, pid_m)
            return
        a_ptr, c_ptr = a_ptr + batch * stride_ab, c_ptr + batch * stride_cb
        rows, cols = pid_m * BLOCK + tl.arange(0, BLOCK), pid_n * BLOCK + tl.arange(0, BLOCK)
        ks, acc = tl.arange(0, BLOCK_K), tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks)[None, :] < K
            a_rows = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
                             mask=(rows[:, None] < M) & kmask, other=0.0)
            a_cols = tl.load(a_ptr + cols[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
                             mask=(cols[:, None] < M) & kmask, other=0.0)
            if UPCAST:
                a_rows, a_cols = a_rows.to(tl.float32), a_cols.to(tl.float32)
            acc = tl.dot(a_rows, tl.trans(a_cols), acc)
        # Store the lower triangle and its mirror: a diagonal tile's dot need not be bitwise symmetric itself.
        mask = (rows[:, None] < M) & (cols[None, :] <= rows[:, None])
        if ADD_A:  # A is square and symmetric here, so its tile (rows, cols) serves the mirror too
            a_tile = tl.load(a_ptr + rows[:, None] * stride_am + cols[None, :] * stride_ak, mask=mask, other=0.0)
            acc = b * a_tile.to(tl.float32) + c * acc
        out = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out, mask=mask)
        tl.store(c_ptr + cols[:, None] * stride_cm + rows[None, :] * stride_cn, tl.trans(out), mask=tl.trans(mask))

def xxt_reference(A):
    return A @ A.mT

def ba_plus_caa_reference(A, b, c):
    return b * A + c * (A @ A.mT)

def _sym_matmul_triton(A, b, c, add_a, block, block_k):
    *batch, m, k = A.shape
    A3 = A.reshape(-1, m, k)  # a view for X.mT-style inputs: the kernel takes any strides
    out = torch.empty(A3.shape[0], m, m, dtype=A.dtype, device=A.device)
    grid = (A3.shape[0], triton.cdiv(m, block), triton.cdiv(m, block))
    _sym_matmul_kernel[grid](A3, out, m, k, *A3.stride(), *out.stride(), b, c,
                             ADD_A=add_a, BLOCK=block, BLOCK_K=block_k, UPCAST=UPCAST, num_warps=4, num_stages=3)
    return out.reshape(*batch, m, m)

def xxt_triton(A, *, block=64, block_k=32):
    return _sym_matmul_triton(A, 0.0, 0.0, False, block, block_k)

def ba_plus_caa_triton(A, b, c, *, block=64, block_k=32):
    assert A.shape[-1] == A.shape[-2], "ba_plus_caa needs square symmetric matrices"
    return _sym_matmul_triton(A, float(b), float(c), True, block, block_k)

def xxt(A):
    return xxt_triton(A) if _use_triton(A) else xxt_reference(A)

def ba_plus_caa(A, b, c):
    return ba_plus_caa_triton(A, b, c) if _use_triton(A) else ba_plus_caa_reference(A, b, c)

# --- ReLU^2 MLP: relu(x @ W_fc^T)^2 fused into the matmul epilogue (FORWARD), as is the backward's dpre = (g @ W_proj)
# * 2*sqrt(post) (relu(pre) = sqrt(post)): the 4x-wide hidden activation is written (`post`) and read once, `pre` never.
if triton is not None:
    @triton.jit
    def _relu2_matmul_kernel(a_ptr, b_ptr, c_ptr, post_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                             stride_cm, stride_cn, FORWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks, acc = tl.arange(0, BLOCK_K), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
                        mask=(rows[:, None] < M) & ((k0 + ks)[None, :] < K), other=0.0)
            b = tl.load(b_ptr + (k0 + ks)[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=((k0 + ks)[:, None] < K) & (cols[None, :] < N), other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offsets = rows[:, None] * stride_cm + cols[None, :] * stride_cn
        if FORWARD:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        else:
            acc = 2.0 * acc * tl.sqrt(tl.load(post_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
        tl.store(c_ptr + offsets, acc.to(c_ptr.dtype.element_ty), mask=mask)

def relu2_mlp_reference(x, w_fc, w_proj):
    return torch.relu(x @ w_fc.mT).square() @ w_proj.mT

def _relu2_matmul(a, b, post, blocks):
    """relu(a @ b)^2, or (a @ b) * 2*sqrt(post) given post (contiguous); a (M, K), b (K, N) any strides, one dtype."""
    assert a.dtype == b.dtype and (post is None or post.dtype == a.dtype), (a.dtype, b.dtype, post is None or post.dtype)
    (M, K), N, (block_m, block_n, block_k) = a.shape, b.shape[1], blocks
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    aux = out if post is None else post  # the forward never reads post_ptr: any tensor fills the slot
    _relu2_matmul_kernel[grid](a, b, out, aux, M, N, K, *a.stride(), *b.stride(), *out.stride(), FORWARD=post is None,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=UPCAST, num_warps=8,
                               num_stages=3)
    return out

class _Relu2MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, w_proj, blocks):
        # Everything in the activations' dtype (tl.dot needs one; autograd casts the weight grads back to fp32).
        x2, w_fc, w_proj = x.reshape(-1, x.shape[-1]), w_fc.to(x.dtype), w_proj.to(x.dtype)
        post = _relu2_matmul(x2, w_fc.mT, None, blocks)
        ctx.save_for_backward(x2, w_fc, w_proj, post)
        ctx.blocks = blocks
        return (post @ w_proj.mT).reshape(*x.shape[:-1], w_proj.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, w_fc, w_proj, post = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        dpre = _relu2_matmul(g2, w_proj, post, ctx.blocks)
        return (dpre @ w_fc).reshape(*grad.shape[:-1], w_fc.shape[1]), dpre.mT @ x2, g2.mT @ post, None

def relu2_mlp_triton(x, w_fc, w_proj, *, blocks=(128, 128, 32)):
    return _Relu2MLP.apply(x, w_fc, w_proj, blocks)

def relu2_mlp(x, w_fc, w_proj):
    """relu(x @ w_fc.T)^2 @ w_proj.T; x (..., dim), w_fc (hidden, dim), w_proj (dim, hidden) as in nn.Linear."""
    return relu2_mlp_triton(x, w_fc, w_proj) if _use_triton(x) else relu2_mlp_reference(x, w_fc, w_proj)

# --- Softcapped multi-token cross-entropy: per row the loss and dL/dz in one launch, never materialising the (N, V)
# softcapped logits or probabilities (each would cost passes over the model's largest activation). Sweep 1 over V:
# online logsumexp of u = A*s, s = sigmoid((z+B)/C); sweep 2 (re-reading z, mostly from L2): the gradient
#   dz_j = (sum_k w_k * p_j - sum_{k: t_k = j} w_k) * (A/C) * s_j * (1 - s_j).
if triton is not None:
    @triton.jit
    def _softcap_ce_kernel(z_ptr, t_ptr, w_ptr, loss_ptr, dz_ptr, V, K, stride_z, stride_t, stride_dz,
                           cap_a, cap_b, cap_c, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        ks = tl.arange(0, BLOCK_K)
        targets = tl.load(t_ptr + row * stride_t + ks, mask=ks < K, other=-1)
        valid = targets >= 0
        weights = tl.where(valid, tl.load(w_ptr + ks, mask=ks < K, other=0.0).to(tl.float32), 0.0)
        z_t = tl.load(z_row + targets, mask=valid, other=0.0).to(tl.float32)
        u_t = cap_a * tl.sigmoid((z_t + cap_b) / cap_c)
        cols = tl.arange(0, BLOCK_V)
        run_max, run_sum = tl.full((), float("-inf"), tl.float32), tl.full((), 0.0, tl.float32)
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            z = tl.load(z_row + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.where(mask, cap_a * tl.sigmoid((z + cap_b) / cap_c), float("-inf"))
            new_max = tl.maximum(run_max, tl.max(u, axis=0))
            run_sum, run_max = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(u - new_max), axis=0), new_max
        lse = run_max + tl.log(run_sum)
        tl.store(loss_ptr + row, tl.sum(weights * (lse - u_t), axis=0))
        weight_sum = tl.sum(weights, axis=0)
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            z = tl.load(z_row + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid((z + cap_b) / cap_c)
            p = tl.exp(cap_a * s - lse)
            hits = tl.sum(tl.where((v0 + cols)[:, None] == targets[None, :], weights[None, :], 0.0), axis=1)
            dz = (weight_sum * p - hits) * (cap_a / cap_c) * s * (1.0 - s)
            tl.store(dz_ptr + row * stride_dz + v0 + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)

def softcap(logits, cap=SOFTCAP):
    a, b, c = cap
    return a * torch.sigmoid((logits.float() + b) / c)

def softcap_cross_entropy_reference(logits, targets, weights, cap=SOFTCAP):
    u = softcap(logits, cap)
    per_target = (u.logsumexp(1, keepdim=True) - u.gather(1, targets.clamp(min=0))) * weights.float()
    return torch.where(targets >= 0, per_target, 0.0).sum(1)

class _SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weights, cap, block_v):
        (n, v), k = logits.shape, targets.shape[1]
        assert logits.stride(1) == 1 and targets.stride(1) == 1 and weights.is_contiguous() and len(weights) == k
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        dz = torch.empty_like(logits, memory_format=torch.contiguous_format)
        _softcap_ce_kernel[(n,)](logits, targets, weights, loss, dz, v, k, logits.stride(0), targets.stride(0),
                                 dz.stride(0), *map(float, cap), BLOCK_V=block_v,
                                 BLOCK_K=triton.next_power_of_2(k), num_warps=4)
        ctx.save_for_backward(dz)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (dz,) = ctx.saved_tensors
        return dz * grad_loss[:, None].to(dz.dtype), None, None, None, None

def softcap_cross_entropy_triton(logits, targets, weights, cap=SOFTCAP, *, block_v=1024):
    return _SoftcapCrossEntropy.apply(logits, targets, weights, cap, block_v)

def softcap_cross_entropy(logits, targets, weights, cap=SOFTCAP):
    """Per-row loss (N,): sum_k weights[k] * CE(softcap(logits), targets[:, k]) over targets != -1.
    logits (N, V) before the softcap; targets (N, K) int64, column k = the token k+1 ahead, -1 = ignored."""
    impl = softcap_cross_entropy_triton if _use_triton(logits) else softcap_cross_entropy_reference
    return impl(logits, targets, weights, cap)

# --- FP8 lm_head (training only, sm89+): e4m3 inputs, e5m2 output grads, fixed per-tensor scales mapping each tensor's
# expected max |value| to the format's max (modded-nanogpt's; its gradient scale, also divided by the gradient
# accumulation, is for a loss summed over tokens: with a mean loss it is also divided by the tokens per step). CUDA's
# _scaled_mm needs every dim a multiple of 16; torch's CPU build runs it too, without that rule (the tests do).
FP8_SCALES = (100 / 448, 1.6 / 448, 0.75 / 448)  # inputs, weights, output gradients

def fp8_supported(device):
    return torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)

def fp8_quantize(t, scale, dtype):
    """t / scale in an fp8 format, saturated: unclamped, an overflow becomes inf in e5m2 (e4m3fn has no inf)."""
    limit = torch.finfo(dtype).max
    return (t / scale).clamp(-limit, limit).to(dtype)

class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, x_scale, w_scale, grad_scale):
        x8 = fp8_quantize(x.reshape(-1, x.shape[-1]), x_scale, torch.float8_e4m3fn)
        w8 = fp8_quantize(w, w_scale, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, w8)
        ctx.scales = x_scale, w_scale, grad_scale
        scale_x, scale_w = (x8.new_tensor(s, dtype=torch.float32) for s in (x_scale, w_scale))
        # _scaled_mm wants a row-major first and a column-major second operand: w8 (out, in) row-major gives w8.mT.
        out = torch._scaled_mm(x8, w8.mT, scale_a=scale_x, scale_b=scale_w, out_dtype=x.dtype, use_fast_accum=True)
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x8, w8 = ctx.saved_tensors
        x_scale, w_scale, grad_scale = (x8.new_tensor(s, dtype=torch.float32) for s in ctx.scales)
        g8 = fp8_quantize(grad.reshape(-1, grad.shape[-1]).contiguous(), ctx.scales[2], torch.float8_e5m2)
        grad_x = torch._scaled_mm(g8, w8.mT.contiguous().mT, scale_a=grad_scale, scale_b=w_scale, out_dtype=grad.dtype)
        grad_w = torch._scaled_mm(g8.mT.contiguous(), x8.mT.contiguous().mT, scale_a=grad_scale, scale_b=x_scale,
                                  out_dtype=torch.float32)
        return grad_x.reshape(*grad.shape[:-1], w8.shape[1]), grad_w, None, None, None

def fp8_linear(x, w, x_scale, w_scale, grad_scale):
    """x @ w.T (w (out, in) as nn.Linear's) in fp8 matmuls forward and backward; only where fp8_supported(x.device).
    Rows go in zero-padded to a multiple of 16 (the weight gradient's inner dim) and come out cut to the real ones."""
    rows = x.reshape(-1, x.shape[-1])
    pad = -len(rows) % 16
    out = _FP8Linear.apply(F.pad(rows, (0, 0, 0, pad)) if pad else rows, w, x_scale, w_scale, grad_scale)
    return out[:len(rows)].reshape(*x.shape[:-1], w.shape[0])


# =============================================================================================================
# 4. Attention over packed documents: the Batch, one entry point, four backends (FA3, FA2, flex_attention, SDPA).
# Documents are packed into one (T, H, D) sequence; document d holds tokens cu_seqlens[d]:cu_seqlens[d+1] (int32,
# unused tail entries repeating T: empty documents, so torch.compile sees static shapes). The mask, identical for
# every backend (FlashAttention's window_size=(window, 0), causal=True): i attends j iff
#     doc(j) == doc(i)  and  j <= i  and  i - j <= window        (window None or < 0: plain causal within the document)
# Evaluation may pack sequences sharing a prefix (CORE's choices after one context) as one segment (Branches): the
# prefix once (branch 0), then each one's rest (a branch, positions going on from the prefix end), masked as alone:
#     seg(j) == seg(i)  and  pos(j) <= pos(i)  and  pos(i) - pos(j) <= window  and  branch(j) in {0, branch(i)}

ATTENTION_BACKENDS = ("fa3", "fa2", "flex", "sdpa")  # the order "auto" tries them in
_FLASH = {}  # "fa3"/"fa2" -> FA's interface module, or the exception loading it raised (tried once per process)

def _load_fa3():
    """FA3's interface from the HF kernels hub (kept in the HF cache; offline it fails in seconds)."""
    from kernels import get_kernel
    if torch.cuda.get_device_capability()[0] == 9:
        try:  # faster on Hopper; a personal repo, not a hub-trusted organisation: kernels>=0.14 wants the opt-in
            module = get_kernel("varunneal/flash-attention-3", revision="main", trust_remote_code=True)
            return getattr(module, "flash_attn_interface", module)
        except Exception:
            pass  # the kernels-community build below also covers Hopper
    module = get_kernel("kernels-community/flash-attn3", version=1)
    return getattr(module, "flash_attn_interface", module)

def _flash_func(name, func="flash_attn_varlen_func"):
    if name not in _FLASH:
        try:
            _FLASH[name] = _load_fa3() if name == "fa3" else __import__("flash_attn")
        except Exception as e:  # no network, package missing, no build for this torch/GPU
            _FLASH[name] = e
    if isinstance(_FLASH[name], Exception):
        raise RuntimeError(f"could not load {name}: {_FLASH[name]!r}") from _FLASH[name]
    return getattr(_FLASH[name], func)

def _unavailable(name, device):
    """Why backend `name` can't train on `device`, or None if it can."""
    if name == "sdpa":
        return None
    if device.type != "cuda":
        return "flex_attention trains only on CUDA (no CPU backward)" if name == "flex" else "it needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if name == "fa3" and major not in (8, 9):
        return f"the hub builds cover sm80-sm90, this GPU is sm{major}{minor}"
    if name == "fa2" and major < 8:
        return f"it needs sm80+, this GPU is sm{major}{minor}"
    if name in ("fa3", "fa2"):
        try:
            _flash_func(name)
        except RuntimeError as e:
            return str(e)

def select_attention_backend(device, requested="auto"):
    """`requested` if it can run here (else RuntimeError saying why), or for "auto" the first backend that can."""
    device = torch.device(device)
    if requested not in ("auto", *ATTENTION_BACKENDS):
        raise ValueError(f"unknown attention backend {requested!r}; choose auto, {', '.join(ATTENTION_BACKENDS)}")
    for name in ATTENTION_BACKENDS if requested == "auto" else (requested,):
        reason = _unavailable(name, device)
        if reason is None:
            return name
        if requested != "auto":
            raise RuntimeError(f"attention backend {name!r} can't run on {device}: {reason}")

def _document_ids(cu_seqlens, T):
    """(T,) index of each token's document; right=True sends a token past the empty (repeated) entries."""
    return torch.searchsorted(cu_seqlens, torch.arange(T, dtype=cu_seqlens.dtype, device=cu_seqlens.device), right=True)

def _visible(doc_q, doc_k, pos_q, pos_k, window, branch_q=None, branch_k=None):
    """The mask of this section's top, on broadcastable tensors; the branch terms only where a batch has branches."""
    mask = (doc_q == doc_k) & (pos_k <= pos_q) & (pos_q - pos_k <= window)
    return mask if branch_q is None else mask & ((branch_k == 0) | (branch_k == branch_q))

def _mask_mod(doc, window, branches=None):
    """The mask as a flex_attention mask_mod; SDPA calls it with broadcast index grids."""
    if branches is None:
        return lambda b, h, q_idx, kv_idx: _visible(doc[q_idx], doc[kv_idx], q_idx, kv_idx, window)
    pos, branch = branches.positions, branches.branch
    return lambda b, h, q_idx, kv_idx: _visible(doc[q_idx], doc[kv_idx], pos[q_idx], pos[kv_idx], window,
                                                branch[q_idx], branch[kv_idx])

def _sdpa_attention(q, k, v, cu_seqlens, window, scale, reach, block=256, branches=None):
    """SDPA with a boolean mask. Every query's keys lie within `reach` tokens (the window, or the longest document), so
    queries go in blocks, each seeing its band of block + reach keys: T*(block+reach) work, not T*T (CPU-affordable)."""
    T = q.size(0)
    doc = _document_ids(cu_seqlens, T)
    if block + reach >= T:  # one dense block
        pos = torch.arange(T, device=q.device)
        mask = _mask_mod(doc, window, branches)(None, None, pos[:, None], pos[None, :])
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # (H, T, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1).contiguous()
    n, span, pad = -(-T // block), block + reach, -T % block  # pad: queries up to n whole blocks
    # keys get `reach` slots on the left (document -2: matches nothing) and, like the queries, `pad` on the right
    # (document -1): padded queries see themselves, so no row of the mask is empty
    doc_q, doc_k = F.pad(doc, (0, pad), value=-1), F.pad(doc, (reach, pad), value=-2)
    doc_k[reach + T:] = -1
    k, v = (F.pad(x, (0, 0, 0, 0, reach, pad)) for x in (k, v))
    kb, vb = (x.unfold(0, span, block).permute(0, 1, 3, 2) for x in (k, v))  # (n, H, span, D)
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(n, block, *q.shape[1:]).transpose(1, 2)  # (n, H, block, D)
    qi = torch.arange(n * block, device=q.device).view(n, block)
    kj = qi[:, :1] - reach + torch.arange(span, device=q.device)  # absolute key position of each band slot
    if branches is None:
        pos_q, pos_k, branch_q, branch_k = qi, kj, None, None
    else:  # the logical positions and branches of the padded layout (a padded query only sees padding)
        pos_q, branch_q = (F.pad(x, (0, pad)).view(n, block) for x in (branches.positions, branches.branch))
        pos_k, branch_k = (F.pad(x, (reach, pad)).unfold(0, span, block) for x in (branches.positions, branches.branch))
        branch_q, branch_k = branch_q[:, :, None], branch_k[:, None, :]
    mask = _visible(doc_q.view(n, block)[:, :, None], doc_k.unfold(0, span, block)[:, None, :],
                    pos_q[:, :, None], pos_k[:, None, :], window, branch_q, branch_k)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale)  # (n, H, block, D)
    return y.transpose(1, 2).reshape(n * block, *q.shape[1:])[:T].contiguous()

def flex_block_mask(cu_seqlens, T, window, branches=None):
    """The mask as flex_attention's BlockMask over T packed tokens; a build evaluates it at every (query, key) pair."""
    window = T if window is None or window < 0 else min(window, T)
    return create_block_mask(_mask_mod(_document_ids(cu_seqlens, T), window, branches), None, None, T, T,
                             device=cu_seqlens.device)

def _flex_attention(q, k, v, block_mask, scale):
    """Eager form; attention() runs it compiled (eager flex_attention materialises the T x T scores)."""
    # (1, H, T, D) contiguous: inductor's CPU flex template rejects the transposed view
    q, k, v = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)[0].transpose(0, 1).contiguous()

@functools.cache
def _compiled_flex():
    """(flex_block_mask, _flex_attention) compiled, once per process (a changing window int: dynamic after one
    recompile); inside a compiled loss they are traced with it."""
    return torch.compile(flex_block_mask), torch.compile(_flex_attention)

def _flash_attention(fn, q, k, v, cu_seqlens, max_seqlen, window, scale, cu_seqlens_k=None, max_seqlen_k=None):
    """FA's varlen call. With cu_seqlens_k (a branch's keys: its prefix's, then its own) FA aligns the causal mask and
    the window to each sequence's last query and key (query i of m sees keys j <= i + n - m of n): the branch mask."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"FlashAttention needs bf16 or fp16 inputs, got {q.dtype}")
    cu = cu_seqlens.to(torch.int32).contiguous()
    cu_k = cu if cu_seqlens_k is None else cu_seqlens_k.to(torch.int32).contiguous()
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q=cu, cu_seqlens_k=cu_k,
             max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen if max_seqlen_k is None else max_seqlen_k,
             softmax_scale=scale, causal=True, window_size=(window, 0))
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp

def _flash_branches(fn, q, k, v, branches, window, scale):
    """FA over branches in two calls: the trunk, then the branches on gathered keys (a prefix's K/V once per branch)."""
    (trunk, *trunk_lens), (queries, *query_lens), (keys, *key_lens) = branches.trunk, branches.queries, branches.keys
    out = torch.empty_like(q)
    out[trunk] = _flash_attention(fn, q[trunk], k[trunk], v[trunk], *trunk_lens, window, scale)
    if len(queries):
        out[queries] = _flash_attention(fn, q[queries], k[keys], v[keys], *query_lens, window, scale, *key_lens)
    return out

def attention(q, k, v, cu_seqlens, max_seqlen, window, scale, backend, branches=None, block_mask=None):
    """The mask of this section's top over packed q, k, v (T, H, D); returns (T, H, D), contiguous. max_seqlen bounds
    a document's length (FA sizes its grid with it); window: earlier tokens a query also sees; backend: from
    select_attention_backend; branches: Branches (evaluation); block_mask: flex's for this window, else built."""
    if not q.dtype == k.dtype == v.dtype:  # FA refuses mixed dtypes, and flex's backward does: fail alike everywhere
        raise TypeError(f"attention needs q, k, v of one dtype (PRECISION), got {q.dtype}, {k.dtype}, {v.dtype}")
    T = q.size(0)
    window = T if window is None or window < 0 else min(window, T)  # i - j <= T - 1 always holds: plain causal
    if backend in ("fa3", "fa2"):
        fn, window = _flash_func(backend), -1 if window == T else window
        return (_flash_attention(fn, q, k, v, cu_seqlens, max_seqlen, window, scale) if branches is None
                else _flash_branches(fn, q, k, v, branches, window, scale))
    if backend == "flex":
        make_mask, flex = _compiled_flex()
        mask = block_mask if block_mask is not None else make_mask(cu_seqlens, T, window, branches)
        return flex(q, k, v, mask, scale)
    if backend == "sdpa":
        reach = min(window + (branches.spread if branches is not None else 0), max(1, max_seqlen) - 1)
        return _sdpa_attention(q, k, v, cu_seqlens, window, scale, reach, branches=branches)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")

def attention_reference(q, k, v, cu_seqlens, window, scale):
    """Ground truth for attention(): a Python loop over documents with an explicit fp32 softmax. Differentiable."""
    bounds, outs = cu_seqlens.tolist(), []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd, kd, vd = (x[start:end].float().transpose(0, 1) for x in (q, k, v))  # (H, L, D)
        i = torch.arange(end - start, device=q.device)
        allowed = i[:, None] >= i[None, :]
        if window is not None and window >= 0:
            allowed &= i[:, None] - i[None, :] <= window
        scores = (qd @ kd.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
        p = (scores - scores.amax(-1, keepdim=True)).exp()
        outs.append(((p / p.sum(-1, keepdim=True)) @ vd).transpose(0, 1).to(q.dtype))
    return torch.cat(outs)

def cached_attention(q, k, v, k_cache, v_cache, lengths, key_span, window, scale, backend):
    """Decoding: row b writes S new tokens at positions lengths[b]..lengths[b] + S - 1 of its cache (in place) and
    attends over it with attention()'s mask. q, k, v: (B, S, H, D); k_cache, v_cache: (B, capacity, H, D); lengths:
    int32 (B,) tokens cached before; key_span: host ints (lo, hi), lo <= the first key a new token may see and hi =
    max(lengths) + S (SDPA reads only that slice), or None for S = 1: each row's window + 1 keys gathered (no window:
    the whole cache, masked), shapes set by the tensors alone (a compiled step). flex, no gain here, decodes by SDPA."""
    window = -1 if window is None or window < 0 else window
    pos = lengths.long()[:, None] + torch.arange(q.size(1), device=q.device)  # (B, S)
    rows = torch.arange(q.size(0), device=q.device)[:, None]
    k_cache[rows, pos], v_cache[rows, pos] = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if backend in ("fa3", "fa2"):
        # FA only reads the cache: its op declares no mutation, so an append inside it (k=, v=) would be lost under
        # CUDA graphs; traced, FA3's fake refuses num_splits <= 0 (its heuristic), so a compiled step fixes it at 1
        out = _flash_func(backend, "flash_attn_with_kvcache")(
            q.to(k_cache.dtype).contiguous(), k_cache, v_cache, cache_seqlens=lengths + q.size(1), softmax_scale=scale,
            causal=True, window_size=(window, 0), num_splits=1 if torch.compiler.is_compiling() else 0)
        return (out[0] if isinstance(out, tuple) else out).to(q.dtype)
    if key_span is None and window >= 0:
        j = pos - torch.arange(window, -1, -1, device=q.device)  # (B, window + 1): the visible positions, or < 0
        keys, values = (c[rows, j.clamp(min=0)].to(q.dtype).transpose(1, 2) for c in (k_cache, v_cache))
        mask = (j >= 0)[:, None]
    else:
        lo, hi = key_span or (0, k_cache.size(1))
        j = torch.arange(lo, hi, device=q.device)
        mask = j <= pos[..., None]
        if window >= 0:
            mask &= pos[..., None] - j <= window
        keys, values = (c[:, lo:hi].to(q.dtype).transpose(1, 2) for c in (k_cache, v_cache))  # (B, H, hi - lo, D)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=scale)
    return y.transpose(1, 2)

# -- the Batch every forward reads, and its packer --------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    """What GPT.hidden reads: packed documents back to back, unpadded (pack()), or a KV cache's (B, S) new tokens."""
    inputs: torch.Tensor      # (T,) token ids
    prev_ids: torch.Tensor    # (T,) previous token of the same document, -1 at a document start
    positions: torch.Tensor   # (T,) position inside the segment: the angles a document gets when it is alone
    targets: torch.Tensor     # (T, K) token k+1 ahead, -1 where that crosses a document end
    cu_seqlens: torch.Tensor  # int32, segment starts padded with T to a power of two >= 128 (few distinct lengths)
    max_seqlen: int           # bound on segment lengths (a stage's max_doc_len: static, so compiled code is reused)
    segment_lengths: np.ndarray = None  # on the host: what attention FLOPs are counted from
    branches: "Branches" = None  # segments that share a prefix (pack_branches), else None

@dataclasses.dataclass
class Branches:
    """A packed batch's shared-prefix branches (this section's top), split as FA's two varlen calls need them."""
    branch: torch.Tensor      # (T,) 0 in a prefix or a plain segment, b >= 1 in its segment's b-th branch
    positions: torch.Tensor   # (T,) the Batch's positions: continuing from the prefix end in every branch
    trunk: tuple              # (token indices, cu_seqlens, max_seqlen) of branch 0: every prefix, as plain documents
    queries: tuple            # the same of the branches' tokens, in order
    keys: tuple               # the same per branch of its prefix's tokens, then its own: the keys its queries see
    spread: int               # most branch tokens of one segment: a key a query sees lies <= window + spread back

def padded_length(n):
    return max(128, 1 << (n - 1).bit_length())

def to_device(array, dtype, device):
    """A host array as a new tensor on `device`; to a GPU via pinned memory, not blocking (overlapping queued work)."""
    t = torch.from_numpy(np.array(array, dtype=np.float64 if dtype.is_floating_point else np.int64)).to(dtype)  # a copy
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)

def pack(inputs, segment_starts, document_starts, targets, max_seqlen, device):
    """The Batch of tokens `inputs`: attention segments start at `segment_starts` (sorted, from 0), documents (no
    previous token) at `document_starts`; positions restart per segment: RoPE angles exactly the segment's alone."""
    T = len(inputs)
    cu = np.full(padded_length(len(segment_starts) + 1), T, dtype=np.int32)
    cu[:len(segment_starts)] = segment_starts
    positions = np.arange(T) - np.asarray(segment_starts)[np.searchsorted(segment_starts, np.arange(T), side="right") - 1]
    prev = np.concatenate([[-1], inputs[:-1]]).astype(np.int64)
    prev[document_starts] = -1
    cu = to_device(cu, torch.int32, device)
    torch._dynamo.maybe_mark_dynamic(cu, 0)  # cu's length varies: compiled code takes any, not recompiling mid-run
    tensors = (to_device(x, torch.long, device) for x in (inputs, prev, positions, targets))
    return Batch(*tensors, cu, max_seqlen, np.diff(list(segment_starts) + [T]))

def pack_sequences(sequences, device):
    """Token arrays packed back to back, each its own document (a left-truncated one need not start with BOS), with
    one target each (its next token, -1 at its end); and the n + 1 start offsets, ending in T."""
    starts = np.cumsum([0] + [len(t) for t in sequences])
    ids = np.concatenate(sequences).astype(np.int64)
    targets = np.concatenate([ids[1:], [-1]])
    targets[starts[1:] - 1] = -1
    return pack(ids, starts[:-1], starts[:-1], targets[:, None], int(np.diff(starts).max()), device), starts

def shared_prefix_groups(sequences):
    """Consecutive token arrays grouped greedily: (first, count, prefix length) each. A sequence joins when the prefix
    shrinking from P to P' saves n P' - (n - 1) P tokens, >= the branch it adds (len - P': branch tokens widen SDPA's
    band; a shared <|bos|> alone is not worth it). Branches keep >= 1 token; a group of one is all prefix."""
    groups = []
    for i, seq in enumerate(sequences):
        if groups:
            first, n, P = groups[-1]
            head = sequences[first]
            m = min(P, len(head) - 1, len(seq) - 1)
            differ = np.flatnonzero(head[:m] != seq[:m])
            shared = int(differ[0]) if len(differ) else m
            saved = n * shared - (n - 1) * P
            if saved > 0 and saved >= len(seq) - shared:
                groups[-1] = (first, n + 1, shared)
                continue
        groups.append((i, 1, len(seq)))
    return groups

def pack_branches(sequences, device):
    """Token arrays packed as shared_prefix_groups: each group one segment, its prefix once, then each sequence's
    remaining tokens (a branch), positions and previous tokens those of the sequence alone. Returns the Batch (no
    targets: a prefix's last token precedes every branch) and per sequence the buffer index of each of its tokens."""
    inputs, prev, positions, branch, where, seg_starts, T = [], [], [], [], [None] * len(sequences), [], 0
    trunk, queries, keys = [], [], []
    for first, n, P in shared_prefix_groups(sequences):
        seg_starts.append(T)
        for b, i in enumerate([first, *(range(first, first + n) if n > 1 else [])]):  # b = 0: the prefix
            seq = sequences[i]
            lo, hi = (P, len(seq)) if b else (0, P)
            inputs.append(seq[lo:hi])
            prev.append(np.concatenate([[-1], seq])[lo:hi])
            positions.append(np.arange(lo, hi))
            branch.append(np.full(hi - lo, b, dtype=np.int64))
            where[i] = np.arange(T, T + hi - lo)
            T += hi - lo
            if b == 0:
                trunk.append(where[i])
            else:  # a branch's keys: its prefix's, then its own
                queries.append(where[i])
                where[i] = np.concatenate([trunk[-1], where[i]])
                keys.append(where[i])
    cu = np.full(padded_length(len(seg_starts) + 1), T, dtype=np.int32)
    cu[:len(seg_starts)] = seg_starts
    dev = lambda parts, dtype=torch.long: to_device(np.concatenate(parts) if parts else np.zeros(0), dtype, device)
    varlen = lambda parts: (dev(parts), dev([np.cumsum([0] + [len(x) for x in parts])], torch.int32),
                            max(map(len, parts), default=0))  # one FA call's tokens, cu_seqlens and max_seqlen
    positions_t, segment_lengths = dev(positions), np.diff(seg_starts + [T])
    branches = Branches(dev(branch), positions_t, varlen(trunk), varlen(queries), varlen(keys),
                        int((segment_lengths - np.array([len(x) for x in trunk])).max()))
    return Batch(dev(inputs), dev(prev), positions_t, None, to_device(cu, torch.int32, device),
                 int(segment_lengths.max()), segment_lengths, branches), where

def make_batch(buf, bos_id, max_doc_len, n_targets, device):
    """Packed varlen batch from a token window `buf` of T + n_targets tokens. Segments start at every BOS and
    every max_doc_len tokens inside a document, so long documents (books) are trained on whole, in pieces."""
    T = len(buf) - n_targets
    inputs = buf[:T]
    doc_start = np.flatnonzero(inputs == bos_id).tolist()
    starts = [s for a, b in zip([0] + doc_start, doc_start + [T]) for s in range(a, b, max_doc_len)]
    # target k is valid while no BOS lies between it and the input (a BOS target is fine): MTP stays in the document
    bos_seen = np.cumsum(buf == bos_id)
    targets = np.stack([buf[1 + k:T + 1 + k] for k in range(n_targets)], axis=1).astype(np.int64)
    for k in range(1, n_targets):
        targets[bos_seen[k:T + k] != bos_seen[:T], k] = -1
    return pack(inputs, sorted(set(starts)), doc_start, targets, min(max_doc_len, T), device)


# =============================================================================================================
# 5. Model: modded-nanogpt's architecture, restricted to what a KV cache serves exactly.
# Left out: paired-head attention (two tokens' heads interleaved into one doubled sequence: a per-token cache cannot
# hold it), partial key offset (token t's key takes dims of token t-1's: a cache would keep each row's previous
# unshifted key per layer), XSA / MUDD / DC attention (much machinery for small gains at our scales), FP8 MLP (GPU-only,
# unmeasured here). models/modded-nanogpt has the first two.

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a trained model is, stored with its weights (state.json "model") so a checkpoint loads alone (load_model):
    architecture, vocabulary, and the windows and document length it is served with (its last pretraining stage's)."""
    vocab_size: int
    n_layers: int
    model_dim: int
    n_heads: int
    head_dim: int
    mlp_mult: int
    vocab_multiple: int
    long_window_layers: str
    value_embed_layers: str
    bigram_rows_per_vocab: float
    attn_scale: float
    softcap: tuple
    short_window: int
    long_window: int
    max_doc_len: int

    @classmethod
    def of(cls, cfg, vocab_size):
        served = {"short_window", "long_window", "max_doc_len"}  # those of its last stage
        return cls(vocab_size=vocab_size, **{f.name: getattr(cfg.stages[-1] if f.name in served else cfg, f.name)
                                             for f in dataclasses.fields(cls) if f.name != "vocab_size"})

GATE_DIMS = 12  # the gates (smear, attention, value embedding) read the first 12 dims of their input
LOGITS_CHUNK = 8192  # rows of logits evaluation computes at once: bounded memory at any vocabulary size

def norm(x):
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)  # RMS norm in fp32, returned in x's dtype (PRECISION)

def yarn_attn_factor(old_window, new_window):
    return 0.2 * math.log(new_window / old_window) + 1  # YaRN's attention-scale growth as the window grows

class Rotary(nn.Module):
    """Half-truncated RoPE: the first half of each head's dims rotate (periods 2*pi to 2*pi*1024 tokens), the second
    half none. `yarn` stretches the slow frequencies for a longer window; they are a buffer: checkpoints keep them."""

    def __init__(self, head_dim):
        super().__init__()
        n_rot = head_dim // 4
        freqs = torch.cat([(1 / 1024) ** torch.linspace(0, 1, n_rot), torch.zeros(head_dim // 2 - n_rot)])
        self.register_buffer("freqs", freqs, persistent=True)

    def yarn(self, old_window, new_window, alpha=1.0, beta=32.0):
        """YaRN: stretch frequencies turning < `beta` times in the old window; returns the attention scale's growth."""
        ramp = ((old_window * self.freqs / (2 * math.pi) - alpha) / (beta - alpha)).clamp(0, 1)  # rotations in window
        s = old_window / new_window
        self.freqs.mul_(s + ramp * (1 - s))
        return yarn_attn_factor(old_window, new_window)

    def forward(self, x, positions):
        """x: (..., H, D); positions: (...) positions (only differences matter inside a document)."""
        angles = positions.to(self.freqs.dtype)[..., None] * self.freqs
        cos, sin = angles.cos()[..., None, :].to(x.dtype), angles.sin()[..., None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

class Block(nn.Module):
    def __init__(self, cfg, has_value_embed):
        super().__init__()
        inner, dim = cfg.n_heads * cfg.head_dim, cfg.model_dim
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        bound = math.sqrt(3) * 0.5 / math.sqrt(dim)  # uniform with std 0.5/sqrt(dim)
        self.q, self.k, self.v = (nn.Parameter(torch.empty(inner, dim).uniform_(-bound, bound)) for _ in range(3))
        self.o = nn.Parameter(torch.zeros(dim, inner))  # zero-init output projections: each block starts as identity
        self.fc = nn.Parameter(torch.empty(cfg.mlp_mult * dim, dim).uniform_(-bound, bound))
        self.proj = nn.Parameter(torch.zeros(dim, cfg.mlp_mult * dim))
        self.attn_gate = nn.Parameter(torch.zeros(cfg.n_heads, GATE_DIMS))  # sparse attention gate, starts at 0.5
        self.ve_gate = nn.Parameter(torch.zeros(cfg.n_heads, GATE_DIMS)) if has_value_embed else None  # starts at 1

    def forward(self, x, ve, rotary, positions, attn_scale, window, attend):
        """x: (..., dim) tokens; attend(q, k, v, window, scale): packed attention() or a KV cache's."""
        h = norm(x)
        heads = (*x.shape[:-1], self.n_heads, self.head_dim)
        q, k, v = (h @ self.q.T).view(heads), (h @ self.k.T).view(heads), (h @ self.v.T).view(heads)
        q, k = rotary(norm(q), positions), rotary(norm(k), positions)  # QK-norm, then rotate
        if ve is not None:
            v = v + 2 * torch.sigmoid(h[..., :GATE_DIMS] @ self.ve_gate.T)[..., None] * ve.view_as(v)
        y = attend(q, k, v, window=window, scale=attn_scale)
        y = y * torch.sigmoid(h[..., :GATE_DIMS] @ self.attn_gate.T)[..., None]
        x = x + y.flatten(-2) @ self.o.T
        return x + relu2_mlp(norm(x), self.fc, self.proj)

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg  # a ModelConfig
        vocab_size = self.vocab_size = cfg.vocab_size
        padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple  # matmul-friendly rows; extra ids never occur
        dim, L = cfg.model_dim, cfg.n_layers
        self.value_embed_layers = [i for i in parse_ints(cfg.value_embed_layers) if i < L]
        self.long_window_layers = set(i for i in parse_ints(cfg.long_window_layers) if i < L)
        self.blocks = nn.ModuleList(Block(cfg, i in self.value_embed_layers) for i in range(L))
        self.lm_head = nn.Parameter(torch.randn(padded, dim) * 0.005)
        self.embed = nn.Parameter(self.lm_head.detach().clone())  # used once untied; until then lm_head serves both
        self.value_embeds = nn.Parameter(torch.randn(len(self.value_embed_layers), padded, cfg.n_heads * cfg.head_dim) * 0.01)
        self.bigram_rows = max(2, int(cfg.bigram_rows_per_vocab * vocab_size))
        self.bigram_embed = nn.Parameter(torch.zeros(self.bigram_rows, dim))
        self.smear_gate = nn.Parameter(torch.zeros(GATE_DIMS))
        # residual mixing per block: x = a*x + b*x0 + c*bigram; U-net skips from the first half into the second
        self.block_lambdas = nn.Parameter(torch.tensor([[1.0, 0.0, 0.05]] * L))
        self.skip_weights = nn.Parameter(torch.ones(L // 2))
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.rotary = Rotary(cfg.head_dim)
        # training-time state: buffers (saved in checkpoints) mirrored by Python values, constants to compiled code
        self.register_buffer("attn_scale", torch.tensor(cfg.attn_scale))
        self.register_buffer("tied", torch.tensor(True))
        self.sync_flags()

    def sync_flags(self):
        self.is_tied, self.scale = bool(self.tied), float(self.attn_scale)

    def untie(self):
        """Give the input embedding its own weights (a copy of lm_head); the optimizer copies the state too."""
        with torch.no_grad():
            self.embed.copy_(self.lm_head)
        self.tied.fill_(False)
        self.sync_flags()

    def grow_window(self, old_window, new_window):
        self.attn_scale.mul_(self.rotary.yarn(old_window, new_window))
        self.sync_flags()

    def windows(self, short_window=None, long_window=None):
        """Per-layer attention windows: a training stage's, else the ones the model is evaluated and served with."""
        short_window, long_window = short_window or self.cfg.short_window, long_window or self.cfg.long_window
        return [long_window if i in self.long_window_layers else short_window for i in range(self.cfg.n_layers)]

    def bigram_ids(self, ids, prev_ids):
        h = ((36313 * ids) ^ (27191 * prev_ids.clamp(min=0))) % (self.bigram_rows - 1)
        return torch.where(prev_ids < 0, self.bigram_rows - 1, h)

    def hidden(self, batch, windows, backend="sdpa", cache=None):
        """Final hidden states (T, dim) of a packed Batch; windows: per layer. With a KVCache, inputs, prev_ids and
        positions are (B, S) tokens appended to the rows' caches; all else being per token, both compute the same."""
        ids, prev_ids, positions = batch.inputs, batch.prev_ids, batch.positions
        # lookups in autocast's dtype where autocast(rt) is on, else fp32: the residual stream stays in it (PRECISION)
        act = torch.get_autocast_dtype(ids.device.type) if torch.is_autocast_enabled(ids.device.type) else torch.float32
        lookup = lambda index, table: F.embedding(index, table).to(act)
        embed = self.lm_head if self.is_tied else self.embed
        e = lookup(ids, embed)
        # smear: each token takes a gated share of the previous token's embedding (not across documents)
        before = lookup(prev_ids.clamp(min=0), embed)
        before = torch.where((prev_ids >= 0)[..., None], before, torch.zeros_like(before))
        e = e + self.smear_lambda * torch.sigmoid(e[..., :GATE_DIMS] @ self.smear_gate)[..., None] * before
        x = x0 = norm(e)
        bigram = lookup(self.bigram_ids(ids, prev_ids), self.bigram_embed)
        skips, L, block_masks = [], self.cfg.n_layers, {}
        if backend == "flex" and cache is None:  # one BlockMask per distinct window, shared by its layers
            block_masks = {w: _compiled_flex()[0](batch.cu_seqlens, len(ids), w, batch.branches) for w in set(windows)}
        for i, block in enumerate(self.blocks):
            if i >= L - L // 2 and skips:
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            a, b, c = self.block_lambdas[i]
            x = a * x + b * x0 + c * bigram
            ve = lookup(ids, self.value_embeds[self.value_embed_layers.index(i)]) if i in self.value_embed_layers else None
            flex = {"block_mask": block_masks[windows[i]]} if block_masks else {}
            attend = (functools.partial(cache.attend, i) if cache is not None else
                      functools.partial(attention, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                                        backend=backend, branches=batch.branches, **flex))
            x = block(x, ve, self.rotary, positions, self.scale, windows[i], attend)
            if i < L // 2:
                skips.append(x)
        return norm(x)

    def logits(self, h):
        """fp32 softcapped logits of final hidden states h: the matmul in h's dtype, in or out of autocast."""
        return softcap(h @ self.lm_head[:self.vocab_size].T.to(h.dtype), self.cfg.softcap)

    def decode(self, ids, cache, windows, last_only=False, step=None):
        """Logits (B, S, vocab) of ids (B, S) appended to the rows of a KVCache (prefill: S = prompt length), or
        (B, 1, vocab) of the last token only. step: decode_logits or a compiled form of it."""
        cache.reserve(ids.size(1))
        logits = (step or decode_logits)(self, ids, cache, windows, last_only)
        cache.advance(ids)
        return logits

def decode_logits(model, ids, cache, windows, last_only):
    """GPT.decode without the cache's host bookkeeping, the cache written in place (what the engine compiles)."""
    prev = torch.cat([cache.last_ids[:, None], ids[:, :-1]], dim=1)
    positions = cache.lengths.long()[:, None] + torch.arange(ids.size(1), device=ids.device)
    h = model.hidden(Batch(ids, prev, positions, None, None, None), windows, cache=cache)
    return model.logits(h[:, -1:] if last_only else h)


# =============================================================================================================
# 6. Optimizer: NorMuon (Polar Express) for matrices, Adam for everything else, sharded across ranks

# Polar Express (Amsel et al., arXiv:2505.16932): per iteration, the odd polynomial p(x) = a x + b x^3 + c x^5 applied
# to the singular values. Computed for 5 iterations, safety factor 2e-2, cushion 2 (the set modded-nanogpt uses).
POLAR_EXPRESS_COEFFS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))

def polar_express(G, steps=5, dtype=None):
    """Approximately orthogonalise G (..., rows, cols), batched: U S V^T -> U V^T, singular values near 1 (not on it).
    Runs in and returns `dtype`: default bf16 where Triton kernels run (sm80+), else fp32 (CPU bf16: ~100x slower)."""
    assert 1 <= steps <= len(POLAR_EXPRESS_COEFFS), steps
    dtype = dtype or (torch.bfloat16 if _use_triton(G) else torch.float32)
    # Iterate on the wide orientation so the Gram matrix A = X X^T is the small one (an odd polynomial commutes with
    # transposition); contiguous because the Gram kernels expect row-major input.
    tall = G.size(-2) > G.size(-1)
    X = (G.mT if tall else G).to(dtype).contiguous()
    # The Frobenius norm bounds the spectral norm; the 2% extra keeps it below 1 after bf16 rounding.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        B = ba_plus_caa(xxt(X), b, c)  # b A + c A^2
        X = torch.matmul(B, X).add_(X, alpha=a)  # a X + b X X^T X + c (X X^T)^2 X
    return X.mT if tall else X

def muon_momentum(step, total_steps, warmup=300, cooldown=50, low=0.85, high=0.95):
    if step < warmup:
        return low + (high - low) * step / warmup
    if step > total_steps - cooldown:
        return high - (high - low) * (step - (total_steps - cooldown)) / cooldown
    return high

def normuon_update(p, g, momentum, second_moment, mu, beta2, lr, wd, eps=1e-10):
    """One NorMuon step on fp32 matrices (n, rows, cols): state buffers updated in place, new values returned."""
    momentum.lerp_(g, 1 - mu)  # EMA form: buf = mu buf + (1 - mu) g
    V = polar_express(g.lerp(momentum, mu)).float()  # Nesterov: (1 - mu) g + mu buf
    # NorMuon: divide each row (or column, whichever dim is larger) by its running RMS, then restore the
    # orthogonalised update's Frobenius norm so only the distribution across neurons changes.
    second_moment.lerp_(V.square().mean(dim=-1 if V.size(-2) >= V.size(-1) else -2, keepdim=True), 1 - beta2)
    norm = V.norm(dim=(-2, -1), keepdim=True)
    V = V * second_moment.clamp_min(eps).rsqrt()
    V = V * (norm / V.norm(dim=(-2, -1), keepdim=True).clamp_min(eps))
    # Cautious weight decay: only shrink weights the update already pushes towards zero (same sign: p -= lr V; a zero
    # gradient leaves them alone). Decay lr*wd is linear in lr (decoupled AdamW, as nanochat): wd keeps its meaning
    # whatever the lr and schedule; modded-nanogpt's is quadratic in the scheduled lr (wd_lin = 0.023*1.2 there).
    return p - lr * (V + wd * ((V * p) > 0) * p)

def adam_update(p, g, exp_avg, exp_avg_sq, step, betas, lr, wd, eps=1e-10):
    """torch.optim.Adam's bias-corrected step, fp32, moments in place; cautious decay lr*wd (see normuon_update)."""
    beta1, beta2 = betas
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # eps is added to the bias-corrected sqrt(v), as torch does (modded adds it before the correction; at 1e-10 moot)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    update = exp_avg / denom * (lr / (1 - beta1 ** step))
    return p - update - lr * wd * ((update * p) > 0) * p

@dataclasses.dataclass
class OptimLabel:
    """Settings shared by every parameter with this label. Effective lr = lr * lr_mul * lr_factor (the schedule),
    times max(1, rows/cols)**0.5 for NorMuon; effective decay = wd * wd_mul (applied as lr * decay)."""
    kind: str  # "normuon" (matrices) or "adam"
    lr: float
    wd: float = 0.0
    lr_mul: float = 1.0
    wd_mul: float = 1.0
    betas: tuple = (0.9, 0.95)  # Adam only

class _Group:
    """`members` ((name, tensor) pairs) updated together, viewed as rows of shape `tail` (NorMuon: (rows, cols); Adam:
    ()) stacked on dim 0. Sharded: n rows zero-padded to world * chunk, rank r updating [r*chunk, (r+1)*chunk)."""

    def __init__(self, label, spec, tail, sharded, members, world, rank):
        self.label, self.spec, self.tail, self.sharded = label, spec, tuple(tail), sharded
        self.names, self.params = [name for name, _ in members], [p for _, p in members]
        self.step = 0  # optimizer steps this group took (bias correction)
        self.rows = [p.numel() // math.prod(self.tail) for p in self.params]
        self.offsets, self.n = [sum(self.rows[:i]) for i in range(len(self.rows))], sum(self.rows)
        self.shards = world if sharded else 1
        self.chunk = -(-self.n // self.shards)
        self.start = rank * self.chunk if sharded else 0
        if spec.kind == "normuon":
            r, c = self.tail
            self.state_tails = {"momentum": (r, c), "second_moment": (r, 1) if r >= c else (1, c)}
        else:
            self.state_tails = {"exp_avg": (), "exp_avg_sq": ()}
        self.state = {k: torch.zeros(self.chunk, *t, device=self.params[0].device) for k, t in self.state_tails.items()}

    def rows_of(self, tensors, pad_to, start=0, stop=math.inf):
        """Rows [start, stop) of the stacked `tensors` (one per param; None: zeros), zero-padded to `pad_to` rows."""
        ref, parts = self.params[0], []
        for t, off, rows in zip(tensors, self.offsets, self.rows):
            a, b = max(start, off), min(stop, off + rows)
            if a < b:
                parts.append(ref.new_zeros(b - a, *self.tail) if t is None
                             else t.detach().reshape(-1, *self.tail)[a - off:b - off])
        parts.append(ref.new_zeros(pad_to - sum(x.size(0) for x in parts), *self.tail))
        return torch.cat(parts)

    def full_shape(self, p, key):  # of p's unsharded state `key`: p's leading dims, then the per-row state shape
        return p.shape[:p.ndim - len(self.tail)] + self.state_tails[key]

def _launch(collective, *tensors, **kwargs):
    """Start an async collective. gloo silently reduces the wrong memory for non-contiguous tensors: refuse them."""
    assert all(t.is_contiguous() for t in tensors), "collective on a non-contiguous tensor"
    return collective(*tensors, async_op=True, **kwargs)

class NorMuonAdam:
    """NorMuon for matrices, Adam for the rest, ZeRO-style over the ranks of the default process group, if any.
    label_of: name -> label (param_label); labels: label -> OptimLabel fields. NorMuon matrices are banked by (label,
    shape), each rank orthogonalising whole ones (reduce-scatter, all-gather); a label's Adam params are flattened, the
    big ones (numel >= shard_numel) sharded alike (Adam is elementwise), the rest all-reduced. A group with no gradient
    skips the step; in one that steps a missing gradient counts as zero. Which ones exist must match across ranks."""

    def __init__(self, named_params, label_of, labels, beta2=0.9, eps=1e-10, shard_numel=16384):
        self.labels = {k: OptimLabel(**v) if isinstance(v, dict) else v for k, v in labels.items()}
        self.beta2, self.eps = beta2, eps
        distributed = dist.is_available() and dist.is_initialized()
        self.world, self.rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        members = {}  # (label, dtype, tail, sharded) -> [(name, parameter)]
        for name, p in named_params:
            if not p.requires_grad:
                continue
            label = label_of(name)
            if label not in self.labels:
                raise ValueError(f"parameter {name!r}: no label in the table ({', '.join(self.labels)}) matches (got {label!r})")
            spec = self.labels[label]
            assert p.is_contiguous(), f"{name}: the optimizer writes parameters through views"
            if spec.kind == "normuon":
                assert p.ndim >= 2, f"{name}: NorMuon needs a matrix (or a stack of them), got shape {tuple(p.shape)}"
                tail, sharded = tuple(p.shape[-2:]), True
            elif spec.kind == "adam":
                tail, sharded = (), p.numel() >= shard_numel
            else:
                raise ValueError(f"label {label!r}: kind must be 'normuon' or 'adam', got {spec.kind!r}")
            members.setdefault((label, p.dtype, tail, sharded), []).append((name, p))
        self.groups = [_Group(label, self.labels[label], tail, sharded and self.world > 1, pairs, self.world, self.rank)
                       for (label, _, tail, sharded), pairs in members.items()]
        self.where = {name: (g, i) for g in self.groups for i, name in enumerate(g.names)}

    @torch.no_grad()
    def step(self, lr_factor=1.0, muon_momentum=0.95):
        """Update every parameter from its .grad averaged over ranks; lr_factor scales each lr, muon_momentum is mu."""
        active, pending, gathers = [g for g in self.groups if any(p.grad is not None for p in g.params)], [], []
        for g in active:  # 1. launch every reduction
            grads = g.rows_of([p.grad for p in g.params], g.shards * g.chunk)
            if g.sharded:
                chunk = grads.new_empty(g.chunk, *g.tail)
                pending.append((chunk, _launch(dist.reduce_scatter_tensor, chunk, grads, op=dist.ReduceOp.AVG)))
            else:
                work = _launch(dist.all_reduce, grads, op=dist.ReduceOp.AVG) if self.world > 1 else None
                pending.append((grads, work))
        # 2. per group: wait for its gradients, update this rank's rows, launch the gather at once, so communication
        # overlaps the optimizer math (launching from post-accumulate-grad hooks would overlap the backward pass too).
        for g, (grad, work) in zip(active, pending):
            if work is not None:
                work.wait()
            g.step += 1
            spec, grad = g.spec, grad.float()
            p = g.rows_of(g.params, g.chunk, g.start, g.start + g.chunk).float()
            lr, wd = spec.lr * spec.lr_mul * lr_factor, spec.wd * spec.wd_mul
            if spec.kind == "normuon":
                new = normuon_update(p, grad, g.state["momentum"], g.state["second_moment"], muon_momentum,
                                     self.beta2, lr * max(1.0, g.tail[0] / g.tail[1]) ** 0.5, wd, self.eps)
            else:
                new = adam_update(p, grad, g.state["exp_avg"], g.state["exp_avg_sq"], g.step, spec.betas, lr, wd, self.eps)
            new = new.to(g.params[0].dtype)
            full = new.new_empty(g.shards * g.chunk, *g.tail) if g.sharded else new
            gathers.append((g, full, _launch(dist.all_gather_into_tensor, full, new) if g.sharded else None))
        for g, full, work in gathers:  # 3. write the gathered rows back into the parameters
            if work is not None:
                work.wait()
            for p, off, rows in zip(g.params, g.offsets, g.rows):
                p.view(-1, *g.tail).copy_(full[off:off + rows])

    def zero_grad(self):
        for g, i in self.where.values():
            g.params[i].grad = None

    # -- checkpoints: full (unsharded) state keyed by parameter name, so N ranks can resume on M --
    def _param_states(self, g):
        """{name: {key: full state shaped for that param, "step": int}} for group g (a collective when sharded)."""
        full = dict(g.state)
        if g.sharded:
            for key, t in g.state.items():
                gathered = t.new_empty(g.shards * g.chunk, *t.shape[1:])
                _launch(dist.all_gather_into_tensor, gathered, t).wait()
                full[key] = gathered[:g.n]
        return {name: {**{k: t[off:off + rows].reshape(g.full_shape(p, k)) for k, t in full.items()}, "step": g.step}
                for name, p, off, rows in zip(g.names, g.params, g.offsets, g.rows)}

    def _set_param_state(self, name, state):
        g, i = self.where[name]
        a, b = max(g.start, g.offsets[i]), min(g.start + g.chunk, g.offsets[i] + g.rows[i])  # its rows in our chunk
        for key in g.state:
            want, got = tuple(g.full_shape(g.params[i], key)), tuple(state[key].shape) if key in state else "missing"
            if got != want:
                raise ValueError(f"optimizer state {name}.{key}: expected shape {want}, got {got}")
            if a < b:
                src = state[key].reshape(-1, *g.state_tails[key])[a - g.offsets[i]:b - g.offsets[i]]
                g.state[key][a - g.start:b - g.start].copy_(src)
        g.step = int(state["step"])

    def state_dict(self):
        """{"state": {param name: {full CPU tensors, "step": int}}} for torch.load(weights_only=True); a collective."""
        return {"state": {name: {k: v.cpu().clone() if torch.is_tensor(v) else v for k, v in st.items()}
                          for g in self.groups for name, st in self._param_states(g).items()}}

    def load_state_dict(self, sd):
        """Load a state_dict saved with any number of ranks. Every rank passes the whole dict."""
        missing, extra = set(self.where) - set(sd["state"]), set(sd["state"]) - set(self.where)
        if missing or extra:
            raise ValueError(f"optimizer state does not match the parameters: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for g in self.groups:
            steps = {int(sd["state"][name]["step"]) for name in g.names}
            if len(steps) > 1:
                raise ValueError(f"parameters of one optimizer group ({', '.join(g.names)}) have different step counts {steps}")
            for name in g.names:
                self._set_param_state(name, sd["state"][name])

    def copy_state(self, src, dst):
        """dst (embed, untied from lm_head) takes src's state, its group src's step count; a collective if sharded."""
        self._set_param_state(dst, self._param_states(self.where[src][0])[src])

# -- which rule, lr and weight decay each parameter gets --------------------------------------------------------

def param_label(name):
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("blocks."):
        return {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "fc": "mlp_fc", "proj": "mlp_proj"}.get(leaf, "gate")
    return {"lm_head": "lm_head", "embed": "embed", "value_embeds": "value_embed", "bigram_embed": "bigram",
            "smear_gate": "gate"}.get(leaf, "scalar")

def optimizer_labels(cfg, lr_mul=1.0):
    """modded-nanogpt's table, per label: rule, lr (x lr_mul: SFT's, RL's), weight decay (linear in lr here: modded's
    quadratic one at lr factor 1); mlp_proj x4 where modded's (3072, 768) storage gets x2 from its shape, x2 more."""
    muon_lr, adam_lr = cfg.muon_lr * lr_mul, cfg.adam_lr * lr_mul
    muon = lambda mul=1.0: dict(kind="normuon", lr=muon_lr, lr_mul=mul, wd=cfg.muon_wd)
    adam = lambda betas, mul=1.0, wd_mul=0.0: dict(kind="adam", lr=adam_lr, lr_mul=mul, wd=cfg.adam_wd, wd_mul=wd_mul, betas=betas)
    return {"attn": muon(), "mlp_fc": muon(), "mlp_proj": muon(4.0),
            "lm_head": adam((0.5, 0.95), wd_mul=1.0), "embed": adam((0.5, 0.95), wd_mul=1.0),
            "value_embed": adam((0.75, 0.95), 75, 2.5), "bigram": adam((0.75, 0.95), 75, 2.5),
            "gate": adam((0.9, 0.99)), "scalar": adam((0.9, 0.99), 5)}

def make_optimizer(model, cfg, lr_mul=1.0):
    return NorMuonAdam(list(model.named_parameters()), param_label, optimizer_labels(cfg, lr_mul))


# =============================================================================================================
# 7. Data: readers of every format (writers: data/*.py; formats: data/README.md), the pretraining loader

TOKEN_FILE_MAGIC, TOKEN_FILE_VERSION, HEADER_INTS = 20240520, 1, 256
FORMAT_VERSIONS = {"pretrain": 2, "core": 1, "sft": 1, "chat_eval": 2}  # pretrain 2: shuffled, val_sources
TOKENIZER_VERSION = 2  # 2: its sha256 covers the split pattern and the special tokens too

class DataFormatError(Exception):
    """A prepared file is missing or malformed; the message names the file."""

class Tokenizer:
    """The tokenizer written by data/tokenizer.py: tiktoken ranks in base64 text, JSON metadata, byte counts."""

    def __init__(self, tok_dir):
        import tiktoken
        meta_path, bpe_path = os.path.join(tok_dir, "tokenizer.json"), os.path.join(tok_dir, "tokenizer.tiktoken")
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("version") != TOKENIZER_VERSION:
            raise DataFormatError(f"{meta_path}: tokenizer version {meta.get('version') if isinstance(meta, dict) else None} "
                                  f"is not {TOKENIZER_VERSION} (re-prepare the data with data/prepare.py)")
        specials = meta.get("special_tokens")
        if not (isinstance(meta.get("pattern"), str) and isinstance(meta.get("vocab_size"), int)
                and isinstance(specials, dict) and all(isinstance(v, int) for v in specials.values())
                and "<|bos|>" in specials):
            raise DataFormatError(f"{meta_path}: needs 'pattern' (text), 'vocab_size' (int) and 'special_tokens' "
                                  "({name: id}, <|bos|> among them)")
        ranks, raw = {}, read_bytes(bpe_path)
        lines = raw.splitlines()
        for lineno, line in enumerate(lines, 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise DataFormatError(f"{bpe_path}:{lineno}: expected '<base64 token> <rank>'") from None
        ids = sorted(ranks.values()) + sorted(specials.values())
        if len(ranks) != len(lines) or ids != list(range(len(ids))):
            raise DataFormatError(f"{bpe_path}: tokens and ranks must be unique and, with the special tokens of "
                                  "tokenizer.json after them, number 0, 1, 2, ... without gaps")
        self.special_tokens, self.pattern = specials, meta["pattern"]  # the pattern: for export (hf_tokenizer_json)
        try:  # tiktoken compiles the pattern
            self.enc = tiktoken.Encoding("decoderstack", pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens=specials)
        except ValueError as e:
            raise DataFormatError(f"{meta_path}: 'pattern' is not a valid regular expression ({e})") from None
        self.vocab_size, self.bos_id = self.enc.n_vocab, specials["<|bos|>"]
        if self.vocab_size != meta["vocab_size"]:
            raise DataFormatError(f"{meta_path}: vocab_size {meta['vocab_size']}, but the files define {self.vocab_size} tokens")
        # computed over all that decides the encoding (data/README.md): the data's manifests name the tokenizer by it
        identity = json.dumps({"pattern": meta["pattern"], "special_tokens": specials}, sort_keys=True)
        self.sha256 = hashlib.sha256(raw + b"\0" + identity.encode("utf-8")).hexdigest()
        if self.sha256 != meta.get("sha256"):
            raise DataFormatError(f"{meta_path}: sha256 {self.sha256[:12]}... of tokenizer.tiktoken, the pattern and the "
                                  f"special tokens differs from the {str(meta.get('sha256'))[:12]}... recorded (edited or corrupt)")
        self.token_bytes = load_npy(os.path.join(tok_dir, "token_bytes.npy"), np.int32, (self.vocab_size,))

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def special(self, name):
        return self.special_tokens[name]

def data_tokenizer(data_dir):
    return Tokenizer(os.path.join(data_dir, "tokenizer"))

def read_bytes(path):
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing")
    with open(path, "rb") as f:
        return f.read()

def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()

def read_json(path):
    try:
        return json.loads(read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: malformed JSON ({e})") from None

def load_npy(path, dtype, shape=None):
    """A plain .npy array (never unpickled) of the given dtype and, where given, shape (None = any size)."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataFormatError(f"{path}: not a plain .npy array ({e})") from None
    if arr.dtype != np.dtype(dtype) or (shape is not None and (arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)))):
        raise DataFormatError(f"{path}: expected {np.dtype(dtype)} array of shape {shape}, got {arr.dtype} {arr.shape}")
    return arr

def read_token_file(path, vocab_size, check_ids=True):
    """Memory-map a token file after checking its header against the file size and the tokenizer."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise DataFormatError(f"{path}: truncated header ({size} bytes, expected at least {HEADER_INTS * 4})")
    magic, version, n_tokens, width, file_vocab, file_bos = (int(x) for x in np.fromfile(path, dtype="<i4", count=6))
    if magic != TOKEN_FILE_MAGIC:
        raise DataFormatError(f"{path}: bad magic {magic} (expected {TOKEN_FILE_MAGIC}): not a DecoderStack token file")
    if version != TOKEN_FILE_VERSION:
        raise DataFormatError(f"{path}: token file version {version}, this reader knows {TOKEN_FILE_VERSION}")
    if (width, file_vocab, file_bos) == (0, 0, 0):  # llm.c's header (data/llmc.py links such shards): uint16 ids
        width, file_vocab = 2, vocab_size
    if width not in (2, 4) or width != (2 if file_vocab <= 65536 else 4):
        raise DataFormatError(f"{path}: {width} bytes per token does not fit vocab_size {file_vocab}")
    if file_vocab != vocab_size:
        raise DataFormatError(f"{path}: written for vocab_size {file_vocab}, but the tokenizer has {vocab_size}")
    if size != HEADER_INTS * 4 + n_tokens * width:
        raise DataFormatError(f"{path}: header says {n_tokens} tokens ({HEADER_INTS * 4 + n_tokens * width} bytes), file has {size} bytes (truncated?)")
    tokens = np.memmap(path, dtype="<u2" if width == 2 else "<u4", mode="r", offset=HEADER_INTS * 4, shape=(n_tokens,))
    if check_ids and n_tokens and int(tokens.max()) >= vocab_size:
        raise DataFormatError(f"{path}: token id {int(tokens.max())} >= vocab_size {vocab_size}")
    return tokens

def read_manifest(directory, fmt, tokenizer):
    path = os.path.join(directory, "manifest.json")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != fmt or manifest.get("version") != FORMAT_VERSIONS[fmt]:
        raise DataFormatError(f"{path}: expected format {fmt!r} version {FORMAT_VERSIONS[fmt]}, got {manifest.get('format')!r} version {manifest.get('version')}")
    if manifest.get("tokenizer_sha256") != tokenizer.sha256:
        raise DataFormatError(f"{path}: written with a different tokenizer than {tokenizer.sha256[:12]}... (re-prepare the data)")
    return manifest

def checked_tasks(manifest, path, n_examples, fields, **extra):
    """A manifest's tasks, each with `fields` ({key: type}) and its examples inside the n_examples rows, and its `extra`
    keys (ints or lists of ints): one error naming the manifest, not a KeyError or TypeError deep in an evaluation."""
    for key, kind in extra.items():
        if not isinstance(manifest.get(key), kind) or kind is list and not all(type(x) is int for x in manifest[key]):
            raise DataFormatError(f"{path}: needs {key!r} ({'a list of ints' if kind is list else kind.__name__})")
    tasks, fields = manifest.get("tasks"), {**fields, "first_example": int, "n_examples": int, "random_baseline": (int, float)}
    if not isinstance(tasks, list) or not tasks:
        raise DataFormatError(f"{path}: 'tasks' must be a non-empty list")
    for i, t in enumerate(tasks):
        if not (isinstance(t, dict) and all(isinstance(t.get(k), kind) for k, kind in fields.items())
                and 0 <= t["first_example"] and 0 <= t["n_examples"] and t["first_example"] + t["n_examples"] <= n_examples):
            raise DataFormatError(f"{path}: task {i} needs {', '.join(fields)} with its examples inside the {n_examples} rows")
    return tasks

def pretrain_shards(data_dir, tokenizer, split):
    """Paths of the `split` ('train' or 'val') shards of a prepared pretrain/ directory, in order, every header checked
    (their bytes against the manifest's sha256: ~2 s a GB here, so data/check.py does it, training does not)."""
    directory = os.path.join(data_dir, "pretrain")
    shards, where = read_manifest(directory, "pretrain", tokenizer).get("shards"), f"{directory}/manifest.json"
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str) and
                                               isinstance(s.get("n_tokens"), int) for s in shards):
        raise DataFormatError(f"{where}: 'shards' must be a list of {{file, split, n_tokens, ...}} objects")
    for s in shards:  # file names only: a manifest must not point outside its directory
        if s["file"] != os.path.basename(s["file"]) or s["file"] in ("", ".", ".."):
            raise DataFormatError(f"{where}: shard file {s['file']!r} is not a file name in {directory}")
    picked = [s for s in shards if s.get("split") == split]
    if not picked:
        raise DataFormatError(f"{where}: no {split} shards")
    for s in picked:
        path = os.path.join(directory, s["file"])
        n = len(read_token_file(path, tokenizer.vocab_size, check_ids=False))
        if n != s["n_tokens"]:
            raise DataFormatError(f"{path}: {n} tokens, but {where} says {s['n_tokens']}")
    return [os.path.join(directory, s["file"]) for s in picked]

@dataclasses.dataclass
class PretrainData:
    train: list               # shard paths, in stream order
    val: list
    vocab_size: int
    bos_id: int               # starts every document
    token_bytes: np.ndarray   # int32 [vocab_size]: UTF-8 bytes of each token (bpb weights)
    val_sources: list         # [(name, n_docs)]: runs of the val stream's documents by source ([]: not recorded)
    tokenizer: Tokenizer
    _val: tuple = dataclasses.field(default=None, repr=False)

    def source_names(self):  # the val sources by name (a name in several runs of val_sources is one source)
        return list(dict.fromkeys(name for name, _ in self.val_sources))

    def val_stream(self):
        """(the val shards' tokens back to back, each position's index into source_names() (0 without them))."""
        if self._val is None:
            tokens = np.concatenate([np.asarray(read_token_file(p, self.vocab_size)) for p in self.val])
            doc = np.cumsum(tokens == self.bos_id) - 1  # the document each position lies in (-1 before the first BOS)
            n_docs = [n for _, n in self.val_sources]
            if self.val_sources and sum(n_docs) != doc[-1] + 1:
                raise DataFormatError(f"{self.val[0]}: {doc[-1] + 1} documents, but the manifest's val_sources count {sum(n_docs)}")
            run_source = [self.source_names().index(name) for name, _ in self.val_sources]
            source = (np.repeat(run_source, n_docs)[np.maximum(doc, 0)] if self.val_sources else np.zeros(len(tokens))).astype(np.int64)
            self._val = tokens, source
        return self._val

def pretrain_data(data_dir, vocab_size=0, bos_id=-1):
    """The pretraining data of `data_dir` (pretrain/, tokenizer/); vocab_size, bos_id (0, -1: not given) must agree."""
    llmc = glob.glob(f"{data_dir}/*train_*.bin") + glob.glob(f"{data_dir}/*/*train_*.bin")  # e.g. modded's FineWeb
    if llmc and not os.path.isdir(os.path.join(data_dir, "pretrain")):
        raise DataFormatError(f"{data_dir}: shards but no pretrain/: llm.c shards are read once converted: python "
                              f"data/llmc.py --src {data_dir} --tokenizer gpt2 (GPT-2 ids; else their tokenizer)")
    tokenizer = data_tokenizer(data_dir)
    val, train = (pretrain_shards(data_dir, tokenizer, split) for split in ("val", "train"))
    for name, given, unset in (("vocab_size", vocab_size, 0), ("bos_id", bos_id, -1)):  # unset: the flags' defaults
        if given not in (unset, has := getattr(tokenizer, name)):
            raise DataFormatError(f"{data_dir}/tokenizer: {name} {has}, but --{name.replace('_', '-')} {given}")
    where = f"{data_dir}/pretrain/manifest.json"
    runs = read_manifest(os.path.join(data_dir, "pretrain"), "pretrain", tokenizer).get("val_sources")
    if not (isinstance(runs, list) and all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                           and type(r.get("n_docs")) is int and r["n_docs"] >= 0 for r in runs)):
        raise DataFormatError(f"{where}: 'val_sources' must be a list of {{name, n_docs}} objects")
    data = PretrainData(train, val, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.token_bytes,
                        [(r["name"], r["n_docs"]) for r in runs], tokenizer)
    data.val_stream()  # its documents against val_sources now, not at the first evaluation
    return data

@dataclasses.dataclass
class CoreData:
    tasks: list          # manifest task dicts: label, task_type, num_fewshot, random_baseline, first_example, n_examples
    tokens: np.ndarray     # token segments back to back
    sequences: np.ndarray  # [n_seq, 6] offset_a, len_a, offset_b, len_b, cont_start, cont_end: sequence = a ++ b
    examples: np.ndarray   # [n_ex, 4] task, gold, first sequence, number of sequences
    max_len: int

    def sequence(self, i):  # (tokens, cont_start, cont_end) of sequence i
        off_a, len_a, off_b, len_b, start, end = (int(x) for x in self.sequences[i])
        return np.concatenate([self.tokens[off_a:off_a + len_a], self.tokens[off_b:off_b + len_b]]).astype(np.int64), start, end

def load_core(data_dir, tokenizer):
    directory = os.path.join(data_dir, "core")
    manifest = read_manifest(directory, "core", tokenizer)
    tokens = read_token_file(os.path.join(directory, "tokens.bin"), tokenizer.vocab_size)
    sequences = load_npy(os.path.join(directory, "sequences.npy"), np.int64, (None, 6))
    examples = load_npy(os.path.join(directory, "examples.npy"), np.int64, (None, 4))
    n_tasks = len(checked_tasks(manifest, os.path.join(directory, "manifest.json"), len(examples),
                                {"label": str, "task_type": str}, max_len=int))
    if len(sequences) and max((sequences[:, 0] + sequences[:, 1]).max(), (sequences[:, 2] + sequences[:, 3]).max()) > len(tokens):
        raise DataFormatError(f"{directory}/sequences.npy: a segment runs past the end of tokens.bin")
    if len(examples) and ((examples[:, 0] >= n_tasks).any() or (examples[:, 2] + examples[:, 3]).max() > len(sequences)):
        raise DataFormatError(f"{directory}/examples.npy: a row points past the tasks or sequences")
    return CoreData(manifest["tasks"], tokens, sequences, examples, manifest["max_len"])

@dataclasses.dataclass
class SFTSplit:
    tokens: np.ndarray  # conversations back to back, each starting with BOS
    mask: np.ndarray    # uint8, 1 where the token is a training target
    convs: np.ndarray   # [n_convs + 1] start offsets, then n_tokens

    def conversation(self, i):
        a, b = int(self.convs[i]), int(self.convs[i + 1])
        return np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.mask[a:b], dtype=np.int64)

def load_sft(data_dir, tokenizer, split):
    directory = os.path.join(data_dir, "sft")
    read_manifest(directory, "sft", tokenizer)
    tokens = read_token_file(os.path.join(directory, f"{split}.bin"), tokenizer.vocab_size)
    mask = load_npy(os.path.join(directory, f"{split}_mask.npy"), np.uint8, (len(tokens),))
    convs = load_npy(os.path.join(directory, f"{split}_convs.npy"), np.int64, (None,))
    if len(convs) < 1 or convs[0] != 0 or convs[-1] != len(tokens) or (np.diff(convs) <= 0).any():
        raise DataFormatError(f"{directory}/{split}_convs.npy: offsets must rise from 0 to {len(tokens)}")
    if len(convs) > 1 and (np.asarray(tokens[convs[:-1]]) != tokenizer.bos_id).any():
        raise DataFormatError(f"{directory}/{split}.bin: a conversation does not start with <|bos|>")
    return SFTSplit(tokens, mask, convs)

@dataclasses.dataclass
class ChatEvalData:
    tasks: list       # manifest task dicts: name, kind, first_example, n_examples, random_baseline, answers
    tokens: np.ndarray
    examples: np.ndarray  # [n, 5] task, offset, length, gold (-1: generative), n_choices
    letter_ids: list

    def prompt(self, i):
        _, offset, length, gold, n_choices = (int(x) for x in self.examples[i])
        return np.asarray(self.tokens[offset:offset + length], dtype=np.int64), gold, n_choices

def load_chat_eval(data_dir, tokenizer, name="chat_eval"):
    """The chat-eval file, or another in its format (name "rl": GSM8K's training questions)."""
    directory = os.path.join(data_dir, name)
    manifest = read_manifest(directory, "chat_eval", tokenizer)
    tokens = read_token_file(os.path.join(directory, "tokens.bin"), tokenizer.vocab_size)
    examples = load_npy(os.path.join(directory, "examples.npy"), np.int64, (None, 5))
    path = os.path.join(directory, "manifest.json")
    tasks = checked_tasks(manifest, path, len(examples), {"name": str, "kind": str}, letter_ids=list)
    for i, t in enumerate(tasks):  # what scoring a generated answer reads: one entry per example
        if t["kind"] not in ("categorical", "generative", "code"):
            raise DataFormatError(f"{path}: task {i} has kind {t['kind']!r}; known: categorical, generative, code")
        key, item = {"generative": ("answers", str), "code": ("problems", dict)}.get(t["kind"], (None, None))
        if key and not (isinstance(t.get(key), list) and len(t[key]) == t["n_examples"]
                        and all(isinstance(x, item) for x in t[key])):
            raise DataFormatError(f"{path}: task {i} ({t['kind']}) needs {key!r}: one {item.__name__} per example")
        if t["kind"] == "code" and not all(isinstance(p.get(k), str) for p in t["problems"] for k in ("prompt", "test", "entry_point")):
            raise DataFormatError(f"{path}: task {i}: every problem needs 'prompt', 'test' and 'entry_point' (text)")
    if len(examples) and (examples[:, 1] + examples[:, 2]).max() > len(tokens):
        raise DataFormatError(f"{directory}/examples.npy: a prompt runs past the end of tokens.bin")
    if len(examples) and (examples[:, 0] >= len(tasks)).any():
        raise DataFormatError(f"{directory}/examples.npy: a row points past the tasks")
    return ChatEvalData(manifest["tasks"], tokens, examples, manifest["letter_ids"])

class PretrainLoader:
    """The shards as one token stream, wrapping around; each step takes world_size * T tokens, rank r its own slice.
    Its position (shard, offset, epoch) is checkpointed; `ids`: a PretrainData or Tokenizer (its vocab_size, bos_id)."""

    def __init__(self, paths, ids, rank, world_size, state=None):
        self.paths, self.ids, self.vocab, self.bos = paths, ids, ids.vocab_size, ids.bos_id
        self.rank, self.world_size, self._cache, self._prefetch = rank, world_size, {}, None
        self.state = dict(state or {"shard": 0, "offset": 0, "epoch": 0})

    def fork(self):  # a loader that reads the same upcoming batches, leaving this one where it is
        other = PretrainLoader(self.paths, self.ids, self.rank, self.world_size, self.state)
        other._cache = self._cache
        return other

    def _tokens(self, shard):
        if shard not in self._cache:
            self._cache = {shard: read_token_file(self.paths[shard], self.vocab)}  # ids < vocab: checked once here
            nxt = (shard + 1) % len(self.paths)  # page the next shard in while this one is used
            self._prefetch = threading.Thread(target=lambda: np.asarray(read_token_file(self.paths[nxt], self.vocab, check_ids=False)).sum(), daemon=True)
            self._prefetch.start()
        return self._cache[shard]

    def _take(self, shard, offset, n):  # n tokens from (shard, offset) onwards, crossing shard ends
        parts = []
        while n > 0:
            tokens = self._tokens(shard)
            if offset < len(tokens):
                parts.append(np.asarray(tokens[offset:offset + n]))
                n -= len(parts[-1])
            shard, offset = (shard + 1) % len(self.paths), max(0, offset - len(tokens))
        return np.concatenate(parts)

    def next_batch(self, T, max_doc_len, n_targets, device):
        s = self.state
        buf = self._take(s["shard"], s["offset"] + self.rank * T, T + n_targets)
        s["offset"] += self.world_size * T
        while s["offset"] >= len(self._tokens(s["shard"])):
            s["offset"] -= len(self._tokens(s["shard"]))
            s["shard"] = (s["shard"] + 1) % len(self.paths)
            s["epoch"] += s["shard"] == 0
        return make_batch(buf, self.bos, max_doc_len, n_targets, device)


# =============================================================================================================
# 8. The run: its log (code, header, timed lines, progress), metrics, checkpoints, run directory, loops' bookkeeping.
# RUN_DIR: log.txt, code/ (sources the log names), metrics.json (each phase's results), curves.jsonl, checkpoints.

LOG_SEPARATOR = "=" * 100  # after an invocation's code lines, before its header (baselines/record.py splits on it)

class Logger:
    """Rank 0 prints and appends to log.txt, lines after the header stamped [h:mm:ss] since the start; metrics go to
    curves.jsonl, {"step": the phase's steps done, name: value} a line (resumed: the last for a step wins), wandb."""

    def __init__(self, cfg, rt):
        self.master, self.path, self.wandb = rt.master, os.path.join(cfg.run_dir, "log.txt"), None
        self.curves, self.t0 = os.path.join(cfg.run_dir, "curves.jsonl"), time.time()
        mode = cfg.wandb if cfg.wandb != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "disabled")
        if self.master:
            os.makedirs(cfg.run_dir, exist_ok=True)
        if self.master and mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            import wandb
            self.wandb = wandb.init(project="decoderstack", name=os.path.basename(os.path.abspath(cfg.run_dir)),
                                    config=dataclasses.asdict(cfg), mode=mode, dir=cfg.run_dir)

    def __call__(self, msg, stamp=True):
        if self.master:
            seconds = int(time.time() - self.t0)
            line = f"[{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}] {msg}" if stamp else msg
            print(line, flush=True)
            self.write(line)

    def write(self, text, path=None):  # to log.txt (or path) only, not printed
        with open(path or self.path, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def start(self, cfg, rt):
        header = run_header(rt)
        if self.master:
            self.write("\n".join(code_lines(cfg.run_dir) + [LOG_SEPARATOR]))
            self("\n".join(header + [f"config: {json.dumps(dataclasses.asdict(cfg))}"]), stamp=False)
        return header

    def metrics(self, step, values):
        if self.master:
            self.write(json.dumps({"step": step, **values}), self.curves)
        if self.wandb is not None:  # None on ranks other than 0
            self.wandb.log(values, step=step)

class Progress:
    """A long evaluation's progress in the log every `every` s, one unit a call (rank 0's share); log=None: silent."""

    def __init__(self, log, what, total, unit, every=30.0):
        self.log, self.what, self.total, self.unit, self.every, self.done = log, what, total, unit, every, 0
        self.t0 = self.last = time.time()

    def __call__(self, *_):
        self.done, now = self.done + 1, time.time()
        if self.log is not None and now - self.last >= self.every and self.done < self.total:
            self.last, elapsed = now, now - self.t0
            self.log(f"{self.what}: {self.done:,}/{self.total:,} {self.unit}, {duration(elapsed)} so far, "
                     f"eta {duration(elapsed / self.done * (self.total - self.done))}")

def duration(seconds):
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"

def code_lines(run_dir):
    """`code: NAME sha256 HASH (code/HASH16/NAME)` for this file, then each module beside it that it imported, each
    kept once under RUN_DIR/code/: the log names exactly the code that ran (modded-nanogpt logs it whole), yet small."""
    this = os.path.abspath(__file__)
    paths = {m.__file__ for m in globals().values() if isinstance(m, type(os)) and isinstance(getattr(m, "__file__", None), str)}
    beside = sorted(p for p in paths if os.path.dirname(os.path.abspath(p)) == os.path.dirname(this) and p != this)
    lines = []
    for path in [this] + beside:
        data = read_bytes(path)
        digest, name = hashlib.sha256(data).hexdigest(), os.path.basename(path)
        kept = os.path.join("code", digest[:16], name)
        target = os.path.join(run_dir, kept)
        if not os.path.isfile(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            write_text_atomic(target, data)
        lines.append(f"code: {name} sha256 {digest} ({kept})")
    return lines

@functools.cache
def git_state(directory):
    """(commit, dirty: tracked files differ from it) of the git work tree holding directory; None where git cannot tell
    (no git, repository or commit; one git refuses as another user's). Cached: the state the run started from."""
    git = lambda *args: subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True, timeout=10,
                                       check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None

def run_header(rt):
    """The lines every invocation's log opens with after its code (modded-nanogpt's logs open with the code, then the
    versions), kept in metrics.json as "environment": what is needed to run the same thing again and compare."""
    import shlex
    state = git_state(os.path.dirname(os.path.abspath(__file__)))
    commit = "unknown (no git, or not in a repository)" if state is None else state[0] + (" (dirty)" if state[1] else "")
    gpu = f" ({torch.cuda.get_device_name(rt.device)})" if rt.device.type == "cuda" else ""
    return [f"commit: {commit}", f"command: {shlex.join(sys.argv)}",
            f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"triton {triton.__version__ if triton else 'not installed'}, CUDA {torch.version.cuda or 'none'}",
            f"device: {rt.device}{gpu}, world size {rt.world_size}, attention {rt.backend}"]

def write_text_atomic(path, text):
    with open(path + ".tmp", "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.json")
    return read_json(path) if os.path.isfile(path) else {}

def update_metrics(cfg, rt, values):
    if rt.master:
        write_text_atomic(os.path.join(cfg.run_dir, "metrics.json"),
                          json.dumps({**read_metrics(cfg.run_dir), **values}, indent=1) + "\n")

def phase_times(metrics):
    """metrics.json's phase_time_s as a list; before 2026-12-06 it was {phase: seconds}, one entry per phase."""
    times = metrics.get("phase_time_s", [])
    if isinstance(times, dict):
        times = [{"phase": phase, "checkpoint": None, "seconds": seconds} for phase, seconds in times.items()]
    return [t for t in times if isinstance(t, dict)]

def record_phase_time(cfg, rt, phase, checkpoint, seconds, header):
    """metrics.json's phase_time_s, [{phase, checkpoint (written or evaluated), seconds}] in run order (the same phase
    on the same checkpoint replaces its entry: chat after SFT and after RL are two), and "environment": run_header's."""
    entry = {"phase": phase, "checkpoint": checkpoint and os.path.basename(checkpoint), "seconds": seconds}
    times, key = phase_times(read_metrics(cfg.run_dir)), (phase, entry["checkpoint"])
    i = next((i for i, t in enumerate(times) if (t.get("phase"), t.get("checkpoint")) == key), len(times))
    times[i:i + 1] = [entry]  # replaces that entry, or appends
    update_metrics(cfg, rt, {"phase_time_s": times, "environment": header})

# -- checkpoints: written atomically, pruned by step number, verified on load; one run per run directory (a lock) --

CHECKPOINT_PREFIX = {"pt": "ckpt_", "sft": "sft_ckpt_", "rl": "rl_ckpt_"}  # RUN_DIR/<prefix><step>/, in phase order
CURVE_PHASES = {"train": "pt", "val": "pt", "sft": "sft", "rl": "rl"}  # curves.jsonl's "<group>/<name>" -> phase
CHECKPOINT_FILES = ("model.safetensors", "optim.pt")

class CheckpointError(DataFormatError):
    """A checkpoint or run directory problem: missing, truncated, corrupt, unwritable, in use; the message names it."""

def checkpoints(run_dir, phase):
    """{step: path} of the phase's checkpoints in run_dir, by step number (so 7-digit steps sort after 6-digit ones)."""
    pattern = re.compile(re.escape(CHECKPOINT_PREFIX[phase]) + r"(\d+)")
    found = {int(m.group(1)): os.path.join(run_dir, d) for d in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
             if (m := pattern.fullmatch(d))}
    return dict(sorted(found.items()))

def save_checkpoint(cfg, rt, step, model, opt, extra_state, phase="pt"):
    """RUN_DIR/<prefix><step>/, named by latest_<phase> (what --resume continues) and latest (what the next phase starts
    from); the phase's newest --keep-checkpoints kept. A failed write (a full disk) leaves the last checkpoint and
    pointers as they were: a CheckpointError. Every rank returns once rank 0 wrote it."""
    opt_state = opt.state_dict()  # a collective when sharded: every rank calls it
    final = os.path.join(cfg.run_dir, f"{CHECKPOINT_PREFIX[phase]}{step:06d}")
    tmp = final + ".tmp"
    if rt.master:
        from safetensors.torch import save_file
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, os.path.join(tmp, "model.safetensors"))
            torch.save(opt_state, os.path.join(tmp, "optim.pt"))
            files = {name: sha256_file(os.path.join(tmp, name)) for name in CHECKPOINT_FILES}
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, "phase": phase, "loader": extra_state, "model": dataclasses.asdict(model.cfg),
                           "run": dataclasses.asdict(cfg), "files": files}, f, indent=1)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_text_atomic(os.path.join(cfg.run_dir, f"latest_{phase}"), os.path.basename(final))
            write_text_atomic(os.path.join(cfg.run_dir, "latest"), os.path.basename(final))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{final}: could not write the checkpoint ({e.strerror or e}); the latest is still "
                                  f"{latest_checkpoint(cfg.run_dir, phase) or 'none'}") from None
        for old in list(checkpoints(cfg.run_dir, phase).values())[:-max(cfg.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    if rt.world_size > 1:
        dist.barrier()

def latest_checkpoint(run_dir, phase=None):
    """The newest checkpoint of `phase`, or of any phase (the model the next phase starts from); None if none."""
    path = os.path.join(run_dir, f"latest_{phase}" if phase else "latest")
    return os.path.join(run_dir, read_bytes(path).decode().strip()) if os.path.isfile(path) else None

def verify_checkpoint(path, files):
    """state.json of a checkpoint, after checking that `files` are there and have the sha256 it recorded."""
    where = os.path.join(path, "state.json")
    if not os.path.isfile(where):
        raise CheckpointError(f"{where}: missing (not a checkpoint directory?)")
    state = read_json(where)  # malformed: a DataFormatError naming it
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("model"), dict)):
        raise CheckpointError(f"{where}: not a checkpoint's state (step, model); checkpoints written before "
                              "2026-12-01 carry no model and are not read")
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (not a checkpoint directory, or an incomplete one?)")
        want = state.get("files", {}).get(name)  # checkpoints written before checksums have none
        if want is not None and sha256_file(file) != want:
            raise CheckpointError(f"{file}: sha256 differs from the one in state.json (truncated or corrupt)")
    return state

def load_checkpoint(path, model, opt=None, state=None):
    """Verify (unless given its `state`), load the weights (and optimizer state); state.json, or a CheckpointError."""
    state = state or verify_checkpoint(path, CHECKPOINT_FILES if opt is not None else CHECKPOINT_FILES[:1])
    from safetensors.torch import load_file
    weights, optim = (os.path.join(path, name) for name in CHECKPOINT_FILES)
    try:
        model.load_state_dict(load_file(weights, device=str(next(model.parameters()).device)))
    except Exception as e:  # safetensors' header errors, missing or unexpected keys, other shapes
        raise CheckpointError(f"{weights}: does not load into this model ({str(e).splitlines()[0][:300]})") from None
    model.sync_flags()
    if opt is not None:
        try:
            opt.load_state_dict(torch.load(optim, weights_only=True, map_location="cpu"))
        except Exception as e:  # unpickling refused, other parameters, other shapes
            raise CheckpointError(f"{optim}: does not load into this optimizer ({str(e).splitlines()[0][:300]})") from None
    return state

def load_model(path, device="cpu"):
    """(model, state.json) of a checkpoint: the model its ModelConfig builds, weights loaded; state.json read once."""
    state = verify_checkpoint(path, CHECKPOINT_FILES[:1])
    try:
        model_cfg = ModelConfig(**{**state["model"], "softcap": tuple(state["model"]["softcap"])})
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path}/state.json: 'model' is not a model this stack builds ({e})") from None
    model = GPT(model_cfg).to(device)
    return model, load_checkpoint(path, model, state=state)

def resume_checkpoint(cfg, phase, model, opt, log):
    """--resume: (path, state) of the phase's newest checkpoint that loads into model and opt; None if it has none."""
    if not cfg.resume:
        return None
    latest = latest_checkpoint(cfg.run_dir, phase)
    candidates = ([latest] if latest else []) + [p for p in reversed(checkpoints(cfg.run_dir, phase).values()) if p != latest]
    for path in candidates:
        try:
            return path, load_checkpoint(path, model, opt)
        except DataFormatError as e:
            log(f"warning: cannot resume from {path}: {e}")
    if candidates:
        raise CheckpointError(f"{cfg.run_dir}: no {phase} checkpoint to resume from loads ({', '.join(map(os.path.basename, candidates))})")

def resumed_step(cfg, phase, model, opt, loader, log):
    """The step a pt or sft loop starts at: 0, or with --resume the loaded checkpoint's, the loader where it stood."""
    path, state = resume_checkpoint(cfg, phase, model, opt, log) or (None, None)
    if path is None:
        return 0
    loader.state = state["loader"]
    log(f"{'' if phase == 'pt' else phase + ': '}resumed from {path} at step {state['step']}")
    return state["step"]

def claim_run_dir(cfg, phases):
    """Lock the run directory (the lock, returned, dies with the process, kill -9 too; another run is refused); delete
    *.tmp; refuse a fresh pt, sft or rl run amid old checkpoints, or with --overwrite delete its and later phases'."""
    import fcntl
    os.makedirs(cfg.run_dir, exist_ok=True)
    lock = open(os.path.join(cfg.run_dir, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise CheckpointError(f"{cfg.run_dir}: run directory in use by pid {lock.read().strip() or '?'} "
                              "(one run per --run-dir)") from None
    lock.truncate(0)
    print(os.getpid(), file=lock, flush=True)
    for path in (os.path.join(cfg.run_dir, name) for name in os.listdir(cfg.run_dir) if name.endswith(".tmp")):
        (shutil.rmtree if os.path.isdir(path) and not os.path.islink(path) else os.remove)(path)
    training = [p for p in CHECKPOINT_PREFIX if p in phases]
    clash = [os.path.basename(path) for p in training for path in checkpoints(cfg.run_dir, p).values()]
    if clash and not cfg.resume:
        if not cfg.overwrite:
            raise CheckpointError(f"{cfg.run_dir}: holds checkpoints of an earlier run ({', '.join(clash)}); pass "
                                  "--resume to continue it, --overwrite to replace it, or another --run-dir")
        order = list(CHECKPOINT_PREFIX)
        kept_phases, replaced = order[:order.index(training[0])], order[order.index(training[0]):]
        for phase in replaced:
            for path in checkpoints(cfg.run_dir, phase).values():
                shutil.rmtree(path)
            for p, pointer in ((phase, f"latest_{phase}"), (None, "latest")):  # pointers to what is gone go too
                if (target := latest_checkpoint(cfg.run_dir, p)) and not os.path.isdir(target):
                    os.remove(os.path.join(cfg.run_dir, pointer))
        curves = os.path.join(cfg.run_dir, "curves.jsonl")
        if os.path.isfile(curves):  # the replaced phases' curves go with their checkpoints (the report draws them)
            kept = []
            for line in open(curves, encoding="utf-8"):
                try:
                    values = json.loads(line)
                except json.JSONDecodeError:  # a torn line: dropped, as one not ours (not an object) is
                    continue
                if isinstance(values, dict):
                    values = {k: v for k, v in values.items() if CURVE_PHASES.get(k.split("/")[0]) not in replaced}
                    kept += [json.dumps(values) + "\n"] if len(values) > 1 else []
            write_text_atomic(curves, "".join(kept))
        earlier = [path for p in kept_phases if (path := latest_checkpoint(cfg.run_dir, p)) and os.path.isdir(path)]
        if earlier and latest_checkpoint(cfg.run_dir) is None:  # the phase trains again from what it started from
            write_text_atomic(os.path.join(cfg.run_dir, "latest"), os.path.basename(earlier[-1]))
    return lock

def settle_losses(pending, cfg, rt, log, phase):
    """The losses of `pending` ([(step, loss tensor)], emptied) averaged over ranks, as floats, in one host sync (loops
    sync to log, eval or save only). A NaN/inf loss exits with code 2, noted in metrics.json, before any later save."""
    steps, losses = [s for s, _ in pending], torch.stack([loss for _, loss in pending])
    pending.clear()
    values = sum_over_ranks(losses, rt, dist.ReduceOp.AVG).tolist()
    for step, value in zip(steps, values):
        if not math.isfinite(value):
            prefix = "" if phase == "pt" else phase + " "
            log(f"{prefix}step {step}: loss is {value}; stopping. The last good checkpoint is {latest_checkpoint(cfg.run_dir, phase)}")
            update_metrics(cfg, rt, {prefix.replace(" ", "_") + "diverged_at_step": step})
            sys.exit(2)
    return values

class LoopTimer:
    """Training time without eval and checkpoint pauses, read at host syncs (where the GPU has caught up)."""

    def __init__(self):
        self.total, self.steps, self.tokens, self.since = 0.0, 0, 0, time.perf_counter()

    def step(self, tokens):
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def lap(self):  # (seconds, steps, tokens) since the last lap; call it right after a host sync
        now = time.perf_counter()
        self.total += now - self.since
        lap = max(now - self.since, 1e-9), self.steps, self.tokens
        self.since, self.steps, self.tokens = now, 0, 0
        return lap

    def pause_until_now(self):  # eval or a checkpoint ran since the last lap: leave it out
        self.since = time.perf_counter()

def trained_model(cfg, rt):
    """(model, state.json, path) of --init-from, else of the run's latest checkpoint (load_model)."""
    path = cfg.init_from or latest_checkpoint(cfg.run_dir)
    if not path:
        raise CheckpointError(f"{cfg.run_dir}: no checkpoint to evaluate (run --phases pt first, or pass --init-from)")
    return (*load_model(path, rt.device), path)


# =============================================================================================================
# 9. Pretraining: the schedule, the loss, bits per byte, FLOPs, then the loop (phase_pt)

StepPlan = collections.namedtuple("StepPlan", ["stage", "batch_tokens", "max_doc_len", "short_window", "long_window",
                                               "lr_factor", "mtp_weights"])

def scaled_stages(cfg):
    if not cfg.train_tokens:
        return list(cfg.stages)
    factor = cfg.train_tokens / sum(s.steps * s.batch_tokens for s in cfg.stages)
    return [dataclasses.replace(s, steps=max(1, round(s.steps * factor))) for s in cfg.stages]

def total_steps(stages):
    return sum(s.steps for s in stages)

def plan_step(cfg, stages, step):
    total, start = total_steps(stages), 0
    for index, stage in enumerate(stages):
        if step < start + stage.steps or index == len(stages) - 1:
            break
        start += stage.steps
    t = (step - start) / max(1, stage.steps - 1)
    mtp = [a + t * (b - a) for a, b in zip(stage.mtp_start, stage.mtp_end)]
    while len(mtp) > 1 and mtp[-1] == 0:  # a horizon whose weight reached 0 costs nothing: drop it
        mtp.pop()
    cooldown_start = total * (1 - cfg.cooldown_frac)
    frac = min(1.0, max(0.0, (step - cooldown_start) / max(1, total - 1 - cooldown_start)))  # reaches final_lr on the last step
    warmup = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    return StepPlan(index, stage.batch_tokens, stage.max_doc_len, stage.short_window, stage.long_window,
                    warmup * (stage.lr_mul * (1 - frac) + cfg.final_lr * frac), mtp)

def micro_batch(batch_tokens, micro_batch_tokens, world_size, what):
    """(tokens per forward, forwards per step) that make up a global batch of batch_tokens over world_size ranks."""
    T = min(micro_batch_tokens, batch_tokens // world_size)
    if batch_tokens % (world_size * T):
        raise ValueError(f"{what}: batch of {batch_tokens} tokens is not a multiple of world size {world_size} x {T} tokens")
    return T, batch_tokens // (world_size * T)

def pretrain_steps(cfg, stages, world_size, start=0):
    """(step, plan, tokens per forward, forwards, grow, untie) for each step from `start` on, walked by the loop and the
    compile warm-up; grow ((old, new) long window, or None) and untie (embed, lm_head part) apply before the step."""
    total = total_steps(stages)
    for step in range(start, total):
        p = plan_step(cfg, stages, step)
        before = plan_step(cfg, stages, step - 1) if step > 0 else p
        grow = (before.long_window, p.long_window) if p.long_window != before.long_window else None
        yield (step, p, *micro_batch(p.batch_tokens, cfg.micro_batch_tokens, world_size, f"stage {p.stage}"), grow,
               step == round(cfg.untie_frac * total))

def warm_up_compiled(loss_fn, model, cfg, rt, stages, loader, start):
    """Compiles, as modded-nanogpt does, a forward and backward per distinct `key` from step `start` on, in schedule
    order (so dynamic shapes choose as in the run), on a fork of the loader, no optimizer step; (seconds, graphs)."""
    from torch._dynamo.utils import counters
    scale, tied, variants = model.attn_scale.clone(), model.is_tied, {}
    for step, p, T, accum, grow, untie in pretrain_steps(cfg, stages, rt.world_size, start):
        if grow:
            scale.mul_(yarn_attn_factor(*grow))  # as grow_window does, in fp32: the same float the run will have
        tied = tied and not untie
        windows = model.windows(p.short_window, p.long_window)
        key = (T, len(p.mtp_weights), p.max_doc_len, tuple(windows), float(scale), tied, accum)
        variants.setdefault(key, (p, T, accum, windows))
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 2 * len(variants) + 8))
    peek, graphs, t0 = loader.fork(), counters["stats"]["unique_graphs"], time.perf_counter()
    for (*_, scale_value, tied, _), (p, T, accum, windows) in variants.items():
        model.scale, model.is_tied = scale_value, tied
        batch = peek.next_batch(T, p.max_doc_len, len(p.mtp_weights), rt.device)
        with autocast(rt):
            loss = loss_fn(model, batch, windows, to_device(p.mtp_weights, torch.float32, rt.device), rt.backend, 1 / accum,
                           cfg.fp8)
        (loss / accum).backward()
    model.zero_grad(set_to_none=True)
    model.sync_flags()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return time.perf_counter() - t0, counters["stats"]["unique_graphs"] - graphs

def train_loss(model, batch, windows, mtp_weights, backend, grad_scale=1.0, fp8=False):
    """Mean over tokens of the MTP-weighted softcapped cross entropy. mtp_weights: a (K,) tensor, so compiled code is
    not specialised to its values; grad_scale: 1 / accumulation steps; fp8: FP8 lm_head matmuls on GPUs with FP8."""
    h = model.hidden(batch, windows, backend)
    if fp8 and fp8_supported(h.device):
        # modded-nanogpt's static scales; the gradient's follows our mean loss (it shrinks with the tokens per step).
        # The padded lm_head keeps every matmul dim a multiple of 16, as _scaled_mm requires.
        x_scale, w_scale, g_scale = FP8_SCALES
        logits = fp8_linear(h, model.lm_head, x_scale, w_scale, g_scale * grad_scale / batch.inputs.numel())[:, :model.vocab_size]
    else:
        logits = h @ model.lm_head[:model.vocab_size].T
    return softcap_cross_entropy(logits, batch.targets[:, :len(mtp_weights)], mtp_weights, model.cfg.softcap).sum() / batch.inputs.numel()

def val_rows(n_targets, T, subset=0, first=0):
    """The rows an evaluation scores (row r: targets r*T+1 .. r*T+T of the val stream): all, every target once; first=N:
    those of the first N targets (modded-nanogpt's rule); subset=N: N targets' worth, spread to draw on every source."""
    n_rows = -(-n_targets // T)
    if first:
        return np.arange(min(n_rows, -(-first // T)))
    if subset and subset < n_targets:
        return np.unique(np.linspace(0, n_rows - 1, max(1, subset // T)).round().astype(np.int64))
    return np.arange(n_rows)

@torch.no_grad()
def evaluate_bpb(model, data, rt, windows, max_doc_len, T, subset=0, first=0, log=None):
    """Next-token loss on PretrainData `data`'s val stream in rows of T (val_rows), over targets of > 0 bytes (special
    tokens count in neither sum: bpb compares across tokenizers; modded-nanogpt's val loss counts them too)."""
    tokens, source = data.val_stream()
    n, names = len(tokens) - 1, data.source_names()
    rows = val_rows(n, T, subset, first)
    weights = torch.from_numpy(data.token_bytes).to(rt.device)
    sums = torch.zeros(max(1, len(names)), 3, device=rt.device, dtype=torch.float64)  # nats, bytes, counted targets
    mine = rows[rt.rank::rt.world_size]
    progress = Progress(log, "val bpb", len(mine), "rows")
    for r in mine:
        start = int(r) * T
        real = min(T, n - start, first - start if first else T)  # targets of this row inside what is scored
        buf = np.asarray(tokens[start:start + T + 1])
        buf = np.concatenate([buf, np.full(T + 1 - len(buf), data.bos_id, buf.dtype)])  # the last row, padded
        b = make_batch(buf, data.bos_id, max_doc_len, 1, rt.device)
        src = torch.zeros(T, dtype=torch.long, device=rt.device)
        src[:real] = to_device(source[start + 1:start + 1 + real], torch.long, rt.device)
        counted = torch.arange(T, device=rt.device) < real
        with autocast(rt):
            h = model.hidden(b, windows, rt.backend)
        for rows_ in torch.split(torch.arange(T, device=rt.device), LOGITS_CHUNK):
            target = b.targets[rows_, 0]
            loss = F.cross_entropy(model.logits(h[rows_]).float(), target, reduction="none")
            nbytes = weights[target] * counted[rows_]
            keep = counted[rows_] & (nbytes > 0)
            sums.index_add_(0, src[rows_], torch.stack([loss * keep, nbytes, keep]).T.double())
        progress()
    sums = sum_over_ranks(sums, rt).cpu()
    nats, nbytes, count = sums.sum(0).tolist()
    per_nat = 1 / math.log(2)
    out = {"bpb": nats * per_nat / nbytes, "loss": nats / count, "targets": int(count), "of": n,
           "by_source": {name: float(sums[i, 0] * per_nat / sums[i, 1]) for i, name in enumerate(names) if sums[i, 1] > 0}}
    scored = int(np.minimum(T, n - rows * T).sum())  # the padding of a last row is not scored
    out["what"] = ("every val token" if scored == n and not first else f"the first {first:,} val tokens" if first else
                   f"subset: {scored:,} of {n:,} targets, spread over the stream")
    return out

def val_line(val):
    """The log's line of an evaluate_bpb result (baselines/record.py reads it)."""
    split = "".join(f"; {name} {b:.4f}" for name, b in val["by_source"].items())
    return f"val bpb {val['bpb']:.4f} val loss {val['loss']:.4f} ({val['what']}{split})"

def val_metrics(val):
    return {"val_bpb": val["bpb"], "val_loss": val["loss"], "val_bpb_by_source": val["by_source"],
            "val_loss_tokens": val["targets"], "val_scored": val["what"]}

def mtp_note(weights):
    """What the training loss is when it is not the next-token loss alone: the MTP-weighted sum (at init ~ sum(w) ln V)."""
    if len(weights) == 1 and weights[0] == 1:
        return ""
    names = ["next"] + [f"{k + 2}-ahead" for k in range(len(weights) - 1)]
    return " (loss = " + " + ".join(f"{w:.2f} x {n}" for w, n in zip(weights, names)) + ")"

def attention_pairs(segment_lengths, window):
    """(query, key) pairs one attention layer scores over segments of these lengths: a query sees itself and up to
    `window` earlier tokens of its segment (None or < 0: all), so window + 1 keys deep in a long one, not half of it."""
    L = np.asarray(segment_lengths, dtype=np.int64)
    w = L.max(initial=0) if window is None or window < 0 else window + 1  # keys of a query deep in a segment
    first = np.minimum(L, w)  # the first w queries see 1, 2, ..., w keys; the rest w each
    return int((first * (first + 1) // 2 + (L - first) * w).sum())

def training_flops(model, windows, segment_lengths):
    """FLOPs of a forward + backward over a micro-batch of these segments: 6 per token per matmul weight (no embedding
    lookups) plus 12 per head dim per (query, key) pair (QK^T and PV, 2 FLOPs a multiply-add, x3 with backward)."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2 and "gate" not in n)
    matmul += model.vocab_size * model.cfg.model_dim
    pairs = sum(attention_pairs(segment_lengths, w) for w in windows)
    return 6 * matmul * int(np.sum(segment_lengths)) + 12 * model.cfg.n_heads * model.cfg.head_dim * pairs

# Dense bf16 tensor-core peaks, FLOP/s, from datasheets; the first name in torch.cuda.get_device_name() wins, so the
# specific come first ("GH200" holds "H200"). MFU for bf16 runs only (fp32 runs, as pre-Ampere, would need fp32's peak).
PEAK_BF16_FLOPS = (("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12),
                   ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))

def peak_flops(device, dtype=torch.bfloat16):
    if torch.device(device).type != "cuda" or dtype != torch.bfloat16:
        return None
    return next((v for k, v in PEAK_BF16_FLOPS if k in torch.cuda.get_device_name(device)), None)

def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None

def phase_pt(cfg, rt, log):
    """pretrain; reads DATA_DIR/pretrain; writes RUN_DIR/ckpt_<step>/, curves.jsonl, metrics.json"""
    require_training_dtype(rt, "pt")
    data = pretrain_data(cfg.data_dir, cfg.vocab_size, cfg.bos_id)
    log(f"data: {len(data.train)} train and {len(data.val)} val shards")
    torch.manual_seed(cfg.seed)
    model = GPT(ModelConfig.of(cfg, data.vocab_size)).to(rt.device)
    opt, loader = make_optimizer(model, cfg), PretrainLoader(data.train, data, rt.rank, rt.world_size)
    stages = scaled_stages(cfg)
    total = total_steps(stages)
    start = resumed_step(cfg, "pt", model, opt, loader, log)
    if not start and cfg.init_from:
        load_checkpoint(cfg.init_from, model)
        log(f"initialized from {cfg.init_from}")
    n_params = sum(p.numel() for p in model.parameters())
    n_matrix = sum(p.numel() for n, p in model.named_parameters() if param_label(n) in ("attn", "mlp_fc", "mlp_proj"))
    log(f"model: {n_params:,} parameters ({n_matrix:,} in NorMuon matrices), {total} steps, attention backend {rt.backend}, "
        f"device {rt.device}, activations {rt.precision or rt.dtype}, world size {rt.world_size}")
    loss_fn, compile_s, graphs = torch.compile(train_loss) if cfg.compile else train_loss, 0.0, 0
    if cfg.compile:
        compile_s, graphs = warm_up_compiled(loss_fn, model, cfg, rt, stages, loader, start)
        log(f"compiled {graphs} graphs for steps {start}-{total} in {compile_s:.1f}s, before the timed loop")
    peak, timer, pending, val, flops, last = peak_flops(rt.device, rt.dtype), LoopTimer(), [], None, 0, None
    for step, p, T, accum, grow, untie in pretrain_steps(cfg, stages, rt.world_size, start):
        if grow:
            model.grow_window(*grow)
        if untie and model.is_tied:
            model.untie()
            opt.copy_state("lm_head", "embed")
        windows = model.windows(p.short_window, p.long_window)
        step_loss, mtp_weights = torch.zeros((), device=rt.device), to_device(p.mtp_weights, torch.float32, rt.device)
        for _ in range(accum):
            batch = loader.next_batch(T, p.max_doc_len, len(p.mtp_weights), rt.device)
            with autocast(rt):
                loss = loss_fn(model, batch, windows, mtp_weights, rt.backend, 1 / accum, cfg.fp8) / accum
            loss.backward()
            step_loss += loss.detach()
            flops += training_flops(model, windows, batch.segment_lengths) if peak else 0
        pending.append((step, step_loss))
        opt.step(p.lr_factor, muon_momentum(step, total))
        opt.zero_grad()
        timer.step(p.batch_tokens)
        last, final = step, step == total - 1
        logging = step % cfg.log_every == 0 or final
        validating = (step + 1) % cfg.val_every == 0 or final
        saving = (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or final
        if not (logging or validating or saving):
            continue
        losses = settle_losses(pending, cfg, rt, log, "pt")  # the host sync; stops on a NaN before anything is saved
        seconds, steps, tokens = timer.lap()
        tok_per_s, mfu, flops = tokens / seconds, f" mfu {100 * flops / (seconds * peak):.1f}%" if peak else "", 0
        if logging:
            log(f"step {step + 1}/{total} loss {losses[-1]:.4f} lr {p.lr_factor:.3f} {tok_per_s:,.0f} tok/s{mfu} "
                f"eta {seconds / steps * (total - step - 1) / 60:.1f} min{mtp_note(p.mtp_weights)}")
            log.metrics(step + 1, {"train/loss": losses[-1], "train/tok_per_s": tok_per_s})
        if validating:
            full = dict(first=cfg.val_final_tokens) if final else dict(subset=cfg.val_tokens)
            val = evaluate_bpb(model, data, rt, windows, p.max_doc_len, cfg.micro_batch_tokens, **full, log=log)
            memory = peak_memory_gib(rt.device)
            log(f"step {step + 1}/{total} {val_line(val)}" + (f" peak memory {memory:.1f} GiB" if memory is not None else ""))
            log.metrics(step + 1, {"val/bpb": val["bpb"], "val/loss": val["loss"]})
        if saving:
            save_checkpoint(cfg, rt, step + 1, model, opt, loader.state)
        timer.pause_until_now()
    if last is None:
        log(f"nothing to do: run already at step {start} of {total}")
        return
    timed_tokens = sum(plan_step(cfg, stages, s).batch_tokens for s in range(start, last + 1))
    update_metrics(cfg, rt, {
        **val_metrics(val), "train_tokens": sum(s.steps * s.batch_tokens for s in stages), "params": n_params,
        "params_matrix": n_matrix, "tok_per_s": timed_tokens / timer.total, "device": str(rt.device),
        "attn_backend": rt.backend, "world_size": rt.world_size, "pt_train_time_s": timer.total,
        "pt_compile_time_s": compile_s, "pt_compile_graphs": graphs, "peak_memory_gib": peak_memory_gib(rt.device)})


# =============================================================================================================
# 10. Evaluation: packed forwards every evaluation shares, CORE (DCLM's 22 tasks, as nanochat scores them), phase_eval.
# nanochat forwards each example alone (options padded to (n_options, L), logits everywhere); here examples go back to
# back in one varlen batch, an example's choices share a forward of their context (pack_branches), only continuation
# rows get logits; the decisions are nanochat's (tests compare bench/eval_bench.py's evaluate_example_alone).

@torch.no_grad()
def packed_hidden(model, sequences, rt, windows):
    """One forward of `sequences` as pack_sequences: final hidden states (T, dim), tokens (T,), start offsets."""
    batch, starts = pack_sequences(sequences, rt.device)
    with autocast(rt):
        h = model.hidden(batch, windows, rt.backend)
    return h, batch.inputs, starts

def examples_of_rank(tasks, n_examples, max_per_task, rt):
    """Evaluated examples (bools: first max_per_task of each task; <= 0: all) and this rank's: r, r + world_size, ..."""
    evaluated, mine = np.zeros(n_examples, dtype=bool), []
    for t in tasks:
        first, n = t["first_example"], t["n_examples"] if max_per_task <= 0 else min(max_per_task, t["n_examples"])
        evaluated[first:first + n] = True
        mine += range(first + rt.rank, first + n, rt.world_size)
    return evaluated, mine

def token_batches(items, n_tokens, batch_tokens):
    """Consecutive items grouped into batches of up to batch_tokens tokens (an item longer than that goes alone)."""
    batch, used = [], 0
    for item in items:
        if batch and used + n_tokens(item) > batch_tokens:
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += n_tokens(item)
    if batch:
        yield batch

def task_scores(tasks, name_key, correct, evaluated, rt):
    """Sums the ranks' `correct` (float: 1 right, 0 wrong or not mine); dict(results={name: accuracy}, centered={name:
    (accuracy - baseline) / (1 - baseline)}, mean=mean centered, correct=int8 per example, -1 where not evaluated)."""
    correct = sum_over_ranks(correct.to(rt.device), rt)  # NCCL reduces device tensors only
    correct = np.where(evaluated, correct.cpu().numpy(), -1).astype(np.int8)
    rows = {t[name_key]: correct[t["first_example"]:t["first_example"] + t["n_examples"]] for t in tasks}
    results = {name: float((r == 1).sum() / max(1, (r >= 0).sum())) for name, r in rows.items()}
    centered = {t[name_key]: (results[t[name_key]] - t["random_baseline"]) / (1 - t["random_baseline"]) for t in tasks}
    return dict(results=results, centered=centered, mean=sum(centered.values()) / len(centered), correct=correct)

def task_table(out, tasks, name_key, total):
    """Per-task examples, accuracy, centered accuracy (stand-ins marked), then the `total` line: out[total.lower()]."""
    width = max(len(total), *(len(t[name_key]) for t in tasks)) + 2
    lines = [f"{'task':<{width}} {'examples':>8} {'accuracy':>8} {'centered':>8}"]
    for t in tasks:
        n, name = int((out["correct"][t["first_example"]:t["first_example"] + t["n_examples"]] >= 0).sum()), t[name_key]
        note = "  (stand-in)" if t.get("stand_in") else ""
        lines.append(f"{name:<{width}} {n:>8} {out['results'][name]:>8.4f} {out['centered'][name]:>8.4f}{note}")
    lines.append(f"{total:<{width}} {'':>8} {'':>8} {out[total.lower()]:>8.4f}")
    return "\n".join(lines)

def core_decision(task_type, gold, mean_losses, all_right):
    """nanochat's rule: the option of least mean continuation loss; language_modeling: every greedy prediction right."""
    if task_type == "language_modeling":
        return all_right[0]
    # The mean over an empty continuation (piqa has some) is NaN. min() replaces its running value only by a smaller
    # one, so a NaN option wins exactly when it comes first (then index() finds that very object) and never otherwise
    return mean_losses.index(min(mean_losses)) == gold

def _span_scores(losses, right, spans):
    """Per sequence (mean loss, all right) from flat fp32 losses / bools, span after span (empty: NaN, as nanochat)."""
    return [(losses[e - n:e].mean().item(), bool(right[e - n:e].all())) for n, e in zip(spans, np.cumsum(spans))]

@torch.no_grad()
def core_scores_packed(model, seqs, rt, windows):
    """Per (tokens, cont_start, cont_end) of `seqs`: (mean continuation loss, all argmax-right), from one forward."""
    batch, where = pack_branches([t for t, _, _ in seqs], rt.device)
    with autocast(rt):
        h = model.hidden(batch, windows, rt.backend)
    rows = to_device(np.concatenate([w[s - 1:e - 1] for w, (_, s, e) in zip(where, seqs)]), torch.long, rt.device)
    targets = to_device(np.concatenate([t[s:e] for t, s, e in seqs]), torch.long, rt.device)
    losses, right = [], []
    for chunk in torch.split(torch.arange(len(rows), device=rt.device), LOGITS_CHUNK):
        logits = model.logits(h[rows[chunk]])
        losses.append(F.cross_entropy(logits, targets[chunk], reduction="none"))
        right.append(logits.argmax(-1) == targets[chunk])
    return _span_scores(torch.cat(losses).cpu(), torch.cat(right).cpu(), [e - s for _, s, e in seqs])

@torch.no_grad()
def evaluate_core(model, core, rt, windows, max_per_task=-1, batch_tokens=32768, log=None):
    """CORE of `model` on CoreData `core`: the first max_per_task examples of each task (<= 0: all, as in nanochat; the
    file is pre-shuffled) over the ranks, up to batch_tokens tokens a forward. task_scores' dict, mean as `core`, and
    `choices`: each example's option of least loss (-1: a language-modeling task, or not evaluated)."""
    evaluated, mine = examples_of_rank(core.tasks, len(core.examples), max_per_task, rt)
    correct, picked = torch.zeros(len(core.examples), dtype=torch.float32), torch.zeros(len(core.examples))
    scores = {}  # example -> scores of its sequences so far (an example may straddle two forwards)
    progress = Progress(log, "CORE", len(mine), "examples")
    def sequences():  # ((example, its sequence count), sequence, tokens it adds to a forward: its prefix is shared)
        for e in mine:
            first, n = int(core.examples[e, 2]), int(core.examples[e, 3])
            seqs = [core.sequence(s) for s in range(first, first + n)]
            for head, count, P in shared_prefix_groups([t for t, _, _ in seqs]):
                for j in range(head, head + count):
                    yield (e, n), seqs[j], len(seqs[j][0]) - (P if j > head else 0)
    for batch in token_batches(sequences(), lambda item: item[2], batch_tokens):
        for ((e, n_seqs), _, _), score in zip(batch, core_scores_packed(model, [s for _, s, _ in batch], rt, windows)):
            scores.setdefault(e, []).append(score)
            if len(scores[e]) == n_seqs:
                task, gold = (int(x) for x in core.examples[e, :2])
                losses, right = zip(*scores.pop(e))
                kind = core.tasks[task]["task_type"]
                correct[e] = float(core_decision(kind, gold, list(losses), right))
                picked[e] = 0 if kind == "language_modeling" else losses.index(min(losses)) + 1  # 0: none; summed
                progress()
    out = task_scores(core.tasks, "label", correct, evaluated, rt)
    choices = sum_over_ranks(picked.to(rt.device), rt).cpu().numpy().astype(np.int64) - 1
    return dict(out, core=out.pop("mean"), choices=choices)

def phase_eval(cfg, rt, log):
    """bits per byte over every val token, then CORE; reads pretrain/ val, core/; writes metrics.json, core_examples.jsonl
    Either may be absent: core/ may hold a bundle of your own (data/core_shards.py --bundle); core_examples.jsonl holds
    each example's gold option, choice and verdict."""
    has_val = os.path.isdir(os.path.join(cfg.data_dir, "pretrain")) or not os.path.isdir(os.path.join(cfg.data_dir, "core"))
    data = pretrain_data(cfg.data_dir, cfg.vocab_size, cfg.bos_id) if has_val else None
    tokenizer = data.tokenizer if data else data_tokenizer(cfg.data_dir)
    model, _, path = trained_model(cfg, rt)
    log(f"evaluating {path}" + ("" if has_val else f" (no bpb: {cfg.data_dir} has no pretrain/)"))
    windows, t0, metrics = model.windows(), time.time(), {}
    if has_val:
        val = evaluate_bpb(model, data, rt, windows, model.cfg.max_doc_len, cfg.micro_batch_tokens,
                           first=cfg.val_final_tokens, log=log)
        log(val_line(val))
        metrics = val_metrics(val)
    if not os.path.isdir(os.path.join(cfg.data_dir, "core")):
        log(f"no CORE: {cfg.data_dir} has no core/ (data/core_shards.py writes it, with our tokenizer/ beside it)")
    else:
        core = load_core(cfg.data_dir, tokenizer)
        out = evaluate_core(model, core, rt, windows, cfg.core_max_per_task, cfg.core_batch_tokens, log)
        log(task_table(out, core.tasks, "label", "CORE"))
        metrics.update({"core": out["core"], "core_per_task": out["centered"], "core_max_per_task": cfg.core_max_per_task})
        if rt.master:  # what each example got, for reading one task closely
            write_text_atomic(os.path.join(cfg.run_dir, "core_examples.jsonl"), "".join(
                json.dumps({"task": t["label"], "example": i, "gold": int(core.examples[e, 1]),
                            "choice": int(out["choices"][e]), "correct": bool(out["correct"][e])}) + "\n"
                for t in core.tasks for i, e in enumerate(range(t["first_example"], t["first_example"] + t["n_examples"]))
                if out["correct"][e] >= 0))
    log(f"eval took {time.time() - t0:.0f}s")
    update_metrics(cfg, rt, metrics)


# =============================================================================================================
# 11. Inference: a KV cache reproducing the training forward, sampling, the calculator tool, the engine, phase_generate

class KVCache:
    """Keys and values of B rows, one (B, capacity, H, D) tensor per layer (FA's layout; a compiled step writing into
    a slice of one big tensor would copy all of it), each row's length (its RoPE position) and last token (smear, bigram
    hash). static=True: a one-token step reads each row's window + 1 keys, gathered (or all keys, masked)."""

    def __init__(self, model, batch, capacity, device, dtype, backend="sdpa", static=False):
        L, shape = model.cfg.n_layers, (batch, capacity, model.cfg.n_heads, model.cfg.head_dim)
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(L)] for _ in "kv")
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.host_lengths = [0] * batch  # the same on the host: slicing the cache needs no device sync
        self.last_ids = torch.full((batch,), -1, dtype=torch.long, device=device)  # -1: nothing yet (document start)
        self.backend, self.capacity, self.static = backend, capacity, static
        self.mark_static()

    def mark_static(self):
        """A compiled step writes the cache in place, and inductor records a CUDA graph only when every input it mutates
        has a static address (cudagraph_utils.check_for_mutation): new tensors (grow, keep) re-record (few: rows in
        powers of two), unguarded, so dynamo does not recompile for them."""
        if self.static:
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t, guard=False)

    def reserve(self, n_tokens):
        """Before a forward that appends n_tokens per row (host ints only: nothing here enters a compiled step)."""
        if max(self.host_lengths) + n_tokens > self.capacity:
            raise ValueError(f"KV cache full: {max(self.host_lengths)} + {n_tokens} tokens > capacity {self.capacity}")

    def attend(self, layer, q, k, v, window, scale):
        """The attend() of Block.forward: write this layer's new keys/values, attend over the visible cache."""
        span, S = None, q.size(1)  # static one-token steps: no host int sets a shape (one compiled graph serves all)
        if not (self.static and S == 1):  # else reads are sliced to fit
            lo = 0 if window is None or window < 0 else max(0, min(self.host_lengths) - window)
            span = (lo, max(self.host_lengths) + S)
        return cached_attention(q, k, v, self.k[layer], self.v[layer], self.lengths, span, window, scale, self.backend)

    def advance(self, ids):
        self.lengths += ids.size(1)
        self.host_lengths = [n + ids.size(1) for n in self.host_lengths]
        self.last_ids = ids[:, -1].contiguous().clone()  # contiguous: a compiled step guards on strides

    def grow(self, n):
        """n more rows, empty (a continuous batch adding rows for waiting streams)."""
        self.k, self.v = ([torch.cat([c, c.new_zeros((n, *c.shape[1:]))]) for c in cache] for cache in (self.k, self.v))
        self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(n)])
        self.last_ids = torch.cat([self.last_ids, self.last_ids.new_full((n,), -1)])
        self.host_lengths += [0] * n
        self.mark_static()

    def put(self, row, other, other_row=0):
        """Row `row` becomes a copy of row `other_row` of cache `other` (one prefill serves all samples of a prompt)."""
        n = other.host_lengths[other_row]
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            mine[row, :n] = theirs[other_row, :n]
        self.lengths[row], self.last_ids[row], self.host_lengths[row] = n, other.last_ids[other_row], n

    def clear(self, row):
        """Row `row` holds nothing (a free slot: it is masked down to its own junk until a prompt is put there)."""
        self.lengths[row], self.last_ids[row], self.host_lengths[row] = 0, -1, 0

    def keep(self, rows):
        """Drop every row not in `rows` (finished samples stop costing compute)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.k, self.v = [c[index] for c in self.k], [c[index] for c in self.v]
        self.lengths, self.last_ids = self.lengths[index], self.last_ids[index]
        self.host_lengths = [self.host_lengths[r] for r in rows]
        self.mark_static()

MIN_TEMPERATURE = 1e-4  # below it a draw is greedy: logits / a temperature near fp32's smallest are inf - inf (NaN)

def sample_next(logits, generator, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """(B,) next tokens from logits (B, V): argmax below MIN_TEMPERATURE, else a draw after the top-k, min-p (below
    min_p x the top probability) and top-p filters; the most likely token always stays (none leaves nothing to draw)."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    logits = logits.float()
    logits, index = (logits - logits.amax(-1, keepdim=True)) / temperature, None  # a tiny temperature: no inf - inf
    if 0 < top_k < logits.size(-1):  # draw among the k only: a draw over the whole vocabulary costs ~ms per row
        logits, index = logits.topk(top_k)
    probs = logits.softmax(-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min(min_p, 1.0) * probs.amax(-1, keepdim=True), 0)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens: the first token is always kept
        dropped = (before >= top_p * sorted_p.sum(-1, keepdim=True)) & (before > 0)  # a tiny top_p keeps the first
        probs = probs.scatter(-1, order, sorted_p.masked_fill(dropped, 0))
    draw = torch.multinomial(probs, 1, generator=generator)  # multinomial renormalises
    return (draw if index is None else index.gather(-1, draw)).squeeze(-1)

# -- the calculator tool the chat model calls between <|python_start|> and <|python_end|>: parsed, never executed --
# calculate() computes only whitelisted syntax-tree nodes, in bounded work (no timer): every value, constants too, is
# checked against CALC_MAX_MAGNITUDE (a power, exponent <= 64, may first make up to (1e15)**64, ~3,200 bits, in
# microseconds); strings are only the input's literals (no operator takes one): str.count scans <= CALC_MAX_CHARS.
CALC_MAX_CHARS = 200  # GSM8K's calls are a few dozen characters
CALC_MAX_NODES = 100  # ~30 operations, calc_value's recursion depth: the longest GSM8K sums fit, each in microseconds
CALC_MAX_MAGNITUDE = 10**15  # <= 50-bit operands: below 2**53, so integral floats are still exact integers
CALC_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
DIGIT_GROUP_COMMA = re.compile(r"(?<=\d),(?=\d{3})")  # "1,200*3": GSM8K writes thousands separators
STRING_LITERAL = re.compile(r"""('[^'\\]*(?:\\.[^'\\]*)*'|"[^"\\]*(?:\\.[^"\\]*)*")""")  # kept as written

def calc_value(node):
    """The int or float a whitelisted node computes to; any other node, or a value out of bounds, raises ValueError."""
    kind = type(node)
    if kind is ast.Constant and type(node.value) in (int, float):  # type(), not isinstance: bools are ints
        value = node.value
    elif kind is ast.UnaryOp and type(node.op) in (ast.UAdd, ast.USub):
        value = -calc_value(node.operand) if type(node.op) is ast.USub else calc_value(node.operand)
    elif kind is ast.BinOp and type(node.op) in CALC_BINOPS:
        left, right = calc_value(node.left), calc_value(node.right)
        if type(node.op) is ast.Pow and abs(right) > 64:
            raise ValueError("exponent too large")
        value = CALC_BINOPS[type(node.op)](left, right)
    elif (kind is ast.Call and type(node.func) is ast.Attribute and node.func.attr == "count"  # 'ab'.count('b')
          and len(node.args) == 1 and not node.keywords
          and all(type(n) is ast.Constant and type(n.value) is str for n in (node.func.value, node.args[0]))):
        value = node.func.value.value.count(node.args[0].value)
    else:
        raise ValueError(f"{kind.__name__} is not allowed")
    # A negative base to a fractional power is complex; nan fails the comparison; 1e400 parses as inf.
    if type(value) not in (int, float) or not abs(value) <= CALC_MAX_MAGNITUDE:
        raise ValueError("result out of bounds")
    return value

def calculate(expr):
    """The tool's output for arithmetic (+ - * / // % **, unary +-) on int/float literals or "'ab'.count('b')" (else
    None) in GSM8K's notation, which SFT teaches: 0.2*50 -> '10', 2/3 -> '0.666667' (nanochat's str() gives '10.0')."""
    if len(expr) > CALC_MAX_CHARS:  # before any other work: a 10 MB "expression" costs nothing
        return None
    parts = STRING_LITERAL.split(expr)  # literals at the odd indices: "'1,234'.count(',')" keeps its commas
    expr = "".join(part if i % 2 else DIGIT_GROUP_COMMA.sub("", part) for i, part in enumerate(parts)).strip()
    try:  # ValueError: also null bytes (Python < 3.12); ArithmeticError: division by zero, float overflow in **
        with warnings.catch_warnings():  # an invalid escape warns: still just a literal
            warnings.simplefilter("ignore")
            tree = ast.parse(expr, mode="eval")
        if sum(1 for _ in ast.walk(tree)) > CALC_MAX_NODES:  # ast.walk iterates, so a deep tree cannot overflow it
            return None
        value = calc_value(tree.body)
    except (SyntaxError, ValueError, RecursionError, MemoryError, ArithmeticError):
        return None
    text = str(value) if type(value) is int else f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text

@dataclasses.dataclass
class Sample:
    tokens: list   # generated tokens, forced tool output included; the stop token too when one was reached
    mask: list     # 1 where the model sampled the token, 0 where the calculator's output was forced
    stopped: bool  # ended on <|assistant_end|> or <|bos|> (else it ran into max_new_tokens; None: it failed, in serve.py)

@dataclasses.dataclass(eq=False)
class Sampling:  # sample_next's filters and a generator: a DecodeBatch's streams share one (serve.py's: a request's)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    generator: torch.Generator = None

@dataclasses.dataclass(eq=False)  # one sample on its way through a DecodeBatch
class Stream:
    prompt: list             # one list object for all samples of a prompt: they share its prefill
    sampling: Sampling
    max_new_tokens: int
    on_token: object = None  # on_token(token), in the batch's thread, as each token comes
    on_done: object = None   # on_done(), once, when it has stopped or run out of tokens
    sample: Sample = dataclasses.field(default_factory=lambda: Sample([], [], False))
    forced: list = dataclasses.field(default_factory=list)  # calculator output still to feed
    call: list = None        # tokens of an open calculator call

class Engine:
    """KV-cached generation with the calculator tool: <|python_start|> expr <|python_end|> forces <|output_start|>
    calculate(expr) <|output_end|> (none if refused). compile=True: compiled steps: same tokens, less overhead."""

    def __init__(self, model, tokenizer, windows, rt, compile=False):
        self.model, self.tokenizer, self.windows, self.rt = model, tokenizer, windows, rt
        self.stops = {tokenizer.special("<|assistant_end|>"), tokenizer.bos_id}
        self.python_start, self.python_end = tokenizer.special("<|python_start|>"), tokenizer.special("<|python_end|>")
        self.output_start, self.output_end = tokenizer.special("<|output_start|>"), tokenizer.special("<|output_end|>")
        self.step = None  # decode_logits, eager
        if compile:  # shapes static within a call; a second batch size or capacity makes that dimension dynamic
            self.step = torch.compile(decode_logits, mode="reduce-overhead" if rt.device.type == "cuda" else None)

    def _decode(self, ids, cache, step=None):
        with autocast(self.rt):
            return self.model.decode(torch.tensor(ids, device=self.rt.device), cache, self.windows, last_only=True,
                                     step=step)[:, -1].float()

    def batch(self, capacity, max_rows, kind=None):
        """A DecodeBatch (or `kind`, a subclass of it: serve.py's) of max_rows rows of capacity tokens."""
        if self.step is not None:  # compiled: capacities in multiples of 256, so calls reuse CUDA graphs (one a shape)
            capacity = -(-capacity // 256) * 256
        return (kind or DecodeBatch)(self, capacity, max_rows)

    @torch.no_grad()
    def generate(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 seed=0, on_token=None, max_rows=0, on_done=None):
        """num_samples Samples per prompt (token ids), sample s = i * num_samples + j being prompt i's j-th: on_token(s,
        token) sees its tokens, on_done(s) its end; max_rows: rows at once (0: all). One generator (`seed`) for all."""
        sampling = Sampling(temperature, top_k, top_p, min_p, torch.Generator(device=self.rt.device).manual_seed(seed))
        call = lambda fn, i: functools.partial(fn, i) if fn else None
        streams = [Stream(prompt, sampling, max_new_tokens, call(on_token, i), call(on_done, i))
                   for i, prompt in enumerate(p for p in prompts for _ in range(num_samples))]
        batch = self.batch(max(map(len, prompts)) + max_new_tokens, max_rows or len(streams))
        for stream in streams:
            batch.add(stream)
        while batch.step():  # a failure raises: a sample that failed is not a wrong answer
            pass
        return [[s.sample for s in streams[i * num_samples:(i + 1) * num_samples]] for i in range(len(prompts))]

class DecodeBatch:
    """Streams decoding in the rows of one KV cache, a token each per step, driven by one thread. A stream takes a free
    row with its prompt but the last token prefilled (in a one-row cache, once per run of streams sharing a prompt).
    serve.py's subclass adds what a server needs: streams with their own Sampling, cancelled or failing alone."""

    def __init__(self, engine, capacity, max_rows):
        self.engine, self.capacity, self.max_rows, self.waiting = engine, capacity, max_rows, collections.deque()
        self.slots, self.feed, self.cache, self.prefilled = [], [], None, (None, None)  # slots[row]: Stream, or None

    def add(self, stream):
        if len(stream.prompt) + stream.max_new_tokens > self.capacity:
            raise ValueError(f"{len(stream.prompt)} prompt + {stream.max_new_tokens} new tokens > capacity {self.capacity}")
        self.waiting.append(stream)

    def _end(self, stream):
        self.slots[self.slots.index(stream)] = None  # its row is cleared before the next step
        if stream.on_done:
            stream.on_done()

    def _arrange(self):
        """Between steps: fill free rows (adding some, to max_rows, if streams wait), shrink."""
        rt, free = self.engine.rt, [row for row, s in enumerate(self.slots) if s is None]
        extra = min(len(self.waiting) - len(free), self.max_rows - len(self.slots))
        if extra > 0:
            if self.cache is None:  # compiled steps: a static cache, no host int sets a shape
                self.cache = KVCache(self.engine.model, 0, self.capacity, rt.device, rt.dtype, rt.backend,
                                     static=self.engine.step is not None)
            self.cache.grow(extra)
            free += range(len(self.slots), len(self.slots) + extra)
            self.slots, self.feed = self.slots + [None] * extra, self.feed + [0] * extra
        for row in free[:len(self.waiting)]:
            stream = self.slots[row] = self.waiting.popleft()  # first: a failed prefill (OOM) leaves it in the batch
            if self.prefilled[0] is not stream.prompt:
                alone = KVCache(self.engine.model, 1, len(stream.prompt), rt.device, rt.dtype, rt.backend)
                if len(stream.prompt) > 1:
                    self.engine._decode([stream.prompt[:-1]], alone)
                self.prefilled = (stream.prompt, alone)
            self.cache.put(row, self.prefilled[1])
            self.feed[row] = stream.prompt[-1]
        for row, stream in enumerate(self.slots):  # a free row is fed junk each step: keep it empty, never full
            if stream is None and self.cache.host_lengths[row]:
                self.cache.clear(row)
        live = [row for row, s in enumerate(self.slots) if s is not None]
        if not live:  # idle: give the memory back
            self.slots, self.feed, self.cache, self.prefilled = [], [], None, (None, None)
        elif not self.waiting and len(live) <= len(self.slots) // 2:  # to a power of two rows: few shapes to compile
            free = [row for row, s in enumerate(self.slots) if s is None]
            rows = live + free[:(1 << (len(live) - 1).bit_length()) - len(live)]
            self.cache.keep(rows)
            self.slots, self.feed = [self.slots[r] for r in rows], [self.feed[r] for r in rows]

    @torch.no_grad()
    def step(self):
        """One token for every live stream (forced or sampled); False when no stream is live or waiting."""
        self._arrange()
        if not self.slots:
            return False
        logits = self.engine._decode([[token] for token in self.feed], self.cache, self.engine.step)
        sampled = self._draw(logits).tolist()  # the step's one host sync
        for row, s in [(row, s) for row, s in enumerate(self.slots) if s is not None]:
            self._advance(row, s, sampled[row])
        return True

    def _draw(self, logits):
        """(rows,) tokens: one call over every row (free ones too: cheaper than gathering the live ones)."""
        g = next(s for s in self.slots if s is not None).sampling
        return sample_next(logits, g.generator, g.temperature, g.top_k, g.top_p, g.min_p)

    def _advance(self, row, s, sampled):
        """Stream s (in `row`) takes its next token: forced, else `sampled`; its calculator call, stop or budget."""
        engine = self.engine
        s.sample.mask.append(0 if s.forced else 1)
        token = self.feed[row] = s.forced.pop(0) if s.forced else sampled
        s.sample.tokens.append(token)
        if s.on_token:
            s.on_token(token)
        if token in engine.stops:
            s.sample.stopped = True
        elif token == engine.python_start:  # a calculator call: its result is forced after <|python_end|>
            s.call = []
        elif s.call is not None and token == engine.python_end:
            result, s.call = calculate(engine.tokenizer.decode(s.call)), None
            if result is not None:
                s.forced += [engine.output_start, *engine.tokenizer.encode(result), engine.output_end]
        elif s.call is not None:
            s.call.append(token)
        if s.sample.stopped or len(s.sample.tokens) == s.max_new_tokens:
            self._end(s)

def chat_turn(tokenizer, conversation, user_text):
    """conversation (tokens so far, starting with <|bos|>) + a user turn + <|assistant_start|>: the prompt for a reply."""
    return [*conversation, tokenizer.special("<|user_start|>"), *tokenizer.encode(user_text),
            tokenizer.special("<|user_end|>"), tokenizer.special("<|assistant_start|>")]

def reply_text(tokenizer, sample):
    """The text of a generated Sample, without the stop token that ended it."""
    return tokenizer.decode(sample.tokens[:-1] if sample.stopped else sample.tokens)

def trained_engine(cfg, rt):
    """(Engine, state.json, path, chat) of trained_model's checkpoint; chat: prompts are user turns, not plain text."""
    tokenizer, sample = data_tokenizer(cfg.data_dir), cfg.sample
    model, state, path = trained_model(cfg, rt)
    chat = sample.prompt_format == "chat" or (sample.prompt_format == "auto" and state.get("phase", "pt") != "pt")
    return Engine(model, tokenizer, model.windows(), rt, compile=sample.decode_compile), state, path, chat

def phase_generate(cfg, rt, log):
    """samples for --prompt; writes nothing (a chat in the terminal: chat_cli.py)"""
    engine, _, path, chat = trained_engine(cfg, rt)
    tokenizer, sample = engine.tokenizer, cfg.sample
    prompt = (chat_turn(tokenizer, [tokenizer.bos_id], sample.prompt) if chat
              else [tokenizer.bos_id, *tokenizer.encode(sample.prompt)])
    log(f"sampling from {path} ({'chat' if chat else 'text'} prompt)")
    for i, drawn in enumerate(engine.generate([prompt], sample.num_samples, sample.max_new_tokens, sample.temperature,
                                              sample.top_k, sample.top_p, sample.min_p, seed=cfg.seed)[0]):
        log(f"--- sample {i + 1}/{sample.num_samples} ({len(drawn.tokens)} tokens)\n"
            f"{'' if chat else sample.prompt}{reply_text(tokenizer, drawn)}")


# =============================================================================================================
# 12. Chat evaluation (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval in a sandbox; ChatCORE), then phase_chat

def gsm8k_answer(text):
    """The number after '####' (commas dropped), where GSM8K puts its final answers; None when there is none."""
    match = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    return match.group(1).replace(",", "") if match else None

@torch.no_grad()
def categorical_choices(model, prompts, letter_ids, rt, windows):
    """Per (prompt tokens, n_choices): the argmax of its next-token logits over the first n_choices answer letters."""
    h, _, starts = packed_hidden(model, [p for p, _ in prompts], rt, windows)
    letter_logits = model.logits(h[torch.from_numpy(starts[1:] - 1).to(rt.device)])[:, letter_ids].float()
    n_choices = torch.tensor([n for _, n in prompts], device=rt.device)
    allowed = torch.arange(len(letter_ids), device=rt.device) < n_choices[:, None]
    return letter_logits.masked_fill(~allowed, float("-inf")).argmax(-1).tolist()

# -- HumanEval: model-written code runs in a sandbox ------------------------------------------------------------------
# The promise of --sandbox=isolated (the default; Linux on x86_64 or aarch64): the program runs in a fresh
# `python -I -S` (no site-packages, .pth files or environment), under a launcher and the namespaces' init, and
# - runs as an unprivileged uid: its own (SANDBOX_UID_BASE + the launcher's pid) when we are root, else ours in a user
#   namespace where it holds no capability; no setuid binary can raise it (no_new_privs);
# - is alone in a PID namespace (sees and signals nothing outside), all of which the timeout kills with the launcher;
# - is one process with one thread (RLIMIT_NPROC 1), so RLIMIT_AS is the whole sandbox's memory budget;
# - sees the filesystem read-only but its cwd, a tmpfs of disk_mb (all its disk, gone with it), and an empty /proc;
# - has no network of any family, UNIX too: an empty net namespace; seccomp fails socket, socketpair, io_uring_setup;
# - passes only if the harness, after the program (check() last) returned, writes the run's nonce on a pipe set up
#   before it started: exit status 0 (sys.exit, os._exit, atexit, a signal) is no pass.
# Limits: it reads what any user may read, has its CPU until the timeout, and shares an interpreter with the harness:
# code hunting for the nonce in its own process could forge a pass (contained, but the score is not unforgeable).
# --sandbox=weak, for machines that refuse namespaces: the same uid drop (as root), rlimits (files up to disk_mb),
# syscall filter and nonce without the namespaces; warn_weak_sandbox says, once, what that opens.
SANDBOX_MODES = ("isolated", "weak")
SANDBOX_UID_BASE = 2_000_000_000  # + the launcher's pid: a uid that no account and no other live sandbox has
SANDBOX_PYTHON = sys.executable    # the interpreter the program runs in (only its standard library is used)

# The launcher, what the isolated interpreter runs (sandbox_launcher() gives its source): standard library only and
# nothing of this file but the constants and sandbox_* code below; each function runs in its processes, never ours.
SANDBOX_IMPORTS = "builtins, ctypes, functools, json, os, resource, select, signal, struct, sys, traceback"
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
SANDBOX_SYSCALLS = {  # by machine: seccomp's audit arch and the syscall numbers used here
    "x86_64": (0xC000003E, dict(socket=41, socketpair=53, io_uring_setup=425, unshare=272, mount_setattr=442)),
    "aarch64": (0xC00000B7, dict(socket=198, socketpair=199, io_uring_setup=425, unshare=97, mount_setattr=442))}
SANDBOX_NO_NETWORK = ("socket", "socketpair", "io_uring_setup")  # io_uring can open sockets without socket()

class SandboxSetupError(Exception):
    pass

@functools.cache
def sandbox_libc():
    return ctypes.CDLL(None, use_errno=True)

def sandbox_check(ret, what):
    if ret == -1:
        raise SandboxSetupError(f"{what}: {os.strerror(ctypes.get_errno())}")

def sandbox_syscalls():
    known = SANDBOX_SYSCALLS.get(os.uname().machine) if sys.platform == "linux" else None
    if known is None:
        raise SandboxSetupError(f"no namespaces or syscall table for {sys.platform} on {os.uname().machine}")
    return known

def sandbox_deny_syscalls(names):
    """A seccomp filter: the named syscalls fail with EPERM, any other ABI (x32, 32-bit compat) kills the process."""
    arch, numbers = sandbox_syscalls()
    load, equal, at_least, ret, n = 0x20, 0x15, 0x35, 0x06, len(names)
    program = [(load, 0, 0, 4), (equal, 0, n + 4, arch), (load, 0, 0, 0), (at_least, n + 1, 0, 0x40000000)]
    program += [(equal, n - i, 0, numbers[name]) for i, name in enumerate(names)]  # jumps count from the next op
    program += [(ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | 1), (ret, 0, 0, 0x80000000)]  # allow, EPERM, kill
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    class Filter(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    libc = sandbox_libc()
    sandbox_check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    sandbox_check(libc.prctl(22, 2, ctypes.byref(Filter(len(program), ctypes.addressof(code))), 0, 0), "seccomp")

def sandbox_namespaces(as_root, uid):
    flags, gid = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS, os.getegid()
    sandbox_check(sandbox_libc().unshare(flags if as_root else flags | CLONE_NEWUSER), "unshare")
    if as_root:
        return
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)

def sandbox_mount(source, target, fstype, flags, options=None):
    sandbox_check(sandbox_libc().mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                                       ctypes.c_ulong(flags), options and options.encode()), f"mount {target}")

def sandbox_hidden_ancestor(path):
    """The first directory on the way to path that other users may not enter (e.g. /root, for a Python under it)."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    ancestors = [os.sep + os.sep.join(parts[:i + 1]) for i in range(len(parts))]
    return next((directory for directory in ancestors if not os.stat(directory).st_mode & 0o001), None)

def sandbox_mount_views(work, disk, owner, as_root):
    """Every mount read-only, nosuid, private; tmpfs on the working directory (`disk` bytes) and /proc (empty). A
    directory around our Python that the program's uid may not enter: hidden by a tmpfs, the installation bound back."""
    # struct mount_attr: attr_set, attr_clr, propagation, userns_fd (MOUNT_ATTR_RDONLY, _NOSUID have MS_'s values)
    attr = (ctypes.c_uint64 * 4)(MS_RDONLY | MS_NOSUID, 0, MS_PRIVATE, 0)
    mount_setattr = sandbox_syscalls()[1]["mount_setattr"]
    sandbox_check(sandbox_libc().syscall(mount_setattr, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)),
                  "mount_setattr(/, AT_RECURSIVE) (Linux >= 5.12)")
    if as_root and (hidden := sandbox_hidden_ancestor(sys.base_prefix)):
        python = os.open(os.path.realpath(sys.base_prefix), os.O_PATH)
        sandbox_mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=65536,mode=0755")
        os.makedirs(os.path.realpath(sys.base_prefix))
        sandbox_mount(f"/proc/self/fd/{python}", os.path.realpath(sys.base_prefix), None, MS_BIND | MS_REC)
        sandbox_mount(None, os.path.realpath(sys.base_prefix), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        sandbox_mount(None, hidden, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(python)
    sandbox_mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV,
                  f"size={disk},nr_inodes=16384,mode=0700,uid={owner},gid={owner}")
    sandbox_mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4096,mode=0555")

def sandbox_fork_supervised():
    """Fork. The parent waits and exits as the child did (a signal as 128 + its number: a namespace's init cannot
    signal itself); the child gets the read end of a pipe only the parent writes to, for sandbox_die_with_parent."""
    alive, parent_end = os.pipe()
    if (pid := os.fork()) == 0:
        os.close(parent_end)
        return alive
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(128 - code if code < 0 else code)

def sandbox_die_with_parent(alive):
    """SIGKILL when the parent dies (the pipe: if it died already). Set after any change of uid, which clears it."""
    if sys.platform == "linux":
        sandbox_check(sandbox_libc().prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([alive], [], [], 0)[0]:
        os._exit(1)
    os.close(alive)

def sandbox_cut_python_sockets():
    """A first, friendlier layer under the syscall filter: Python's socket types refuse with a clear message."""
    import _socket
    import socket
    class NoNetwork(socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = NoNetwork

def sandbox_run(source, status, nonce):
    """The harness: the program as module "program" (its `if __name__ == "__main__":` demos, input() or unittest,
    don't run, as in OpenAI's harness), then the nonce; never atexit handlers."""
    read, write, exit_, stderr = os.read, os.write, os._exit, sys.stderr
    write(status, b"ready\n")
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "program", "__builtins__": builtins})
        write(status, read(nonce, 64) + b"\n")
        exit_(0)
    except SystemExit as e:
        print(f"the program exited ({e.code!r}) before its end", file=stderr)
    except BaseException:
        traceback.print_exc()
    stderr.flush()
    exit_(1)

def sandbox_main(a):
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    status, nonce, isolated, as_root = a["status_fd"], a["nonce_fd"], a["mode"] == "isolated", os.geteuid() == 0
    uid = a["uid_base"] + os.getpid() if as_root else os.geteuid()
    try:
        source = open(a["program"], encoding="utf-8").read()
        if isolated:
            sandbox_syscalls()
            sandbox_namespaces(as_root, uid)
            sandbox_die_with_parent(sandbox_fork_supervised())  # the new PID namespace's init; the program its child
            sandbox_mount_views(a["work"], a["disk"], uid if as_root else 0, as_root)
            os.chdir(a["work"])  # into the tmpfs
        elif as_root:
            if hidden := sandbox_hidden_ancestor(sys.base_prefix):
                raise SandboxSetupError(f"our Python ({sys.base_prefix}) lies in {hidden}, which other users may not "
                                        "enter: the weak sandbox's uid could not import the standard library")
            os.chown(a["work"], uid, uid)
        alive = sandbox_fork_supervised()
        with open("program.py", "w", encoding="utf-8") as f:  # for its tracebacks
            f.write(source)
        sandbox_cut_python_sockets()
        if as_root:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        elif isolated:  # a nested user namespace: no capability left over the namespaces made above
            sandbox_check(sandbox_libc().unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        sandbox_die_with_parent(alive)
        for name, value in dict(AS=a["memory"], CPU=a["cpu_seconds"], FSIZE=a["disk"], NPROC=1, NOFILE=64).items():
            try:
                resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
            except (ValueError, OSError) as e:  # macOS refuses RLIMIT_AS
                if sys.platform == "linux":
                    raise SandboxSetupError(f"setrlimit: {e}")
        if isolated or sys.platform == "linux" and os.uname().machine in SANDBOX_SYSCALLS:
            sandbox_deny_syscalls(SANDBOX_NO_NETWORK)
        os.closerange(3, min(status, nonce))
        os.closerange(min(status, nonce) + 1, max(status, nonce))
        os.closerange(max(status, nonce) + 1, 1 << 16)
        os.environ.clear()
        os.environ.update(PATH="/usr/bin:/bin", HOME=a["work"], TMPDIR=a["work"])
    except (SandboxSetupError, OSError) as e:
        os.write(status, f"error: {e}\n".encode())
        os._exit(125)
    sandbox_run(source, status, nonce)

SANDBOX_CODE = (SandboxSetupError, *(f for name, f in globals().items() if name.startswith("sandbox_")))  # all above

@functools.cache
def sandbox_launcher():
    """The source `python -I -S -c` runs: the imports, the constants and the code above, then sandbox_main of its
    JSON argument (`python -c` names it __main__; exec'd under another name it only defines them)."""
    constants = "".join(f"{name} = {value!r}\n" for name, value in globals().items()
                        if name.startswith(("CLONE_", "MS_")) or name in ("SANDBOX_SYSCALLS", "SANDBOX_NO_NETWORK"))
    try:  # read at a run's start (phases_to_run), before the file can change under it
        code = "\n\n".join(inspect.getsource(part) for part in SANDBOX_CODE)
    except OSError as e:
        raise SandboxUnavailable(f"{__file__}: the sandbox's code cannot be read ({e})") from None
    return (f"import {SANDBOX_IMPORTS}\n\n{constants}\n\n{code}\n\n"
            "if __name__ == '__main__':\n    sandbox_main(json.loads(sys.argv[1]))\n")

def extract_program(completion, prompt):
    """The problem's prompt, then the completion's first ``` block (unclosed: to the end), else its whole text. The
    prompt first: its imports and helpers are there (HumanEval/10, 32, 38, 50's tests call helpers, which nanochat's
    imports alone miss), a restated function replaces its stub and a bare body continues it."""
    fenced = re.search(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", completion, re.DOTALL)  # ```python, ```py, ```Python3, ```
    return prompt + "\n" + (fenced.group(1) if fenced else completion)

class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up on this machine."""

class SandboxWarning(UserWarning):
    """Model-written code runs in the weak sandbox."""

@functools.cache  # said once per process
def warn_weak_sandbox():
    who = ("its own uid" if os.geteuid() == 0 else
           f"our uid {os.geteuid()}, so it can write our files and signal our processes")
    warnings.warn(f"--sandbox=weak: model-written code runs without namespaces, as {who}; it can see other processes, "
                  "read world-readable files and write world-writable directories (README: Security)",
                  SandboxWarning, stacklevel=3)

def remove_tree(top):
    """Delete top and all under it, following no link and raising nothing, however deep or locked down the tree a
    program left: subdirectories empty into top by renames (no recursion, short paths; rmtree fails ~1,000 deep)."""
    lifted = 0
    try:
        if not os.path.isdir(top) or os.path.islink(top):
            return os.unlink(top)
        for _ in range(1 << 20):  # each round removes or lifts something, or we give up on what is left
            os.chmod(top, 0o700)
            progress = False
            for entry in list(os.scandir(top)):  # listed whole (which closes the scandir) before anything moves
                try:
                    if entry.is_dir(follow_symlinks=False):
                        os.chmod(entry.path, 0o700)
                        children = os.listdir(entry.path)
                        for lifted, child in enumerate(children, lifted + 1):
                            os.rename(os.path.join(entry.path, child), os.path.join(top, f".lifted-{lifted}"))
                        if not children:
                            os.rmdir(entry.path)
                    else:
                        os.unlink(entry.path)
                    progress = True
                except OSError:
                    pass
            if not progress:
                break
        os.rmdir(top)
    except OSError:
        pass

def run_sandboxed(program, timeout=5.0, memory_mb=512, disk_mb=64, sandbox="isolated"):
    """Run Python source in the sandbox (its promise above) -> (passed, reason): "passed", else the last line of its
    stderr (e.g. "AssertionError", "MemoryError"), a signal or the timeout. SandboxUnavailable: no sandbox here."""
    if sandbox not in SANDBOX_MODES:
        raise ValueError(f"sandbox {sandbox!r}: choose from {', '.join(SANDBOX_MODES)}")
    if sandbox == "weak":
        warn_weak_sandbox()
    nonce = os.urandom(16).hex().encode()
    private = tempfile.mkdtemp(prefix="decoderstack-sandbox-")
    os.chmod(private, 0o711)  # ours: the program may reach its cwd by path but neither list nor replace it
    status, nonce_r, timed_out = None, None, False
    try:
        work, source = os.path.join(private, "work"), os.path.join(private, "program.py")
        os.mkdir(work)
        with open(source, "w", encoding="utf-8") as f:
            f.write(program)
        (status, status_w), (nonce_r, nonce_w) = os.pipe(), os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        args = dict(mode=sandbox, work=work, program=source, status_fd=status_w, nonce_fd=nonce_r, disk=disk_mb << 20,
                    memory=memory_mb << 20, cpu_seconds=math.ceil(timeout) + 1, uid_base=SANDBOX_UID_BASE)
        with open(os.path.join(private, "stderr"), "w+b") as err:  # a file, not a pipe: RLIMIT_FSIZE bounds it
            try:
                child = subprocess.Popen([SANDBOX_PYTHON, "-I", "-S", "-c", sandbox_launcher(), json.dumps(args)], cwd=work,
                                         env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, pass_fds=(status_w, nonce_r), start_new_session=True)
            finally:
                os.close(status_w)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:  # the launcher's group, and with the launcher the namespace
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            report = os.read(status, 4096) if select.select([status], [], [], 0)[0] else b""
            err.seek(max(0, os.fstat(err.fileno()).st_size - 4096))
            lines = err.read().decode("utf-8", "replace").strip().splitlines()
    finally:
        for fd in (status, nonce_r):
            if fd is not None:
                os.close(fd)
        remove_tree(private)
    if report.startswith(b"error: "):  # written before the program ran, so by the sandbox itself
        reason = report[7:].decode("utf-8", "replace").strip()
        hint = (" (--sandbox=weak runs HumanEval without namespaces; README: Security)" if sandbox == "isolated" else "")
        raise SandboxUnavailable(f"cannot set up the {sandbox} sandbox for model-written code: {reason}{hint}")
    code = child.returncode
    if timed_out:
        return False, f"timed out after {timeout:g}s"
    if code == 0 and report == b"ready\n" + nonce + b"\n":
        return True, "passed"
    if code == 0:
        return False, "the program exited (0) before its end"
    if code > 128 and code - 128 in signal.valid_signals():  # SIGKILL at the CPU limit, SIGSEGV, ...
        return False, f"killed by {signal.Signals(code - 128).name}"
    return False, (lines[-1] if lines else f"exit status {code}")[:200]

def humaneval_passed(completion, problem, timeout=5.0, sandbox="isolated"):
    """Whether the completion passes a HumanEval problem (an entry of the code task's manifest "problems")."""
    program = f"{extract_program(completion, problem['prompt'])}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    return run_sandboxed(program, timeout, sandbox=sandbox)[0]

@torch.no_grad()
def evaluate_chat(model, chat, tokenizer, rt, windows, max_per_task=-1, batch_tokens=32768, batch_size=16,
                  max_new_tokens=512, sandbox="isolated", compile_decode=False, log=None):
    """Categorical tasks by letter argmax; GSM8K and HumanEval greedy with the calculator, scored on '####' or by tests
    in `sandbox` (tried first: SandboxUnavailable before generating). Ranks split examples; returns task_scores'."""
    evaluated, mine = examples_of_rank(chat.tasks, len(chat.examples), max_per_task, rt)
    correct = torch.zeros(len(chat.examples), dtype=torch.float32)
    kind = {e: chat.tasks[int(chat.examples[e, 0])]["kind"] for e in mine}
    progress = Progress(log, "chat eval", len(mine), "examples")
    categorical = [(e, chat.prompt(e)) for e in mine if kind[e] == "categorical"]
    for batch in token_batches(categorical, lambda item: len(item[1][0]), batch_tokens):
        choices = categorical_choices(model, [(tokens, n) for _, (tokens, _, n) in batch], chat.letter_ids, rt, windows)
        for (e, (_, gold, _)), choice in zip(batch, choices):
            correct[e] = float(choice == gold)
            progress()
    engine = Engine(model, tokenizer, windows, rt, compile=compile_decode)
    generated = [e for e in mine if kind[e] != "categorical"]
    code = [e for e in generated if kind[e] == "code"]
    if code and (tried := run_sandboxed("pass", sandbox=sandbox)) != (True, "passed"):
        raise SandboxUnavailable(f"the {sandbox} sandbox does not run even `pass`: {tried[1]}")
    if generated:  # continuously batched: batch_size rows, a finished one takes the next prompt at once
        samples = engine.generate([chat.prompt(e)[0].tolist() for e in generated], 1, max_new_tokens, temperature=0,
                                  max_rows=batch_size, on_done=progress)
        tested = Progress(log, "HumanEval tests", len(code), "programs")  # each up to its timeout
        for e, (sample,) in zip(generated, samples):
            task = chat.tasks[int(chat.examples[e, 0])]
            text, index = reply_text(tokenizer, sample), e - task["first_example"]
            correct[e] = float(humaneval_passed(text, task["problems"][index], sandbox=sandbox) if kind[e] == "code"
                               else gsm8k_answer(text) == task["answers"][index])
            if kind[e] == "code":
                tested()
    out = task_scores(chat.tasks, "name", correct, evaluated, rt)
    return dict(out, chatcore=out.pop("mean"))

def phase_chat(cfg, rt, log):
    """chat eval (ARC, MMLU, GSM8K, HumanEval; ChatCORE); reads chat_eval/; writes metrics.json"""
    tokenizer = data_tokenizer(cfg.data_dir)
    model, _, path = trained_model(cfg, rt)
    chat = load_chat_eval(cfg.data_dir, tokenizer)
    log(f"chat evaluation of {path}")
    t0 = time.time()
    out = evaluate_chat(model, chat, tokenizer, rt, model.windows(), cfg.chat_max_per_task, cfg.core_batch_tokens,
                        cfg.chat_batch_size, cfg.chat_max_new_tokens, cfg.sandbox, cfg.sample.decode_compile, log)
    log(task_table(out, chat.tasks, "name", "ChatCORE"))
    log(f"chat eval took {time.time() - t0:.0f}s")
    values = {"chatcore": out["chatcore"], "chat_per_task": out["results"], "chat_max_per_task": cfg.chat_max_per_task}
    # the pipeline evaluates after SFT and again after RL: keep each checkpoint's numbers, the latest on top
    history = read_metrics(cfg.run_dir).get("chat_by_checkpoint", {})
    update_metrics(cfg, rt, {**values, "chat_by_checkpoint": {**history, os.path.basename(path): values}})


# =============================================================================================================
# 13. Chat SFT: batches of whole conversations, the masked loss, then the loop (phase_sft)
# Each conversation is a varlen batch's document as in pretraining (positions from 0, no attention across): its losses
# are its own alone (nanochat pads rows). Targets: its mask's tokens (assistant text, tool calls, <|assistant_end|>).

def sft_batch(split, convs, T, bos_id, device):
    """Packed Batch of T tokens: conversations `convs` (indices into SFTSplit `split`) back to back (only the first may
    be longer: it is cut), then one padding document (BOS, token 0s: a single cu_seqlens entry). Targets: the next
    token where its mask is 1, else -1 (never across conversations: each starts with BOS, whose mask is 0)."""
    tokens, masks = zip(*(split.conversation(i) for i in convs))
    pad = max(0, T - sum(len(t) for t in tokens))
    buf = np.concatenate([*tokens, [bos_id], np.zeros(pad, np.int64)])[:T + 1]
    supervised = np.concatenate([*masks, np.zeros(pad + 1, np.int64)])[1:T + 1] == 1
    batch = make_batch(buf, bos_id, T, 1, device)  # max_doc_len T: documents start only at BOS
    batch.targets.masked_fill_(~to_device(supervised, torch.bool, device)[:, None], -1)
    return batch

class SFTLoader:
    """Conversations in a new seeded permutation each epoch, packed greedily into T tokens (the first always, cut if
    longer). Every rank packs the same stream and keeps every world_size-th batch; checkpoints save (epoch, cursor)."""

    def __init__(self, split, tokenizer, rank, world_size, seed, state=None):
        self.split, self.bos, self.rank, self.world_size, self.seed = split, tokenizer.bos_id, rank, world_size, seed
        self.lengths, self._order = np.diff(split.convs), (None, None)
        self.state = dict(state or {"epoch": 0, "cursor": 0})

    def order(self, epoch):
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths)))
        return self._order[1]

    def _take(self, T):
        """Conversation indices of the next batch of the shared stream; advances the state."""
        s, convs, used = self.state, [], 0
        while True:
            i = int(self.order(s["epoch"])[s["cursor"]])
            if convs and used + self.lengths[i] > T:
                return convs
            convs.append(i)
            used += int(self.lengths[i])
            s["cursor"] += 1
            if s["cursor"] == len(self.lengths):
                s["epoch"], s["cursor"] = s["epoch"] + 1, 0

    def next_batch(self, T, device):
        return sft_batch(self.split, [self._take(T) for _ in range(self.world_size)][self.rank], T, self.bos, device)

def sft_loss(model, batch, windows, backend):
    """Mean softcapped cross entropy over the supervised targets (targets -1 count nowhere, get no gradient).
    The lm_head stays a plain matmul: FP8's static gradient scale is set for pretraining's mean over all tokens."""
    h = model.hidden(batch, windows, backend)
    logits = h @ model.lm_head[:model.vocab_size].T
    targets = batch.targets[:, :1]
    losses = softcap_cross_entropy(logits, targets, torch.ones(1, device=h.device), model.cfg.softcap)
    return losses.sum() / (targets >= 0).sum().clamp(min=1)

@torch.no_grad()
def evaluate_sft_loss(model, split, rt, windows, max_tokens, batch_tokens=8192):
    """Mean nats per supervised token of a fixed sample of val conversations, up to max_tokens tokens (a seed-0
    permutation's first: the files are grouped by source), in forwards of <= batch_tokens (longer: cut), over ranks."""
    order = np.random.default_rng(0).permutation(len(split.convs) - 1)
    n = max(1, int(np.searchsorted(np.cumsum(np.diff(split.convs)[order]), max_tokens, side="right")))
    convs = (split.conversation(int(i)) for i in order[:n])
    sums = torch.zeros(2, device=rt.device, dtype=torch.float64)  # nats, supervised tokens
    for batch in list(token_batches(convs, lambda c: len(c[0]), batch_tokens))[rt.rank::rt.world_size]:
        batch = [(t[:batch_tokens], m[:batch_tokens]) for t, m in batch]
        h, ids, starts = packed_hidden(model, [t for t, _ in batch], rt, windows)
        # row i predicts token i + 1 of its conversation: a target where that token's mask is 1
        rows = torch.from_numpy(np.concatenate([o + np.flatnonzero(m[1:]) for o, (_, m) in zip(starts, batch)])).to(rt.device)
        for chunk in torch.split(rows, LOGITS_CHUNK):
            sums[0] += F.cross_entropy(model.logits(h[chunk]), ids[chunk + 1], reduction="sum").double()
        sums[1] += len(rows)
    nats, count = sum_over_ranks(sums, rt).tolist()
    return nats / max(count, 1)

def sft_lr_factor(sft, step, total):
    """Linear warmup over warmup_frac of the steps, flat, linear decay over the last cooldown_frac (no step at lr 0)."""
    warmup, cooldown = sft.warmup_frac * total, sft.cooldown_frac * total
    up = min(1.0, (step + 1) / warmup) if warmup else 1.0
    down = min(1.0, (total - step) / cooldown) if cooldown else 1.0
    return up * down

def phase_sft(cfg, rt, log):
    """chat SFT with a fresh optimizer; reads sft/; writes RUN_DIR/sft_ckpt_<step>/, curves.jsonl, metrics.json"""
    require_training_dtype(rt, "sft")
    sft, tokenizer = cfg.sft, data_tokenizer(cfg.data_dir)
    model, _, path = trained_model(cfg, rt)  # the checkpoint's architecture and final windows
    windows, opt = model.windows(), make_optimizer(model, cfg, sft.lr_mul)
    train, val = load_sft(cfg.data_dir, tokenizer, "train"), load_sft(cfg.data_dir, tokenizer, "val")
    loader, total = SFTLoader(train, tokenizer, rt.rank, rt.world_size, cfg.seed), sft.steps
    T, accum = micro_batch(sft.batch_tokens, cfg.micro_batch_tokens, rt.world_size, "sft")
    start = resumed_step(cfg, "sft", model, opt, loader, log)
    log(f"sft: from {path}, {total} steps of {sft.batch_tokens:,} tokens, {len(train.convs) - 1:,} train conversations "
        f"({len(train.tokens):,} tokens), lr x{sft.lr_mul}")
    loss_fn = torch.compile(sft_loss) if cfg.compile else sft_loss
    chat = load_chat_eval(cfg.data_dir, tokenizer) if sft.chat_max_per_task > 0 else None

    def evaluate(step):
        val_loss = evaluate_sft_loss(model, val, rt, windows, sft.val_tokens, T)
        log(f"sft step {step}/{total} val loss {val_loss:.4f}")
        log.metrics(step, {"sft/val_loss": val_loss})
        if chat is not None and step > 0:  # the base model cannot chat yet: nothing to learn from its score
            out = evaluate_chat(model, chat, tokenizer, rt, windows, sft.chat_max_per_task, cfg.core_batch_tokens,
                                cfg.chat_batch_size, cfg.chat_max_new_tokens, cfg.sandbox, cfg.sample.decode_compile, log)
            log(f"sft step {step}/{total} chatcore {out['chatcore']:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in out["results"].items()))
            log.metrics(step, {"sft/chatcore": out["chatcore"]})
            update_metrics(cfg, rt, {"sft_chatcore": out["chatcore"], "sft_chat_per_task": out["results"]})
        return val_loss

    if start == 0:
        update_metrics(cfg, rt, {"sft_val_loss_init": evaluate(0)})
    timer, pending = LoopTimer(), []
    for step in range(start, total):
        batches = [loader.next_batch(T, rt.device) for _ in range(accum)]
        # the step's loss is the mean over every supervised target of every rank: weigh each micro-batch's mean by
        # its share of them (times world size: the optimizer averages gradients over ranks)
        counts = torch.stack([(b.targets[:, 0] >= 0).sum() for b in batches]).double()
        n_total = sum_over_ranks(counts.sum(), rt)
        step_loss = torch.zeros((), device=rt.device)
        for b, n in zip(batches, counts):
            with autocast(rt):
                loss = loss_fn(model, b, windows, rt.backend) * (n * rt.world_size / n_total.clamp(min=1)).float()
            loss.backward()
            step_loss += loss.detach()
        pending.append((step, step_loss))
        lr = sft_lr_factor(sft, step, total)
        opt.step(lr, muon_momentum(step, total, warmup=sft.momentum_warmup, cooldown=0))
        opt.zero_grad()
        timer.step(sft.batch_tokens)
        final = step == total - 1
        logging = step % cfg.log_every == 0 or final
        evaluating = (step + 1) % sft.eval_every == 0 and not final
        saving = (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or final
        if not (logging or evaluating or saving):
            continue
        losses = settle_losses(pending, cfg, rt, log, "sft")  # the host sync; stops on a NaN before anything is saved
        seconds, steps, tokens = timer.lap()
        if step == start and cfg.compile:
            timer.total = 0.0  # the first step compiled the loss
        if logging:
            log(f"sft step {step + 1}/{total} loss {losses[-1]:.4f} lr {lr:.3f} {tokens / seconds:,.0f} tok/s "
                f"eta {seconds / steps * (total - step - 1) / 60:.1f} min")
            log.metrics(step + 1, {"sft/loss": losses[-1]})
        if evaluating:
            evaluate(step + 1)
        if saving:
            save_checkpoint(cfg, rt, step + 1, model, opt, loader.state, phase="sft")
        timer.pause_until_now()
    if start >= total:
        log(f"sft: nothing to do: run already at step {start} of {total}")
        return
    update_metrics(cfg, rt, {"sft_val_loss": evaluate(total), "sft_steps": total, "sft_train_time_s": timer.total})


# =============================================================================================================
# 14. GSM8K RL: on-policy policy gradient with the engine and the calculator, nanochat-style; the loop (phase_rl)

def gsm8k_reward(tokenizer, sample, answer):
    return float(gsm8k_answer(reply_text(tokenizer, sample)) == answer)

def group_advantages(rewards):
    """Reward minus the mean over the k samples of the same question (no std scaling, as nanochat)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    return rewards - rewards.mean()

def policy_gradient_loss(model, rollouts, windows, rt, n_tokens):
    """-sum(advantage x log p(token)) / n_tokens (all the step's sampled tokens) over the sampled tokens of `rollouts`,
    (prompt, Sample, advantage)s in one varlen forward; prompts and forced tool output (mask 0) get no gradient."""
    batch, starts = pack_sequences([np.array(prompt + sample.tokens) for prompt, sample, _ in rollouts], rt.device)
    rows, weights = [], []
    for start, (prompt, sample, advantage) in zip(starts, rollouts):
        sampled = np.flatnonzero(np.array(sample.mask) == 1)  # token i of the sample sits at start + len(prompt) + i
        rows.append(start + len(prompt) + sampled - 1)        # ... and is predicted by the row before it
        weights.append(np.full(len(sampled), advantage, dtype=np.float32))
    rows = torch.from_numpy(np.concatenate(rows)).to(rt.device)
    with autocast(rt):
        h = model.hidden(batch, windows, rt.backend)
        logp = -F.cross_entropy(model.logits(h[rows]).float(), batch.inputs[rows + 1], reduction="none")
    return -(logp * torch.from_numpy(np.concatenate(weights)).to(rt.device)).sum() / max(1, n_tokens)

@torch.no_grad()
def gsm8k_pass_at_k(engine, tokenizer, chat, task, examples, k, rl, rt, seed, log=None):
    """pass@j, j = 1..k: the fraction of `examples` (split across ranks) one of whose first j samples is right."""
    hits, mine = torch.zeros(k, device=rt.device), examples[rt.rank::rt.world_size]
    progress = Progress(log, f"pass@{k}", len(mine), "questions")
    for e in mine:
        samples = engine.generate([chat.prompt(e)[0].tolist()], k, rl.max_new_tokens, rl.temperature, rl.top_k,
                                  seed=seed + e)[0]
        right = [gsm8k_reward(tokenizer, s, task["answers"][e - task["first_example"]]) for s in samples]
        hits += torch.tensor(np.maximum.accumulate(right), dtype=torch.float32, device=rt.device)
        progress()
    return {j + 1: hit / len(examples) for j, hit in enumerate(sum_over_ranks(hits, rt).tolist())}

def phase_rl(cfg, rt, log):
    """GSM8K RL; reads rl/, chat_eval/; writes RUN_DIR/rl_ckpt_<step>/, curves.jsonl, metrics.json
    Each step: rl.samples samples of rl.questions_per_step questions each (split across ranks); pass@k on test ones."""
    require_training_dtype(rt, "rl")
    rl, tokenizer = cfg.rl, data_tokenizer(cfg.data_dir)
    model, _, path = trained_model(cfg, rt)
    train, test = load_chat_eval(cfg.data_dir, tokenizer, "rl"), load_chat_eval(cfg.data_dir, tokenizer)
    train_task, test_task = (next(t for t in data.tasks if t["name"] == "gsm8k") for data in (train, test))
    test_examples = [test_task["first_example"] + i for i in range(min(rl.eval_questions, test_task["n_examples"]))]
    if rl.questions_per_step < rt.world_size:
        raise ValueError(f"--rl-questions-per-step {rl.questions_per_step} < world size {rt.world_size}: every rank "
                         "needs a question")
    windows, opt = model.windows(), make_optimizer(model, cfg, rl.lr_mul)
    engine = Engine(model, tokenizer, windows, rt, compile=cfg.sample.decode_compile)
    order = np.random.default_rng(cfg.seed).permutation(train_task["n_examples"]) + train_task["first_example"]
    log(f"RL from {path}: {rl.steps} steps x {rl.questions_per_step} questions x {rl.samples} samples, "
        f"{train_task['n_examples']} training questions, pass@{rl.eval_samples} on {len(test_examples)} test questions")
    rewards, pass_at, start = [], {}, 0
    resumed = resume_checkpoint(cfg, "rl", model, opt, log)
    if resumed:  # the questions' order and every step's seeds follow from --seed: the rest replays exactly
        start, rewards, pass_at = resumed[1]["step"], resumed[1]["loader"]["rewards"], resumed[1]["loader"]["pass_at"]
        log(f"rl: resumed from {resumed[0]} at step {start}")
        if start == rl.steps:
            log(f"rl: nothing to do: run already at step {start} of {rl.steps}")
            return
    for step in range(start, rl.steps + 1):
        if step % rl.eval_every == 0 or step == rl.steps:
            pass_at = gsm8k_pass_at_k(engine, tokenizer, test, test_task, test_examples, rl.eval_samples, rl, rt, cfg.seed,
                                      log)
            log(f"rl step {step}/{rl.steps} " + " ".join(f"pass@{j} {v:.4f}" for j, v in pass_at.items()))
            log.metrics(step, {f"rl/pass@{j}": v for j, v in pass_at.items()})
        if step == rl.steps:
            break
        t0 = time.perf_counter()
        questions = [int(order[(step * rl.questions_per_step + i) % len(order)]) for i in range(rl.questions_per_step)]
        mine, rollouts, step_rewards = questions[rt.rank::rt.world_size], [], []
        prompts = [train.prompt(e)[0].tolist() for e in mine]  # all of a rank's rollouts decode as one batch
        drawn = engine.generate(prompts, rl.samples, rl.max_new_tokens, rl.temperature, rl.top_k,
                                seed=cfg.seed * 1_000_003 + step * 1009 + rt.rank)
        for e, prompt, samples in zip(mine, prompts, drawn):
            reward = [gsm8k_reward(tokenizer, s, train_task["answers"][e - train_task["first_example"]]) for s in samples]
            step_rewards += reward
            rollouts += [(prompt, s, float(a)) for s, a in zip(samples, group_advantages(reward))]
        stats = torch.tensor([sum(step_rewards), len(step_rewards), sum(sum(s.mask) for _, s, _ in rollouts)],
                             dtype=torch.float64, device=rt.device)
        sum_over_ranks(stats, rt)
        # advantage-0 rollouts add no gradient: skipped, but one runs (weighted 0) so every rank's optimizer sees the
        # same gradients exist. Over all ranks' sampled tokens / world size: the ranks' mean is one process's update
        learning = [r for r in rollouts if r[2] != 0] or [(rollouts[0][0], rollouts[0][1], 0.0)]
        for batch in token_batches(learning, lambda r: len(r[0]) + len(r[1].tokens), rl.batch_tokens):
            policy_gradient_loss(model, batch, windows, rt, float(stats[2]) / rt.world_size).backward()
        opt.step(1 - step / rl.steps, 0.95)
        opt.zero_grad()
        rewards.append(float(stats[0] / stats[1]))
        log(f"rl step {step + 1}/{rl.steps} reward {rewards[-1]:.4f} sampled tokens {int(stats[2])} "
            f"lr {1 - step / rl.steps:.3f} {time.perf_counter() - t0:.1f}s")
        log.metrics(step + 1, {"rl/reward": rewards[-1]})
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < rl.steps:
            save_checkpoint(cfg, rt, step + 1, model, opt, {"rewards": rewards, "pass_at": pass_at}, phase="rl")
    save_checkpoint(cfg, rt, rl.steps, model, opt, {"rewards": rewards, "pass_at": pass_at}, phase="rl")
    update_metrics(cfg, rt, {"rl_reward": rewards, "gsm8k_pass_at": pass_at})


# =============================================================================================================
# 15. The phase table and main

PHASES = dict(pt=phase_pt, eval=phase_eval, sft=phase_sft, chat=phase_chat, rl=phase_rl, generate=phase_generate)
TIMED_PHASES = ("pt", "eval", "sft", "chat", "rl")  # their wall times go into metrics.json (phase_time_s)
MOVED = {"serve": "serve.py", "export": "export.py", "data": "data/check.py"}  # what files beside this one run now

def beside(name):
    """The path of the file `name` beside this one, as a command run from here would give it."""
    return os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), name))

def moved_phase(argv):
    """The error for an old command: --phases serve, export, data or convert, or generate without --prompt (its chat)."""
    import shlex
    if (at := next((i for i, a in enumerate(argv) if a.split("=")[0] == "--phases"), None)) is None:
        return None
    n = 1 if "=" in argv[at] else 2  # --phases=a,b or --phases a,b
    names, rest = " ".join(argv[at:at + n])[len("--phases "):].split(","), argv[:at] + argv[at + n:]
    if "convert" in names:
        return ("--phases convert is gone: checkpoints written before 2026-12-01 are not read (README: Checkpoints "
                "and the run directory)")
    if "generate" in names and not any(a.split("=")[0] == "--prompt" for a in argv):
        return ("--phases generate samples --prompt TEXT; its chat on stdin moved beside the stack: "
                + shlex.join(["python", beside("chat_cli.py"), *rest]))
    if moved := [name for name in names if name in MOVED]:
        return (f"--phases {moved[0]} moved beside the stack (it imports it); run the other phases first, then: "
                + shlex.join(["python", beside(MOVED[moved[0]]), *rest]))

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if message := moved_phase(argv):
        sys.exit(f"error: {message}")
    cfg = parse_config(argv)
    phases = [p for p in cfg.phases.split(",") if p]
    if unknown := [p for p in phases if p not in PHASES]:
        sys.exit(f"error: unknown phase(s) {', '.join(unknown)}; available: {', '.join(PHASES)}")
    rt = init_runtime(cfg)
    try:
        # phases that write checkpoints own the run directory; generate (and eval, chat) may read one in use
        lock = claim_run_dir(cfg, phases) if rt.master and set(phases) & set(CHECKPOINT_PREFIX) else None
        log = Logger(cfg, rt)
        header = log.start(cfg, rt)
        if rt.world_size > 1:  # the other ranks wait for rank 0 to claim the run directory (--overwrite deletes)
            dist.barrier()
    except DataFormatError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. a full disk
        sys.exit(f"error: {cfg.run_dir}: cannot write ({e.strerror or e})")
    try:
        times = phases_to_run(phases, cfg, rt, log, header)
        if lock is not None:  # the config of the last invocation that trained and finished; every one is in log.txt
            path = os.path.join(cfg.run_dir, "config.json")
            try:
                write_text_atomic(path, json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
            except OSError as e:
                sys.exit(f"error: {path}: cannot write ({e.strerror or e})")
        done = ", ".join(f"{phase} {duration(seconds)}" for phase, seconds in times)
        log(f"done: {done}. Results: {os.path.join(cfg.run_dir, 'metrics.json')}; the report: python "
            f"{beside('report.py')} --run-dir {cfg.run_dir} writes {os.path.join(cfg.run_dir, 'report.md')}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.close()

def phases_to_run(phases, cfg, rt, log, header=None):
    """Run the phases -> [(phase, seconds)]; each of TIMED_PHASES' wall time and checkpoint (written or evaluated) go
    into metrics.json with run_header (failing: a warning). A bad prepared file or no sandbox: one error line."""
    times = []
    try:
        if {"chat", "sft"} & set(phases):
            sandbox_launcher()  # read from this file now: hours later it may have been edited
        for phase in phases:
            t0, evaluated = time.perf_counter(), cfg.init_from or latest_checkpoint(cfg.run_dir)
            PHASES[phase](cfg, rt, log)
            times.append((phase, time.perf_counter() - t0))
            if phase in TIMED_PHASES and rt.master:
                try:
                    checkpoint = latest_checkpoint(cfg.run_dir, phase) if phase in CHECKPOINT_PREFIX else evaluated
                    record_phase_time(cfg, rt, phase, checkpoint, times[-1][1], header or run_header(rt))
                except Exception as e:  # anything: a full disk, a metrics.json of another version of the stack
                    log(f"warning: {os.path.join(cfg.run_dir, 'metrics.json')}: {phase}'s time not recorded: "
                        f"{type(e).__name__}: {e}")
    except (DataFormatError, SandboxUnavailable) as e:
        sys.exit(f"error: {e}")
    return times

if __name__ == "__main__":
    main()
