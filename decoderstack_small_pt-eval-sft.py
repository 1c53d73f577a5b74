"""DecoderStack: one file that pretrains a decoder on pre-tokenized shards, evaluates it (bits per byte, CORE),
fine-tunes it for chat and generates with a KV cache. Data is prepared by the scripts in data/ (data/README.md).

Run:
    8xH100 record:  torchrun --nproc_per_node=8 decoderstack_small_pt-eval-sft.py --preset h100x8 --data-dir DIR
    one GPU:        python decoderstack_small_pt-eval-sft.py --preset gpu1 --data-dir DIR
    Colab:          python decoderstack_small_pt-eval-sft.py --preset colab --data-dir DIR
    CPU:            python decoderstack_small_pt-eval-sft.py --preset cpu --data-dir DIR
    modded-nanogpt's FineWeb shards (GPT-2 ids; its val loss rule, to compare with its 3.28 target):
        torchrun --nproc_per_node=8 decoderstack_small_pt-eval-sft.py --preset h100x8 --data-dir data/fineweb10B \\
            --vocab-size 50257 --bos-id 50256 --val-final-tokens 10485760
Any hyperparameter can be overridden with --name=value (--flag / --no-flag for booleans, JSON for tuples).

Contents, in the order data flows
    1. Hyperparameters: the stages of the schedule, one Config, presets, --name=value overrides
    2. Runtime: device, precision (PRECISION), distributed
    3. Kernels: Triton kernels beside their PyTorch references
    4. Attention over packed documents: the Batch and its packer; FA3 / FA2 / flex / SDPA
    5. Model: ModelConfig (stored with the weights), GPT
    6. Optimizer: NorMuon (Polar Express) + Adam, each parameter's rule
    7. Data: readers of every format, the pretraining loader
    8. Pretraining: the schedule, the loss, bits per byte, FLOPs
    9. Evaluation: packed forwards every evaluation shares, CORE
    10. Inference: KV cache, sampling, the calculator tool, the engine
    11. Evaluation: chat (ARC, MMLU, GSM8K, HumanEval in a sandbox; ChatCORE)
    12. Post-training: chat SFT and GSM8K RL
    13. Run helpers: logging, checkpoints (load_model), the run directory, metrics, the run report, the loop's
        bookkeeping
    14. Serving: the OpenAI-compatible server over the engine, its chat page
    15. Export: a checkpoint as a Hugging Face folder (transformers), uploaded to the Hub
    16. Phases (data, pt, eval, sft, chat, rl, generate, serve, export, convert) and main
"""
import argparse
import ast
import asyncio
import base64
import collections
import dataclasses
import functools
import glob
import hashlib
import json
import math
import operator
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
# 1. Hyperparameters


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pretraining schedule (modded-nanogpt's TrainingStage). On the command line, --stages is JSON:
    a list of objects with these names, or of lists in this order."""
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
        """A Stage from itself, its dict or its positional list."""
        if isinstance(value, Stage):
            return value
        names = [f.name for f in dataclasses.fields(cls)]
        fields = value if isinstance(value, dict) else None
        if isinstance(value, (list, tuple)) and len(value) == len(names):
            fields = dict(zip(names, value))
        if fields is None or sorted(fields) != sorted(names):
            raise ValueError(f"a stage needs exactly {', '.join(names)}, got {value!r}")
        return cls(**{**fields, "mtp_start": tuple(fields["mtp_start"]), "mtp_end": tuple(fields["mtp_end"])})


SOFTCAP = (23.0, 5.0, 7.5)  # logits u = A * sigmoid((z + B) / C): bounded to (0, 23), as in modded-nanogpt


@dataclasses.dataclass
class Config:
    # run
    preset: str = "h100x8"
    data_dir: str = "runs/data"     # written by data/prepare.py, or a folder of llm.c shards (PretrainData)
    vocab_size: int = 0             # 0: from the data; llm.c shards record none (modded's FineWeb: 50257, BOS 50256)
    bos_id: int = -1                # -1: from the data
    run_dir: str = "runs/h100x8"
    phases: str = "pt"
    seed: int = 0
    resume: bool = False          # continue from the last checkpoint in run_dir
    overwrite: bool = False       # a fresh pt/sft/rl run replaces the run_dir's earlier checkpoints of that phase on
    init_from: str = ""           # start from this checkpoint's weights
    compile: bool = True
    attn_backend: str = "auto"    # auto | fa3 | fa2 | flex | sdpa
    dtype: str = "auto"           # activations (PRECISION, in Runtime): auto | bf16 | fp32 | fp16 (no training)
    wandb: str = "auto"           # auto: online when WANDB_API_KEY is set, else disabled | offline | disabled
    # model (modded-nanogpt track-1 scale)
    n_layers: int = 11
    model_dim: int = 768
    n_heads: int = 6
    head_dim: int = 128
    mlp_mult: int = 4
    vocab_multiple: int = 128        # embedding rows padded to a multiple: matmul-friendly shapes
    long_window_layers: str = "3,10"
    value_embed_layers: str = "1,2,8,9,10"
    bigram_rows_per_vocab: float = 7.5
    attn_scale: float = 0.1
    softcap: tuple = SOFTCAP
    fp8: bool = True                   # FP8 lm_head matmuls in training, where the GPU has them (sm89+)
    # schedule: the stages of pretraining, in order
    stages: tuple = (
        Stage(423, 131072, 896, 128, 384, 1.0, mtp_start=(1.0, 0.5, 0.25), mtp_end=(1.0, 0.5, 0.0)),
        Stage(424, 262144, 2048, 384, 896, 1.52, mtp_start=(1.0, 0.5), mtp_end=(1.0, 0.0)),
        Stage(423, 393216, 2048, 640, 1408, 1.73, mtp_start=(1.0,), mtp_end=(1.0,)),
        Stage(15, 393216, 2048, 768, 1664, 1.73, mtp_start=(1.0,), mtp_end=(1.0,)),
    )
    micro_batch_tokens: int = 49152  # tokens per rank per forward; gradient accumulation makes up the batch
    train_tokens: int = 0            # 0: as the stages say; N: rescale every stage's steps to N tokens in total
    lr_warmup_steps: int = 0         # linear lr warmup (modded-nanogpt needs none)
    cooldown_frac: float = 0.6       # lr is flat, then decays linearly to final_lr over this last fraction
    final_lr: float = 0.15
    untie_frac: float = 0.667        # embed and lm_head share weights until this fraction of the steps
    # optimizer: NorMuon for the blocks' matrices, Adam for the rest (optimizer_labels: each parameter's multipliers)
    muon_lr: float = 0.023
    muon_wd: float = 0.028
    adam_lr: float = 0.008
    adam_wd: float = 0.006
    # evaluation during pretraining, checkpoints
    val_every: int = 250             # steps between val bpb evaluations (also after the last)
    val_tokens: int = 10_485_760     # val targets per evaluation during training, spread over the whole val stream;
                                     # the last step's (and --phases eval's) scores every val token once
    val_final_tokens: int = 0        # N: the last evaluation scores the first N val tokens instead (modded-nanogpt's
                                     # rule: 10,485,760 of its FineWeb val shard, for its 3.28 val loss)
    checkpoint_every: int = 0        # steps between checkpoints (0: only at the end); pt, sft and rl
    keep_checkpoints: int = 2        # the newest N checkpoints of each phase are kept
    core_max_per_task: int = -1      # CORE examples per task in --phases eval (-1: all)
    core_batch_tokens: int = 32768   # tokens per packed CORE (and categorical chat-eval) forward
    chat_max_per_task: int = -1      # chat-eval examples per task in --phases chat (-1: all)
    chat_batch_size: int = 16        # GSM8K problems generated together
    chat_max_new_tokens: int = 512
    sandbox: str = "isolated"        # HumanEval's model-written code: isolated (refused where Linux namespaces are
                                     # not to be had) | weak (no namespaces; says what it lacks; README: Security)
    # GSM8K RL (--phases rl): on-policy policy gradient, nanochat's recipe
    rl_steps: int = 60
    rl_questions_per_step: int = 16  # over all ranks
    rl_samples: int = 16             # per question: the group whose mean reward is the baseline
    rl_max_new_tokens: int = 256
    rl_temperature: float = 1.0
    rl_top_k: int = 50
    rl_lr_mul: float = 0.05          # times --muon-lr / --adam-lr, decaying linearly to 0
    rl_batch_tokens: int = 16384     # tokens per training forward
    rl_eval_every: int = 20
    rl_eval_questions: int = 400     # held-out GSM8K test questions for pass@k
    rl_eval_samples: int = 8         # k of pass@1..k
    # generation (--phases generate): --prompt, or an interactive chat on stdin without one
    prompt: str = ""
    prompt_format: str = "auto"      # auto: a user turn for SFT/RL checkpoints, plain text for base models | chat | text
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 50                  # 0: off
    top_p: float = 1.0               # 1: off
    min_p: float = 0.0               # 0: off
    decode_compile: bool = False     # the engine's decode steps through torch.compile (CUDA graphs on GPUs; unmeasured
                                     # there): on 2 CPU cores 1.5-2x faster at batch 1, after 6-40 s compiling
    # serving (--phases serve): an OpenAI-compatible API and a chat page; omitted sampling fields take the above
    host: str = "127.0.0.1"          # 0.0.0.0 to serve other machines (there is no authentication: see README)
    port: int = 8000
    served_model_name: str = ""      # the API's model id ("": the run directory's and checkpoint's names)
    serve_max_rows: int = 32         # choices decoding at once (continuous batching); also the largest n
    serve_max_queue: int = 64        # choices waiting beyond those; more get 429
    serve_timeout: float = 300.0     # seconds per request; longer ones are cancelled (504)
    log_every: int = 10
    # SFT (--phases sft): fine-tune the latest checkpoint on the sft/ conversations
    sft_steps: int = 500              # optimizer steps
    sft_batch_tokens: int = 393216    # global tokens per step: whole conversations packed, the rest padding
    sft_lr_mul: float = 0.8           # SFT lr = --muon-lr / --adam-lr times this (nanochat: 0.8)
    sft_warmup_frac: float = 0.0      # linear lr warmup over this first fraction of the steps
    sft_cooldown_frac: float = 0.5    # then flat, then a linear decay to 0 over this last fraction (nanochat's shape)
    sft_momentum_warmup: int = 300    # NorMuon momentum 0.85 -> 0.95 over these steps (the optimizer starts fresh)
    sft_eval_every: int = 100         # steps between SFT evaluations (also at the start and the end)
    sft_val_tokens: int = 4_194_304   # val conversation tokens per evaluation (masked loss on their supervised tokens)
    sft_chat_max_per_task: int = 0    # chat-eval examples per task at each SFT evaluation but the first (0: none)
    # export (--phases export): the latest checkpoint (or --init-from) as a Hugging Face folder
    export_dir: str = ""              # "": RUN_DIR/hf
    push_to_hub: str = ""             # ORG/NAME: also upload the folder to this model repo (created if missing)

    def __post_init__(self):  # --stages JSON and configs read back from JSON give dicts or lists
        self.stages = tuple(Stage.of(s) for s in self.stages)


PRESETS = {
    "h100x8": dict(run_dir="runs/h100x8"),
    # the same model and tokens on one GPU: the stages' batches come from gradient accumulation of 32K-token
    # forwards (every stage's batch is a multiple; 49152 is not a divisor of 131072)
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


def parse_config(argv=None):
    """--preset picks the defaults, then every --name=value (or --name value) overrides one field."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    parser = argparse.ArgumentParser(description="DecoderStack (see the header of this file)")
    for name, field in fields.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(field.default, bool):
            parser.add_argument(flag, dest=name, nargs="?", const=True, default=None, type=parse_bool)
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_const", const=False)
        elif isinstance(field.default, tuple):
            parser.add_argument(flag, dest=name, default=None, type=parse_tuple)
        else:
            parser.add_argument(flag, dest=name, default=None, type=type(field.default))
    args = parser.parse_args(argv)
    preset = args.preset or Config.preset
    if preset not in PRESETS:
        parser.error(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset}
    values.update({k: v for k, v in vars(args).items() if v is not None})
    if values.get("sandbox", Config.sandbox) not in SANDBOX_MODES:
        parser.error(f"unknown --sandbox {values['sandbox']!r}; choose from {', '.join(SANDBOX_MODES)}")
    try:
        return Config(**values)
    except ValueError as e:  # e.g. a --stages entry that is not a stage
        parser.error(str(e))


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


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


# PRECISION, the one policy of this file (modded-nanogpt runs its whole model in bf16; so does this one):
# - Parameters and optimizer state are fp32 master copies; the optimizer's arithmetic is fp32, except Polar Express,
#   which iterates in bf16 wherever the Triton kernels run (its matmuls are the bulk of the optimizer's work).
# - Activations are in rt.dtype: bf16 on GPUs with native bf16 (sm80+), fp32 elsewhere (CPUs: bf16 matmuls are 50-150x
#   slower there; pre-Ampere GPUs such as the T4 and V100: fp16 would need loss scaling, which training does not do,
#   so they train in fp32 and may evaluate and generate in fp16 with --dtype fp16).
# - The switch is autocast(rt), entered the same way around every forward (training, evaluation, decoding):
#   GPT.hidden casts its embedding lookups to autocast's dtype, so the residual stream, every matmul, every Triton
#   kernel and every attention call downstream see that one dtype; norms compute in fp32 and return it (CUDA
#   autocast runs rms_norm in fp32 since torch 2.12, CPU autocast does not: doing it ourselves makes both agree).
#   The lm_head matmul writes bf16 logits (FP8 on sm89+ in training); the softcap, losses and log-probs are fp32.
# - fp32 matmuls that remain (fp32 runs, eval of fp32 models) use TF32 tensor cores on GPUs that have them.


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


def pick_device():
    """cuda -> mps -> cpu; FORCE_DEVICE overrides (e.g. FORCE_DEVICE=cpu on a GPU machine)."""
    forced = os.environ.get("FORCE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def native_bf16(device):
    """bf16 in hardware: sm80+ GPUs. (torch.cuda.is_bf16_supported() alone says True on a T4, through emulation.)"""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def pick_dtype(device, requested="auto"):
    """The activation dtype and the reason for it (PRECISION above)."""
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
    device = pick_device()
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype, why = pick_dtype(device, cfg.dtype)
    return Runtime(device, dtype, rank, world_size, select_attention_backend(device, cfg.attn_backend), why)


def sum_over_ranks(t, rt, op=None):
    """t reduced in place over the ranks (a sum, or `op`), where there is more than one; returns t. t must be
    contiguous: gloo reduces the wrong memory for non-contiguous tensors."""
    if rt.world_size > 1:
        assert t.is_contiguous()
        dist.all_reduce(t, **({} if op is None else {"op": op}))
    return t


def autocast(rt):
    """The precision switch (PRECISION above): activations in rt.dtype; parameters and optimizer state stay fp32."""
    if rt.dtype == torch.float32:
        return torch.autocast(rt.device.type, enabled=False)
    return torch.autocast(rt.device.type, dtype=rt.dtype)


def activation_dtype(device):
    """The dtype activations flow in: autocast's where autocast(rt) is on for this device type, else fp32."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


def require_training_dtype(rt, phase):
    if rt.dtype == torch.float16:
        raise ValueError(f"{phase}: fp16 training needs loss scaling, which this stack does not do; use --dtype bf16 "
                         "(sm80+ GPUs) or fp32 (fp16 serves eval, chat and generate)")


# =============================================================================================================
# 3. Kernels. Each op has a PyTorch reference (`*_reference`: the CPU/MPS path and the test oracle), a Triton
# launcher (`*_triton`) and a dispatcher (the plain name) that picks Triton only for CUDA tensors on sm80+ (bf16
# tl.dot). Kernels take operands of one dtype, bf16 or fp32, and accumulate in fp32; fp32 inputs use TF32 tensor
# cores on the GPU. The tests run the launchers on CPU under TRITON_INTERPRET=1, in fp32 and in bf16; the
# interpreter's bf16 tl.dot is wrong (triton#11584), so there (UPCAST, a constexpr: no code on a GPU) dots run on
# operands upcast to fp32. One fixed tile config each; the `block*` keywords exist so tests can force several tiles.



def _use_triton(t):
    return triton is not None and t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 0)


UPCAST = os.environ.get("TRITON_INTERPRET") == "1"  # read where triton reads it: when the kernels are decorated


if triton is not None:

    # C = A @ A^T, or b*A + c*(A @ A^T) with ADD_A, for a batch of matrices. C is symmetric, so only tiles on or
    # below the diagonal are computed, each stored twice (in place and mirrored): about half the FLOPs of a matmul,
    # and an exactly symmetric result. These two products are the bulk of a Polar Express (Muon) iteration.
    @triton.jit
    def _sym_matmul_kernel(a_ptr, c_ptr, M, K, stride_ab, stride_am, stride_ak, stride_cb, stride_cm, stride_cn,
                           b, c, ADD_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                           UPCAST: tl.constexpr):
        batch, pid_m, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        if pid_n > pid_m:  # upper triangle: written as the mirror of tile (pid_n, pid_m)
            return
        a_ptr += batch * stride_ab
        c_ptr += batch * stride_cb
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = pid_n * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
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

    # relu(x @ W_fc^T)^2 with the activation fused into the matmul epilogue (FORWARD), and the backward's
    # dpre = (g @ W_proj) * 2*sqrt(post) (relu(pre) = sqrt(post)). The hidden activation, 4x wider than the residual
    # stream, is written once as `post` and read once in the backward; `pre` never reaches memory.
    @triton.jit
    def _relu2_matmul_kernel(a_ptr, b_ptr, c_ptr, post_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                             stride_cm, stride_cn, FORWARD: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             UPCAST: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
            post = tl.load(post_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            acc = 2.0 * acc * tl.sqrt(post)
        tl.store(c_ptr + offsets, acc.to(c_ptr.dtype.element_ty), mask=mask)

    # Softcapped multi-token cross-entropy: per row the loss and dL/dz in one launch, so the (N, V) softcapped
    # logits and probabilities are never materialised (unfused, each costs extra passes over the largest activation
    # in the model). Sweep 1 over V: online logsumexp; sweep 2 (re-reading z, mostly from L2): the gradient
    #   dz_j = (sum_k w_k * p_j - sum_{k: t_k = j} w_k) * (A/C) * s_j * (1 - s_j),  s = sigmoid((z+B)/C), u = A*s.
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
        run_max = tl.full((), float("-inf"), tl.float32)
        run_sum = tl.full((), 0.0, tl.float32)
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            z = tl.load(z_row + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.where(mask, cap_a * tl.sigmoid((z + cap_b) / cap_c), float("-inf"))
            new_max = tl.maximum(run_max, tl.max(u, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(u - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        tl.store(loss_ptr + row, tl.sum(weights * (lse - u_t), axis=0))
        weight_sum = tl.sum(weights, axis=0)
        dz_row = dz_ptr + row * stride_dz
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            z = tl.load(z_row + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid((z + cap_b) / cap_c)
            p = tl.exp(cap_a * s - lse)
            hits = tl.sum(tl.where((v0 + cols)[:, None] == targets[None, :], weights[None, :], 0.0), axis=1)
            dz = (weight_sum * p - hits) * (cap_a / cap_c) * s * (1.0 - s)
            tl.store(dz_row + v0 + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# --- A @ A^T and b*A + c*A@A^T (Polar Express)


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
    """A @ A.mT for A of shape (..., m, k)."""
    return xxt_triton(A) if _use_triton(A) else xxt_reference(A)


def ba_plus_caa(A, b, c):
    """b*A + c*(A @ A.mT) for symmetric A of shape (..., m, m)."""
    return ba_plus_caa_triton(A, b, c) if _use_triton(A) else ba_plus_caa_reference(A, b, c)


# --- ReLU^2 MLP


def relu2_mlp_reference(x, w_fc, w_proj):
    return torch.relu(x @ w_fc.mT).square() @ w_proj.mT


def _relu2_matmul(a, b, post, blocks):
    """relu(a @ b)^2 if post is None, else (a @ b) * 2*sqrt(post). a (M, K), b (K, N) any strides, of one dtype;
    post contiguous."""
    assert a.dtype == b.dtype and (post is None or post.dtype == a.dtype), (a.dtype, b.dtype, post is None or post.dtype)
    (M, K), N = a.shape, b.shape[1]
    block_m, block_n, block_k = blocks
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
        dx = (dpre @ w_fc).reshape(*grad.shape[:-1], w_fc.shape[1])
        return dx, dpre.mT @ x2, g2.mT @ post, None


def relu2_mlp_triton(x, w_fc, w_proj, *, blocks=(128, 128, 32)):
    return _Relu2MLP.apply(x, w_fc, w_proj, blocks)


def relu2_mlp(x, w_fc, w_proj):
    """relu(x @ w_fc.T)^2 @ w_proj.T; x (..., dim), w_fc (hidden, dim), w_proj (dim, hidden) as in nn.Linear."""
    return relu2_mlp_triton(x, w_fc, w_proj) if _use_triton(x) else relu2_mlp_reference(x, w_fc, w_proj)


# --- Softcapped multi-token cross-entropy


def softcap(logits, cap=SOFTCAP):
    """The logits the model predicts with (fp32): A * sigmoid((z + B) / C)."""
    a, b, c = cap
    return a * torch.sigmoid((logits.float() + b) / c)


def softcap_cross_entropy_reference(logits, targets, weights, cap=SOFTCAP):
    u = softcap(logits, cap)
    picked = u.gather(1, targets.clamp(min=0))
    per_target = (u.logsumexp(1, keepdim=True) - picked) * weights.float()
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
    if _use_triton(logits):
        return softcap_cross_entropy_triton(logits, targets, weights, cap)
    return softcap_cross_entropy_reference(logits, targets, weights, cap)


# --- FP8 lm_head (training only, sm89+): e4m3 inputs, e5m2 output grads, fixed per-tensor scales, each mapping the
# tensor's expected max |value| to the format's max (modded-nanogpt's; its gradient scale, also divided by the
# gradient accumulation, is for a loss summed over tokens: with a mean loss it is also divided by the tokens per step).
# CUDA's _scaled_mm needs every dim a multiple of 16. torch's CPU build runs _scaled_mm too, which the tests use;
# only speed and CUDA's layout rules are GPU-only.
FP8_SCALES = (100 / 448, 1.6 / 448, 0.75 / 448)  # inputs, weights, output gradients


def fp8_supported(device):
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


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
        # _scaled_mm wants a row-major first and a column-major second operand: w8 (out, in) row-major gives w8.mT.
        out = torch._scaled_mm(x8, w8.mT, scale_a=x8.new_tensor(x_scale, dtype=torch.float32),
                               scale_b=x8.new_tensor(w_scale, dtype=torch.float32), out_dtype=x.dtype,
                               use_fast_accum=True)
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x8, w8 = ctx.saved_tensors
        x_scale, w_scale, grad_scale = (x8.new_tensor(s, dtype=torch.float32) for s in ctx.scales)
        g8 = fp8_quantize(grad.reshape(-1, grad.shape[-1]).contiguous(), ctx.scales[2], torch.float8_e5m2)
        grad_x = torch._scaled_mm(g8, w8.mT.contiguous().mT, scale_a=grad_scale, scale_b=w_scale,
                                  out_dtype=grad.dtype)
        grad_w = torch._scaled_mm(g8.mT.contiguous(), x8.mT.contiguous().mT, scale_a=grad_scale, scale_b=x_scale,
                                  out_dtype=torch.float32)
        return grad_x.reshape(*grad.shape[:-1], w8.shape[1]), grad_w, None, None, None


def fp8_linear(x, w, x_scale, w_scale, grad_scale):
    """x @ w.T (w in nn.Linear layout (out, in)) with fp8 matmuls in forward and backward; use where
    fp8_supported(x.device), else a plain matmul."""
    return _FP8Linear.apply(x, w, x_scale, w_scale, grad_scale)


# =============================================================================================================
# 4. Attention over packed documents: the Batch, one entry point, four backends (FA3, FA2, flex_attention, SDPA).
#
# Documents are packed into one (T, H, D) sequence and described by cu_seqlens, int32 (n+1,): document d holds
# tokens cu_seqlens[d]:cu_seqlens[d+1]. Its length is static: unused tail entries repeat T (empty documents), so
# torch.compile sees the same shapes every step. The mask, identical for every backend: query i attends key j iff
#     doc(j) == doc(i)  and  j <= i  and  i - j <= window
# so a query sees itself plus up to `window` earlier tokens of its own document; window None or < 0 means plain
# causal attention within the document. This is FlashAttention's window_size=(window, 0) with causal=True.
# Evaluation can also pack sequences that share a prefix (CORE's choices after one context) as one segment: the prefix
# once, then each sequence's remaining tokens (a branch). Positions continue from the prefix end in every branch, and
#     seg(j) == seg(i)  and  pos(j) <= pos(i)  and  pos(i) - pos(j) <= window  and  branch(j) in {0, branch(i)}
# (branch 0: the prefix), which is each sequence's own causal mask, its prefix computed once (Branches).

ATTENTION_BACKENDS = ("fa3", "fa2", "flex", "sdpa")  # the order "auto" tries them in

_FLASH = {}  # "fa3"/"fa2" -> FA's interface module, or the exception loading it raised (tried once per process)


def _load_fa3():
    """FA3's interface (flash_attn_varlen_func, flash_attn_with_kvcache) from the HF kernels hub (cached in the HF
    cache; offline it fails in seconds)."""
    from kernels import get_kernel
    if torch.cuda.get_device_capability()[0] == 9:
        try:  # faster on Hopper; a personal repo, not a hub-trusted organisation: kernels>=0.14 wants the opt-in
            module = get_kernel("varunneal/flash-attention-3", revision="main", trust_remote_code=True)
            return getattr(module, "flash_attn_interface", module)
        except Exception:
            pass  # the kernels-community build below also covers Hopper
    module = get_kernel("kernels-community/flash-attn3", version=1)
    return getattr(module, "flash_attn_interface", module)


def _load_fa2():
    import flash_attn
    return flash_attn


def _flash_func(name, func="flash_attn_varlen_func"):
    if name not in _FLASH:
        try:
            _FLASH[name] = _load_fa3() if name == "fa3" else _load_fa2()
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
    if name == "fa3" and major not in (8, 9):  # the hub builds cover sm80-sm90
        return f"the hub builds cover sm80-sm90, this GPU is sm{major}{minor}"
    if name == "fa2" and major < 8:
        return f"it needs sm80+, this GPU is sm{major}{minor}"
    if name in ("fa3", "fa2"):
        try:
            _flash_func(name)
        except RuntimeError as e:
            return str(e)
    return None


def select_attention_backend(device, requested="auto"):
    """The backend to train with: `requested`, or for "auto" the first of fa3, fa2, flex (CUDA), sdpa that works
    here. An explicit request that can't run raises RuntimeError saying why."""
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
    """SDPA with a boolean mask. When every query's keys lie within `reach` tokens (the window, or the longest
    document), queries go in blocks that each see only their band of block + reach keys: T*(block+reach) work instead
    of T*T, which is what makes CPU training with short windows affordable."""
    T = q.size(0)
    doc = _document_ids(cu_seqlens, T)
    if block + reach >= T:  # one dense block
        pos = torch.arange(T, device=q.device)
        mask = _mask_mod(doc, window, branches)(None, None, pos[:, None], pos[None, :])
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # (H, T, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1).contiguous()
    n, span = -(-T // block), block + reach
    pad = n * block - T
    # keys get `reach` slots on the left (document -2: matches nothing) and, like the queries, `pad` on the right
    # (document -1): padded queries see themselves, so no row of the mask is empty
    doc_q = F.pad(doc, (0, pad), value=-1)
    doc_k = F.pad(doc, (reach, pad), value=-2)
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


def _flex_attention(q, k, v, cu_seqlens, window, scale, branches=None):
    """Eager form; attention() runs it compiled (eager flex_attention materialises the T x T scores)."""
    T = q.size(0)
    block_mask = create_block_mask(_mask_mod(_document_ids(cu_seqlens, T), window, branches), None, None, T, T,
                                   device=q.device)
    # (1, H, T, D) contiguous: inductor's CPU flex template rejects the transposed view
    q, k, v = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)[0].transpose(0, 1).contiguous()


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_attention)  # once per process; a changing window int becomes dynamic after one recompile


def _flash_attention(fn, q, k, v, cu_seqlens, max_seqlen, window, scale, cu_seqlens_k=None, max_seqlen_k=None):
    """FA's varlen call. With cu_seqlens_k (a branch's keys are its prefix's, then its own) FA aligns the causal
    mask and the window to each sequence's last query and key: query i of m sees keys j <= i + n - m of n, the
    branch mask of this section's top."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"FlashAttention needs bf16 or fp16 inputs, got {q.dtype}")
    cu = cu_seqlens.to(torch.int32).contiguous()
    cu_k = cu if cu_seqlens_k is None else cu_seqlens_k.to(torch.int32).contiguous()
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q=cu, cu_seqlens_k=cu_k,
             max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen if max_seqlen_k is None else max_seqlen_k,
             softmax_scale=scale, causal=True, window_size=(window, 0))
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp


def _flash_branches(fn, q, k, v, branches, window, scale):
    """FA over a batch with branches, in two calls: the branch-0 tokens as plain documents, then every branch's
    queries against its prefix's keys followed by its own (gathered: the prefix's K/V are read once per branch)."""
    b = branches
    out = torch.empty_like(q)
    out[b.trunk] = _flash_attention(fn, q[b.trunk], k[b.trunk], v[b.trunk], b.cu_trunk, b.max_trunk, window, scale)
    if len(b.branch_q):
        out[b.branch_q] = _flash_attention(fn, q[b.branch_q], k[b.branch_kv], v[b.branch_kv], b.cu_q, b.max_q, window,
                                           scale, b.cu_kv, b.max_kv)
    return out


def attention(q, k, v, cu_seqlens, max_seqlen, window, scale, backend, branches=None):
    """Causal sliding-window attention within packed documents (mask defined at the top of this section).
    q, k, v: (T, H, D); cu_seqlens: int32 (n+1,) document starts ending in T, padded by repeating T; max_seqlen: an
    upper bound on a document's length (FA sizes its grid with it); window: earlier tokens a query may also see
    (None or < 0: all of its document); scale: softmax scale; backend: a name from select_attention_backend;
    branches: None, or the Branches of segments that share a prefix (evaluation only).
    Returns (T, H, D), contiguous."""
    if not q.dtype == k.dtype == v.dtype:  # FA refuses mixed dtypes, and flex's backward does: fail alike everywhere
        raise TypeError(f"attention needs q, k, v of one dtype (PRECISION), got {q.dtype}, {k.dtype}, {v.dtype}")
    T = q.size(0)
    window = T if window is None or window < 0 else min(window, T)  # i - j <= T - 1 always holds: plain causal
    if backend in ("fa3", "fa2"):
        if branches is not None:
            return _flash_branches(_flash_func(backend), q, k, v, branches, -1 if window == T else window, scale)
        return _flash_attention(_flash_func(backend), q, k, v, cu_seqlens, max_seqlen,
                                -1 if window == T else window, scale)
    if backend == "flex":
        return _compiled_flex()(q, k, v, cu_seqlens, window, scale, branches)
    if backend == "sdpa":
        # a branch's query sees prefix keys up to `window` positions back, which lie behind the segment's earlier
        # branches in the buffer: up to window + spread tokens back
        reach = min(window + (branches.spread if branches is not None else 0), max(1, max_seqlen) - 1)
        return _sdpa_attention(q, k, v, cu_seqlens, window, scale, reach, branches=branches)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")


def attention_reference(q, k, v, cu_seqlens, window, scale):
    """Ground truth for attention(): a Python loop over documents with an explicit fp32 softmax. Differentiable."""
    bounds = cu_seqlens.tolist()
    outs = []
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
    """Attention for decoding: row b of the batch appends S new tokens at positions lengths[b] .. lengths[b] + S - 1
    of its cache and attends over its cache, with the mask of attention() (key j visible from position i iff
    j <= i and i - j <= window). q, k, v: (B, S, H, D); k_cache, v_cache: (B, capacity, H, D), written in place;
    lengths: int32 (B,) tokens cached before this call; key_span: host ints (lo, hi), lo <= the first key any new
    token may see and hi = max(lengths) + S, so SDPA reads only the window's slice of the cache; or, for one new
    token per row (S = 1), None: each row's window + 1 keys ending at its new token are gathered, or with no window
    the whole cache is read, masked (shapes set by the tensors alone, for a compiled step). FA3/FA2 do all of it in
    flash_attn_with_kvcache; flex has nothing to add for one new token per row, so it decodes with SDPA."""
    window = -1 if window is None or window < 0 else window
    if backend in ("fa3", "fa2"):
        out = _flash_func(backend, "flash_attn_with_kvcache")(
            q.to(k_cache.dtype).contiguous(), k_cache, v_cache, k=k.to(k_cache.dtype).contiguous(),
            v=v.to(k_cache.dtype).contiguous(), cache_seqlens=lengths, softmax_scale=scale, causal=True,
            window_size=(window, 0))
        return (out[0] if isinstance(out, tuple) else out).to(q.dtype)
    B, S = q.shape[:2]
    pos = lengths.long()[:, None] + torch.arange(S, device=q.device)  # (B, S)
    rows = torch.arange(B, device=q.device)[:, None]
    k_cache[rows, pos], v_cache[rows, pos] = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if key_span is None and window >= 0:
        j = pos - torch.arange(window, -1, -1, device=q.device)  # (B, window + 1): the visible positions, or < 0
        keys, values = (c[rows, j.clamp(min=0)].to(q.dtype).transpose(1, 2) for c in (k_cache, v_cache))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=(j >= 0)[:, None, None],
                                           scale=scale)
        return y.transpose(1, 2)
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
    """What GPT.hidden reads: packed documents back to back, none padded (pack() makes it, for training, evaluation
    and the references alike), or, for a KV cache, (B, S) new tokens with no cu_seqlens."""
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
    """Which tokens of a packed batch are branches of a shared prefix (the mask at this section's top), and the
    same split as FA's two varlen calls need it: index tensors into the batch's T tokens."""
    branch: torch.Tensor      # (T,) 0 in a prefix or a plain segment, b >= 1 in its segment's b-th branch
    positions: torch.Tensor   # (T,) the Batch's positions: continuing from the prefix end in every branch
    trunk: torch.Tensor       # tokens of branch 0, in order: every segment's prefix, as plain documents
    cu_trunk: torch.Tensor
    max_trunk: int
    branch_q: torch.Tensor    # tokens of the branches, in order
    cu_q: torch.Tensor
    max_q: int
    branch_kv: torch.Tensor   # per branch, its prefix's tokens then its own: the keys its queries see
    cu_kv: torch.Tensor
    max_kv: int
    spread: int               # most branch tokens of one segment: a key a query sees lies <= window + spread back


def padded_length(n):
    """Static cu_seqlens length: a power of two >= 128, so torch.compile sees few distinct shapes."""
    return max(128, 1 << (n - 1).bit_length())


def to_device(array, dtype, device):
    """A host array as a new tensor on `device`. To a GPU it goes from pinned memory without blocking, so the copy
    overlaps the kernels still queued from the previous step."""
    t = torch.from_numpy(np.array(array, dtype=np.float64 if dtype.is_floating_point else np.int64)).to(dtype)  # a copy
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pack(inputs, segment_starts, document_starts, targets, max_seqlen, device):
    """The Batch of token array `inputs` whose attention segments start at `segment_starts` (sorted, from 0) and whose
    documents start at `document_starts` (where a token has no previous token); positions restart in every segment,
    so the RoPE angles (position x frequency, fp32) are exactly those of the segment alone."""
    T = len(inputs)
    cu = np.full(padded_length(len(segment_starts) + 1), T, dtype=np.int32)
    cu[:len(segment_starts)] = segment_starts
    positions = np.arange(T) - np.asarray(segment_starts)[np.searchsorted(segment_starts, np.arange(T), side="right") - 1]
    prev = np.concatenate([[-1], inputs[:-1]]).astype(np.int64)
    prev[document_starts] = -1
    cu = to_device(cu, torch.int32, device)
    # the segment count varies from batch to batch (128 entries, then 256 where documents are short...): compiled
    # code takes any length, rather than recompiling inside the timed loop the first time a batch needs more
    torch._dynamo.maybe_mark_dynamic(cu, 0)
    return Batch(to_device(inputs, torch.long, device), to_device(prev, torch.long, device),
                 to_device(positions, torch.long, device), to_device(targets, torch.long, device), cu, max_seqlen,
                 np.diff(list(segment_starts) + [T]))


def pack_sequences(sequences, device):
    """Token arrays packed back to back, each its own document (a left-truncated one need not start with BOS), with
    one target each (the next token of the same sequence, -1 at its end); and each one's start offset (n + 1 offsets,
    ending in T)."""
    starts = np.cumsum([0] + [len(t) for t in sequences])
    ids = np.concatenate(sequences).astype(np.int64)
    targets = np.concatenate([ids[1:], [-1]])
    targets[starts[1:] - 1] = -1
    return pack(ids, starts[:-1], starts[:-1], targets[:, None], int(np.diff(starts).max()), device), starts


def shared_prefix_groups(sequences):
    """Consecutive token arrays grouped greedily where one copy of their common prefix saves work: (first, count,
    prefix length) each. Joining a sequence shrinks the group's prefix from P to P' and saves n P' - (n - 1) P
    tokens over forwarding it alone; it joins when that is at least the branch it adds (len - P'), since every
    branch token lengthens the band SDPA reads (a shared <|bos|> alone is not worth it). Every branch keeps >= 1
    token. A group of one is a plain sequence (prefix = all of it)."""
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
    targets: a prefix's last token precedes every branch) and, per sequence, the buffer index of each of its
    positions (its prefix's, then its branch's)."""
    groups = shared_prefix_groups(sequences)
    inputs, prev, positions, branch, where, seg_starts, T = [], [], [], [], [None] * len(sequences), [], 0
    trunk, cu_trunk, branch_q, cu_q, branch_kv, cu_kv = [], [0], [], [0], [], [0]
    for first, n, P in groups:
        seg_starts.append(T)
        head = sequences[first]
        prefix = np.arange(T, T + P)
        inputs.append(head[:P])
        prev.append(np.concatenate([[-1], head[:P - 1]]))
        positions.append(np.arange(P))
        branch.append(np.zeros(P, dtype=np.int64))
        trunk.append(prefix)
        cu_trunk.append(cu_trunk[-1] + P)
        T += P
        for b, i in enumerate(range(first, first + n) if n > 1 else []):
            seq = sequences[i]
            rest = np.arange(T, T + len(seq) - P)
            inputs.append(seq[P:])
            prev.append(seq[P - 1:-1])
            positions.append(np.arange(P, len(seq)))
            branch.append(np.full(len(seq) - P, b + 1, dtype=np.int64))
            where[i] = np.concatenate([prefix, rest])
            branch_q.append(rest)
            cu_q.append(cu_q[-1] + len(rest))
            branch_kv.append(where[i])
            cu_kv.append(cu_kv[-1] + len(seq))
            T += len(rest)
        if n == 1:
            where[first] = prefix
    cu = np.full(padded_length(len(seg_starts) + 1), T, dtype=np.int32)
    cu[:len(seg_starts)] = seg_starts
    flat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    longest = lambda cu: int(np.diff(cu).max()) if len(cu) > 1 else 0
    dev = lambda parts, dtype=torch.long: to_device(flat(parts), dtype, device)
    positions_t, segment_lengths = dev(positions), np.diff(seg_starts + [T])
    branches = Branches(dev(branch), positions_t, dev(trunk), dev([cu_trunk], torch.int32), longest(cu_trunk),
                        dev(branch_q), dev([cu_q], torch.int32), longest(cu_q), dev(branch_kv),
                        dev([cu_kv], torch.int32), longest(cu_kv), int((segment_lengths - np.diff(cu_trunk)).max()))
    batch = Batch(dev(inputs), dev(prev), positions_t, None, to_device(cu, torch.int32, device),
                  int(segment_lengths.max()), segment_lengths, branches)
    return batch, where


def make_batch(buf, bos_id, max_doc_len, n_targets, device):
    """Packed varlen batch from a token window `buf` of T + n_targets tokens. Segments start at every BOS and
    every max_doc_len tokens inside a document, so long documents (books) are trained on whole, in pieces."""
    T = len(buf) - n_targets
    inputs = buf[:T]
    doc_start = np.flatnonzero(inputs == bos_id).tolist()
    starts = []
    for a, b in zip([0] + doc_start, doc_start + [T]):
        starts += range(a, b, max_doc_len)
    # target k (k tokens beyond the next one) is valid while no BOS lies between it and the input: MTP never
    # crosses into the next document (predicting the BOS that ends this one is fine)
    bos_seen = np.cumsum(buf == bos_id)
    targets = np.stack([buf[1 + k:T + 1 + k] for k in range(n_targets)], axis=1).astype(np.int64)
    for k in range(1, n_targets):
        targets[bos_seen[k:T + k] != bos_seen[:T], k] = -1
    return pack(inputs, sorted(set(starts)), doc_start, targets, min(max_doc_len, T), device)


# =============================================================================================================
# 5. Model: modded-nanogpt's architecture, restricted to what a KV cache serves exactly.
# Left out, and why: paired-head attention (two tokens' heads interleaved into one doubled sequence: a per-token
# cache cannot hold it), partial key offset (token t's key takes some dims of token t-1's: a cache would have to keep
# each row's previous unshifted key per layer), XSA / MUDD dense connections / DC attention (large extra machinery for
# small gains at our scales), FP8 MLP (GPU-only and unmeasured here). models/modded-nanogpt has the first two.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a trained model is, stored with its weights (state.json "model") so that a checkpoint loads by itself
    (load_model): the architecture, the vocabulary, and the windows and document length it is evaluated and served
    with (those of its last pretraining stage)."""
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
        """The model a run's Config trains, over a vocabulary of vocab_size."""
        last, served = cfg.stages[-1], {"vocab_size", "short_window", "long_window", "max_doc_len"}
        return cls(vocab_size=vocab_size, short_window=last.short_window, long_window=last.long_window,
                   max_doc_len=last.max_doc_len,
                   **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name not in served})


GATE_DIMS = 12  # the gates (smear, attention, value embedding) read the first 12 dims of their input
LOGITS_CHUNK = 8192  # rows of logits evaluation computes at once: bounded memory at any vocabulary size


def norm(x):
    """RMS norm computed in fp32, returned in x's dtype (PRECISION)."""
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)


def yarn_attn_factor(old_window, new_window):
    """YaRN's growth of the attention scale when the window grows from old_window to new_window."""
    return 0.2 * math.log(new_window / old_window) + 1


class Rotary(nn.Module):
    """Half-truncated RoPE: the first half of each head's dims rotate (periods from 2*pi to 2*pi*1024 tokens), the
    second half carry position-free content. `yarn` stretches the slow frequencies when the window grows, and the
    frequencies live in a buffer so checkpoints (and the KV cache) use exactly the trained ones."""

    def __init__(self, head_dim):
        super().__init__()
        n_rot = head_dim // 4
        freqs = torch.cat([(1 / 1024) ** torch.linspace(0, 1, n_rot), torch.zeros(head_dim // 2 - n_rot)])
        self.register_buffer("freqs", freqs, persistent=True)

    def yarn(self, old_window, new_window, alpha=1.0, beta=32.0):
        """Interpolate frequencies that turn fewer than `beta` times inside the old window (YaRN); returns the factor
        by which the attention scale grows."""
        rotations = old_window * self.freqs / (2 * math.pi)
        ramp = ((rotations - alpha) / (beta - alpha)).clamp(0, 1)
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
        # state that changes during training lives in buffers (saved in checkpoints) mirrored by Python values,
        # so compiled code sees constants instead of reading tensors
        self.register_buffer("attn_scale", torch.tensor(cfg.attn_scale))
        self.register_buffer("tied", torch.tensor(True))
        self.sync_flags()

    def sync_flags(self):
        self.is_tied, self.scale = bool(self.tied), float(self.attn_scale)

    # -- training-time structure changes --
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

    # -- forward --
    def bigram_ids(self, ids, prev_ids):
        """Hash of (previous token, token); a document start (prev_ids < 0) gets the reserved last row."""
        h = ((36313 * ids) ^ (27191 * prev_ids.clamp(min=0))) % (self.bigram_rows - 1)
        return torch.where(prev_ids < 0, self.bigram_rows - 1, h)

    def hidden(self, batch, windows, backend="sdpa", cache=None):
        """Final hidden states (T, dim) of a packed Batch; windows: per layer. With a KVCache instead, the batch's
        inputs, prev_ids and positions are (B, S), new tokens appended to each row's cache. Everything but attention
        is per token, given its previous token: the two paths compute the same thing."""
        ids, prev_ids, positions = batch.inputs, batch.prev_ids, batch.positions
        act = activation_dtype(ids.device)  # every lookup in it: the residual stream then stays in it (PRECISION)
        lookup = lambda index, table: F.embedding(index, table).to(act)
        embed = self.lm_head if self.is_tied else self.embed
        e = lookup(ids, embed)
        # smear: each token takes a gated share of the previous token's embedding (not across documents)
        before = lookup(prev_ids.clamp(min=0), embed)
        before = torch.where((prev_ids >= 0)[..., None], before, torch.zeros_like(before))
        e = e + self.smear_lambda * torch.sigmoid(e[..., :GATE_DIMS] @ self.smear_gate)[..., None] * before
        x = x0 = norm(e)
        bigram = lookup(self.bigram_ids(ids, prev_ids), self.bigram_embed)
        skips, L = [], self.cfg.n_layers
        for i, block in enumerate(self.blocks):
            if i >= L - L // 2 and skips:
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            a, b, c = self.block_lambdas[i]
            x = a * x + b * x0 + c * bigram
            ve = lookup(ids, self.value_embeds[self.value_embed_layers.index(i)]) if i in self.value_embed_layers else None
            attend = (functools.partial(cache.attend, i) if cache is not None else
                      functools.partial(attention, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                                        backend=backend, branches=batch.branches))
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
    """GPT.decode without the cache's host bookkeeping: tensors in, logits out, the cache written in place (what the
    engine compiles)."""
    prev = torch.cat([cache.last_ids[:, None], ids[:, :-1]], dim=1)
    positions = cache.lengths.long()[:, None] + torch.arange(ids.size(1), device=ids.device)
    h = model.hidden(Batch(ids, prev, positions, None, None, None), windows, cache=cache)
    return model.logits(h[:, -1:] if last_only else h)


# =============================================================================================================
# 6. Optimizer: NorMuon (Polar Express) for matrices, Adam for everything else, sharded across ranks

# Polar Express (Amsel et al., arXiv:2505.16932): per iteration, the odd polynomial p(x) = a x + b x^3 + c x^5 applied
# to the singular values. Computed for 5 iterations, safety factor 2e-2, cushion 2 (the set modded-nanogpt uses).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G, steps=5, dtype=None):
    """Approximately orthogonalise G (..., rows, cols), batched over the leading dims: U S V^T -> U V^T, with the
    singular values landing near 1 rather than exactly on it. Runs in `dtype`: default bf16 where the Triton kernels
    run (sm80+), fp32 elsewhere (bf16 matmuls are ~100x slower on a CPU). Returns a tensor of that dtype."""
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
    """NorMuon momentum: linear low->high over the first `warmup` steps, high->low over the last `cooldown` steps."""
    if step < warmup:
        return low + (high - low) * step / warmup
    if step > total_steps - cooldown:
        return high - (high - low) * (step - (total_steps - cooldown)) / cooldown
    return high


def normuon_update(p, g, momentum, second_moment, mu, beta2, lr, wd, eps=1e-10):
    """One NorMuon step on a chunk of matrices (n, rows, cols), all fp32. Updates the two state buffers in place and
    returns the new parameter values. second_moment is (n, rows, 1) if rows >= cols else (n, 1, cols)."""
    momentum.lerp_(g, 1 - mu)  # EMA form: buf = mu buf + (1 - mu) g
    V = polar_express(g.lerp(momentum, mu)).float()  # Nesterov: (1 - mu) g + mu buf
    # NorMuon: divide each row (or column, whichever dim is larger) by its running RMS, then restore the
    # orthogonalised update's Frobenius norm so only the distribution across neurons changes.
    red_dim = -1 if V.size(-2) >= V.size(-1) else -2
    second_moment.lerp_(V.square().mean(dim=red_dim, keepdim=True), 1 - beta2)
    norm = V.norm(dim=(-2, -1), keepdim=True)
    V = V * second_moment.clamp_min(eps).rsqrt()
    V = V * (norm / V.norm(dim=(-2, -1), keepdim=True).clamp_min(eps))
    # Cautious weight decay: only shrink weights the update is already pushing towards zero (same sign: p -= lr V;
    # a zero update pushes nowhere, so a zero gradient leaves the weights alone).
    # Decay lr*wd is linear in lr (decoupled AdamW convention, as nanochat), so wd keeps its meaning whatever the
    # base lr and schedule are; modded-nanogpt's decay is quadratic in the scheduled lr (wd_lin = 0.023*1.2 there).
    mask = (V * p) > 0
    return p - lr * (V + wd * mask * p)


def adam_update(p, g, exp_avg, exp_avg_sq, step, betas, lr, wd, eps=1e-10):
    """One bias-corrected Adam step (torch.optim.Adam's arithmetic) with cautious weight decay, all fp32. Updates the
    moments in place and returns the new parameter values. Decay is lr*wd, linear in lr (see normuon_update)."""
    beta1, beta2 = betas
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # eps is added to the bias-corrected sqrt(v), as torch does (modded adds it before the correction; at 1e-10 moot)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    update = exp_avg / denom * (lr / (1 - beta1 ** step))
    mask = (update * p) > 0
    return p - update - lr * wd * mask * p


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
    """Parameters updated together: their tensors viewed as rows of shape `tail` ((rows, cols) matrices for NorMuon,
    single elements for Adam) and stacked along dim 0. When sharded, the row count is padded with zero rows to a
    multiple of the world size and rank r updates rows [r*chunk, (r+1)*chunk); otherwise every rank updates all."""

    def __init__(self, label, spec, tail, sharded):
        self.label, self.spec, self.tail, self.sharded = label, spec, tuple(tail), sharded
        self.names, self.params = [], []
        self.step = 0  # optimizer steps this group took (bias correction)

    def finalize(self, world, rank):
        self.rows = [p.numel() // math.prod(self.tail) for p in self.params]
        self.offsets = [sum(self.rows[:i]) for i in range(len(self.rows))]
        self.n = sum(self.rows)
        self.shards = world if self.sharded else 1
        self.chunk = -(-self.n // self.shards)
        self.start = rank * self.chunk if self.sharded else 0
        p0 = self.params[0]
        if self.spec.kind == "normuon":
            r, c = self.tail
            self.state_tails = {"momentum": (r, c), "second_moment": (r, 1) if r >= c else (1, c)}
        else:
            self.state_tails = {"exp_avg": (), "exp_avg_sq": ()}
        self.state = {k: torch.zeros(self.chunk, *t, device=p0.device) for k, t in self.state_tails.items()}

    def rows_of(self, tensors, pad_to, start=0, stop=None):
        """Rows [start, stop) of the stacked `tensors` (one per param, or None = zeros), zero-padded to `pad_to` rows,
        as a new contiguous tensor. Only the overlapping parts of each tensor are read."""
        stop = self.n if stop is None else min(stop, self.n)
        ref = self.params[0]
        parts = []
        for t, p, off, rows in zip(tensors, self.params, self.offsets, self.rows):
            a, b = max(start, off), min(stop, off + rows)
            if a < b:
                parts.append(torch.zeros(b - a, *self.tail, dtype=ref.dtype, device=ref.device) if t is None
                             else t.detach().reshape(-1, *self.tail)[a - off:b - off])
        pad = pad_to - sum(x.size(0) for x in parts)
        parts.append(torch.zeros(pad, *self.tail, dtype=parts[0].dtype if parts else ref.dtype, device=ref.device))
        return torch.cat(parts)

    def full_shape(self, p, key):
        """Shape of parameter p's unsharded state `key`: p's leading dims, then the per-row state shape."""
        return p.shape[:p.ndim - len(self.tail)] + self.state_tails[key]


def _launch(collective, *tensors, **kwargs):
    """Start an async collective. gloo silently reduces the wrong memory for non-contiguous tensors: refuse them."""
    assert all(t.is_contiguous() for t in tensors), "collective on a non-contiguous tensor"
    return collective(*tensors, async_op=True, **kwargs)


class NorMuonAdam:
    """NorMuon for matrix parameters, Adam for the rest, ZeRO-style across the ranks of the default process group
    (set up by the caller; without one the world is this process).

    named_params: (name, parameter) pairs. label_of: name -> label (param_label). labels: label -> dict of
    OptimLabel fields.

    Communication: NorMuon matrices are grouped by (label, shape) into banks whose gradients are reduce-scattered so
    each rank orthogonalises whole matrices of its own, then all-gathered. Adam parameters of a label are flattened
    and concatenated: the big ones (numel >= shard_numel) are reduce-scattered and all-gathered the same way (Adam is
    elementwise, so shards need not follow dim 0), the small ones all-reduced and updated on every rank. Every
    reduction is launched before the first update and waited for just before its group's update, and each gather
    right after it, so communication overlaps the optimizer math. Launching the reductions from post-accumulate-grad
    hooks would overlap them with the backward pass too; a possible next step.

    A group whose parameters all have no gradient skips the step (no state change); a missing gradient in a group
    that does step counts as zero. Which gradients exist must be the same on every rank (it is for a fixed model).
    """

    def __init__(self, named_params, label_of, labels, beta2=0.9, eps=1e-10, shard_numel=16384):
        self.labels = {k: OptimLabel(**v) if isinstance(v, dict) else v for k, v in labels.items()}
        self.beta2, self.eps = beta2, eps
        distributed = dist.is_available() and dist.is_initialized()
        self.world, self.rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        groups, self.where = {}, {}
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
                key, tail, sharded = (label, p.dtype, "matrix", *p.shape[-2:]), p.shape[-2:], True
            elif spec.kind == "adam":
                sharded = p.numel() >= shard_numel
                key, tail = (label, p.dtype, "sharded" if sharded else "replicated"), ()
            else:
                raise ValueError(f"label {label!r}: kind must be 'normuon' or 'adam', got {spec.kind!r}")
            group = groups.setdefault(key, _Group(label, spec, tail, sharded and self.world > 1))
            self.where[name] = (group, len(group.params))
            group.names.append(name)
            group.params.append(p)
        self.groups = list(groups.values())
        for group in self.groups:
            group.finalize(self.world, self.rank)

    @torch.no_grad()
    def step(self, lr_factor=1.0, muon_momentum=0.95):
        """Update every parameter from its .grad, averaged over the ranks here. lr_factor multiplies every label's lr
        and muon_momentum is NorMuon's mu (both schedules are the caller's, e.g. muon_momentum() above)."""
        active = [g for g in self.groups if any(p.grad is not None for p in g.params)]
        # 1. Launch every reduction.
        pending = []
        for g in active:
            grads = g.rows_of([p.grad for p in g.params], g.shards * g.chunk)
            if self.world == 1:
                pending.append((grads, None))
            elif g.sharded:
                chunk = grads.new_empty(g.chunk, *g.tail)
                pending.append((chunk, _launch(dist.reduce_scatter_tensor, chunk, grads, op=dist.ReduceOp.AVG)))
            else:
                pending.append((grads, _launch(dist.all_reduce, grads, op=dist.ReduceOp.AVG)))
        # 2. Per group: wait for its gradients, update this rank's rows, launch the gather.
        gathers = []
        for g, (grad, work) in zip(active, pending):
            if work is not None:
                work.wait()
            g.step += 1
            spec, grad = g.spec, grad.float()
            p = g.rows_of(g.params, g.chunk, g.start, g.start + g.chunk).float()
            lr, wd = spec.lr * spec.lr_mul * lr_factor, spec.wd * spec.wd_mul
            if spec.kind == "normuon":
                rows, cols = g.tail
                new = normuon_update(p, grad, g.state["momentum"], g.state["second_moment"], muon_momentum,
                                     self.beta2, lr * max(1.0, rows / cols) ** 0.5, wd, self.eps)
            else:
                new = adam_update(p, grad, g.state["exp_avg"], g.state["exp_avg_sq"], g.step, spec.betas, lr, wd, self.eps)
            new = new.to(g.params[0].dtype)
            if g.sharded:
                full = new.new_empty(g.shards * g.chunk, *g.tail)
                gathers.append((g, full, _launch(dist.all_gather_into_tensor, full, new)))
            else:
                gathers.append((g, new, None))
        # 3. Write the gathered rows back into the parameters.
        for g, full, work in gathers:
            if work is not None:
                work.wait()
            for p, off, rows in zip(g.params, g.offsets, g.rows):
                p.view(-1, *g.tail).copy_(full[off:off + rows])

    def zero_grad(self):
        for g in self.groups:
            for p in g.params:
                p.grad = None

    # -- checkpoints: full (unsharded) state keyed by parameter name, so N ranks can resume on M --
    def _group_state(self, g):
        """{key: state for all g.n rows} on every rank (a collective when sharded)."""
        out = {}
        for key, t in g.state.items():
            if g.sharded:
                full = t.new_empty(g.shards * g.chunk, *t.shape[1:])
                _launch(dist.all_gather_into_tensor, full, t).wait()
                t = full[:g.n]
            out[key] = t
        return out

    def _param_states(self, g):
        """{name: {key: full state shaped for that parameter, "step": int}} for the parameters of group g."""
        full = self._group_state(g)
        return {name: {**{k: t[off:off + rows].reshape(g.full_shape(p, k)) for k, t in full.items()}, "step": g.step}
                for name, p, off, rows in zip(g.names, g.params, g.offsets, g.rows)}

    def _set_param_state(self, name, state):
        g, i = self.where[name]
        for key in g.state:
            want = g.full_shape(g.params[i], key)
            if key not in state or tuple(state[key].shape) != tuple(want):
                got = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(f"optimizer state {name}.{key}: expected shape {tuple(want)}, got {got}")
            # Write the overlap of this parameter's rows with this rank's chunk.
            a, b = max(g.start, g.offsets[i]), min(g.start + g.chunk, g.offsets[i] + g.rows[i])
            if a < b:
                src = state[key].reshape(-1, *g.state_tails[key])[a - g.offsets[i]:b - g.offsets[i]]
                g.state[key][a - g.start:b - g.start].copy_(src)
        g.step = int(state["step"])

    def state_dict(self):
        """{"state": {param name: {state tensors (full, CPU), "step": int}}}: plain tensors and ints, loadable with
        torch.load(weights_only=True). A collective: every rank must call it (each gets the whole dict)."""
        state = {}
        for g in self.groups:
            for name, st in self._param_states(g).items():
                state[name] = {k: v.cpu().clone() if torch.is_tensor(v) else v for k, v in st.items()}
        return {"state": state}

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
        """Give parameter `dst` the optimizer state of `src` (same shape and kind), e.g. an input embedding untied from
        lm_head. dst's whole group takes src's step count. A collective when either is sharded."""
        self._set_param_state(dst, self._param_states(self.where[src][0])[src])


# -- which rule, lr and weight decay each parameter gets --------------------------------------------------------


def param_label(name):
    """Optimizer label of a parameter: selects its update rule, lr and weight decay in LABELS."""
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("blocks."):
        return {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "fc": "mlp_fc", "proj": "mlp_proj"}.get(leaf, "gate")
    return {"lm_head": "lm_head", "embed": "embed", "value_embeds": "value_embed", "bigram_embed": "bigram",
            "smear_gate": "gate"}.get(leaf, "scalar")


def optimizer_labels(cfg):
    """Per-label update rule, lr and weight decay: modded-nanogpt's table. Our weight decay is linear in lr, so its
    values are modded's quadratic ones taken at lr factor 1; mlp_proj gets x4 where modded's (3072, 768) storage gets
    x2 from its shape and x2 more."""
    muon = lambda lr_mul=1.0: dict(kind="normuon", lr=cfg.muon_lr, lr_mul=lr_mul, wd=cfg.muon_wd)
    adam = lambda betas, lr_mul=1.0, wd_mul=0.0: dict(kind="adam", lr=cfg.adam_lr, lr_mul=lr_mul, wd=cfg.adam_wd, wd_mul=wd_mul, betas=betas)
    return {"attn": muon(), "mlp_fc": muon(), "mlp_proj": muon(4.0),
            "lm_head": adam((0.5, 0.95), wd_mul=1.0), "embed": adam((0.5, 0.95), wd_mul=1.0),
            "value_embed": adam((0.75, 0.95), 75, 2.5), "bigram": adam((0.75, 0.95), 75, 2.5),
            "gate": adam((0.9, 0.99)), "scalar": adam((0.9, 0.99), 5)}


def make_optimizer(model, cfg):
    return NorMuonAdam(list(model.named_parameters()), param_label, optimizer_labels(cfg))


# =============================================================================================================
# 7. Data: readers of every format (the writers are data/*.py; formats in data/README.md), the pretraining loader

TOKEN_FILE_MAGIC, TOKEN_FILE_VERSION, HEADER_INTS = 20240520, 1, 256
FORMAT_VERSIONS = {"pretrain": 2, "core": 1, "sft": 1, "chat_eval": 2}  # pretrain 2: shuffled, val_sources
TOKENIZER_VERSION = 2  # 2: its sha256 covers the split pattern and the special tokens too


class DataFormatError(Exception):
    """A prepared file is missing or malformed; the message names the file."""


class Tokenizer:
    """The tokenizer written by data/tokenizer.py: tiktoken ranks in base64 text, JSON metadata, byte counts."""

    def __init__(self, tok_dir):
        import regex
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
        try:
            regex.compile(meta["pattern"])
        except regex.error as e:
            raise DataFormatError(f"{meta_path}: 'pattern' is not a valid regular expression ({e})") from None
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
        self.enc = tiktoken.Encoding("decoderstack", pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens=specials)
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
    """The tokenizer of a prepared data directory."""
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
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n_tokens, width, file_vocab, file_bos = (int(x) for x in header[:6])
    if magic != TOKEN_FILE_MAGIC:
        raise DataFormatError(f"{path}: bad magic {magic} (expected {TOKEN_FILE_MAGIC}): not a DecoderStack token file")
    if version != TOKEN_FILE_VERSION:
        raise DataFormatError(f"{path}: token file version {version}, this reader knows {TOKEN_FILE_VERSION}")
    if (width, file_vocab, file_bos) == (0, 0, 0):  # llm.c's header (modded-nanogpt, the seed): uint16, no vocab
        width = 2
        if vocab_size > 65536:
            raise DataFormatError(f"{path}: an llm.c shard holds uint16 ids, which cannot reach vocab_size {vocab_size}")
    elif width not in (2, 4) or width != (2 if file_vocab <= 65536 else 4):
        raise DataFormatError(f"{path}: {width} bytes per token does not fit vocab_size {file_vocab}")
    elif file_vocab != vocab_size:
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
    """A manifest's tasks as the evaluators read them, each with `fields` ({key: type}) and its examples inside the
    n_examples rows; `extra` fields must be ints or lists of ints. One error naming the manifest, not a KeyError or
    TypeError deep inside an evaluation."""
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


def pretrain_shards(data_dir, tokenizer, split, check_sha256=False):
    """Paths of the `split` ('train' or 'val') pretraining shards, in order, after checking every header (and, with
    check_sha256, every byte against the manifest's sha256: ~2 s a GB here, so `--phases data` does it, training does not)."""
    return pretrain_manifest_shards(data_dir, tokenizer, split, check_sha256)[1]


def pretrain_manifest_shards(data_dir, tokenizer, split, check_sha256=False):
    """(manifest, shard paths of `split`) of a prepared pretrain/ directory, every shard checked (pretrain_shards)."""
    directory = os.path.join(data_dir, "pretrain")
    manifest, where = read_manifest(directory, "pretrain", tokenizer), f"{directory}/manifest.json"
    shards = manifest.get("shards")
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
        if check_sha256 and (digest := sha256_file(path)) != s.get("sha256"):
            raise DataFormatError(f"{path}: sha256 {digest[:12]}... differs from the {str(s.get('sha256'))[:12]}... "
                                  f"in {where} (a damaged or replaced shard)")
    return manifest, [os.path.join(directory, s["file"]) for s in picked]


# -- the pretraining data of --data-dir: ours (pretrain/manifest.json, tokenizer/ beside it), or a folder of llm.c
# shards as modded-nanogpt's FineWeb (fineweb_{train,val}_NNNNNN.bin) and the seed's climbmix_32k_8_170
# (climbmix/{train,val}_NNNNNN.bin, config.json, tokenizer/token_bytes.pt) are published. Their headers record no
# vocab or BOS, so those must come from somewhere explicit, which the log names.

LLMC_SHARD = re.compile(r"(?:^|_)(train|val)_\d+\.bin$")
GPT2_VOCAB, GPT2_EOT = 50257, 50256  # modded-nanogpt's FineWeb shards: GPT-2 ids, <|endoftext|> before each document


@dataclasses.dataclass
class PretrainData:
    train: list               # shard paths, in stream order
    val: list
    vocab_size: int
    bos_id: int               # starts every document
    token_bytes: np.ndarray   # int32 [vocab_size]: UTF-8 bytes of each token (bpb weights); None: unknown, loss only
    val_sources: list         # [(name, n_docs)]: runs of the val stream's documents by source ([]: not recorded)
    origin: str               # where vocab, BOS and token bytes came from (logged)
    tokenizer: object = None  # ours, where the directory has one (CORE and the chat phases need it)
    _val: tuple = dataclasses.field(default=None, repr=False)

    def source_names(self):
        """The val sources by name (a name in several runs of val_sources is one source)."""
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
    """The pretraining data of `data_dir` (see above); vocab_size / bos_id (0 / -1: not given) are --vocab-size /
    --bos-id, which must agree with whatever else the directory says."""
    shards = llmc_shards(data_dir)
    if shards["train"] + shards["val"] and not os.path.isdir(os.path.join(data_dir, "pretrain")):
        return llmc_data(data_dir, shards, vocab_size, bos_id)
    tokenizer = data_tokenizer(data_dir)
    manifest, val = pretrain_manifest_shards(data_dir, tokenizer, "val")
    train = pretrain_shards(data_dir, tokenizer, "train")
    told = {"vocab_size": (vocab_size, tokenizer.vocab_size), "bos_id": (bos_id, tokenizer.bos_id)}
    for name, (given, has) in told.items():
        if given not in (0, -1) and given != has:
            raise DataFormatError(f"{data_dir}/tokenizer: {name} {has}, but --{name.replace('_', '-')} {given}")
    data = PretrainData(train, val, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.token_bytes,
                        val_sources(manifest, f"{data_dir}/pretrain/manifest.json"), f"{data_dir}/tokenizer", tokenizer)
    data.val_stream()  # its documents against val_sources now, not at the first evaluation
    return data


def val_sources(manifest, where):
    runs = manifest.get("val_sources")
    if not (isinstance(runs, list) and all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                           and type(r.get("n_docs")) is int and r["n_docs"] >= 0 for r in runs)):
        raise DataFormatError(f"{where}: 'val_sources' must be a list of {{name, n_docs}} objects")
    return [(r["name"], r["n_docs"]) for r in runs]


def llmc_shards(data_dir):
    """{"train": paths, "val": paths} of the llm.c shards in data_dir or one folder down, in name order."""
    found = {"train": [], "val": []}
    for path in sorted(glob.glob(os.path.join(data_dir, "*.bin")) + glob.glob(os.path.join(data_dir, "*", "*.bin"))):
        if m := LLMC_SHARD.search(os.path.basename(path)):
            found[m.group(1)].append(path)
    return found


def llmc_data(data_dir, found, vocab_size=0, bos_id=-1):
    """The llm.c shards `found` in data_dir (words 3-5 of their headers zero), with vocab and BOS from --vocab-size /
    --bos-id, the folder's config.json or our tokenizer/ (all that are there must agree), token bytes from our
    tokenizer, the seed's tokenizer/token_bytes.pt (loaded weights_only) or, for GPT-2 ids, tiktoken's gpt2 encoding."""
    if not found["train"] or not found["val"]:
        raise DataFormatError(f"{data_dir}: llm.c shards need both *train_NNNNNN.bin and *val_NNNNNN.bin (here or one "
                              f"folder down); found {len(found['train'])} train and {len(found['val'])} val shards")
    told = {}  # name -> [(value, where)]
    for name, value in (("vocab_size", vocab_size), ("bos_id", bos_id)):
        if value not in (0, -1):
            told.setdefault(name, []).append((value, f"--{name.replace('_', '-')}"))
    config_path, tokenizer = os.path.join(data_dir, "config.json"), None
    if os.path.isfile(config_path):
        config = read_json(config_path)
        for name in ("vocab_size", "bos_id"):
            if isinstance(config, dict) and type(config.get(name)) is int:
                told.setdefault(name, []).append((config[name], config_path))
    if os.path.isfile(os.path.join(data_dir, "tokenizer", "tokenizer.json")):
        tokenizer = data_tokenizer(data_dir)
        told.setdefault("vocab_size", []).append((tokenizer.vocab_size, f"{data_dir}/tokenizer"))
        told.setdefault("bos_id", []).append((tokenizer.bos_id, f"{data_dir}/tokenizer"))
    value = {}
    for name in ("vocab_size", "bos_id"):
        if name not in told:
            raise DataFormatError(f"{data_dir}: llm.c shards record no {name}: give --{name.replace('_', '-')}, or put a "
                                  "config.json ({vocab_size, bos_id}) or a tokenizer/ (data/tokenizer.py) beside them")
        if len({v for v, _ in told[name]}) > 1:
            raise DataFormatError(f"{data_dir}: {name} disagrees: " + ", ".join(f"{v} from {w}" for v, w in told[name]))
        value[name] = told[name][0][0]
    V = value["vocab_size"]
    if not 0 <= value["bos_id"] < V:
        raise DataFormatError(f"{data_dir}: bos_id {value['bos_id']} is not below vocab_size {V}")
    for path in found["train"] + found["val"]:
        read_token_file(path, V, check_ids=False)  # headers and sizes now; ids when the loader maps a shard
    token_bytes, bytes_from = llmc_token_bytes(data_dir, V, tokenizer)
    origin = "; ".join(f"{name} {value[name]} from {told[name][0][1]}" for name in value) + f"; token bytes {bytes_from}"
    return PretrainData(found["train"], found["val"], V, value["bos_id"], token_bytes, [], origin, tokenizer)


def llmc_token_bytes(data_dir, vocab_size, tokenizer):
    """(int32 bytes per token or None, where they came from) for a folder of llm.c shards."""
    if tokenizer is not None:
        return tokenizer.token_bytes, f"from {data_dir}/tokenizer"
    path = os.path.join(data_dir, "tokenizer", "token_bytes.pt")
    if os.path.isfile(path):
        try:  # weights_only: a tensor, never code
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataFormatError(f"{path}: not a plain tensor file ({type(e).__name__}: {str(e)[:200]})") from None
        if not (isinstance(t, torch.Tensor) and t.shape == (vocab_size,) and not t.is_floating_point() and (t >= 0).all()):
            raise DataFormatError(f"{path}: expected a [{vocab_size}] tensor of byte counts")
        return t.numpy().astype(np.int32), f"from {path}"
    if vocab_size == GPT2_VOCAB:
        try:  # tiktoken's gpt2 ranks: in its cache, or downloaded
            import tiktoken
            enc = tiktoken.get_encoding("gpt2")
            counts = np.array([len(enc.decode_single_token_bytes(i)) for i in range(GPT2_EOT)] + [0], dtype=np.int32)
            return counts, "from tiktoken's gpt2 encoding"
        except Exception as e:
            return None, f"unknown (tiktoken's gpt2 encoding is neither cached nor downloadable: {type(e).__name__}): val loss only, no bpb"
    return None, "unknown (no tokenizer/ and no tokenizer/token_bytes.pt): val loss only, no bpb"


@dataclasses.dataclass
class CoreData:
    tasks: list          # manifest task dicts: label, task_type, num_fewshot, random_baseline, first_example, n_examples
    tokens: np.ndarray     # token segments back to back
    sequences: np.ndarray  # [n_seq, 6] offset_a, len_a, offset_b, len_b, cont_start, cont_end: sequence = a ++ b
    examples: np.ndarray   # [n_ex, 4] task, gold, first sequence, number of sequences
    max_len: int

    def sequence(self, i):
        """(tokens, cont_start, cont_end) of sequence i."""
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
    """A contiguous token stream over the shards, wrapping around at the end. Each step takes world_size * T
    tokens; rank r reads its own slice. The position (shard, offset, epoch) is saved in checkpoints. `ids`: what
    says the vocab_size and bos_id (the PretrainData, or a Tokenizer)."""

    def __init__(self, paths, ids, rank, world_size, state=None):
        self.paths, self.ids, self.vocab, self.bos = paths, ids, ids.vocab_size, ids.bos_id
        self.rank, self.world_size = rank, world_size
        self.state = dict(state or {"shard": 0, "offset": 0, "epoch": 0})
        self._cache, self._prefetch = {}, None

    def fork(self):
        """A loader that reads the same upcoming batches, leaving this one where it is."""
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

    def _take(self, shard, offset, n):
        """n tokens from (shard, offset) onwards, crossing shard ends."""
        parts = []
        while n > 0:
            tokens = self._tokens(shard)
            if offset >= len(tokens):
                shard, offset = (shard + 1) % len(self.paths), offset - len(tokens)
                continue
            part = np.asarray(tokens[offset:offset + n])
            parts.append(part)
            n -= len(part)
            shard, offset = (shard + 1) % len(self.paths), 0
        return np.concatenate(parts)

    def next_batch(self, T, max_doc_len, n_targets, device):
        s = self.state
        buf = self._take(s["shard"], s["offset"] + self.rank * T, T + n_targets)
        offset = s["offset"] + self.world_size * T
        while offset >= len(self._tokens(s["shard"])):
            offset -= len(self._tokens(s["shard"]))
            s["shard"] = (s["shard"] + 1) % len(self.paths)
            s["epoch"] += s["shard"] == 0
        s["offset"] = offset
        return make_batch(buf, self.bos, max_doc_len, n_targets, device)

# =============================================================================================================
# 8. Pretraining: the schedule, the loss, bits per byte, FLOPs (the loop is phase_pt)


@dataclasses.dataclass
class StepPlan:
    stage: int
    batch_tokens: int
    max_doc_len: int
    short_window: int
    long_window: int
    lr_factor: float
    mtp_weights: list


def scaled_stages(cfg):
    """The stages, with step counts rescaled so that they add up to --train-tokens when it is set."""
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
    accum = batch_tokens // (world_size * T)
    if accum * world_size * T != batch_tokens:
        raise ValueError(f"{what}: batch of {batch_tokens} tokens is not a multiple of world size {world_size} x {T} tokens")
    return T, accum


def pretrain_steps(cfg, stages, world_size, start=0):
    """The schedule from step `start` on, one (step, plan, tokens per forward, forwards, grow, untie) per step. What
    changes in the model before the step: grow = (old, new) long window or None; untie: the step embed and lm_head
    part. The training loop and the compile warm-up both walk it."""
    total = total_steps(stages)
    untie_step = round(cfg.untie_frac * total)
    for step in range(start, total):
        p = plan_step(cfg, stages, step)
        before = plan_step(cfg, stages, step - 1) if step > 0 else p
        grow = (before.long_window, p.long_window) if p.long_window != before.long_window else None
        yield (step, p, *micro_batch(p.batch_tokens, cfg.micro_batch_tokens, world_size, f"stage {p.stage}"), grow,
               step == untie_step)


def warm_up_compiled(loss_fn, model, cfg, rt, stages, loader, start):
    """Build every graph the compiled loss will need over the steps from `start` on before the timed loop, as
    modded-nanogpt warms up: one forward and backward per distinct set of what the graphs specialise on (tokens per
    forward, MTP horizons, document length bound, windows, attention scale, tied or not, accumulation), in schedule
    order (torch's automatic dynamic shapes then make the same choices as the run), with the model's attention scale
    and tying set as they will be at that step. It reads the upcoming batches without moving the loader; no
    optimizer step, so weights and optimizer state are untouched. Returns (seconds, graphs compiled)."""
    from torch._dynamo.utils import counters
    scale, tied = model.attn_scale.clone(), model.is_tied
    variants = {}
    for step, p, T, accum, grow, untie in pretrain_steps(cfg, stages, rt.world_size, start):
        if grow:
            scale.mul_(yarn_attn_factor(*grow))  # as grow_window does, in fp32: the same float the run will have
        tied = tied and not untie
        windows = model.windows(p.short_window, p.long_window)
        key = (T, len(p.mtp_weights), p.max_doc_len, tuple(windows), float(scale), tied, accum)
        variants.setdefault(key, (p, T, accum, windows))
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 2 * len(variants) + 8))
    peek = loader.fork()
    graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
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
    """Mean over tokens of the MTP-weighted softcapped cross entropy; mtp_weights is a (K,) tensor (a tensor, not
    floats, so compiled code is not specialised to each step's values); grad_scale is 1 / gradient accumulation;
    fp8: the lm_head matmuls in FP8 where the GPU has them."""
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
    """The rows an evaluation scores; row r predicts targets r*T+1 .. r*T+T of the val stream. All of them: every
    target once; first=N: those of the first N targets (modded-nanogpt's rule, for its numbers); subset=N: N targets'
    worth spread evenly over the stream, so that every source is drawn from (evaluation during training)."""
    n_rows = -(-n_targets // T)
    if first:
        return np.arange(min(n_rows, -(-first // T)))
    if subset and subset < n_targets:
        return np.unique(np.linspace(0, n_rows - 1, max(1, subset // T)).round().astype(np.int64))
    return np.arange(n_rows)


@torch.no_grad()
def evaluate_bpb(model, data, rt, windows, max_doc_len, T, subset=0, first=0):
    """Next-token loss on the val stream of `data` (a PretrainData) in rows of T tokens (val_rows: every target once by
    default). Counted targets: those with > 0 bytes (special tokens count in neither sum, so bpb compares across
    tokenizers), or every target where token bytes are unknown (modded-nanogpt's val loss). A dict: bpb (None
    without token bytes), loss (nats per counted target), targets (how many), of (the stream's targets), by_source
    ({name: bpb}, from the documents' sources), what (for the log)."""
    tokens, source = data.val_stream()
    n = len(tokens) - 1
    rows = val_rows(n, T, subset, first)
    weights = None if data.token_bytes is None else torch.from_numpy(data.token_bytes).to(rt.device)
    names = data.source_names()
    n_sources = max(1, len(names))
    sums = torch.zeros(n_sources, 3, device=rt.device, dtype=torch.float64)  # nats, bytes, counted targets
    for r in rows[rt.rank::rt.world_size]:
        start = int(r) * T
        real = min(T, n - start, first - start if first else T)  # targets of this row inside what is scored
        buf = np.asarray(tokens[start:start + T + 1])
        buf = np.concatenate([buf, np.full(T + 1 - len(buf), data.bos_id, buf.dtype)])  # the last row, padded
        b = make_batch(buf, data.bos_id, max_doc_len, 1, rt.device)
        src = np.zeros(T, np.int64)
        src[:real] = source[start + 1:start + 1 + real]
        src = to_device(src, torch.long, rt.device)
        counted = torch.arange(T, device=rt.device) < real
        with autocast(rt):
            h = model.hidden(b, windows, rt.backend)
        for rows_ in torch.split(torch.arange(T, device=rt.device), LOGITS_CHUNK):
            target = b.targets[rows_, 0]
            loss = F.cross_entropy(model.logits(h[rows_]).float(), target, reduction="none")
            nbytes = weights[target] * counted[rows_] if weights is not None else torch.zeros_like(loss)
            keep = counted[rows_] & (nbytes > 0) if weights is not None else counted[rows_]
            sums.index_add_(0, src[rows_], torch.stack([loss * keep, nbytes, keep]).T.double())
    sums = sum_over_ranks(sums, rt).cpu()
    nats, nbytes, count = sums.sum(0).tolist()
    per_nat = 1 / math.log(2)
    out = {"bpb": nats * per_nat / nbytes if weights is not None else None, "loss": nats / count, "targets": int(count),
           "of": n, "by_source": {name: float(sums[i, 0] * per_nat / sums[i, 1]) for i, name in enumerate(names)
                                  if weights is not None and sums[i, 1] > 0}}
    scored = int(np.minimum(T, n - rows * T).sum())  # the padding of a last row is not scored
    out["what"] = ("every val token" if scored == n and not first else f"the first {first:,} val tokens" if first else
                   f"subset: {scored:,} of {n:,} targets, spread over the stream")
    return out


def attention_pairs(segment_lengths, window):
    """(query, key) pairs one attention layer scores over segments of these lengths: a query sees itself and up to
    `window` earlier tokens of its segment (None or < 0: all of them). Inside a long segment that is window + 1 keys
    a query, not half of it."""
    L = np.asarray(segment_lengths, dtype=np.int64)
    w = L.max(initial=0) if window is None or window < 0 else window + 1  # keys of a query deep in a segment
    first = np.minimum(L, w)  # the first w queries see 1, 2, ..., w keys; the rest w each
    return int((first * (first + 1) // 2 + (L - first) * w).sum())


def training_flops(model, windows, segment_lengths):
    """FLOPs of one forward + backward over a micro-batch of these segments: 6 per token per matmul weight (embedding
    lookups excluded), plus 12 per head dim per (query, key) pair (QK^T and PV, 2 FLOPs a multiply-add, x3 with the
    backward)."""
    cfg = model.cfg
    matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2 and "gate" not in n)
    matmul += model.vocab_size * cfg.model_dim
    pairs = sum(attention_pairs(segment_lengths, w) for w in windows)
    return 6 * matmul * int(np.sum(segment_lengths)) + 12 * cfg.n_heads * cfg.head_dim * pairs


# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' datasheets; the first name that occurs in
# torch.cuda.get_device_name() wins, so the specific names come first ("GH200" holds "H200", "A100" holds "A10").
# MFU is reported for bf16 runs only (fp32 runs would need the TF32/fp32 peak; pre-Ampere GPUs train in fp32).
PEAK_BF16_FLOPS = (("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12),
                   ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))


def peak_flops(device, dtype=torch.bfloat16):
    """This GPU's dense bf16 peak, or None where it is unknown (CPUs, GPUs not in the table, fp32 runs)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


def peak_memory_gib(device):
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# =============================================================================================================
# 9. Evaluation: the packed forwards every evaluation shares, then CORE (DCLM's 22 tasks, as nanochat scores them)
#
# nanochat forwards each example alone, its options padded into a (n_options, L) batch, with logits at every
# position. Here sequences of many examples (and tasks) go back to back into one varlen batch, no token padding; the
# choices of an example share their context, forwarded once (pack_branches), and only continuation rows get logits;
# the decisions are nanochat's. evaluate_example_alone is the one-sequence-per-forward reference the tests compare with.


@torch.no_grad()
def packed_hidden(model, sequences, rt, windows):
    """One forward of `sequences` as pack_sequences: final hidden states (T, dim), tokens (T,), start offsets."""
    batch, starts = pack_sequences(sequences, rt.device)
    with autocast(rt):
        h = model.hidden(batch, windows, rt.backend)
    return h, batch.inputs, starts


def examples_of_rank(tasks, n_examples, max_per_task, rt):
    """Which examples are evaluated (bool per example: the first max_per_task of each task, all when <= 0) and the
    ones this rank takes: r, r + world_size, ... of each task."""
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
    """Sum the ranks' float `correct` (1 right, 0 wrong or not mine) and score each task: dict(results={name:
    accuracy}, centered={name: (accuracy - baseline) / (1 - baseline)}, mean=mean centered, correct=int8 per example:
    1 right, 0 wrong, -1 not evaluated)."""
    correct = sum_over_ranks(correct.to(rt.device), rt)  # NCCL reduces device tensors only
    correct = np.where(evaluated, correct.cpu().numpy(), -1).astype(np.int8)
    results, centered = {}, {}
    for t in tasks:
        rows = correct[t["first_example"]:t["first_example"] + t["n_examples"]]
        results[t[name_key]] = float((rows == 1).sum() / max(1, (rows >= 0).sum()))
        b = t["random_baseline"]
        centered[t[name_key]] = (results[t[name_key]] - b) / (1 - b)
    return dict(results=results, centered=centered, mean=sum(centered.values()) / len(centered), correct=correct)


def task_table(out, tasks, name_key, total):
    """Per-task examples evaluated, accuracy and centered accuracy (stand-in data marked), then the `total` line
    ("CORE", "ChatCORE": out[total.lower()])."""
    width = max(len(total), *(len(t[name_key]) for t in tasks)) + 2
    lines = [f"{'task':<{width}} {'examples':>8} {'accuracy':>8} {'centered':>8}"]
    for t in tasks:
        n, name = int((out["correct"][t["first_example"]:t["first_example"] + t["n_examples"]] >= 0).sum()), t[name_key]
        note = "  (stand-in)" if t.get("stand_in") else ""
        lines.append(f"{name:<{width}} {n:>8} {out['results'][name]:>8.4f} {out['centered'][name]:>8.4f}{note}")
    lines.append(f"{total:<{width}} {'':>8} {'':>8} {out[total.lower()]:>8.4f}")
    return "\n".join(lines)


def core_decision(task_type, gold, mean_losses, all_right):
    """nanochat's rule. multiple_choice / schema: the option with the lowest mean continuation loss is the answer.
    language_modeling (one sequence): correct iff every greedy prediction over the continuation is right."""
    if task_type == "language_modeling":
        return all_right[0]
    # The mean over an empty continuation (piqa has some) is NaN. min() replaces its running value only by a smaller
    # one, so a NaN option wins exactly when it comes first (then index() finds that very object) and never otherwise
    return mean_losses.index(min(mean_losses)) == gold


def _span_scores(losses, right, spans):
    """Per sequence (mean loss, all predictions right) from flat fp32 losses / bools laid out span after span."""
    scores, k = [], 0
    for n in spans:
        # .mean() of an empty slice is NaN, as in nanochat (see core_decision)
        scores.append((losses[k:k + n].mean().item(), bool(right[k:k + n].all())))
        k += n
    return scores


@torch.no_grad()
def core_scores_packed(model, seqs, rt, windows):
    """(mean continuation loss, continuation all argmax-right) of each (tokens, cont_start, cont_end) in `seqs`, from
    one forward of them packed with their shared prefixes once (pack_branches: an example's choices share its
    context). Only the rows that predict a continuation token get logits."""
    batch, where = pack_branches([t for t, _, _ in seqs], rt.device)
    with autocast(rt):
        h = model.hidden(batch, windows, rt.backend)
    rows = np.concatenate([w[s - 1:e - 1] for w, (_, s, e) in zip(where, seqs)]).astype(np.int64)
    rows_t = torch.from_numpy(rows).to(rt.device)
    targets = to_device(np.concatenate([t[s:e] for t, s, e in seqs]), torch.long, rt.device)
    losses, right = [], []
    for chunk in torch.split(torch.arange(len(rows), device=rt.device), LOGITS_CHUNK):
        logits = model.logits(h[rows_t[chunk]])
        losses.append(F.cross_entropy(logits, targets[chunk], reduction="none"))
        right.append(logits.argmax(-1) == targets[chunk])
    return _span_scores(torch.cat(losses).cpu(), torch.cat(right).cpu(), [e - s for _, s, e in seqs])


@torch.no_grad()
def evaluate_core(model, core, rt, windows, max_per_task=-1, batch_tokens=32768):
    """CORE of `model` on CoreData `core`: the first max_per_task examples of each task (<= 0: all, as in nanochat;
    the file's examples are pre-shuffled), rank r taking examples r, r + world_size, ... of each task. Sequences are
    packed into forwards of up to batch_tokens tokens (a longer one goes alone). Returns dict(results={label:
    accuracy}, centered={label: (accuracy - baseline) / (1 - baseline)}, core=mean centered, correct=int8 per row of
    core.examples: 1 right, 0 wrong, -1 not evaluated)."""
    evaluated, mine = examples_of_rank(core.tasks, len(core.examples), max_per_task, rt)
    correct = torch.zeros(len(core.examples), dtype=torch.float32)
    scores = {}  # example -> scores of its sequences so far (an example may straddle two forwards)

    def sequences():  # ((example, its sequence count), sequence, tokens it adds to a forward: its prefix is shared)
        for e in mine:
            first, n = int(core.examples[e, 2]), int(core.examples[e, 3])
            seqs = [core.sequence(s) for s in range(first, first + n)]
            for head, count, P in shared_prefix_groups([t for t, _, _ in seqs]):
                for j in range(head, head + count):
                    yield (e, n), seqs[j], len(seqs[j][0]) - (P if j > head else 0)

    for batch in token_batches(sequences(), lambda item: item[2], batch_tokens):
        scored = core_scores_packed(model, [seq for _, seq, _ in batch], rt, windows)
        for (e, n_seqs), score in zip([key for key, _, _ in batch], scored):
            scores.setdefault(e, []).append(score)
            if len(scores[e]) == n_seqs:
                task, gold = (int(x) for x in core.examples[e, :2])
                losses, right = zip(*scores.pop(e))
                correct[e] = float(core_decision(core.tasks[task]["task_type"], gold, list(losses), right))
    out = task_scores(core.tasks, "label", correct, evaluated, rt)
    return dict(out, core=out.pop("mean"))


@torch.no_grad()
def evaluate_example_alone(model, core, example_index, rt, windows):
    """The reference path: each sequence of example `example_index` forwarded alone (one document, full logits,
    then the continuation sliced out, as nanochat does); returns whether the model gets it right."""
    task, gold, first, n_seqs = (int(x) for x in core.examples[example_index])
    scores = []
    for s in range(first, first + n_seqs):
        tokens, start, end = core.sequence(s)
        batch, _ = pack_sequences([tokens], rt.device)
        ids = batch.inputs
        with autocast(rt):
            h = model.hidden(batch, windows, rt.backend)
        logits = model.logits(h)
        losses = F.cross_entropy(logits[:-1], ids[1:], reduction="none")  # row i predicts token i + 1
        right = logits[:-1].argmax(-1) == ids[1:]
        scores += _span_scores(losses[start - 1:end - 1].cpu(), right[start - 1:end - 1].cpu(), [end - start])
    losses, right = zip(*scores)
    return core_decision(core.tasks[task]["task_type"], gold, list(losses), right)


# =============================================================================================================
# 10. Inference: a KV cache that reproduces the training forward, sampling, the calculator tool, the engine


class KVCache:
    """Keys and values of every layer for B rows: a (B, capacity, H, D) tensor per layer (FA's layout; one tensor
    each, since a compiled step writing into a slice of one big tensor would copy all of it), plus what a new token
    needs besides attention: its row's length (its RoPE position) and its row's last token (for smear and the bigram
    hash). static=True: a one-token step reads each row's window + 1 keys, gathered (or the whole cache, masked), so
    no host int sets its shapes and one compiled graph serves every step (the engine's compiled decode); otherwise
    reads are sliced to the rows' visible span."""

    def __init__(self, model, batch, capacity, device, dtype, backend="sdpa", static=False):
        cfg = model.cfg
        shape = (batch, capacity, cfg.n_heads, cfg.head_dim)
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)] for _ in "kv")
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.host_lengths = [0] * batch  # the same on the host: slicing the cache needs no device sync
        self.last_ids = torch.full((batch,), -1, dtype=torch.long, device=device)  # -1: nothing yet (document start)
        self.backend, self.capacity, self.static = backend, capacity, static

    def reserve(self, n_tokens):
        """Before a forward that appends n_tokens per row (host ints only: nothing here enters a compiled step)."""
        if max(self.host_lengths) + n_tokens > self.capacity:
            raise ValueError(f"KV cache full: {max(self.host_lengths)} + {n_tokens} tokens > capacity {self.capacity}")

    def attend(self, layer, q, k, v, window, scale):
        """The attend() of Block.forward: write this layer's new keys/values, attend over the visible cache."""
        S = q.size(1)
        if self.static and S == 1:  # shapes that depend on no host int: a compiled step serves every call
            span = None
        else:
            lo = 0 if window is None or window < 0 else max(0, min(self.host_lengths) - window)
            span = (lo, max(self.host_lengths) + S)
        return cached_attention(q, k, v, self.k[layer], self.v[layer], self.lengths, span, window, scale, self.backend)

    def advance(self, ids):
        """After a forward of ids (B, S): every row is S tokens longer."""
        self.lengths += ids.size(1)
        self.host_lengths = [n + ids.size(1) for n in self.host_lengths]
        self.last_ids = ids[:, -1].contiguous().clone()  # contiguous: a compiled step guards on strides

    def grow(self, n):
        """n more rows, empty (a continuous batch adding rows for waiting streams)."""
        self.k, self.v = ([torch.cat([c, c.new_zeros((n, *c.shape[1:]))]) for c in cache] for cache in (self.k, self.v))
        self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(n)])
        self.last_ids = torch.cat([self.last_ids, self.last_ids.new_full((n,), -1)])
        self.host_lengths += [0] * n

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


def sample_next(logits, generator, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """(B,) next tokens from logits (B, V): argmax at temperature 0, else a draw after the filters: top-k keeps the k
    largest, min-p drops tokens below min_p x the top probability, top-p keeps the smallest set reaching top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float()
    logits, index = (logits - logits.amax(-1, keepdim=True)) / temperature, None  # a tiny temperature: no inf - inf
    if 0 < top_k < logits.size(-1):  # draw among the k only: a draw over the whole vocabulary costs ~ms per row
        logits, index = logits.topk(top_k)
    probs = logits.softmax(-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens: the first token is always kept
        dropped = (before >= top_p * sorted_p.sum(-1, keepdim=True)) & (before > 0)  # a tiny top_p keeps the first
        probs = probs.scatter(-1, order, sorted_p.masked_fill(dropped, 0))
    draw = torch.multinomial(probs, 1, generator=generator)  # multinomial renormalises
    return (draw if index is None else index.gather(-1, draw)).squeeze(-1)


# -- the calculator tool the chat model calls between <|python_start|> and <|python_end|> --
# The expression is parsed, never executed: calculate() walks the syntax tree and computes only whitelisted nodes.
# Every computation is bounded, so no timer is needed: the input is at most CALC_MAX_CHARS characters and at most
# CALC_MAX_NODES tree nodes (so at most ~50 operations, and recursion depth of calc_value <= CALC_MAX_NODES); every
# value, constants included, is checked to be within CALC_MAX_MAGNITUDE, so each operation works on <= 50-bit numbers,
# except that a power may first produce up to (1e15)**64 (~3,200 bits, microseconds) before its check; strings exist
# only as literals of the input (no operator accepts one), so str.count scans at most CALC_MAX_CHARS characters.

CALC_MAX_CHARS = 200  # GSM8K's calls are a few dozen characters
CALC_MAX_NODES = 100  # ~30 operations: the longest GSM8K sums fit, and each node costs microseconds
CALC_MAX_EXPONENT = 64
CALC_MAX_MAGNITUDE = 10**15  # below 2**53, so integral floats are still exact integers
CALC_DECIMALS = 6
CALC_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
DIGIT_GROUP_COMMA = re.compile(r"(?<=\d),(?=\d{3})")  # "1,200*3": GSM8K writes thousands separators
STRING_LITERAL = re.compile(r"""('[^'\\]*(?:\\.[^'\\]*)*'|"[^"\\]*(?:\\.[^"\\]*)*")""")  # kept as written


def calc_is_count(node):
    """Is this Call exactly '<str literal>.count(<str literal>)'?"""
    func, args = node.func, node.args
    return (type(func) is ast.Attribute and func.attr == "count"
            and type(func.value) is ast.Constant and type(func.value.value) is str
            and len(args) == 1 and not node.keywords and type(args[0]) is ast.Constant and type(args[0].value) is str)


def calc_value(node):
    """The int or float a whitelisted node computes to; any other node, or a value out of bounds, raises ValueError."""
    kind = type(node)
    if kind is ast.Constant and type(node.value) in (int, float):  # type(), not isinstance: bools are ints
        value = node.value
    elif kind is ast.UnaryOp and type(node.op) in (ast.UAdd, ast.USub):
        value = calc_value(node.operand)
        value = -value if type(node.op) is ast.USub else value
    elif kind is ast.BinOp and type(node.op) in CALC_BINOPS:
        left, right = calc_value(node.left), calc_value(node.right)
        if type(node.op) is ast.Pow and abs(right) > CALC_MAX_EXPONENT:
            raise ValueError("exponent too large")
        value = CALC_BINOPS[type(node.op)](left, right)
    elif kind is ast.Call and calc_is_count(node):
        value = node.func.value.value.count(node.args[0].value)
    else:
        raise ValueError(f"{kind.__name__} is not allowed")
    # A negative base to a fractional power is complex; nan fails the comparison; 1e400 parses as inf.
    if type(value) not in (int, float) or not abs(value) <= CALC_MAX_MAGNITUDE:
        raise ValueError("result out of bounds")
    return value


def calc_format(value):
    """GSM8K's notation, which the SFT data teaches: 0.2*50 -> '10', 12/60 -> '0.2', 2/3 -> '0.666667'.
    (nanochat's use_calculator returns str() of the raw value: '10.0', '0.30000000000000004'.)"""
    if type(value) is int:
        return str(value)
    text = f"{value:.{CALC_DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def calculate(expr):
    """The tool's output for the text between <|python_start|> and <|python_end|>: arithmetic (+ - * / // % **, unary
    +-) on int/float literals, or "'word'.count('r')"; None when the expression is not allowed or fails."""
    if len(expr) > CALC_MAX_CHARS:  # before any other work: a 10 MB "expression" costs nothing
        return None
    parts = STRING_LITERAL.split(expr)  # literals at the odd indices: "'1,234'.count(',')" keeps its commas
    expr = "".join(part if i % 2 else DIGIT_GROUP_COMMA.sub("", part) for i, part in enumerate(parts)).strip()
    try:
        with warnings.catch_warnings():  # e.g. an invalid escape in a string literal warns; it is still just a literal
            warnings.simplefilter("ignore")
            tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes (Python < 3.12)
        return None
    if sum(1 for _ in ast.walk(tree)) > CALC_MAX_NODES:  # ast.walk iterates, so a deep tree cannot overflow it
        return None
    try:
        return calc_format(calc_value(tree.body))
    except (ValueError, ArithmeticError):  # ArithmeticError: division by zero, float overflow in **
        return None


@dataclasses.dataclass
class Sample:
    tokens: list   # generated tokens, forced tool output included; the stop token too when one was reached
    mask: list     # 1 where the model sampled the token, 0 where the calculator's output was forced
    stopped: bool  # ended on <|assistant_end|> or <|bos|> (else it ran into max_new_tokens, or was cancelled)


@dataclasses.dataclass(eq=False)  # compared by identity: the rows of one Sampling draw together
class Sampling:
    """How a group of samples draws: sample_next's filters and one generator. A group's rows draw in one call over
    their own logits, so its tokens never depend on other groups' rows (a server request's on other requests)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    generator: torch.Generator = None


@dataclasses.dataclass(eq=False)
class Stream:
    """One sample on its way: its prompt (one list object for all samples of a prompt: they share its prefill), its
    Sampling, its budget and callbacks, and what it has produced. Any thread may set `cancelled`: the batch frees
    its row at its next step."""
    prompt: list
    sampling: Sampling
    max_new_tokens: int
    on_token: object = None  # on_token(token), in the batch's thread, as each token comes
    on_done: object = None   # on_done(), once, when it has stopped, run out of tokens or been cancelled
    sample: Sample = dataclasses.field(default_factory=lambda: Sample([], [], False))
    forced: list = dataclasses.field(default_factory=list)  # calculator output still to feed
    call: list = None        # tokens of an open calculator call
    cancelled: bool = False


CAPACITY_STEP = 256  # a compiled engine's cache capacities are multiples of this (CUDA graphs record each shape)


class Engine:
    """Generation with a KV cache and the calculator tool: a sample stops at <|assistant_end|> or <|bos|> (or after
    max_new_tokens); after <|python_start|> expr <|python_end|> its next tokens are forced: <|output_start|>
    calculate(expr) <|output_end|> (nothing when the expression is refused). Samples decode continuously batched
    (DecodeBatch). compile=True runs the step through torch.compile (CUDA graphs on a GPU): the same tokens, less
    overhead."""

    def __init__(self, model, tokenizer, windows, rt, compile=False):
        self.model, self.tokenizer, self.windows, self.rt = model, tokenizer, windows, rt
        special = tokenizer.special
        self.stops = {special("<|assistant_end|>"), tokenizer.bos_id}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.step = None  # decode_logits, eager
        if compile:  # shapes static within a call; a second batch size or capacity makes that dimension dynamic
            self.step = torch.compile(decode_logits, mode="reduce-overhead" if rt.device.type == "cuda" else None)

    def _decode(self, ids, cache, step=None):
        with autocast(self.rt):
            return self.model.decode(torch.tensor(ids, device=self.rt.device), cache, self.windows, last_only=True,
                                     step=step)[:, -1].float()

    def batch(self, capacity, max_rows):
        """A DecodeBatch of up to max_rows rows holding up to `capacity` tokens each."""
        if self.step is not None:  # compiled: capacities in steps of CAPACITY_STEP, so calls reuse graphs
            capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        return DecodeBatch(self, capacity, max_rows)

    @torch.no_grad()
    def generate(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 seed=0, on_token=None, max_rows=0):
        """num_samples Samples for each prompt (a list of token ids): sample i * num_samples + j is prompt i's j-th,
        and on_token(i, token) sees its tokens as they come. max_rows: samples decoding at once (0: all). All of
        them draw from one generator seeded with `seed`."""
        sampling = Sampling(temperature, top_k, top_p, min_p, torch.Generator(device=self.rt.device).manual_seed(seed))
        streams = [Stream(prompt, sampling, max_new_tokens, functools.partial(on_token, i) if on_token else None)
                   for i, prompt in enumerate(p for p in prompts for _ in range(num_samples))]
        batch = self.batch(max(map(len, prompts)) + max_new_tokens, max_rows or len(streams))
        for stream in streams:
            batch.add(stream)
        while batch.step():
            pass
        return [[s.sample for s in streams[i * num_samples:(i + 1) * num_samples]] for i in range(len(prompts))]

    def _tool(self, stream, token):
        if token == self.python_start:
            stream.call = []
        elif stream.call is not None and token == self.python_end:
            result = calculate(self.tokenizer.decode(stream.call))
            stream.call = None
            if result is not None:
                stream.forced += [self.output_start, *self.tokenizer.encode(result), self.output_end]
        elif stream.call is not None:
            stream.call.append(token)


class DecodeBatch:
    """Streams decoding together in the rows of one KV cache, one token each per step, continuously batched: a stream
    waits for a free row (at most max_rows), then its prompt but the last token is prefilled in a one-row cache (once
    for consecutive streams of one prompt) and copied in, and the last token is the row's next input; a stream that
    ends frees its row for the next waiting one at the next step. Rows are added (up to max_rows) while streams wait,
    and when none waits and at most half the rows are live the cache shrinks to the next power of two of them, so a
    compiled step sees few batch sizes. Driven by one thread; `add` and `step` belong to it."""

    def __init__(self, engine, capacity, max_rows):
        self.engine, self.capacity, self.max_rows = engine, capacity, max_rows
        self.waiting = collections.deque()
        self.slots, self.feed, self.cache = [], [], None  # slots[row]: the row's Stream, None when free
        self.prefilled = (None, None)  # (prompt, its prefilled one-row cache)

    def add(self, stream):
        if len(stream.prompt) + stream.max_new_tokens > self.capacity:
            raise ValueError(f"{len(stream.prompt)} prompt + {stream.max_new_tokens} new tokens > capacity {self.capacity}")
        self.waiting.append(stream)

    @property
    def live(self):
        return sum(s is not None for s in self.slots)

    def _end(self, row):
        stream, self.slots[row] = self.slots[row], None
        self.cache.clear(row)  # masked down to its own junk until a stream is put there
        if stream.on_done:
            stream.on_done()

    def _admit(self, row):
        rt, stream = self.engine.rt, self.waiting.popleft()
        self.slots[row] = stream  # first: a prefill that fails (out of memory) leaves it in the batch, not lost
        if self.prefilled[0] is not stream.prompt:
            alone = KVCache(self.engine.model, 1, len(stream.prompt), rt.device, rt.dtype, rt.backend)
            if len(stream.prompt) > 1:
                self.engine._decode([stream.prompt[:-1]], alone)
            self.prefilled = (stream.prompt, alone)
        self.cache.put(row, self.prefilled[1])
        self.feed[row] = stream.prompt[-1]

    def _arrange(self):
        """Between steps: free cancelled rows, drop cancelled waiting streams, fill free rows (adding rows when
        streams wait), shrink when at most half the rows are live."""
        for row, stream in enumerate(self.slots):
            if stream is not None and stream.cancelled:
                self._end(row)
        for stream in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(stream)
            if stream.on_done:
                stream.on_done()
        free = [row for row, s in enumerate(self.slots) if s is None]
        extra = min(len(self.waiting) - len(free), self.max_rows - len(self.slots))
        if extra > 0:
            rt = self.engine.rt
            if self.cache is None:
                self.cache = KVCache(self.engine.model, extra, self.capacity, rt.device, rt.dtype, rt.backend,
                                     static=self.engine.step is not None)  # compiled steps: no host int sets a shape
            else:
                self.cache.grow(extra)
            free += range(len(self.slots), len(self.slots) + extra)
            self.slots += [None] * extra
            self.feed += [0] * extra
        for row in free:
            if not self.waiting:
                break
            self._admit(row)
        for row, stream in enumerate(self.slots):  # a free row is fed junk each step: keep it empty, never full
            if stream is None and self.cache.host_lengths[row]:
                self.cache.clear(row)
        live = [row for row, s in enumerate(self.slots) if s is not None]
        if not live:  # idle: give the memory back
            self.slots, self.feed, self.cache, self.prefilled = [], [], None, (None, None)
        elif not self.waiting and len(live) <= len(self.slots) // 2:
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
        engine = self.engine
        logits = engine._decode([[token] for token in self.feed], self.cache, engine.step)
        groups = {}  # greedy rows draw together; every other Sampling draws over its own rows
        for row, s in enumerate(self.slots):
            if s is not None:
                groups.setdefault(None if s.sampling.temperature <= 0 else s.sampling, []).append(row)
        draw = lambda g, x: sample_next(x, g and g.generator, g.temperature if g else 0, *(
            (g.top_k, g.top_p, g.min_p) if g else ()))
        if len(groups) == 1:  # one call over every row (free ones too: cheaper than gathering the live ones)
            sampled = draw(next(iter(groups)), logits).tolist()  # the step's one host sync
        else:
            tokens = torch.zeros(len(self.slots), dtype=torch.long, device=logits.device)
            for g, rows in groups.items():
                index = torch.tensor(rows, device=logits.device)
                tokens[index] = draw(g, logits[index])
            sampled = tokens.tolist()
        for row, s in enumerate(self.slots):
            if s is None:
                continue
            forced = bool(s.forced)
            token = self.feed[row] = s.forced.pop(0) if forced else sampled[row]
            s.sample.tokens.append(token)
            s.sample.mask.append(0 if forced else 1)
            if s.on_token:
                s.on_token(token)
            if token in engine.stops:
                s.sample.stopped = True
            else:
                engine._tool(s, token)
            if s.sample.stopped or len(s.sample.tokens) == s.max_new_tokens:
                self._end(row)
        return True


def chat_turn(tokenizer, conversation, user_text):
    """conversation (tokens so far, starting with <|bos|>) + a user turn + <|assistant_start|>: the prompt for a reply."""
    special = tokenizer.special
    return [*conversation, special("<|user_start|>"), *tokenizer.encode(user_text), special("<|user_end|>"),
            special("<|assistant_start|>")]



# =============================================================================================================
# 11. Evaluation: chat (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval; ChatCORE)


def reply_text(tokenizer, sample):
    """The text of a generated Sample, without the stop token that ended it."""
    return tokenizer.decode(sample.tokens[:-1] if sample.stopped else sample.tokens)


def gsm8k_answer(text):
    """The number after '####' (commas dropped), where GSM8K puts its final answers; None when there is none."""
    match = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    return match.group(1).replace(",", "") if match else None


@torch.no_grad()
def categorical_choices(model, prompts, letter_ids, rt, windows):
    """The model's choice for each (prompt tokens, n_choices) in `prompts`, all in one packed forward: the argmax of
    the next-token logits after the prompt, over the first n_choices answer letters."""
    h, _, starts = packed_hidden(model, [p for p, _ in prompts], rt, windows)
    letter_logits = model.logits(h[torch.from_numpy(starts[1:] - 1).to(rt.device)])[:, letter_ids].float()
    n_choices = torch.tensor([n for _, n in prompts], device=rt.device)
    allowed = torch.arange(len(letter_ids), device=rt.device) < n_choices[:, None]
    return letter_logits.masked_fill(~allowed, float("-inf")).argmax(-1).tolist()


# -- HumanEval: model-written code runs in a sandbox ------------------------------------------------------------------
#
# The sandbox's promise (--sandbox=isolated, the default; Linux on x86_64 or aarch64). The program runs in a fresh
# `python -I -S` (no site-packages, no .pth files, no environment), three processes deep: a launcher that makes the
# namespaces, the init that holds them, the program. The program
# - runs as an unprivileged uid: one of its own (SANDBOX_UID_BASE + the launcher's pid) when we are root, else ours
#   inside a user namespace in which it holds no capability; no setuid binary can raise it (no_new_privs);
# - is alone in a PID namespace: it sees and signals nothing outside, and the timeout, by killing the launcher,
#   kills the namespace's init and with it everything inside;
# - is one process with one thread (RLIMIT_NPROC 1), so its RLIMIT_AS is the memory budget of the whole sandbox;
# - sees the filesystem read-only (a mount namespace) but for its working directory, a tmpfs of disk_mb that is the
#   whole sandbox's disk and vanishes with it; /proc is an empty directory;
# - has no network of any family: an empty network namespace, and seccomp fails socket(), socketpair() and
#   io_uring_setup() with EPERM, so not even a UNIX socket on the read-only filesystem can be reached;
# - passes only when the harness, after the program (its check() last) returned, writes the run's nonce on a pipe the
#   parent set up before it started: exiting with status 0 (sys.exit, os._exit, atexit, a signal) is not passing.
# Its limits: the program can read what any user may read; it has its CPU until the timeout; and as the harness and
# the program share an interpreter, code written to hunt for the nonce in its own process could forge a pass: the
# sandbox contains such code, it does not make the score unforgeable.
# --sandbox=weak, for machines that refuse namespaces (containers whose seccomp profile forbids unshare): the same uid
# (as root), rlimits, syscall filter and nonce, but no namespaces, so the program can see other processes, read
# world-readable files and write world-writable directories (/tmp; files of up to disk_mb). Not root, it keeps our
# uid: it can then also write our files and signal our processes. Said once, as a SandboxWarning, when used.
SANDBOX_MODES = ("isolated", "weak")
SANDBOX_UID_BASE = 2_000_000_000  # + the launcher's pid: a uid that no account and no other live sandbox has
SANDBOX_PYTHON = sys.executable    # the interpreter the program runs in (only its standard library is used)

SANDBOX_LAUNCHER = r'''
import builtins, ctypes, json, os, resource, select, signal, struct, sys, traceback

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000
# seccomp's audit arch and the syscall numbers used here, by machine
MACHINES = {"x86_64": (0xC000003E, dict(socket=41, socketpair=53, io_uring_setup=425, unshare=272, mount_setattr=442)),
            "aarch64": (0xC00000B7, dict(socket=198, socketpair=199, io_uring_setup=425, unshare=97, mount_setattr=442))}
NO_NETWORK = ("socket", "socketpair", "io_uring_setup")  # io_uring can open sockets without socket()
libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def check(ret, what):
    if ret == -1:
        raise SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")


def syscalls():
    known = MACHINES.get(os.uname().machine) if sys.platform == "linux" else None
    if known is None:
        raise SetupError(f"no namespaces or syscall table for {sys.platform} on {os.uname().machine}")
    return known


def deny_syscalls(names):
    """A seccomp filter: the named syscalls fail with EPERM, any other ABI (x32, 32-bit compat) kills the process."""
    arch, numbers = syscalls()
    load, equal, at_least, ret, n = 0x20, 0x15, 0x35, 0x06, len(names)
    program = [(load, 0, 0, 4), (equal, 0, n + 4, arch), (load, 0, 0, 0), (at_least, n + 1, 0, 0x40000000)]
    program += [(equal, n - i, 0, numbers[name]) for i, name in enumerate(names)]  # jumps count from the next op
    program += [(ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | 1), (ret, 0, 0, 0x80000000)]  # allow, EPERM, kill
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    class Filter(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(libc.prctl(22, 2, ctypes.byref(Filter(len(program), ctypes.addressof(code))), 0, 0), "seccomp")


def make_namespaces(as_root, uid):
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if as_root:
        return check(libc.unshare(flags), "unshare")
    gid = os.getegid()
    check(libc.unshare(flags | CLONE_NEWUSER), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def mount(source, target, fstype, flags, options=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                     options and options.encode()), f"mount {target}")


def hidden_ancestor(path):
    """The first directory on the way to path that other users may not enter (e.g. /root, for a Python under it)."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    for i in range(len(parts)):
        directory = os.sep + os.sep.join(parts[:i + 1])
        if not os.stat(directory).st_mode & 0o001:
            return directory
    return None


def mount_views(work, disk, owner, as_root):
    """Every mount read-only, nosuid and private to us; then a tmpfs of `disk` bytes on the working directory and an
    empty one on /proc. Where our Python lies in a directory the program's uid may not enter, an empty tmpfs covers
    that directory and the installation is bound back at its own path, so imports work and the rest stays hidden."""
    class MountAttr(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]
    attr = MountAttr(MS_RDONLY | MS_NOSUID, 0, MS_PRIVATE, 0)  # MOUNT_ATTR_RDONLY, _NOSUID have MS_'s values
    check(libc.syscall(syscalls()[1]["mount_setattr"], -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)),
          "mount_setattr(/, AT_RECURSIVE) (Linux >= 5.12)")
    hidden = hidden_ancestor(sys.base_prefix) if as_root else None
    if hidden:
        python = os.open(os.path.realpath(sys.base_prefix), os.O_PATH)
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=65536,mode=0755")
        os.makedirs(os.path.realpath(sys.base_prefix))
        mount(f"/proc/self/fd/{python}", os.path.realpath(sys.base_prefix), None, MS_BIND | MS_REC)
        mount(None, os.path.realpath(sys.base_prefix), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        mount(None, hidden, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(python)
    mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk},nr_inodes=16384,mode=0700,uid={owner},gid={owner}")
    mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4096,mode=0555")


def fork_supervised():
    """Fork. The parent waits and exits as the child did (a signal as 128 + its number: a namespace's init cannot
    signal itself); the child gets the read end of a pipe only the parent writes to, for die_with_parent."""
    alive, parent_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(parent_end)
        return alive
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(128 - code if code < 0 else code)


def die_with_parent(alive):
    """SIGKILL when the parent dies; the pipe reads EOF if it died before the prctl took hold. Set after any change of
    uid, which clears it."""
    if sys.platform == "linux":
        check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([alive], [], [], 0)[0]:
        os._exit(1)
    os.close(alive)


def cut_python_sockets():
    """A first, friendlier layer under the syscall filter: Python's socket types refuse with a clear message."""
    import _socket, socket
    class NoNetwork(socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = NoNetwork


def drop_privileges(as_root, isolated, uid):
    if as_root:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif isolated:  # a nested user namespace: no capability left over the namespaces made above
        check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")


def limit(memory, cpu_seconds, disk):
    for which, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, disk), (resource.RLIMIT_NPROC, 1), (resource.RLIMIT_NOFILE, 64)):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError) as e:  # macOS refuses RLIMIT_AS
            if sys.platform == "linux":
                raise SetupError(f"setrlimit: {e}")


def run(source, status, nonce):
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


def main(a):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    status, nonce, isolated, as_root = a["status_fd"], a["nonce_fd"], a["mode"] == "isolated", os.geteuid() == 0
    uid = a["uid_base"] + os.getpid() if as_root else os.geteuid()
    try:
        source = open(a["program"], encoding="utf-8").read()
        if isolated:
            syscalls()
            make_namespaces(as_root, uid)
            die_with_parent(fork_supervised())  # the new PID namespace's init; the program is its only child
            mount_views(a["work"], a["disk"], uid if as_root else 0, as_root)
            os.chdir(a["work"])  # into the tmpfs
        elif as_root:
            hidden = hidden_ancestor(sys.base_prefix)
            if hidden:
                raise SetupError(f"our Python ({sys.base_prefix}) lies in {hidden}, which other users may not enter: "
                                 "the weak sandbox's uid could not import the standard library")
            os.chown(a["work"], uid, uid)
        alive = fork_supervised()
        with open("program.py", "w", encoding="utf-8") as f:  # for its tracebacks
            f.write(source)
        cut_python_sockets()
        drop_privileges(as_root, isolated, uid)
        die_with_parent(alive)
        limit(a["memory"], a["cpu_seconds"], a["disk"])
        if isolated or sys.platform == "linux" and os.uname().machine in MACHINES:
            deny_syscalls(NO_NETWORK)
        os.closerange(3, min(status, nonce))
        os.closerange(min(status, nonce) + 1, max(status, nonce))
        os.closerange(max(status, nonce) + 1, 1 << 16)
        os.environ.clear()
        os.environ.update(PATH="/usr/bin:/bin", HOME=a["work"], TMPDIR=a["work"])
    except (SetupError, OSError) as e:
        os.write(status, f"error: {e}\n".encode())
        os._exit(125)
    run(source, status, nonce)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
'''


def extract_program(completion, prompt):
    """The program of a HumanEval completion: the problem's prompt, then the first ``` block of the completion
    (an unclosed one runs to the end: generation stopped), else its whole text. The prompt always goes first: its
    imports and helpers (HumanEval/10, 32, 38, 50's tests call is_palindrome, poly, encode_cyclic, encode_shift) must be
    there, a completion that restates the function replaces the prompt's docstring-only stub, and one that is only the
    body continues it. nanochat prepends only the prompt's imports, which fails a correct answer that omits a helper."""
    fenced = re.search(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", completion, re.DOTALL)  # ```python, ```py, ```Python3, ```
    return prompt + "\n" + (fenced.group(1) if fenced else completion)


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up on this machine."""


class SandboxWarning(UserWarning):
    """Model-written code runs in the weak sandbox."""


@functools.cache
def warn_weak_sandbox():
    """Said once per process."""
    who = ("its own uid" if os.geteuid() == 0 else
           f"our uid {os.geteuid()}, so it can write our files and signal our processes")
    warnings.warn(f"--sandbox=weak: model-written code runs without namespaces, as {who}; it can see other processes, "
                  "read world-readable files and write world-writable directories (README: Security)",
                  SandboxWarning, stacklevel=3)


def remove_tree(top):
    """Delete top and everything under it without following a link and without raising, however deep or locked down
    the tree a program left: nested directories are emptied into top by renames, so depth costs neither recursion
    nor path length (shutil.rmtree recurses: a RecursionError at ~1,000 levels)."""
    lifted = 0
    try:
        if not os.path.isdir(top) or os.path.islink(top):
            return os.unlink(top)
        for _ in range(1 << 20):  # each round removes or lifts something, or we give up on what is left
            os.chmod(top, 0o700)
            progress = False
            with os.scandir(top) as entries:
                for entry in list(entries):
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            os.chmod(entry.path, 0o700)
                            children = os.listdir(entry.path)
                            for child in children:
                                lifted += 1
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
    """Run Python source in the sandbox (its promise above). -> (passed, reason): passed if the harness reported the
    run's nonce after the program ran to its end; otherwise the reason is the last line of its stderr (e.g.
    "AssertionError", "MemoryError"), a signal or the timeout. SandboxUnavailable when the sandbox cannot be made."""
    if sandbox not in SANDBOX_MODES:
        raise ValueError(f"sandbox {sandbox!r}: choose from {', '.join(SANDBOX_MODES)}")
    if sandbox == "weak":
        warn_weak_sandbox()
    nonce = os.urandom(16).hex().encode()
    private = tempfile.mkdtemp(prefix="decoderstack-sandbox-")
    os.chmod(private, 0o711)  # ours: the program may reach its cwd by path but neither list nor replace it
    status, nonce_r, report = None, None, b""
    try:
        work, source = os.path.join(private, "work"), os.path.join(private, "program.py")
        os.mkdir(work)
        with open(source, "w", encoding="utf-8") as f:
            f.write(program)
        status, status_w = os.pipe()
        nonce_r, nonce_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        args = dict(mode=sandbox, work=work, program=source, status_fd=status_w, nonce_fd=nonce_r, disk=disk_mb << 20,
                    memory=memory_mb << 20, cpu_seconds=math.ceil(timeout) + 1, uid_base=SANDBOX_UID_BASE)
        with open(os.path.join(private, "stderr"), "w+b") as err:  # a file, not a pipe: RLIMIT_FSIZE bounds it
            try:
                child = subprocess.Popen([SANDBOX_PYTHON, "-I", "-S", "-c", SANDBOX_LAUNCHER, json.dumps(args)], cwd=work,
                                         env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, pass_fds=(status_w, nonce_r), start_new_session=True)
            finally:
                os.close(status_w)
            try:
                child.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:  # the launcher's group, and with the launcher the namespace
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            os.set_blocking(status, False)
            try:
                report = os.read(status, 4096)
            except BlockingIOError:
                pass
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
                  max_new_tokens=512, sandbox="isolated", compile_decode=False):
    """Chat evaluation on ChatEvalData `chat`: categorical tasks by letter argmax (packed varlen forwards of up to
    batch_tokens tokens); generative (GSM8K) and code (HumanEval) ones by greedy generation with the calculator,
    batch_size rows continuously batched, scored on the number after '####' or by running the problem's tests in the
    `sandbox` (made once first: SandboxUnavailable before any generation where it cannot be). Examples split across
    ranks as in CORE. Returns dict(results={task: accuracy}, centered={task: centered accuracy}, chatcore=mean
    centered, correct=int8 per example)."""
    evaluated, mine = examples_of_rank(chat.tasks, len(chat.examples), max_per_task, rt)
    correct = torch.zeros(len(chat.examples), dtype=torch.float32)
    kind = {e: chat.tasks[int(chat.examples[e, 0])]["kind"] for e in mine}
    categorical = [(e, chat.prompt(e)) for e in mine if kind[e] == "categorical"]
    for batch in token_batches(categorical, lambda item: len(item[1][0]), batch_tokens):
        choices = categorical_choices(model, [(tokens, n) for _, (tokens, _, n) in batch], chat.letter_ids, rt, windows)
        for (e, (_, gold, _)), choice in zip(batch, choices):
            correct[e] = float(choice == gold)
    engine = Engine(model, tokenizer, windows, rt, compile=compile_decode)
    generated = [e for e in mine if kind[e] != "categorical"]
    if any(kind[e] == "code" for e in generated):
        run_sandboxed("pass", sandbox=sandbox)
    if generated:  # continuously batched: batch_size rows, a finished one takes the next prompt at once
        samples = engine.generate([chat.prompt(e)[0].tolist() for e in generated], 1, max_new_tokens, temperature=0,
                                  max_rows=batch_size)
        for e, (sample,) in zip(generated, samples):
            task = chat.tasks[int(chat.examples[e, 0])]
            text, index = reply_text(tokenizer, sample), e - task["first_example"]
            if task["kind"] == "code":
                correct[e] = float(humaneval_passed(text, task["problems"][index], sandbox=sandbox))
            else:
                correct[e] = float(gsm8k_answer(text) == task["answers"][index])
    out = task_scores(chat.tasks, "name", correct, evaluated, rt)
    return dict(out, chatcore=out.pop("mean"))


# =============================================================================================================
# 12. Post-training: chat SFT and GSM8K RL (their loops are phase_sft and phase_rl)
#
# SFT. Each conversation is its own document of a varlen batch, as in pretraining: positions from 0, no attention
# across conversations, so a conversation gets exactly the losses it would get alone. Only tokens the SFT mask marks
# (assistant text, tool calls, <|assistant_end|>) are targets. nanochat pads rows of a (B, T) batch instead.


def sft_batch(split, convs, T, bos_id, device):
    """Packed Batch of T tokens from conversations `convs` (indices into SFTSplit `split`) back to back; only the
    first may be longer than T (it is cut). The rest is one padding document (BOS, then token 0s), so padding adds a
    single cu_seqlens entry. Targets: the next token where its mask is 1, else -1 (so never across conversations:
    each starts with BOS, whose mask is 0)."""
    tokens, masks = zip(*(split.conversation(i) for i in convs))
    pad = max(0, T - sum(len(t) for t in tokens))
    buf = np.concatenate([*tokens, [bos_id], np.zeros(pad, np.int64)])[:T + 1]
    supervised = np.concatenate([*masks, np.zeros(pad + 1, np.int64)])[1:T + 1] == 1
    batch = make_batch(buf, bos_id, T, 1, device)  # max_doc_len T: documents start only at BOS
    batch.targets.masked_fill_(~to_device(supervised, torch.bool, device)[:, None], -1)
    return batch


class SFTLoader:
    """Whole conversations in a shuffled order (a new permutation each epoch, from the seed), packed greedily: a
    batch takes the next conversations while they fit in T tokens (the first always, cut if longer). Every rank packs
    the same stream and keeps every world_size-th batch, so ranks see disjoint conversations and together exactly
    the single-process batches. The position (epoch, cursor into its permutation) is saved in checkpoints."""

    def __init__(self, split, tokenizer, rank, world_size, seed, state=None):
        self.split, self.bos, self.rank, self.world_size, self.seed = split, tokenizer.bos_id, rank, world_size, seed
        self.lengths = np.diff(split.convs)
        self.state = dict(state or {"epoch": 0, "cursor": 0})
        self._order = (None, None)

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
        mine = [self._take(T) for _ in range(self.world_size)][self.rank]
        return sft_batch(self.split, mine, T, self.bos, device)


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
    """Mean nats per supervised token of a fixed sample of val conversations holding up to max_tokens tokens (the
    first ones of a seed-0 permutation: the files are grouped by source), packed without padding into forwards of up
    to batch_tokens (a longer conversation goes alone, cut); rank r takes forwards r, r + world_size, ... Only
    supervised rows get logits."""
    order = np.random.default_rng(0).permutation(len(split.convs) - 1)
    n = max(1, int(np.searchsorted(np.cumsum(np.diff(split.convs)[order]), max_tokens, side="right")))
    convs = (split.conversation(int(i)) for i in order[:n])
    sums = torch.zeros(2, device=rt.device, dtype=torch.float64)  # nats, supervised tokens
    for k, batch in enumerate(token_batches(convs, lambda c: len(c[0]), batch_tokens)):
        if k % rt.world_size != rt.rank:
            continue
        batch = [(t[:batch_tokens], m[:batch_tokens]) for t, m in batch]
        h, ids, starts = packed_hidden(model, [t for t, _ in batch], rt, windows)
        # row i predicts token i + 1 of its conversation: a target where that token's mask is 1
        rows = torch.from_numpy(np.concatenate([o + np.flatnonzero(m[1:]) for o, (_, m) in zip(starts, batch)])).to(rt.device)
        for chunk in torch.split(rows, LOGITS_CHUNK):
            sums[0] += F.cross_entropy(model.logits(h[chunk]), ids[chunk + 1], reduction="sum").double()
        sums[1] += len(rows)
    nats, count = sum_over_ranks(sums, rt).tolist()
    return nats / max(count, 1)


def sft_lr_factor(cfg, step, total):
    """Linear warmup over sft_warmup_frac of the steps, flat, then linear decay over the last sft_cooldown_frac
    (to 1/cooldown steps on the last step, so no step is wasted at lr 0)."""
    warmup, cooldown = cfg.sft_warmup_frac * total, cfg.sft_cooldown_frac * total
    up = min(1.0, (step + 1) / warmup) if warmup else 1.0
    down = min(1.0, (total - step) / cooldown) if cooldown else 1.0
    return up * down


# -- GSM8K RL: on-policy policy gradient with the engine and the calculator, nanochat-style --


def gsm8k_reward(tokenizer, sample, answer):
    """1 when the number after '####' in the sample is the reference answer, else 0."""
    return float(gsm8k_answer(reply_text(tokenizer, sample)) == answer)


def group_advantages(rewards):
    """Reward minus the mean over the k samples of the same question (no std scaling, as nanochat)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    return rewards - rewards.mean()


def policy_gradient_loss(model, rollouts, windows, rt, n_tokens):
    """-sum(advantage x log p(token)) / n_tokens over the sampled tokens of `rollouts`, a list of (prompt, Sample,
    advantage) packed into one varlen forward. Prompt tokens and forced tool output (mask 0) get no gradient: their
    rows never reach the logits. n_tokens: sampled tokens of the whole step (token-level normalisation)."""
    batch, starts = pack_sequences([np.array(prompt + sample.tokens) for prompt, sample, _ in rollouts], rt.device)
    ids = batch.inputs
    rows, weights = [], []
    for start, (prompt, sample, advantage) in zip(starts, rollouts):
        sampled = np.flatnonzero(np.array(sample.mask) == 1)  # token i of the sample sits at start + len(prompt) + i
        rows.append(start + len(prompt) + sampled - 1)        # ... and is predicted by the row before it
        weights.append(np.full(len(sampled), advantage, dtype=np.float32))
    rows = torch.from_numpy(np.concatenate(rows)).to(rt.device)
    with autocast(rt):
        h = model.hidden(batch, windows, rt.backend)
        logp = -F.cross_entropy(model.logits(h[rows]).float(), ids[rows + 1], reduction="none")
    return -(logp * torch.from_numpy(np.concatenate(weights)).to(rt.device)).sum() / max(1, n_tokens)


@torch.no_grad()
def gsm8k_pass_at_k(engine, tokenizer, chat, task, examples, k, cfg, rt, seed):
    """pass@1..k on the given examples of a generative chat-eval task: the fraction of questions where one of the
    first j samples (temperature cfg.rl_temperature) is right; examples split across ranks."""
    hits = torch.zeros(k, device=rt.device)
    for e in examples[rt.rank::rt.world_size]:
        samples = engine.generate([chat.prompt(e)[0].tolist()], k, cfg.rl_max_new_tokens, cfg.rl_temperature,
                                  cfg.rl_top_k, seed=seed + e)[0]
        right = [gsm8k_reward(tokenizer, s, task["answers"][e - task["first_example"]]) for s in samples]
        hits += torch.tensor(np.maximum.accumulate(right), dtype=torch.float32, device=rt.device)
    sum_over_ranks(hits, rt)
    return {j + 1: float(hits[j]) / len(examples) for j in range(k)}


# =============================================================================================================
# 13. Run helpers: logging, checkpoints, the run directory, metrics, the loop's bookkeeping, the run report


class Logger:
    """Rank 0 prints and appends to RUN_DIR/log.txt; metrics (the curves) are appended to RUN_DIR/curves.jsonl, one
    {"step": ..., name: value} object per line, step counting the phase's steps done (as the log lines do) (a resumed phase appends again from its step: the last line for a
    step wins), and also go to wandb when it is enabled."""

    def __init__(self, cfg, rt):
        self.master, self.path, self.wandb = rt.master, os.path.join(cfg.run_dir, "log.txt"), None
        self.curves = os.path.join(cfg.run_dir, "curves.jsonl")
        if not self.master:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        mode = cfg.wandb if cfg.wandb != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "disabled")
        if os.environ.get("WANDB_MODE") == "disabled":
            mode = "disabled"
        if mode != "disabled":
            import wandb
            self.wandb = wandb.init(project="decoderstack", name=os.path.basename(os.path.abspath(cfg.run_dir)),
                                    config=dataclasses.asdict(cfg), mode=mode, dir=cfg.run_dir)

    def __call__(self, msg):
        if self.master:
            print(msg, flush=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")

    def metrics(self, step, values):
        if not self.master:
            return
        with open(self.curves, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)


# -- checkpoints: safetensors weights + weights_only-loadable optimizer state + JSON holding their sha256, written
# atomically; one run per run directory (a lock), pruned by step number, verified on load, resume falls back --

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
    """RUN_DIR/<prefix><step>/: model.safetensors, optim.pt, state.json (step, phase, extra_state e.g. the loader's
    position, "model": the ModelConfig, "run": this phase's settings, the files' sha256). RUN_DIR/latest_<phase> names it (what --resume continues) and RUN_DIR/latest
    too (the model the next phase starts from). The newest --keep-checkpoints of the phase are kept. A failed write (a full disk)
    leaves the previous checkpoint and the pointers as they were, and raises CheckpointError."""
    opt_state = opt.state_dict()  # a collective when sharded: every rank calls it
    if not rt.master:
        return
    from safetensors.torch import save_file
    final = os.path.join(cfg.run_dir, f"{CHECKPOINT_PREFIX[phase]}{step:06d}")
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
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


def latest_checkpoint(run_dir, phase=None):
    """The newest checkpoint of `phase`, or of any phase (the model the next phase starts from); None if none."""
    path = os.path.join(run_dir, f"latest_{phase}" if phase else "latest")
    return os.path.join(run_dir, open(path).read().strip()) if os.path.isfile(path) else None


def verify_checkpoint(path, files):
    """state.json of a checkpoint, after checking that `files` are there and have the sha256 it recorded."""
    where = os.path.join(path, "state.json")
    if not os.path.isfile(where):
        raise CheckpointError(f"{where}: missing (not a checkpoint directory?)")
    state = read_json(where)  # malformed: a DataFormatError naming it
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)
            and isinstance(state.get("model", state.get("config")), dict)):
        raise CheckpointError(f"{where}: not a checkpoint's state (step, model)")
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (not a checkpoint directory, or an incomplete one?)")
        want = state.get("files", {}).get(name)  # checkpoints written before checksums have none
        if want is not None and sha256_file(file) != want:
            raise CheckpointError(f"{file}: sha256 differs from the one in state.json (truncated or corrupt)")
    return state


def load_checkpoint(path, model, opt=None):
    """Verify, then load weights (and optimizer state); returns state.json. Every failure is a CheckpointError."""
    state = verify_checkpoint(path, CHECKPOINT_FILES if opt is not None else CHECKPOINT_FILES[:1])
    load_verified(path, model, opt)
    return state


def load_model(path, device="cpu", vocab_size=None):
    """(model, state.json) of a checkpoint: the model built from the ModelConfig it carries, its weights loaded;
    state.json read once (step, phase, "run": the settings of the phase that wrote it). A checkpoint from before
    checkpoints carried their model (its state.json has the pretraining run's "config" instead) loads given its
    tokenizer's vocab_size, and --phases convert rewrites it once."""
    state = verify_checkpoint(path, CHECKPOINT_FILES[:1])
    model = GPT(checkpoint_model(path, state, vocab_size)).to(device)
    load_verified(path, model)
    return model, state


def checkpoint_model(path, state, vocab_size=None):
    """The ModelConfig of a checkpoint's state.json (see load_model)."""
    where = os.path.join(path, "state.json")
    if "model" in state:
        try:
            return ModelConfig(**{**state["model"], "softcap": tuple(state["model"]["softcap"])})
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"{where}: 'model' is not a model this stack builds ({e})") from None
    if vocab_size is None:
        raise CheckpointError(f"{path}: written before checkpoints carried their model; convert it once with "
                              f"`python {os.path.basename(__file__)} --phases convert --init-from {path} --data-dir DATA_DIR`")
    unknown = set(state["config"]) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise CheckpointError(f"{where}: config fields this stack does not know: {', '.join(sorted(unknown))}")
    return ModelConfig.of(Config(**{k: freeze(v) for k, v in state["config"].items()}), vocab_size)


def load_verified(path, model, opt=None):
    """Weights (and optimizer state) of a checkpoint verify_checkpoint has checked."""
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


def resume_checkpoint(cfg, phase, model, opt, log):
    """--resume: load the phase's newest checkpoint that verifies (latest_<phase>, else the older ones kept, newest
    first, each skip logged as a warning) into model and opt. Returns (path, state), or None if the phase has none."""
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
    return None


def resumed_step(cfg, phase, model, opt, loader, log):
    """The step a pt or sft loop starts at: 0, or with --resume the step of the checkpoint resume_checkpoint loads
    (the loader then continues where it stood)."""
    resumed = resume_checkpoint(cfg, phase, model, opt, log)
    if not resumed:
        return 0
    path, state = resumed
    loader.state = state["loader"]
    log(f"{'' if phase == 'pt' else phase + ': '}resumed from {path} at step {state['step']}")
    return state["step"]


def claim_run_dir(cfg, phases):
    """Before anything is written: lock the run directory for this process (released at exit, kill -9 included; a
    second run on it is refused, naming the holder), remove what a crash left half-written (*.tmp), and make sure a
    fresh (not --resume) pt, sft or rl run does not mix its checkpoints with an earlier run's: refuse, or with
    --overwrite delete that phase's checkpoints and the later phases' (trained from them). Returns the lock."""
    import fcntl
    os.makedirs(cfg.run_dir, exist_ok=True)
    lock = open(os.path.join(cfg.run_dir, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise CheckpointError(f"{cfg.run_dir}: run directory in use by pid {lock.read().strip() or '?'} "
                              "(one run per --run-dir)") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    for name in os.listdir(cfg.run_dir):
        if name.endswith(".tmp"):
            path = os.path.join(cfg.run_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    training = [p for p in CHECKPOINT_PREFIX if p in phases]
    clash = [os.path.basename(path) for p in training for path in checkpoints(cfg.run_dir, p).values()]
    if clash and not cfg.resume:
        if not cfg.overwrite:
            raise CheckpointError(f"{cfg.run_dir}: holds checkpoints of an earlier run ({', '.join(clash)}); pass "
                                  "--resume to continue it, --overwrite to replace it, or another --run-dir")
        order = list(CHECKPOINT_PREFIX)
        replaced = order[order.index(training[0]):]
        for phase in replaced:
            for path in checkpoints(cfg.run_dir, phase).values():
                shutil.rmtree(path)
            for pointer in (f"latest_{phase}", "latest"):
                path = os.path.join(cfg.run_dir, pointer)
                if os.path.isfile(path) and not os.path.isdir(os.path.join(cfg.run_dir, open(path).read().strip())):
                    os.remove(path)
        curves = os.path.join(cfg.run_dir, "curves.jsonl")
        if os.path.isfile(curves):  # the replaced phases' curves go with their checkpoints (the report draws them)
            kept = []
            for line in open(curves, encoding="utf-8"):
                try:
                    values = json.loads(line)
                except json.JSONDecodeError:
                    continue
                values = {k: v for k, v in values.items() if CURVE_PHASES.get(k.split("/")[0]) not in replaced}
                if len(values) > 1:
                    kept.append(json.dumps(values) + "\n")
            write_text_atomic(curves, "".join(kept))
        earlier = [latest_checkpoint(cfg.run_dir, p) for p in order[:order.index(training[0])]]
        earlier = [path for path in earlier if path and os.path.isdir(path)]
        if earlier and latest_checkpoint(cfg.run_dir) is None:  # the phase trains again from what it started from
            write_text_atomic(os.path.join(cfg.run_dir, "latest"), os.path.basename(earlier[-1]))
    return lock


def write_text_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def update_metrics(cfg, rt, values):
    """Merge values into RUN_DIR/metrics.json (every phase adds its own keys)."""
    if not rt.master:
        return
    path = os.path.join(cfg.run_dir, "metrics.json")
    metrics = read_json(path) if os.path.isfile(path) else {}
    metrics.update(values)
    write_text_atomic(path, json.dumps(metrics, indent=1) + "\n")


def val_line(val):
    """The log's line of an evaluate_bpb result (baselines/record.py reads it)."""
    bpb = "n/a" if val["bpb"] is None else f"{val['bpb']:.4f}"
    split = "".join(f"; {name} {b:.4f}" for name, b in val["by_source"].items())
    return f"val bpb {bpb} val loss {val['loss']:.4f} ({val['what']}{split})"


def val_metrics(val):
    """metrics.json's keys of an evaluate_bpb result."""
    return {"val_bpb": val["bpb"], "val_loss": val["loss"], "val_bpb_by_source": val["by_source"],
            "val_loss_tokens": val["targets"], "val_scored": val["what"]}


def mtp_note(weights):
    """What the training loss is when it is not the next-token loss alone: the MTP-weighted sum (at init ~ sum(w) ln V)."""
    if len(weights) == 1 and weights[0] == 1:
        return ""
    names = ["next"] + [f"{k + 2}-ahead" for k in range(len(weights) - 1)]
    return " (loss = " + " + ".join(f"{w:.2f} x {n}" for w, n in zip(weights, names)) + ")"


def settle_losses(pending, cfg, rt, log, phase):
    """The losses of the steps in `pending` (a list of (step, loss tensor), emptied), averaged over ranks, as floats:
    one host sync for all of them. The loops call it at log, eval and checkpoint steps only, so the GPU runs ahead in
    between. A NaN/inf loss stops the run with exit code 2, recorded in metrics.json, before any checkpoint after it
    is written: the phase's last checkpoint is the last good one."""
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
        self.total, self.resumed = 0.0, time.perf_counter()
        self.since, self.steps, self.tokens = self.resumed, 0, 0

    def step(self, tokens):
        self.steps += 1
        self.tokens += tokens

    def lap(self):
        """(seconds, steps, tokens) since the last lap; call it right after a host sync."""
        now = time.perf_counter()
        self.total += now - self.resumed
        lap = max(now - self.since, 1e-9), self.steps, self.tokens
        self.resumed = self.since = now
        self.steps = self.tokens = 0
        return lap

    def pause_until_now(self):
        """Eval or a checkpoint ran since the last lap: leave it out."""
        self.resumed = self.since = time.perf_counter()


def trained_model(cfg, rt, tokenizer):
    """(model, state.json, path) of --init-from, else of the run's latest checkpoint (load_model)."""
    path = cfg.init_from or latest_checkpoint(cfg.run_dir)
    if not path:
        raise CheckpointError(f"{cfg.run_dir}: no checkpoint to evaluate (run --phases pt first, or pass --init-from)")
    model, state = load_model(path, rt.device, tokenizer.vocab_size)
    return model, state, path


# -- the run report: RUN_DIR/report.md and its plots (report_<phase>.png), rewritten after every phase that records
# results, from metrics.json and curves.jsonl; and the header every invocation's log opens with --

REPORT_PHASES = ("pt", "eval", "sft", "chat", "rl")  # the phases whose results metrics.json holds, in report order
# report_<phase>.png: (title, panels), each panel the curves drawn together; a name ending in @ is a prefix (every k)
REPORT_PLOTS = {"pt": ("pretraining", (("train/loss",), ("val/bpb",))),
                "sft": ("SFT", (("sft/loss", "sft/val_loss"),)),
                "rl": ("RL", (("rl/reward",), ("rl/pass@",)))}


@functools.cache
def git_state(directory):
    """(commit, dirty) of the git work tree holding directory, dirty meaning tracked files differ from the commit;
    None where git cannot tell (no git, no repository, no commit yet, a repository git refuses as another user's).
    Cached: the state the run started from, whatever is edited or committed while it runs."""
    def git(*args):
        return subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None


def run_header(rt):
    """The lines every invocation's log opens with, after its source (modded-nanogpt's logs open with the code, then
    the versions), and the report's environment: what is needed to run the same thing again and compare."""
    import shlex
    state = git_state(os.path.dirname(os.path.abspath(__file__)))
    commit = "unknown (no git, or not in a repository)" if state is None else state[0] + (" (dirty)" if state[1] else "")
    gpu = f" ({torch.cuda.get_device_name(rt.device)})" if rt.device.type == "cuda" else ""
    return [f"commit: {commit}",
            f"command: {shlex.join(sys.argv)}",
            f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"triton {triton.__version__ if triton else 'not installed'}, CUDA {torch.version.cuda or 'none'}",
            f"device: {rt.device}{gpu}, world size {rt.world_size}, attention {rt.backend}"]


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


def duration(seconds):
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


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


def write_report(run_dir, header, phase):
    """RUN_DIR/report.md, written whole (tmp + rename) from the run directory: metrics.json (every invocation's phases
    add to it) and curves.jsonl, so it covers a run resumed or split over invocations; `header` (run_header) is that
    of the invocation writing it, `phase` the one just finished. A section per kind of result, absent without one."""
    file = lambda name: os.path.join(run_dir, name)
    m = read_json(file("metrics.json")) if os.path.isfile(file("metrics.json")) else {}
    curves = read_curves(file("curves.jsonl")) if os.path.isfile(file("curves.jsonl")) else {}
    times = m.get("phase_time_s", {})
    parts = [f"# Run report: {os.path.basename(os.path.abspath(run_dir))}",
             f"Rewritten after every phase, last after **{phase}** ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}),"
             " from `metrics.json` and `curves.jsonl`; the full log is `log.txt`.",
             md_table(["phase", "wall time"], [[p, duration(times[p])] for p in REPORT_PHASES if p in times]),
             "## Environment", "```text\n" + "\n".join(header) + "\n```"]
    if "params" in m:
        memory = m["peak_memory_gib"]
        parts += ["## Pretraining", md_table(["", "value"], [
            ["parameters", m["params"]], ["in NorMuon matrices", m["params_matrix"]],
            ["training tokens", m["train_tokens"]], ["tokens/s", round(m["tok_per_s"])],
            ["training time (no eval, no checkpoints)", duration(m["pt_train_time_s"])],
            ["compile time", f"{duration(m['pt_compile_time_s'])}, {m['pt_compile_graphs']} graphs"],
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
        parts += ["## SFT", f"Training time {duration(m['sft_train_time_s'])} (no eval, no checkpoints).",
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
    write_text_atomic(file("report.md"), "\n\n".join(p for p in parts if p) + "\n")


def report_phase(cfg, rt, log, phase, seconds):
    """After a phase of REPORT_PHASES: its wall time into metrics.json (phase_time_s: a phase run again keeps its
    latest), then report.md rewritten. Rank 0. The report only shows results already saved, so failing to write it
    is a warning in the log, never the end of the run."""
    if not rt.master:
        return
    try:
        path = os.path.join(cfg.run_dir, "metrics.json")
        times = (read_json(path) if os.path.isfile(path) else {}).get("phase_time_s", {})
        update_metrics(cfg, rt, {"phase_time_s": {**times, phase: seconds}})
        write_report(cfg.run_dir, run_header(rt), phase)
    except Exception as e:  # anything: a full disk, a metrics.json of another version of the stack, a plotting bug
        log(f"warning: {os.path.join(cfg.run_dir, 'report.md')} not rewritten: {type(e).__name__}: {e}")


# =============================================================================================================
# 14. Serving: an OpenAI-compatible HTTP server over the engine, and its chat page
# Requests become Streams of one DecodeBatch that one thread steps (continuous batching: a request joins between
# decode steps and leaves when done); the HTTP side is asyncio (FastAPI + uvicorn, imported only to serve).

SERVE_MAX_STOPS = 4  # stop sequences per request (OpenAI's limit)
TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI error body naming the parameter at fault."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def encode_reply(tokenizer, text):
    """An assistant turn's text as the model wrote it: its calculator calls, which replies show as the tool tokens'
    names, become those tokens again (a user turn's text is always ordinary text)."""
    pieces = re.split("(" + "|".join(map(re.escape, TOOL_TOKENS)) + ")", text)
    return [t for i, piece in enumerate(pieces) for t in ([tokenizer.special(piece)] if i % 2 else tokenizer.encode(piece))]


def chat_prompt(tokenizer, messages):
    """The prompt of an OpenAI `messages` list in our chat format (data/tokenizer.py's render_conversation): <|bos|>,
    then user and assistant turns alternating from a user turn (a leading system message is merged into it:
    system + blank line + user), ending on a user turn, then <|assistant_start|>."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    turns = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)  # OpenAI's content parts: text ones only
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(content, str):
            raise RequestError(400, f"messages[{i}] must be {{role: system|user|assistant, content: text}}", "messages")
        turns.append((i, m["role"], content))
    if turns[0][1] == "system":
        if len(turns) < 2 or turns[1][1] != "user":
            raise RequestError(400, "a system message must be followed by a user message", "messages")
        turns = [(1, "user", turns[0][2] + "\n\n" + turns[1][2])] + turns[2:]
    for k, (i, role, _) in enumerate(turns):
        if role != ("user", "assistant")[k % 2]:
            raise RequestError(400, f"messages[{i}] is {role!r}: turns must alternate user, assistant, ... after an "
                               "optional first system message", "messages")
    if turns[-1][1] != "user":
        raise RequestError(400, "the last message must be the user's (the reply is the assistant's)", "messages")
    sp, ids = tokenizer.special, [tokenizer.bos_id]
    for _, role, text in turns:
        ids += ([sp("<|user_start|>"), *tokenizer.encode(text), sp("<|user_end|>")] if role == "user" else
                [sp("<|assistant_start|>"), *encode_reply(tokenizer, text), sp("<|assistant_end|>")])
    return ids + [sp("<|assistant_start|>")]


class ReplyText:
    """One choice's text as its tokens come: all of it decoded each time (a token may end mid-character: a trailing
    replacement character waits for the next token), cut before the first stop sequence, holding back a tail that
    could still begin one."""

    def __init__(self, tokenizer, stop_tokens, stop):
        self.tokenizer, self.stop_tokens, self.stop = tokenizer, stop_tokens, stop
        self.tokens, self.text, self.sent, self.finish = [], "", 0, None

    def push(self, token):
        """The text now safe to send; sets finish = "stop" at a stop token or sequence."""
        if token in self.stop_tokens:
            self.finish = "stop"
            return self.rest()
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens)
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.finish = self.text[:min(cuts)], "stop"
            return self.rest()
        hold = len(self.text) - len(self.text.rstrip("\ufffd"))
        for s in self.stop:
            hold = max(hold, next((n for n in range(min(len(s) - 1, len(self.text)), 0, -1) if self.text.endswith(s[:n])), 0))
        piece = self.text[self.sent:len(self.text) - hold]
        self.sent += len(piece)
        return piece

    def rest(self):
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


# the sampling fields of a request: (type, check, message when the check fails)
REQUEST_FIELDS = {
    "temperature": ((int, float), lambda v: 0 <= v <= 2, "between 0 and 2"),
    "top_p": ((int, float), lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "0 (off) or more"),
    "min_p": ((int, float), lambda v: 0 <= v <= 1, "between 0 and 1"),
    "seed": (int, lambda v: True, ""),
    "stream": (bool, lambda v: True, ""),
    "model": (str, lambda v: True, ""),
}
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "tools": (None, []),
               "functions": (None, []), "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}  # fields accepted only at their off value


class Server:
    """The OpenAI-compatible server of one Engine: POST /v1/chat/completions, POST /v1/completions (text in, text
    out: for base models), GET /v1/models, GET /health, the chat page at /. Each of a request's n choices is a
    Stream of the engine's DecodeBatch, stepped by one thread; the choices of a request draw from one generator
    (its seed), so a request's tokens do not depend on the others in the batch. At most max_rows choices decode at
    once and max_queue more wait; beyond that a request gets 429. A request that runs past `timeout` seconds, or
    whose client disconnects, is cancelled (its rows freed at the next step). Omitted sampling fields take
    `defaults` (the run's --temperature, --top-k, --top-p, --min-p, --max-new-tokens)."""

    def __init__(self, engine, tokenizer, model_name, max_context, chat=True, max_rows=32, max_queue=64,
                 timeout=300.0, defaults=None):
        self.engine, self.tokenizer, self.model_name, self.chat = engine, tokenizer, model_name, chat
        self.max_context, self.max_rows, self.max_queue, self.timeout = max_context, max_rows, max_queue, timeout
        self.defaults = {**dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=256), **(defaults or {})}
        self.batch = engine.batch(max_context, max_rows)
        self.inbox = queue.Queue()  # Streams from the HTTP side, added to the batch by its thread
        self.outbox, self.http_loop = [], None  # (asyncio queue, item) from the decode thread, delivered per step
        self.lock, self.in_flight = threading.Lock(), 0  # choices accepted and not yet done
        self.created, self.thread, self.closed = int(time.time()), None, threading.Event()
        self.failures = 0
        self.app = self._app()

    # -- the decode thread --
    def start(self):
        self.thread = threading.Thread(target=self._loop, name="decode", daemon=True)
        self.thread.start()

    def close(self):
        self.closed.set()
        if self.thread is not None:
            self.thread.join()

    def _loop(self):
        while not self.closed.is_set():
            idle = not self.batch.slots and not self.batch.waiting
            try:
                while True:  # everything that arrived; wait for something only when idle
                    stream = self.inbox.get(timeout=0.05) if idle else self.inbox.get_nowait()
                    self.batch.add(stream)
                    idle = False
            except queue.Empty:
                pass
            try:
                self.batch.step()
            except Exception as e:  # e.g. out of memory: fail the requests in the batch, keep serving
                self.failures += 1
                print(f"serve: a decode step failed ({type(e).__name__}: {e}); its requests get a 500", flush=True)
                streams = [s for s in self.batch.slots if s is not None] + list(self.batch.waiting)
                self.batch = self.engine.batch(self.max_context, self.max_rows)
                for s in streams:
                    s.sample.stopped, s.cancelled = None, True  # None: failed
                    s.on_done()
            self._deliver()

    def _deliver(self):
        """Hand the step's tokens to the HTTP side: one wake-up of its event loop per step, not one per token."""
        if self.outbox:
            items, self.outbox = self.outbox, []
            self.http_loop.call_soon_threadsafe(lambda: [out.put_nowait(item) for out, item in items])

    def _done(self):
        with self.lock:
            self.in_flight -= 1

    # -- requests --
    def _params(self, body, n_prompt, prompt_field):
        """The request's sampling settings and n, max_tokens, stop, checked; RequestError on the first bad one."""
        if self.max_context - n_prompt < 1:
            raise RequestError(400, f"the prompt is {n_prompt} tokens; this model's context is {self.max_context} "
                               "tokens, prompt and reply together", prompt_field, "context_length_exceeded")
        for name, (off_none, off) in UNSUPPORTED.items():
            if body.get(name, off_none) not in (off_none, off):
                raise RequestError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
        p = {}
        for name, (kind, ok, want) in REQUEST_FIELDS.items():
            if body.get(name) is None:
                continue
            value = body[name]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or not ok(value):
                raise RequestError(400, f"'{name}' must be {want or kind.__name__}, got {json.dumps(value)[:40]}", name)
            p[name] = value
        if "model" in p and p["model"] != self.model_name:
            raise RequestError(404, f"model {p['model']!r} does not exist; this server serves {self.model_name!r}",
                               "model", "model_not_found")
        limit = self.max_context - n_prompt
        for name in ("max_tokens", "max_completion_tokens", "n"):
            value = body.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RequestError(400, f"'{name}' must be a positive integer, got {json.dumps(value)[:40]}", name)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and max_tokens > limit:
            raise RequestError(400, f"'max_tokens' {max_tokens} + the prompt's {n_prompt} tokens exceed this model's "
                               f"context of {self.max_context} tokens (at most {limit} here)", "max_tokens",
                               "context_length_exceeded")
        p["max_tokens"] = max_tokens or min(self.defaults["max_tokens"], limit)
        p["n"] = body.get("n") or 1
        if p["n"] > self.max_rows:
            raise RequestError(400, f"'n' is {p['n']}; this server decodes at most {self.max_rows} choices at once", "n")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and len(stop) <= SERVE_MAX_STOPS
                                     and all(isinstance(s, str) and s for s in stop)):
            raise RequestError(400, f"'stop' must be a text or a list of at most {SERVE_MAX_STOPS} non-empty texts", "stop")
        p["stop"] = stop or []
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
            raise RequestError(400, "'stream_options' must be {include_usage: boolean}", "stream_options")
        p["include_usage"] = bool((options or {}).get("include_usage"))
        return {**{k: v for k, v in self.defaults.items() if k != "max_tokens"}, **p}

    def _submit(self, prompt, p):
        """The request's n Streams, queued for the decode thread; tokens arrive as (choice, token) in the returned
        asyncio queue, (choice, None) when a choice is done."""
        with self.lock:
            if self.in_flight + p["n"] > self.max_rows + self.max_queue:
                raise RequestError(429, f"server busy: {self.in_flight} choices decoding or queued (at most "
                                   f"{self.max_rows} + {self.max_queue}); retry later", None, "server_busy",
                                   "rate_limit_error")
            self.in_flight += p["n"]
        self.http_loop, out = asyncio.get_running_loop(), asyncio.Queue()
        seed = p["seed"] if "seed" in p else int.from_bytes(os.urandom(8), "little") >> 1
        generator = torch.Generator(device=self.engine.rt.device).manual_seed(seed % (1 << 63))
        sampling = Sampling(p["temperature"], p["top_k"], p["top_p"], p["min_p"], generator)
        streams = []
        for j in range(p["n"]):
            def on_token(token, j=j):
                self.outbox.append((out, (j, token)))

            def on_done(j=j):
                self._done()
                self.outbox.append((out, (j, None)))

            streams.append(Stream(prompt, sampling, p["max_tokens"], on_token, on_done))
        for s in streams:
            self.inbox.put(s)
        return streams, out

    async def _choices(self, request, streams, out, p):
        """Yields (choice, text piece, finish_reason or None) as the request's choices (_submit's) decode; cancels
        them when the client goes away, the request times out or the generator is closed."""
        texts = [ReplyText(self.tokenizer, self.engine.stops, p["stop"]) for _ in streams]
        deadline, open_choices, check = time.monotonic() + self.timeout, len(streams), 0.0
        try:
            while open_choices:
                if time.monotonic() > check:  # a few times a second: is the client still there, is there time left?
                    if await request.is_disconnected():
                        return
                    if time.monotonic() > deadline:
                        raise RequestError(504, f"the request ran past the server's timeout of {self.timeout:g} s",
                                           None, "timeout", "timeout_error")
                    check = time.monotonic() + 0.2
                try:
                    j, token = await asyncio.wait_for(out.get(), timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                text, stream = texts[j], streams[j]
                if token is None:
                    open_choices -= 1
                    if stream.sample.stopped is None:
                        raise RequestError(500, "decoding failed on the server (its log says why)", None,
                                           "decode_failed", "server_error")
                    if text.finish is None:  # ran into max_tokens
                        text.finish = "stop" if stream.sample.stopped else "length"
                        yield j, text.rest(), text.finish
                    continue
                if text.finish is not None:
                    continue  # after a stop sequence: the row is being freed
                piece = text.push(token)
                if text.finish is not None:
                    stream.cancelled = True
                    yield j, piece, text.finish
                elif piece:
                    yield j, piece, None
        finally:
            for s in streams:
                s.cancelled = True  # a no-op for finished ones

    async def _respond(self, request, kind, prompt, p):
        from fastapi.responses import JSONResponse, StreamingResponse
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + os.urandom(12).hex()
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        streams, out = self._submit(prompt, p)  # 429 here, before any response
        choices = self._choices(request, streams, out, p)
        generated = lambda: sum(len(s.sample.tokens) for s in streams)
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": generated(),
                         "total_tokens": len(prompt) + generated()}
        if not p.get("stream"):
            texts, finishes = [""] * p["n"], [None] * p["n"]
            async for j, piece, finish in choices:
                texts[j] += piece
                finishes[j] = finish or finishes[j]
            choices = [{"index": j, "message": {"role": "assistant", "content": t}, "finish_reason": f} if kind == "chat"
                       else {"index": j, "text": t, "logprobs": None, "finish_reason": f}
                       for j, (t, f) in enumerate(zip(texts, finishes))]
            return JSONResponse({**head, "choices": choices, "usage": usage()})

        chunk_head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
        event = lambda obj: f"data: {json.dumps(obj)}\n\n"

        def chunk(j, piece, finish, first=False):
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                return event({**chunk_head, "choices": [{"index": j, "delta": delta, "finish_reason": finish}]})
            return event({**chunk_head, "choices": [{"index": j, "text": piece, "logprobs": None, "finish_reason": finish}]})

        try:  # the first token before the response starts: errors up to then are plain error responses
            first = await choices.__anext__()
        except StopAsyncIteration:
            first = None

        async def events():
            try:
                for j in range(p["n"] if kind == "chat" else 0):
                    yield chunk(j, "", None, first=True)
                if first:
                    yield chunk(*first)
                async for item in choices:
                    yield chunk(*item)
            except RequestError as e:  # a timeout or a failed step after streaming began: said in the stream
                yield event(e.body())
            finally:
                await choices.aclose()
            if p["include_usage"]:
                yield event({**chunk_head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.exceptions import HTTPException

        app = FastAPI(title="DecoderStack", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RequestError)
        async def refused(request, e):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(HTTPException)
        async def http_error(request, e):  # unknown paths and methods, in OpenAI's error shape too
            return JSONResponse(RequestError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                                status_code=e.status_code)

        async def body_of(request):
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON ({e})") from None
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            return body

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            body = await body_of(request)
            prompt = chat_prompt(self.tokenizer, body.get("messages"))
            return await self._respond(request, "chat", prompt, self._params(body, len(prompt), "messages"))

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await body_of(request)
            text, vocab = body.get("prompt"), self.tokenizer.vocab_size
            if isinstance(text, str):
                prompt = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]
            elif (isinstance(text, list) and text and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                          for t in text)):
                prompt = list(text)  # token ids, as given
            else:
                raise RequestError(400, f"'prompt' must be a text or a non-empty list of token ids below {vocab}", "prompt")
            return await self._respond(request, "text", prompt, self._params(body, len(prompt), "prompt"))

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "decoderstack", "max_context": self.max_context,
                                                "chat": self.chat}]}

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.model_name, "rows_live": self.batch.live, "rows": len(self.batch.slots),
                    "waiting": len(self.batch.waiting) + self.inbox.qsize(), "in_flight": self.in_flight,
                    "max_rows": self.max_rows, "max_queue": self.max_queue, "failed_steps": self.failures}

        @app.get("/")
        async def page():
            return HTMLResponse(CHAT_PAGE)

        return app


def serve_in_thread(server, host="127.0.0.1", port=0):
    """Start `server` (its decode thread and uvicorn) in the background: (base url, stop()). port 0: a free one."""
    import uvicorn
    http = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, name="http", daemon=True)
    server.start()
    thread.start()
    while not http.started:
        if not thread.is_alive():
            server.close()
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    port = http.servers[0].sockets[0].getsockname()[1]

    def stop():
        http.should_exit = True
        thread.join()
        server.close()

    return f"http://{host}:{port}", stop


# The chat page at /: plain HTML + JS, nothing fetched from elsewhere (works offline). It streams replies from
# /v1/chat/completions, keeps the turns until "New chat", and shows calculator calls as "calc: expr = result".
CHAT_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>DecoderStack chat</title>
<link rel="icon" href="data:,">
<style>
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background: #f4f4f6; color: #1d1d22; }
  main { max-width: 760px; margin: 0 auto; height: 100vh; height: 100dvh; display: flex; flex-direction: column; padding: 0 10px; }
  header { display: flex; align-items: center; gap: 8px; padding: 10px 0; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 16px; margin: 0; }
  #model { flex: 1; color: #666; font-size: 13px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  details { font-size: 13px; padding: 6px 0; }
  summary { cursor: pointer; color: #555; }
  .settings { display: flex; flex-wrap: wrap; gap: 8px 14px; padding-top: 6px; }
  .settings label { display: flex; align-items: center; gap: 4px; }
  .settings input { width: 72px; padding: 3px 5px; border: 1px solid #ccc; border-radius: 5px; }
  #messages { flex: 1; overflow-y: auto; padding: 10px 0; display: flex; flex-direction: column; gap: 8px; }
  .msg { max-width: 88%; padding: 8px 12px; border-radius: 12px; white-space: pre-wrap; overflow-wrap: anywhere; }
  .msg.user { align-self: flex-end; background: #2f6fed; color: #fff; }
  .msg.assistant { align-self: flex-start; background: #fff; border: 1px solid #e2e2e6; }
  .msg.assistant.streaming::after { content: ""; display: inline-block; width: 7px; height: 7px; border-radius: 50%; background: #aaa; margin-left: 5px; }
  .msg.error { align-self: stretch; background: #fdecec; color: #a11; border: 1px solid #f3c2c2; font-size: 13px; }
  .calc { display: inline-block; max-width: 100%; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; background: #eef1f7; border-radius: 4px; padding: 0 4px; }
  form { display: flex; gap: 6px; padding: 8px 0 12px; border-top: 1px solid #ddd; }
  textarea { flex: 1; resize: none; font: inherit; padding: 8px 10px; border: 1px solid #ccc; border-radius: 8px; min-height: 42px; max-height: 160px; }
  button { font: inherit; padding: 6px 12px; border: 1px solid #ccc; border-radius: 8px; background: #fff; cursor: pointer; }
  button:disabled { opacity: .45; cursor: default; }
  #send { background: #2f6fed; border-color: #2f6fed; color: #fff; }
</style>
</head>
<body>
<main>
  <header>
    <h1>DecoderStack</h1>
    <span id="model">connecting&hellip;</span>
    <button id="new-chat" type="button">New chat</button>
  </header>
  <details id="settings">
    <summary>Settings</summary>
    <div class="settings">
      <label>temperature <input id="temperature" type="number" min="0" step="0.1" value="0.8"></label>
      <label>top_k <input id="top-k" type="number" min="0" step="1" value="50"></label>
      <label>top_p <input id="top-p" type="number" min="0" max="1" step="0.05" value="1.0"></label>
      <label>max_tokens <input id="max-tokens" type="number" min="1" step="1" value="256"></label>
    </div>
  </details>
  <div id="messages" aria-live="polite"></div>
  <form id="composer">
    <textarea id="input" rows="1" placeholder="Message" title="Enter sends, Shift+Enter: new line" autofocus></textarea>
    <button id="send" type="submit">Send</button>
    <button id="stop" type="button" disabled>Stop</button>
  </form>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const chat = { model: null, messages: [], controller: null };  // messages: the OpenAI conversation so far
const MARK = /(<[|](?:python|output)_(?:start|end)[|]>)/;
const CR = String.fromCharCode(13), LF = String.fromCharCode(10);  // no backslash in this page: Python embeds it as is

// Model text -> DOM nodes (text only, never innerHTML); calculator calls become "calc: expr = result".
function renderContent(el, text) {
  el.replaceChildren();
  let calc = null, mode = "text";
  const show = () => { calc.span.textContent = "calc: " + calc.expr + (calc.out === null ? "" : " = " + calc.out); };
  for (const part of text.split(MARK)) {
    if (part === "<|python_start|>") {
      calc = { span: document.createElement("span"), expr: "", out: null };
      calc.span.className = "calc";
      el.append(calc.span);
      mode = "expr";
      show();
    } else if (part === "<|python_end|>" && mode === "expr") mode = "after";
    else if (part === "<|output_start|>" && mode === "after") { mode = "out"; calc.out = ""; show(); }
    else if (part === "<|output_end|>" && mode === "out") mode = "text";
    else if (part) {
      if (mode === "expr") { calc.expr += part; show(); }
      else if (mode === "out") { calc.out += part; show(); }
      else { mode = "text"; el.append(document.createTextNode(part)); }
    }
  }
}

function addMessage(cls, text) {
  const el = document.createElement("div");
  el.className = "msg " + cls;
  renderContent(el, text);
  $("messages").append(el);
  scrollDown();
  return el;
}
function fitInput() { const t = $("input"); t.style.height = "auto"; t.style.height = t.scrollHeight + 2 + "px"; }
function scrollDown() { const m = $("messages"); m.scrollTop = m.scrollHeight; }
function setBusy(busy) { $("send").disabled = busy; $("stop").disabled = !busy; }

function settings() {
  const num = (id, parse, fallback) => { const v = parse($(id).value); return Number.isFinite(v) ? v : fallback; };
  return { max_tokens: num("max-tokens", parseInt, 256), temperature: num("temperature", parseFloat, 0.8),
           top_k: num("top-k", parseInt, 50), top_p: num("top-p", parseFloat, 1.0) };
}

async function errorMessage(res) {
  try { const body = await res.json(); if (body && body.error && body.error.message) return body.error.message; } catch (e) {}
  return "HTTP " + res.status + " " + res.statusText;
}

// Read server-sent events: "data: {json}" events separated by blank lines, ending with "data: [DONE]".
async function readEvents(res, onData) {
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "", done = false;
  try {
    while (!done) {
      const chunk = await reader.read();
      done = chunk.done;
      buffer = (buffer + decoder.decode(chunk.value || new Uint8Array(), { stream: !done })).split(CR + LF).join(LF);
      const events = buffer.split(LF + LF);
      buffer = done ? "" : events.pop();
      for (const event of events) {
        const lines = event.split(LF).filter((l) => l.startsWith("data:"));
        const data = lines.map((l) => l.slice(5).replace(/^ /, "")).join(LF);
        if (data === "[DONE]") return;
        if (data) onData(JSON.parse(data));
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function send() {
  const text = $("input").value;
  if (chat.controller || !text.trim()) return;
  $("input").value = "";
  fitInput();
  const turn = { role: "user", content: text }, reply = { role: "assistant", content: "" };
  chat.messages.push(turn);
  const userEl = addMessage("user", text), botEl = addMessage("assistant streaming", "");
  const controller = chat.controller = new AbortController();
  setBusy(true);
  let failure = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: controller.signal,
      body: JSON.stringify({ model: chat.model || "default", messages: chat.messages, stream: true, ...settings() }),
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message || "error");
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) { reply.content += delta.content; renderContent(botEl, reply.content); scrollDown(); }
    });
  } catch (e) {
    if (e.name !== "AbortError") failure = e.message || String(e);
  }
  if (chat.controller !== controller) return;  // "New chat" took over: it already cleared everything
  chat.controller = null;
  botEl.classList.remove("streaming");
  if (reply.content) chat.messages.push(reply);
  else {  // nothing came back: undo the turn and give the text back
    chat.messages.splice(chat.messages.indexOf(turn), 1);
    userEl.remove(); botEl.remove();
    if (!$("input").value) { $("input").value = text; fitInput(); }
  }
  if (failure) addMessage("error", failure);
  setBusy(false);
  $("input").focus();
}

function stop() { if (chat.controller) chat.controller.abort(); }
function newChat() {
  const c = chat.controller;
  chat.controller = null;
  if (c) c.abort();
  chat.messages = [];
  $("messages").replaceChildren();
  setBusy(false);
  $("input").focus();
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("input", fitInput);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);

fetch("/v1/models").then(async (res) => {
  if (!res.ok) throw new Error(await errorMessage(res));
  const body = await res.json();
  chat.model = body.data[0].id;
  $("model").textContent = chat.model;
}).catch((e) => { $("model").textContent = "no model (" + e.message + ")"; });
</script>
</body>
</html>
"""


# =============================================================================================================
# 15. Export: a checkpoint as a Hugging Face folder (transformers, trust_remote_code=True), and its upload
#
# The folder holds our weights as they are, the code that runs them (HF_MODELING: this file's GPT for transformers,
# kept here as text so the stack stays one file; nothing here imports transformers) and our tokenizer in the HF
# format. tests/test_export.py checks that transformers computes the stack's logits, tokens and greedy samples.

HF_MODELING = r'''
"""DecoderStack's GPT for transformers (AutoModelForCausalLM with trust_remote_code=True), written by the stack's
--phases export beside the weights it exported. It computes what the stack's GPT.hidden and GPT.logits compute (the
same parameter names, so the stack's state dict loads as it is) on one document per row: position 0 and no previous
token at a row's first token, as the stack's Engine decodes a prompt. Rows are not padded: a batch is rows of equal
length, and an attention_mask, if given, must be all ones.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

GATE_DIMS = 12  # the gates (smear, attention, value embedding) read the first 12 dims of their input


class DecoderStackConfig(PretrainedConfig):
    """The stack's ModelConfig (state.json "model"), field for field, plus the special ids generate needs."""
    model_type = "decoderstack"
    attribute_map = {"num_hidden_layers": "n_layers", "hidden_size": "model_dim", "num_attention_heads": "n_heads"}

    vocab_size: int = 32768
    n_layers: int = 11
    model_dim: int = 768
    n_heads: int = 6
    head_dim: int = 128
    mlp_mult: int = 4
    vocab_multiple: int = 128
    long_window_layers: str = "3,10"
    value_embed_layers: str = "1,2,8,9,10"
    bigram_rows_per_vocab: float = 7.5
    attn_scale: float = 0.1
    softcap: list | tuple = (23.0, 5.0, 7.5)
    short_window: int = 768
    long_window: int = 1664
    max_doc_len: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False  # lm_head and embed are both stored; the `tied` buffer says which one embeds


def parse_ints(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


def norm(x):
    """RMS norm computed in fp32, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)


def softcap(logits, cap):
    """The logits the model predicts with (fp32): A * sigmoid((z + B) / C)."""
    a, b, c = cap
    return a * torch.sigmoid((logits.float() + b) / c)


class Rotary(nn.Module):
    """Half-truncated RoPE with the trained frequencies (a buffer: YaRN may have stretched them)."""

    def __init__(self, head_dim):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(head_dim // 2), persistent=True)

    def forward(self, x, positions):
        angles = positions.float()[..., None] * self.freqs.float()
        cos, sin = angles.cos()[..., None, :].to(x.dtype), angles.sin()[..., None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, config, layer_idx, has_value_embed):
        super().__init__()
        inner, dim = config.n_heads * config.head_dim, config.model_dim
        self.layer_idx, self.n_heads, self.head_dim = layer_idx, config.n_heads, config.head_dim
        self.q, self.k, self.v = (nn.Parameter(torch.zeros(inner, dim)) for _ in range(3))
        self.o = nn.Parameter(torch.zeros(dim, inner))
        self.fc = nn.Parameter(torch.zeros(config.mlp_mult * dim, dim))
        self.proj = nn.Parameter(torch.zeros(dim, config.mlp_mult * dim))
        self.attn_gate = nn.Parameter(torch.zeros(config.n_heads, GATE_DIMS))
        self.ve_gate = nn.Parameter(torch.zeros(config.n_heads, GATE_DIMS)) if has_value_embed else None

    def forward(self, x, ve, rotary, positions, scale, window, cache):
        """x: (B, S, dim) new tokens at `positions` (B, S); cache: a transformers Cache holding the earlier ones, or
        None. A query at position i sees the keys at positions j with 0 <= i - j <= window (the stack's mask)."""
        h = norm(x)
        heads = (*x.shape[:-1], self.n_heads, self.head_dim)
        q, k, v = (h @ self.q.T).view(heads), (h @ self.k.T).view(heads), (h @ self.v.T).view(heads)
        q, k = rotary(norm(q), positions), rotary(norm(k), positions)  # QK-norm, then rotate
        if ve is not None:
            v = v + 2 * torch.sigmoid(h[..., :GATE_DIMS] @ self.ve_gate.T)[..., None] * ve.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D): the layout of transformers' caches
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        key_positions = torch.arange(k.size(2), device=x.device)
        gap = positions[:, None, :, None] - key_positions  # (B, 1, S, T): query position minus key position
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(gap >= 0) & (gap <= window), scale=scale)
        y = y.transpose(1, 2) * torch.sigmoid(h[..., :GATE_DIMS] @ self.attn_gate.T)[..., None]
        x = x + y.flatten(-2) @ self.o.T
        return x + torch.relu(norm(x) @ self.fc.T).square() @ self.proj.T


class DecoderStackForCausalLM(PreTrainedModel, GenerationMixin):
    """The stack's GPT: smear gate, bigram hash embedding, value embeddings, U-net skips, block lambdas, QK-norm,
    half-truncated RoPE, per-layer sliding windows, attention gates, relu^2 MLP, softcapped logits over vocab_size
    (the embedding tables have padded rows that no id reaches). Activations are in the weights' dtype; norms, RoPE
    angles and logits are fp32.

    forward(input_ids (B, S), cache=None, last_ids=None, ...): with a cache holding a row's first n tokens, input_ids
    are its tokens n, n+1, ...; last_ids (B,) are the tokens before them (token n-1), which the smear gate and the
    bigram hash read. generate passes them itself (prepare_inputs_for_generation); they are needed whenever the
    cache is not empty."""
    config_class = DecoderStackConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    # loaded in bf16 or fp16 too, the trained frequencies and attention scale stay fp32, as in the stack (whose
    # buffers stay fp32 under autocast): a bf16 frequency is off by up to 0.4%, radians at position 1000
    _keep_in_fp32_modules_strict = ["rotary", "attn_scale"]

    def __init__(self, config):
        super().__init__(config)
        padded = -(-config.vocab_size // config.vocab_multiple) * config.vocab_multiple
        dim, L, inner = config.model_dim, config.n_layers, config.n_heads * config.head_dim
        self.value_embed_layers = [i for i in parse_ints(config.value_embed_layers) if i < L]
        long_layers = set(i for i in parse_ints(config.long_window_layers) if i < L)
        self.windows = [config.long_window if i in long_layers else config.short_window for i in range(L)]
        self.blocks = nn.ModuleList(Block(config, i, i in self.value_embed_layers) for i in range(L))
        self.lm_head = nn.Parameter(torch.zeros(padded, dim))
        self.embed = nn.Parameter(torch.zeros(padded, dim))
        self.value_embeds = nn.Parameter(torch.zeros(len(self.value_embed_layers), padded, inner))
        self.bigram_rows = max(2, int(config.bigram_rows_per_vocab * config.vocab_size))
        self.bigram_embed = nn.Parameter(torch.zeros(self.bigram_rows, dim))
        self.smear_gate = nn.Parameter(torch.zeros(GATE_DIMS))
        self.block_lambdas = nn.Parameter(torch.zeros(L, 3))
        self.skip_weights = nn.Parameter(torch.zeros(L // 2))
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.rotary = Rotary(config.head_dim)
        self.register_buffer("attn_scale", torch.tensor(float(config.attn_scale)))  # grown by YaRN in training
        self.register_buffer("tied", torch.tensor(True))  # lm_head embeds too until training untied them
        self.post_init()

    def bigram_ids(self, ids, prev_ids):
        """Hash of (previous token, token); a document start (prev_ids < 0) gets the reserved last row."""
        h = ((36313 * ids) ^ (27191 * prev_ids.clamp(min=0))) % (self.bigram_rows - 1)
        return torch.where(prev_ids < 0, self.bigram_rows - 1, h)

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, last_ids=None, logits_to_keep=0,
                **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("DecoderStack models take unpadded rows: attention_mask must be all ones")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        B, S = input_ids.shape
        if last_ids is None:
            if past:
                raise ValueError("with a non-empty cache, pass last_ids: each row's token before input_ids")
            last_ids = input_ids.new_full((B,), -1)
        prev_ids = torch.cat([last_ids.view(B, 1).to(input_ids), input_ids[:, :-1]], dim=1)
        positions = past + torch.arange(S, device=input_ids.device).expand(B, S)

        embed = self.lm_head if bool(self.tied) else self.embed
        e = F.embedding(input_ids, embed)
        # smear: each token takes a gated share of the previous token's embedding (none at the document start)
        before = F.embedding(prev_ids.clamp(min=0), embed)
        before = torch.where((prev_ids >= 0)[..., None], before, torch.zeros_like(before))
        e = e + self.smear_lambda * torch.sigmoid(e[..., :GATE_DIMS] @ self.smear_gate)[..., None] * before
        x = x0 = norm(e)
        bigram = F.embedding(self.bigram_ids(input_ids, prev_ids), self.bigram_embed)
        skips, L, scale = [], self.config.n_layers, float(self.attn_scale)
        for i, block in enumerate(self.blocks):
            if i >= L - L // 2 and skips:  # U-net: the first half's outputs feed the second half, mirrored
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            a, b, c = self.block_lambdas[i]
            x = a * x + b * x0 + c * bigram
            ve = (F.embedding(input_ids, self.value_embeds[self.value_embed_layers.index(i)])
                  if i in self.value_embed_layers else None)
            x = block(x, ve, self.rotary, positions, scale, self.windows[i], cache)
            if i < L // 2:
                skips.append(x)
        h = norm(x)[:, -logits_to_keep:] if logits_to_keep else norm(x)
        logits = softcap(h @ self.lm_head[:self.config.vocab_size].T, self.config.softcap)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """transformers' inputs (the new tokens, the cache) plus last_ids: the token before the new ones, which the
        full sequence generate holds still has."""
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        before = input_ids.size(1) - inputs["input_ids"].size(1)
        if before > 0:
            inputs["last_ids"] = input_ids[:, before - 1]
        return inputs
'''

# The chat format of data/tokenizer.py's render_conversation as a transformers chat template: a leading system message
# merged into the first user message, user/assistant alternating, an assistant's content a string or a list of parts
# (text, python, python_output), and {% generation %} around what SFT supervises (return_assistant_tokens_mask gives
# render_conversation's mask). Every tag trims the whitespace around it: the template's own layout renders nothing.
HF_CHAT_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- if messages | length < 2 or messages[1]['role'] != 'user' -%}
    {{- raise_exception('a system message must be followed by a user message') -}}
  {%- endif -%}
  {%- set merged = messages[0]['content'] + '\n\n' + messages[1]['content'] -%}
  {%- set messages = [{'role': 'user', 'content': merged}] + messages[2:] -%}
{%- endif -%}
{{- '<|bos|>' -}}
{%- for message in messages -%}
  {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
    {{- raise_exception('roles must alternate user/assistant, from user (after an optional system message)') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- if message['content'] is not string -%}
      {{- raise_exception('user content must be a string') -}}
    {%- endif -%}
    {{- '<|user_start|>' + message['content'] + '<|user_end|>' -}}
  {%- else -%}
    {{- '<|assistant_start|>' -}}
    {%- set parts = message['content'] -%}
    {%- if parts is string -%}
      {%- set parts = [{'type': 'text', 'text': parts}] -%}
    {%- endif -%}
    {%- for part in parts -%}
      {%- if part['type'] == 'text' -%}
        {%- generation -%}{{- part['text'] -}}{%- endgeneration -%}
      {%- elif part['type'] == 'python' -%}
        {%- generation -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}{%- endgeneration -%}
      {%- elif part['type'] == 'python_output' -%}
        {{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
      {%- else -%}
        {{- raise_exception('unknown content part type ' + part['type']) -}}
      {%- endif -%}
    {%- endfor -%}
    {%- generation -%}{{- '<|assistant_end|>' -}}{%- endgeneration -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant_start|>' -}}
{%- endif -%}
"""
HF_STOPS = ("<|assistant_end|>", "<|bos|>")  # where the Engine stops a sample: generate's eos_token_id


class ExportError(DataFormatError):
    """The export could not be written or uploaded; the message says where and why."""


def byte_level_chars():
    """GPT-2's byte -> character table, the alphabet of byte-level BPE vocabularies: the printable Latin-1 bytes
    ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF) stand for themselves, the other 68 (controls, space, soft hyphen,
    ...) for U+0100 onwards, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def hf_tokenizer_json(tokenizer):
    """Our tokenizer in the HF tokenizers format (tokenizer.json): byte-level BPE over the tiktoken ranks, the special
    tokens as added tokens with their ids, <|bos|> prepended (every document starts with it) unless
    add_special_tokens=False. tiktoken merges, within a piece of the split pattern, the adjacent pair whose
    concatenation has the lowest rank, and takes a piece that is a token whole; HF's BPE merges the listed pair of
    lowest index. So every split of a token into two tokens is listed, in the order of the token's rank, and
    ignore_merges takes whole tokens: the same ids."""
    chars = byte_level_chars()
    n_ranks = min(tokenizer.special_tokens.values())  # the ranks are 0..n-1, then the special tokens
    pieces = [tokenizer.enc.decode_single_token_bytes(i) for i in range(n_ranks)]
    ranks = {piece: i for i, piece in enumerate(pieces)}
    text = lambda piece: "".join(chars[b] for b in piece)
    merges = sorted((rank, ranks[piece[:k]], ranks[piece[k:]]) for rank, piece in enumerate(pieces)
                    for k in range(1, len(piece)) if piece[:k] in ranks and piece[k:] in ranks)
    bos = {"SpecialToken": {"id": "<|bos|>", "type_id": 0}}
    doc = lambda name: {"Sequence": {"id": name, "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for name, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        # the pattern isolates the pieces tiktoken splits text into; ByteLevel then only maps bytes to characters
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {
            "type": "TemplateProcessing", "single": [bos, doc("A")], "pair": [bos, doc("A"), bos, doc("B")],
            "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [tokenizer.bos_id], "tokens": ["<|bos|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(piece): i for i, piece in enumerate(pieces)},
                  "merges": [[text(pieces[left]), text(pieces[right])] for _, left, right in merges]},
    }


def hf_tokenizer_files(tokenizer):
    """{file name: text} of the tokenizer folder AutoTokenizer loads: tokenizer.json (hf_tokenizer_json) and
    tokenizer_config.json (eos <|assistant_end|>, the chat template)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
              "clean_up_tokenization_spaces": False,  # decode gives back the text, spaces as they were
              "chat_template": HF_CHAT_TEMPLATE.strip()}
    return {"tokenizer.json": json.dumps(hf_tokenizer_json(tokenizer), ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}


def hf_model_card(model_name, cfg):
    """README.md: what the model is and how transformers loads it (the Hub shows it as the model's page)."""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [decoderstack, custom_code]
---
# {model_name}

A DecoderStack model ({cfg.n_layers} layers, model dim {cfg.model_dim}, {cfg.n_heads} heads of {cfg.head_dim},
vocabulary {cfg.vocab_size}; sliding windows {cfg.short_window} / {cfg.long_window}), exported by `--phases export`. Its
code is modeling_decoderstack.py, so it loads with `trust_remote_code=True`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # it reads config.json, whose class is ours
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Hello"}}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0, ids.size(1):]))
```

Rows are not padded (batches of equal-length rows); the tokenizer prepends `<|bos|>` to plain text, as every training
document starts with it. The chat template renders our chat format; pass `sanitize_control_tokens=True` to encode
special-token text inside messages as text, as the stack does.
"""


def export_hf(model, tokenizer, out_dir, model_name="decoderstack"):
    """Write a Hugging Face folder of `model` to out_dir: config.json (the ModelConfig, auto_map to
    modeling_decoderstack.py), model.safetensors (the state dict as it is), the modeling file, the tokenizer files,
    generation_config.json (eos: the Engine's stops) and a model card. Written into out_dir.tmp and moved into place
    whole, so a failure leaves out_dir as it was (absent, or the previous export) and no .tmp. Returns
    {file name: bytes}."""
    from safetensors.torch import save_file
    if model.vocab_size != tokenizer.vocab_size:
        raise ExportError(f"{out_dir}: the model has {model.vocab_size} tokens, the tokenizer {tokenizer.vocab_size}")
    cfg, special = model.cfg, tokenizer.special
    stops = [special(name) for name in HF_STOPS]
    config = {"architectures": ["DecoderStackForCausalLM"], "model_type": "decoderstack",
              "auto_map": {"AutoConfig": "modeling_decoderstack.DecoderStackConfig",
                           "AutoModelForCausalLM": "modeling_decoderstack.DecoderStackForCausalLM"},
              **dataclasses.asdict(cfg), "bos_token_id": tokenizer.bos_id, "eos_token_id": stops, "dtype": "float32"}
    # pad = a stop: generate takes prompt tokens equal to a pad id that is no eos for padding (pad <|bos|> would
    # mask every document start)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops, "pad_token_id": stops[0]}
    texts = {"config.json": json.dumps(config, indent=1) + "\n",
             "generation_config.json": json.dumps(generation, indent=1) + "\n",
             "modeling_decoderstack.py": HF_MODELING.lstrip(), "README.md": hf_model_card(model_name, cfg),
             **hf_tokenizer_files(tokenizer)}
    out_dir = os.path.abspath(out_dir)
    tmp, old = out_dir + ".tmp", out_dir + ".old.tmp"  # .tmp: what claim_run_dir also clears as a crash's leftovers
    for stale in (tmp, old):  # what an export killed half-way left
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.makedirs(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, text in texts.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.isdir(out_dir):  # a directory cannot be renamed over a non-empty one: park the previous export
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except OSError as e:  # e.g. a full disk
        if os.path.isdir(old) and not os.path.exists(out_dir):
            os.rename(old, out_dir)
        raise ExportError(f"{out_dir}: could not write the export ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return {name: os.path.getsize(os.path.join(out_dir, name)) for name in sorted(os.listdir(out_dir))}


def push_to_hub(out_dir, repo):
    """Upload an export_hf folder to the model repo `repo` (ORG/NAME, created if missing); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=out_dir, repo_id=repo, commit_message=f"Upload {os.path.basename(out_dir)}")
    except (OSError, HFValidationError) as e:  # HTTP, connection and offline-mode errors are all OSErrors
        raise ExportError(f"hf://{repo}: {e} (the export is complete in {out_dir})") from None
    return f"https://huggingface.co/{repo}"


# =============================================================================================================
# 16. Phases and main


def phase_data(cfg, rt, log):
    """Check every part of a prepared data directory and print what it holds."""
    t0 = time.time()
    data = pretrain_data(cfg.data_dir, cfg.vocab_size, cfg.bos_id)
    ours = os.path.isfile(os.path.join(cfg.data_dir, "pretrain", "manifest.json"))
    log(f"pretraining data: vocab {data.vocab_size}, bos {data.bos_id}; {data.origin}")
    for split, paths in (("val", data.val), ("train", data.train)):
        if ours:
            pretrain_shards(cfg.data_dir, data.tokenizer, split, check_sha256=True)
        n = sum(len(read_token_file(p, data.vocab_size)) for p in paths)
        log(f"pretrain/{split}: {len(paths)} shards, {n:,} tokens")
    if data.val_sources:
        log("val documents: " + ", ".join(f"{name} {n:,}" for name, n in data.val_sources))
    if not ours:
        log(f"{cfg.data_dir}: llm.c shards, read for pretraining and its val loss; CORE, SFT and chat need data/prepare.py")
        return
    tokenizer = data.tokenizer
    log(f"tokenizer: vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, {len(tokenizer.special_tokens)} special tokens")
    core = load_core(cfg.data_dir, tokenizer)
    log(f"core: {len(core.tasks)} tasks, {len(core.examples):,} examples, {len(core.tokens):,} tokens (max_len {core.max_len})")
    for split in ("val", "train"):
        sft = load_sft(cfg.data_dir, tokenizer, split)
        log(f"sft/{split}: {len(sft.convs) - 1:,} conversations, {len(sft.tokens):,} tokens, {int(sft.mask.sum()):,} supervised")
    for name in ("chat_eval", "rl"):
        chat = load_chat_eval(cfg.data_dir, tokenizer, name)
        log(f"{name}: " + ", ".join(f"{t['name']} {t['n_examples']}" for t in chat.tasks))
    log(f"data directory {cfg.data_dir} is complete and consistent ({time.time() - t0:.1f}s)")


def phase_pt(cfg, rt, log):
    require_training_dtype(rt, "pt")
    data = pretrain_data(cfg.data_dir, cfg.vocab_size, cfg.bos_id)
    log(f"data: {len(data.train)} train and {len(data.val)} val shards; {data.origin}")
    torch.manual_seed(cfg.seed)
    model = GPT(ModelConfig.of(cfg, data.vocab_size)).to(rt.device)
    opt = make_optimizer(model, cfg)
    stages = scaled_stages(cfg)
    total = total_steps(stages)
    loader = PretrainLoader(data.train, data, rt.rank, rt.world_size)
    start = resumed_step(cfg, "pt", model, opt, loader, log)
    if not start and cfg.init_from:
        load_checkpoint(cfg.init_from, model)
        log(f"initialized from {cfg.init_from}")
    n_params = sum(p.numel() for p in model.parameters())
    n_matrix = sum(p.numel() for n, p in model.named_parameters() if param_label(n) in ("attn", "mlp_fc", "mlp_proj"))
    log(f"model: {n_params:,} parameters ({n_matrix:,} in NorMuon matrices), {total} steps, attention backend {rt.backend}, "
        f"device {rt.device}, activations {rt.precision or rt.dtype}, world size {rt.world_size}")
    loss_fn, compile_s, graphs = train_loss, 0.0, 0
    if cfg.compile:
        loss_fn = torch.compile(train_loss)
        compile_s, graphs = warm_up_compiled(loss_fn, model, cfg, rt, stages, loader, start)
        log(f"compiled {graphs} graphs for steps {start}-{total} in {compile_s:.1f}s, before the timed loop")
    peak = peak_flops(rt.device, rt.dtype)
    timer, pending, val, flops, last = LoopTimer(), [], None, 0, None
    for step, p, T, accum, grow, untie in pretrain_steps(cfg, stages, rt.world_size, start):
        if grow:
            model.grow_window(*grow)
        if untie and model.is_tied:
            model.untie()
            opt.copy_state("lm_head", "embed")
        windows = model.windows(p.short_window, p.long_window)
        step_loss = torch.zeros((), device=rt.device)
        mtp_weights = to_device(p.mtp_weights, torch.float32, rt.device)
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
            val = evaluate_bpb(model, data, rt, windows, p.max_doc_len, cfg.micro_batch_tokens, **full)
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
        **val_metrics(val), "train_tokens": sum(s.steps * s.batch_tokens for s in stages), "params": n_params, "params_matrix": n_matrix,
        "tok_per_s": timed_tokens / timer.total, "device": str(rt.device), "attn_backend": rt.backend,
        "world_size": rt.world_size, "pt_train_time_s": timer.total, "pt_compile_time_s": compile_s,
        "pt_compile_graphs": graphs, "peak_memory_gib": peak_memory_gib(rt.device)})


def phase_eval(cfg, rt, log):
    """Bits per byte over every val token, and CORE, of a trained model."""
    data = pretrain_data(cfg.data_dir, cfg.vocab_size, cfg.bos_id)
    model, _, path = trained_model(cfg, rt, data)
    windows = model.windows()
    log(f"evaluating {path}")
    t0 = time.time()
    val = evaluate_bpb(model, data, rt, windows, model.cfg.max_doc_len, cfg.micro_batch_tokens, first=cfg.val_final_tokens)
    log(val_line(val))
    metrics = val_metrics(val)
    if data.tokenizer is None or not os.path.isdir(os.path.join(cfg.data_dir, "core")):
        log(f"no CORE: {cfg.data_dir} has no core/ (data/core_shards.py writes it, with our tokenizer/ beside it)")
    else:
        core = load_core(cfg.data_dir, data.tokenizer)
        out = evaluate_core(model, core, rt, windows, cfg.core_max_per_task, cfg.core_batch_tokens)
        log(task_table(out, core.tasks, "label", "CORE"))
        metrics.update({"core": out["core"], "core_per_task": out["centered"], "core_max_per_task": cfg.core_max_per_task})
    log(f"eval took {time.time() - t0:.0f}s")
    update_metrics(cfg, rt, metrics)


def phase_sft(cfg, rt, log):
    """Fine-tune the latest model (or --init-from) on the SFT conversations with a fresh optimizer."""
    require_training_dtype(rt, "sft")
    tokenizer = data_tokenizer(cfg.data_dir)
    model, _, path = trained_model(cfg, rt, tokenizer)  # the checkpoint's architecture and final windows
    windows = model.windows()
    opt = make_optimizer(model, dataclasses.replace(cfg, muon_lr=cfg.muon_lr * cfg.sft_lr_mul, adam_lr=cfg.adam_lr * cfg.sft_lr_mul))
    train, val = load_sft(cfg.data_dir, tokenizer, "train"), load_sft(cfg.data_dir, tokenizer, "val")
    loader = SFTLoader(train, tokenizer, rt.rank, rt.world_size, cfg.seed)
    total = cfg.sft_steps
    T, accum = micro_batch(cfg.sft_batch_tokens, cfg.micro_batch_tokens, rt.world_size, "sft")
    start = resumed_step(cfg, "sft", model, opt, loader, log)
    log(f"sft: from {path}, {total} steps of {cfg.sft_batch_tokens:,} tokens, {len(train.convs) - 1:,} train conversations "
        f"({len(train.tokens):,} tokens), lr x{cfg.sft_lr_mul}")
    loss_fn = torch.compile(sft_loss) if cfg.compile else sft_loss
    chat = load_chat_eval(cfg.data_dir, tokenizer) if cfg.sft_chat_max_per_task > 0 else None

    def evaluate(step):
        val_loss = evaluate_sft_loss(model, val, rt, windows, cfg.sft_val_tokens, T)
        log(f"sft step {step}/{total} val loss {val_loss:.4f}")
        log.metrics(step, {"sft/val_loss": val_loss})
        if chat is not None and step > 0:  # the base model cannot chat yet: nothing to learn from its score
            out = evaluate_chat(model, chat, tokenizer, rt, windows, cfg.sft_chat_max_per_task, cfg.core_batch_tokens,
                                cfg.chat_batch_size, cfg.chat_max_new_tokens, cfg.sandbox, cfg.decode_compile)
            log(f"sft step {step}/{total} chatcore {out['chatcore']:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in out["results"].items()))
            log.metrics(step, {"sft/chatcore": out["chatcore"]})
            update_metrics(cfg, rt, {"sft_chatcore": out["chatcore"], "sft_chat_per_task": out["results"]})
        return val_loss

    if start == 0:
        update_metrics(cfg, rt, {"sft_val_loss_init": evaluate(0)})
    timer, pending, last = LoopTimer(), [], None
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
        lr = sft_lr_factor(cfg, step, total)
        opt.step(lr, muon_momentum(step, total, warmup=cfg.sft_momentum_warmup, cooldown=0))
        opt.zero_grad()
        timer.step(cfg.sft_batch_tokens)
        last, final = step, step == total - 1
        logging = step % cfg.log_every == 0 or final
        evaluating = (step + 1) % cfg.sft_eval_every == 0 and not final
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
    if last is None:
        log(f"sft: nothing to do: run already at step {start} of {total}")
        return
    update_metrics(cfg, rt, {"sft_val_loss": evaluate(total), "sft_steps": total, "sft_train_time_s": timer.total})


def phase_chat(cfg, rt, log):
    """Chat evaluation (ARC, MMLU, GSM8K; ChatCORE) of the latest checkpoint or --init-from."""
    tokenizer = data_tokenizer(cfg.data_dir)
    model, _, path = trained_model(cfg, rt, tokenizer)
    windows = model.windows()
    chat = load_chat_eval(cfg.data_dir, tokenizer)
    log(f"chat evaluation of {path}")
    t0 = time.time()
    out = evaluate_chat(model, chat, tokenizer, rt, windows, cfg.chat_max_per_task, cfg.core_batch_tokens,
                        cfg.chat_batch_size, cfg.chat_max_new_tokens, cfg.sandbox, cfg.decode_compile)
    log(task_table(out, chat.tasks, "name", "ChatCORE"))
    log(f"chat eval took {time.time() - t0:.0f}s")
    values = {"chatcore": out["chatcore"], "chat_per_task": out["results"], "chat_max_per_task": cfg.chat_max_per_task}
    # the pipeline evaluates after SFT and again after RL: keep each checkpoint's numbers, the latest on top
    metrics_path = os.path.join(cfg.run_dir, "metrics.json")
    history = (read_json(metrics_path) if os.path.isfile(metrics_path) else {}).get("chat_by_checkpoint", {})
    update_metrics(cfg, rt, {**values, "chat_by_checkpoint": {**history, os.path.basename(path): values}})


def phase_rl(cfg, rt, log):
    """GSM8K RL from the latest checkpoint (or --init-from): each step, rl_questions_per_step training questions (split
    across ranks) get rl_samples samples each from the engine; reward 1 for the right '####' answer; loss
    -advantage x log p over the sampled tokens; lr decays linearly to 0; pass@k on held-out test questions."""
    require_training_dtype(rt, "rl")
    tokenizer = data_tokenizer(cfg.data_dir)
    model, _, path = trained_model(cfg, rt, tokenizer)
    windows = model.windows()
    train, test = load_chat_eval(cfg.data_dir, tokenizer, "rl"), load_chat_eval(cfg.data_dir, tokenizer)
    train_task = next(t for t in train.tasks if t["name"] == "gsm8k")
    test_task = next(t for t in test.tasks if t["name"] == "gsm8k")
    test_examples = list(range(test_task["first_example"], test_task["first_example"] + min(cfg.rl_eval_questions, test_task["n_examples"])))
    if cfg.rl_questions_per_step < rt.world_size:
        raise ValueError(f"--rl-questions-per-step {cfg.rl_questions_per_step} < world size {rt.world_size}: every rank needs a question")
    opt = make_optimizer(model, dataclasses.replace(cfg, muon_lr=cfg.muon_lr * cfg.rl_lr_mul, adam_lr=cfg.adam_lr * cfg.rl_lr_mul))
    engine = Engine(model, tokenizer, windows, rt, compile=cfg.decode_compile)
    order = np.random.default_rng(cfg.seed).permutation(train_task["n_examples"]) + train_task["first_example"]
    log(f"RL from {path}: {cfg.rl_steps} steps x {cfg.rl_questions_per_step} questions x {cfg.rl_samples} samples, "
        f"{train_task['n_examples']} training questions, pass@{cfg.rl_eval_samples} on {len(test_examples)} test questions")
    rewards, pass_at, start = [], {}, 0
    resumed = resume_checkpoint(cfg, "rl", model, opt, log)
    if resumed:  # the questions' order and every step's seeds follow from --seed: the rest replays exactly
        start, rewards, pass_at = resumed[1]["step"], resumed[1]["loader"]["rewards"], resumed[1]["loader"]["pass_at"]
        log(f"rl: resumed from {resumed[0]} at step {start}")
        if start == cfg.rl_steps:
            log(f"rl: nothing to do: run already at step {start} of {cfg.rl_steps}")
            return
    for step in range(start, cfg.rl_steps + 1):
        if step % cfg.rl_eval_every == 0 or step == cfg.rl_steps:
            pass_at = gsm8k_pass_at_k(engine, tokenizer, test, test_task, test_examples, cfg.rl_eval_samples, cfg, rt, cfg.seed)
            log(f"rl step {step}/{cfg.rl_steps} " + " ".join(f"pass@{j} {v:.4f}" for j, v in pass_at.items()))
            log.metrics(step, {f"rl/pass@{j}": v for j, v in pass_at.items()})
        if step == cfg.rl_steps:
            break
        t0 = time.perf_counter()
        questions = [int(order[(step * cfg.rl_questions_per_step + i) % len(order)]) for i in range(cfg.rl_questions_per_step)]
        rollouts, step_rewards = [], []
        mine = questions[rt.rank::rt.world_size]
        prompts = [train.prompt(e)[0].tolist() for e in mine]  # all of a rank's rollouts decode as one batch
        drawn = engine.generate(prompts, cfg.rl_samples, cfg.rl_max_new_tokens, cfg.rl_temperature, cfg.rl_top_k,
                                seed=cfg.seed * 1_000_003 + step * 1009 + rt.rank)
        for e, prompt, samples in zip(mine, prompts, drawn):
            reward = [gsm8k_reward(tokenizer, s, train_task["answers"][e - train_task["first_example"]]) for s in samples]
            step_rewards += reward
            rollouts += [(prompt, s, float(a)) for s, a in zip(samples, group_advantages(reward))]
        stats = torch.tensor([sum(step_rewards), len(step_rewards), sum(sum(s.mask) for _, s, _ in rollouts)],
                             dtype=torch.float64, device=rt.device)
        sum_over_ranks(stats, rt)
        # rollouts with advantage 0 (all k samples equally right) add nothing to the gradient: skip their forward,
        # but keep one (weighted 0) so every rank's optimizer sees the same gradients exist
        learning = [r for r in rollouts if r[2] != 0] or [(rollouts[0][0], rollouts[0][1], 0.0)]
        for batch in token_batches(learning, lambda r: len(r[0]) + len(r[1].tokens), cfg.rl_batch_tokens):
            # normalised by all ranks' sampled tokens / world size: the optimizer's average over ranks then gives
            # the same update as one process with every question
            policy_gradient_loss(model, batch, windows, rt, float(stats[2]) / rt.world_size).backward()
        opt.step(1 - step / cfg.rl_steps, 0.95)
        opt.zero_grad()
        rewards.append(float(stats[0] / stats[1]))
        log(f"rl step {step + 1}/{cfg.rl_steps} reward {rewards[-1]:.4f} sampled tokens {int(stats[2])} "
            f"lr {1 - step / cfg.rl_steps:.3f} {time.perf_counter() - t0:.1f}s")
        log.metrics(step + 1, {"rl/reward": rewards[-1]})
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.rl_steps:
            save_checkpoint(cfg, rt, step + 1, model, opt, {"rewards": rewards, "pass_at": pass_at}, phase="rl")
    save_checkpoint(cfg, rt, cfg.rl_steps, model, opt, {"rewards": rewards, "pass_at": pass_at}, phase="rl")
    update_metrics(cfg, rt, {"rl_reward": rewards, "gsm8k_pass_at": pass_at})


def phase_generate(cfg, rt, log):
    """Samples from a checkpoint for --prompt, or an interactive chat on stdin when there is no --prompt. The prompt
    is a user turn for a chat model (SFT/RL checkpoints, or --prompt-format chat), plain text for a base model."""
    tokenizer = data_tokenizer(cfg.data_dir)
    model, state, path = trained_model(cfg, rt, tokenizer)
    chat = cfg.prompt_format == "chat" or (cfg.prompt_format == "auto" and state.get("phase", "pt") != "pt")
    engine = Engine(model, tokenizer, model.windows(), rt, compile=cfg.decode_compile)
    options = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   min_p=cfg.min_p, seed=cfg.seed)
    text = lambda tokens: tokenizer.decode([t for t in tokens if t not in engine.stops])  # a stream has no Sample yet
    if cfg.prompt:
        prompt = chat_turn(tokenizer, [tokenizer.bos_id], cfg.prompt) if chat else [tokenizer.bos_id, *tokenizer.encode(cfg.prompt)]
        log(f"sampling from {path} ({'chat' if chat else 'text'} prompt)")
        for i, sample in enumerate(engine.generate([prompt], cfg.num_samples, **options)[0]):
            log(f"--- sample {i + 1}/{cfg.num_samples} ({len(sample.tokens)} tokens)\n"
                f"{'' if chat else cfg.prompt}{reply_text(tokenizer, sample)}")
        return
    if rt.world_size > 1:
        raise ValueError("interactive chat runs in one process: pass --prompt, or run without torchrun")
    print(f"chatting with {path}: type a message, an empty line to start over, Ctrl-D to quit", flush=True)
    conversation = [tokenizer.bos_id]
    for line in sys.stdin:
        if not line.strip():
            conversation = [tokenizer.bos_id]
            continue
        prompt = chat_turn(tokenizer, conversation, line.strip()) if chat else conversation + tokenizer.encode(line)
        reply, shown = [], ""

        def stream(_, token):  # print each new piece of the reply (a token may end mid-character)
            nonlocal shown
            reply.append(token)
            now = text(reply)
            print(now[len(shown):], end="", flush=True)
            shown = now

        sample = engine.generate([prompt], 1, on_token=stream, **options)[0][0]
        print(flush=True)
        conversation = prompt + sample.tokens + ([] if sample.stopped or not chat else [tokenizer.special("<|assistant_end|>")])
        options["seed"] += 1


def phase_serve(cfg, rt, log):
    """The OpenAI-compatible server (Server) of the latest checkpoint or --init-from, with its chat page at /, on
    --host:--port until Ctrl-C."""
    import uvicorn
    if rt.world_size > 1:
        raise ValueError("the server runs in one process: run it without torchrun")
    tokenizer = data_tokenizer(cfg.data_dir)
    model, state, path = trained_model(cfg, rt, tokenizer)
    name = cfg.served_model_name or f"{os.path.basename(os.path.abspath(cfg.run_dir))}/{os.path.basename(path)}"
    engine = Engine(model, tokenizer, model.windows(), rt, compile=cfg.decode_compile)
    server = Server(engine, tokenizer, name, model.cfg.max_doc_len, state.get("phase", "pt") != "pt",
                    cfg.serve_max_rows, cfg.serve_max_queue, cfg.serve_timeout,
                    dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                         max_tokens=cfg.max_new_tokens))
    log(f"serving {path} as {name!r} at http://{cfg.host}:{cfg.port} (chat page at /, API at /v1; context "
        f"{model.cfg.max_doc_len} tokens, {cfg.serve_max_rows} rows, device {rt.device})")
    server.start()
    try:
        uvicorn.run(server.app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        server.close()


def phase_export(cfg, rt, log):
    """The latest checkpoint (or --init-from) as a Hugging Face folder (export_hf) in --export-dir (default RUN_DIR/hf),
    uploaded to --push-to-hub ORG/NAME when given."""
    if not rt.master:
        return
    tokenizer = data_tokenizer(cfg.data_dir)
    model, _, path = trained_model(cfg, rt, tokenizer)
    out_dir = cfg.export_dir or os.path.join(cfg.run_dir, "hf")
    name = cfg.push_to_hub.split("/")[-1] if cfg.push_to_hub else os.path.basename(os.path.abspath(cfg.run_dir))
    files = export_hf(model, tokenizer, out_dir, model_name=name)
    log(f"exported {path} to {out_dir}: " + ", ".join(f"{n} ({size:,} bytes)" for n, size in files.items()))
    if cfg.push_to_hub:
        log(f"pushed {out_dir} to {push_to_hub(out_dir, cfg.push_to_hub)}")


def phase_convert(cfg, rt, log):
    """Rewrite the state.json of --init-from, a checkpoint from before checkpoints carried their model, as today's:
    its ModelConfig (its pretraining config over the data's tokenizer) and that config as the run's settings."""
    if not cfg.init_from:
        raise CheckpointError("--phases convert needs --init-from CHECKPOINT_DIR")
    model, state = load_model(cfg.init_from, "cpu", data_tokenizer(cfg.data_dir).vocab_size)
    if "config" not in state:
        log(f"{cfg.init_from} is already in today's format")
        return
    state = {**{k: v for k, v in state.items() if k != "config"}, "model": dataclasses.asdict(model.cfg), "run": state["config"]}
    write_text_atomic(os.path.join(cfg.init_from, "state.json"), json.dumps(state, indent=1))
    log(f"converted {cfg.init_from}: its state.json now carries its model")


PHASES = {"data": phase_data, "pt": phase_pt, "eval": phase_eval, "sft": phase_sft, "chat": phase_chat, "rl": phase_rl,
          "generate": phase_generate, "serve": phase_serve, "export": phase_export,
          "convert": phase_convert}


def main(argv=None):
    cfg = parse_config(argv)
    phases = [p for p in cfg.phases.split(",") if p]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        sys.exit(f"error: unknown phase(s) {', '.join(unknown)}; available: {', '.join(PHASES)}")
    if phases == ["data"]:  # checking data needs no device, run directory or log file
        rt, log = None, lambda msg: print(msg, flush=True)
        phases_to_run(phases, cfg, rt, log)
        return
    rt = init_runtime(cfg)
    try:
        # phases that write checkpoints own the run directory; generate (and eval, chat) may read one in use
        lock = claim_run_dir(cfg, phases) if rt.master and set(phases) & set(CHECKPOINT_PREFIX) else None
        log = Logger(cfg, rt)
        if rt.master:
            with open(log.path, "a", encoding="utf-8") as f:  # the exact code, versions and config, modded-nanogpt style
                f.write(open(__file__, encoding="utf-8").read() + "\n" + "=" * 100 + "\n")
            log("\n".join(run_header(rt)))
        log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    except DataFormatError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. a full disk
        sys.exit(f"error: {cfg.run_dir}: cannot write ({e.strerror or e})")
    try:
        phases_to_run(phases, cfg, rt, log)
        if lock is not None:  # the config of the last invocation that trained and finished; every one is in log.txt
            path = os.path.join(cfg.run_dir, "config.json")
            try:
                write_text_atomic(path, json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
            except OSError as e:
                sys.exit(f"error: {path}: cannot write ({e.strerror or e})")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.close()


def phases_to_run(phases, cfg, rt, log):
    try:
        for phase in phases:
            t0 = time.perf_counter()
            PHASES[phase](cfg, rt, log)
            if phase in REPORT_PHASES:
                report_phase(cfg, rt, log, phase, time.perf_counter() - t0)
    except (DataFormatError, SandboxUnavailable) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
