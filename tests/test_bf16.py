"""The GPU's dtype flow, on CPU. Every training phase (pt, sft, rl), the packed eval forward and KV-cache prefill +
decode run as on an sm90 GPU: under bf16 autocast with CUDA's autocast policy emulated where CPU's differs (rms_norm
in fp32), every Triton launcher forced on (under TRITON_INTERPRET=1; the stack upcasts dot operands there, since
the interpreter's bf16 tl.dot is wrong), FlashAttention 3 through the stand-ins with FA's exact signatures and dtype
rules, the FP8 lm_head through torch's CPU _scaled_mm. Every kernel and attention call must receive one dtype, bf16,
and nothing may raise. Then every Triton kernel is compiled ahead of time for sm80 and sm90 with exactly the
signatures recorded in that run. Both stacks, each with its own tiny model (the medium has no FP8 head). bf16 is
50-150x slower than fp32 on these CPUs: the model and runs are tiny."""
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import STACK_PATH, TINY_ARGS, UNINTERPRETED_STACK, unstamped, write_eval_sources
from load_stack import load_stack
from test_medium import MEDIUM_PATH, MEDIUM_TINY
from test_attention import make_standins
from test_engine import kvcache_standins
from test_sft import conversations

KERNELS = ("_sym_matmul_kernel", "_relu2_matmul_kernel", "_softcap_ce_kernel")
# 3 steps of 512 tokens: the long window grows before step 1 (YaRN), embed and lm_head untie at step 2
BF16_ARGS = ["--val-tokens", "512", "--checkpoint-every", "0", "--sft-steps", "2", "--sft-batch-tokens", "512",
             "--sft-eval-every", "1", "--sft-val-tokens", "512", "--sft-momentum-warmup", "1", "--rl-steps", "1",
             "--rl-questions-per-step", "1", "--rl-samples", "2", "--rl-max-new-tokens", "4", "--rl-batch-tokens", "512",
             "--rl-eval-every", "1", "--rl-eval-questions", "1", "--rl-eval-samples", "2", "--no-compile"]
# per stack: its tiny model, 3 steps of 512 tokens (small: the long window grows before step 1 (YaRN), embed and
# lm_head untie at step 2), its file
STACK_RUNS = {"small": (TINY_ARGS + ["--stages", "[[1, 512, 128, 32, 64, 1.0, [1, 0.5], [1, 0.5]], [2, 512, 128, 32, 128, "
                                     "1.0, [1], [1]]]"], STACK_PATH),
              "medium": (MEDIUM_TINY + ["--train-tokens", "1536", "--batch-tokens", "512"], MEDIUM_PATH)}


def triton_type(value):
    """The type Triton's launcher gives an argument: '*bf16' for a bf16 tensor, 'i32'/'i64' for ints, 'fp32' for floats."""
    if torch.is_tensor(value):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
                      torch.int32: "i32"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


class RecordingKernel:
    """Stands in for a @triton.jit kernel: records each launch's signature, then launches the real kernel (unless
    launch=False: the launchers then run on meta tensors)."""

    def __init__(self, name, kernel, calls, launch=True):
        self.name, self.kernel, self.calls, self.launch = name, kernel, calls, launch
        self.arg_names = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            constexprs = {k: v for k, v in kwargs.items() if k not in options}
            signature = {name: triton_type(a) for name, a in zip(self.arg_names, args)}
            self.calls.append(dict(kernel=self.name, signature=signature, constexprs=constexprs, options=options))
            return self.kernel[grid](*args, **kwargs) if self.launch else None
        return launch


@pytest.fixture(scope="module")
def bf16_data(tiny_data, tok_dir, tmp_path_factory):
    """tiny_data plus chat-eval, RL and SFT files: everything the phases read."""
    import chat_eval_shards
    import sft_shards
    root = tmp_path_factory.mktemp("bf16")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    write_eval_sources(root / "eval")
    chat_eval_shards.write_chat_eval(str(root / "eval"), tok_dir, str(data / "chat_eval"))
    chat_eval_shards.write_rl(str(root / "eval"), tok_dir, str(data / "rl"))
    src = root / "conversations.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations()[:60]))
    sft_shards.write_sft([str(src)], tok_dir, str(data / "sft"), val_percent=20)
    return data


def run_phases(stack, data, run_dir, rt, phases, args):
    cfg = stack.parse_config(args + BF16_ARGS + ["--data-dir", str(data), "--run-dir", str(run_dir)])
    log = stack.Logger(cfg, rt)
    for phase in phases:
        stack.PHASES[phase](cfg, rt, log)
    return cfg


def first_loss(run_dir):
    return float(re.search(r"^step 1/3 loss (\S+)", unstamped(open(run_dir / "log.txt").read()), re.M).group(1))


@pytest.fixture(scope="module", params=list(STACK_RUNS))
def gpu_like_run(request, bf16_data, tmp_path_factory):
    """Every phase on CPU as it runs on an H100; returns what each kernel and attention call received."""
    stack = load_stack(None if request.param == "small" else request.param)  # small: DECODERSTACK_STACK's copy
    args, path = STACK_RUNS[request.param]
    if stack.triton is None:
        pytest.skip("triton is not installed")
    calls = dict(kernels=[], attention=[], kvcache=[], fp8=[], rms_norm=[], norm=[], branch_attention=[],
                 stack=request.param, path=path)
    varlen, kvcache = make_standins(stack, [], False)["fa3"], kvcache_standins([])["fa3"]

    def fa3_varlen(q, k, v, *args, **kwargs):
        calls["attention"].append((q.dtype, k.dtype, v.dtype))
        if not torch.equal(kwargs["cu_seqlens_q"], kwargs["cu_seqlens_k"]):  # branches after a shared prefix (CORE)
            calls["branch_attention"].append((q.dtype, k.dtype, v.dtype))
        return varlen(q, k, v, *args, **kwargs)

    def fa3_kvcache(q, k_cache, v_cache, k=None, v=None, **kwargs):
        calls["kvcache"].append((q.dtype, k_cache.dtype, v_cache.dtype))  # read-only: the new keys are in the cache
        return kvcache(q, k_cache, v_cache, k, v, **kwargs)

    real_rms_norm, real_fp8, real_norm = F.rms_norm, getattr(stack, "fp8_linear", None), stack.norm

    def cuda_rms_norm(x, shape, weight=None, eps=None):  # CUDA autocast (torch >= 2.12): rms_norm in fp32
        calls["rms_norm"].append(x.dtype)
        if torch.is_autocast_enabled("cpu"):
            return real_rms_norm(x.float(), shape, None if weight is None else weight.float(), eps)
        return real_rms_norm(x, shape, weight, eps)

    def norm(x):
        calls["norm"].append(x.dtype)
        return real_norm(x)

    def fp8_linear(x, *args):
        out = real_fp8(x, *args)
        calls["fp8"].append((x.dtype, out.dtype))
        return out

    root = tmp_path_factory.mktemp("bf16runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stack, "_use_triton", lambda t: True)
        for name in KERNELS:
            mp.setattr(stack, name, RecordingKernel(name, getattr(stack, name), calls["kernels"]))
        mp.setitem(stack._FLASH, "fa3", types.SimpleNamespace(flash_attn_varlen_func=fa3_varlen,
                                                                flash_attn_with_kvcache=fa3_kvcache))
        mp.setattr(torch.nn.functional, "rms_norm", cuda_rms_norm)
        if real_fp8 is not None:  # the small stack's FP8 head
            mp.setattr(stack, "fp8_supported", lambda device: True)
            mp.setattr(stack, "fp8_linear", fp8_linear)
        mp.setattr(stack, "norm", norm)
        rt = stack.Runtime(torch.device("cpu"), torch.bfloat16, 0, 1, "fa3")
        cfg = run_phases(stack, bf16_data, root / "run", rt, ["pt", "sft", "rl"], args)
        # the packed eval forward (CORE, chat eval, bpb) and prefill + decode with the KV cache
        tok = stack.Tokenizer(str(bf16_data / "tokenizer"))
        model, _, _ = stack.trained_model(cfg, rt)
        windows = model.windows()
        seqs = [(np.array([tok.bos_id] + tok.encode(t)), 2, 5) for t in ("The cat sat down.", "The cat sat down on it.",
                                                                        "A dog ran off, fast.")]
        calls["core"] = stack.core_scores_packed(model, seqs, rt, windows)
        calls["samples"] = stack.Engine(model, tok, windows, rt).generate([seqs[0][0].tolist()], 2, 5, temperature=1.0)
    fp32 = stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    run_phases(stack, bf16_data, root / "fp32", fp32, ["pt"], args)
    calls["first_losses"] = first_loss(root / "run"), first_loss(root / "fp32")
    calls["metrics"] = json.load(open(root / "run" / "metrics.json"))
    return calls


def test_every_kernel_launch_gets_bf16(gpu_like_run):
    launched = {c["kernel"] for c in gpu_like_run["kernels"]}
    assert launched == set(KERNELS)
    modes = {(c["kernel"], c["constexprs"].get("FORWARD")) for c in gpu_like_run["kernels"]}
    assert ("_relu2_matmul_kernel", True) in modes and ("_relu2_matmul_kernel", False) in modes  # forward, backward
    for c in gpu_like_run["kernels"]:
        data = {k: v for k, v in c["signature"].items() if k in ("a_ptr", "b_ptr", "c_ptr", "post_ptr", "z_ptr", "dz_ptr")}
        assert set(data.values()) == {"*bf16"}, c  # matrices, MLP activations, logits and their gradient
        if c["kernel"] != "_softcap_ce_kernel":  # the kernels with a tl.dot
            assert c["constexprs"]["UPCAST"] is True  # interpreted here; the GPU compiles UPCAST=False (no code)


def test_every_attention_call_gets_bf16(gpu_like_run):
    assert len(gpu_like_run["attention"]) > 0 and len(gpu_like_run["kvcache"]) > 0
    assert set(gpu_like_run["attention"]) == {(torch.bfloat16,) * 3}  # pt, sft, rl and eval forwards
    assert set(gpu_like_run["kvcache"]) == {(torch.bfloat16,) * 3}  # prefill and decode
    assert set(gpu_like_run["branch_attention"]) == {(torch.bfloat16,) * 3}  # CORE's choices after their context


def test_fp8_head_writes_bf16_and_norms_see_bf16(gpu_like_run):
    if gpu_like_run["stack"] == "small":
        assert gpu_like_run["fp8"] and set(gpu_like_run["fp8"]) == {(torch.bfloat16, torch.bfloat16)}
    else:
        assert gpu_like_run["fp8"] == []  # the medium stack has no FP8
    # the residual stream is bf16 from the embeddings on: every norm's input is (the QK-norm's too) ...
    assert gpu_like_run["norm"] and set(gpu_like_run["norm"]) == {torch.bfloat16}
    # ... and norm() upcasts for rms_norm itself, so CUDA's fp32 rms_norm and CPU's bf16 one give the same dtypes
    assert set(gpu_like_run["rms_norm"]) == {torch.float32}


def test_phases_finish_and_compute_what_fp32_computes(gpu_like_run):
    m = gpu_like_run["metrics"]
    assert math.isfinite(m["val_bpb"]) and math.isfinite(m["sft_val_loss"]) and len(m["rl_reward"]) == 1
    bf16, fp32 = gpu_like_run["first_losses"]
    assert bf16 == pytest.approx(fp32, rel=0.02)  # same weights, same batch; bf16 activations (small: an FP8 head)
    assert all(math.isfinite(loss) for loss, _ in gpu_like_run["core"])
    assert len(gpu_like_run["samples"][0]) == 2 and all(1 <= len(s.tokens) <= 5 for s in gpu_like_run["samples"][0])


# The interpreter accepts things the GPU compiler rejects: compile, for sm80 and sm90, every kernel exactly as the run
# above launched it (signatures, constexprs, warps, stages), in a fresh process without the interpreter.
AOT_RECORDED = UNINTERPRETED_STACK + textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert stack.UPCAST is False
    out = []
    for launch in json.load(open(sys.argv[2])):
        fn = getattr(stack, launch["kernel"])
        constexprs = dict(launch["constexprs"])
        if "UPCAST" in constexprs:
            constexprs["UPCAST"] = stack.UPCAST  # what a GPU launch passes: False
        signature = {**launch["signature"], **{name: "constexpr" for name in constexprs}}
        for cap in (80, 90):
            kernel = triton.compile(ASTSource(fn=fn, signature=signature,
                                              constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}),
                                    target=GPUTarget("cuda", cap, 32), options=launch["options"])
            out.append(dict(kernel=launch["kernel"], cap=cap, shared=kernel.metadata.shared, ptx=len(kernel.asm["ptx"])))
    print(json.dumps(out))
""")


def test_recorded_kernels_compile_for_sm80_and_sm90(gpu_like_run, tmp_path):
    unique = {json.dumps(c, sort_keys=True) for c in gpu_like_run["kernels"]}
    launches = [json.loads(u) for u in sorted(unique)]
    (tmp_path / "launches.json").write_text(json.dumps(launches))
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", AOT_RECORDED, gpu_like_run["path"], str(tmp_path / "launches.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(compiled) == 2 * len(launches) and {c["kernel"] for c in compiled} == set(KERNELS)
    assert all(c["ptx"] > 0 for c in compiled)
    assert max(c["shared"] for c in compiled) <= 99 * 1024  # fits an sm86/sm89 block's shared memory


@pytest.mark.parametrize("name", list(STACK_RUNS))
def test_kernels_compile_for_sm80_and_sm90_at_the_h100x8_shapes(name, monkeypatch, tmp_path):
    """Every kernel's launcher, forward and backward, on meta tensors of the stack's h100x8 shapes (gpu_check's SHAPES:
    one rank's Polar Express banks, a micro-batch's MLP and logits; for the small stack past 2^31 logits), recorded
    and compiled for sm80 and sm90 as launched: the integer types, block sizes and warps of the real run."""
    from gpu_check import SHAPES
    stack = load_stack(None if name == "small" else name)
    if stack.triton is None:
        pytest.skip("triton is not installed")
    shapes, calls = SHAPES[name], []
    for kernel in KERNELS:
        monkeypatch.setattr(stack, kernel, RecordingKernel(kernel, getattr(stack, kernel), calls, launch=False))
    T, dim = shapes["mlp"]
    k = 3 if name == "small" else 1  # MTP horizons of the first stage; the medium trains next-token only
    with torch.device("meta"):
        for shape in shapes["polar"]:
            gram = stack.xxt_triton(torch.empty(shape, dtype=torch.bfloat16))
            stack.ba_plus_caa_triton(gram, -2.8, 0.5)
        x = torch.empty(T, dim, dtype=torch.bfloat16, requires_grad=True)
        w_fc, w_proj = torch.empty(4 * dim, dim, requires_grad=True), torch.empty(dim, 4 * dim, requires_grad=True)
        stack.relu2_mlp_triton(x, w_fc, w_proj).sum().backward()
        z = torch.empty(T, -(-shapes["vocab"] // 128) * 128, dtype=torch.bfloat16, requires_grad=True)
        stack.softcap_cross_entropy_triton(z, torch.zeros(T, k, dtype=torch.long), torch.ones(k)).sum().backward()
    # per bank xxt and ba_plus_caa; the MLP forward and backward; the cross-entropy
    assert {c["kernel"] for c in calls} == set(KERNELS) and len(calls) == 2 * len(shapes["polar"]) + 3
    launches = [json.loads(u) for u in sorted({json.dumps(c, sort_keys=True) for c in calls})]
    (tmp_path / "launches.json").write_text(json.dumps(launches))
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", AOT_RECORDED, STACK_RUNS[name][1], str(tmp_path / "launches.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(compiled) == 2 * len(launches) and all(c["ptx"] > 0 for c in compiled)
    assert max(c["shared"] for c in compiled) <= 99 * 1024


# ---- which dtype a GPU gets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_activation_dtype_by_gpu(stack, monkeypatch, native, want):
    """An A100/H100 trains in bf16; a T4 or V100 (bf16 only through emulation: is_bf16_supported() alone says True
    there) in fp32, and the log says why."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    dtype, why = stack.pick_dtype(torch.device("cuda", 0))
    assert dtype == want and ("native" in why if native else "no native bf16" in why)
    assert stack.pick_dtype("cpu")[0] == torch.float32 and stack.pick_dtype("cpu", "bf16")[0] == torch.bfloat16
    with pytest.raises(ValueError, match="unknown --dtype"):
        stack.pick_dtype("cpu", "fp8")


def test_fp16_refuses_training(stack):
    rt = stack.Runtime(torch.device("cpu"), torch.float16, 0, 1, "sdpa")
    for phase in ("pt", "sft", "rl"):
        with pytest.raises(ValueError, match=f"{phase}: fp16 training needs loss scaling"):
            stack.PHASES[phase](stack.parse_config(TINY_ARGS), rt, print)
