"""Kernels section: Triton launchers (run by the interpreter on CPU fp32 tensors) against the PyTorch references, the
references against independent formulations, CPU dispatch, FP8 lm_head on CPU, and an ahead-of-time GPU compile."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import STACK_PATH, UNINTERPRETED_STACK

POLAR_STEP = (-2.808917465908714, 0.5000178451051316)  # (b, c) of a Polar Express iteration


def close(actual, expected, tol=1e-5):
    """Max abs error relative to the expected tensor's largest entry."""
    err = (actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30)
    assert err < tol, f"relative error {err:.3g} > {tol}"


@pytest.fixture(scope="module")
def triton_stack(stack):
    if stack.triton is None:
        pytest.skip("triton is not installed")
    return stack


# --- A @ A^T and b*A + c*A@A^T


@pytest.mark.parametrize("shape, blocks", [((2, 3, 70, 90), dict(block=32, block_k=16)), ((96, 40), {})])
def test_xxt_triton_matches_reference(triton_stack, shape, blocks):
    A = torch.randn(shape)
    out = triton_stack.xxt_triton(A, **blocks)
    assert out.shape == (*shape[:-1], shape[-2])
    close(out, triton_stack.xxt_reference(A))
    assert torch.equal(out, out.mT)  # each lower tile is stored with its mirror


def test_xxt_triton_takes_a_transposed_view(triton_stack):
    """Tall Polar Express inputs arrive as X.mT views; the kernel reads strides rather than copying."""
    X = torch.randn(2, 90, 50)
    close(triton_stack.xxt_triton(X.mT, block=32, block_k=16), X.mT @ X)


def test_ba_plus_caa_triton_matches_reference(triton_stack):
    S = torch.randn(2, 2, 70, 50)
    A = S @ S.mT / 50  # symmetric, like the A = X X^T it is applied to
    b, c = POLAR_STEP
    out = triton_stack.ba_plus_caa_triton(A, b, c, block=32, block_k=16)
    close(out, triton_stack.ba_plus_caa_reference(A, b, c))
    assert torch.equal(out, out.mT)


# --- ReLU^2 MLP


def test_relu2_mlp_triton_forward_backward(triton_stack):
    x = torch.randn(2, 25, 48, requires_grad=True)  # 50 rows: two row tiles of 32, the second partial
    w_fc = (torch.randn(100, 48) / 7).requires_grad_()
    w_proj = (torch.randn(48, 100) / 10).requires_grad_()
    out = triton_stack.relu2_mlp_triton(x, w_fc, w_proj, blocks=(32, 32, 16))
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w_fc, w_proj), grad)
    ref = triton_stack.relu2_mlp_reference(x, w_fc, w_proj)
    want = torch.autograd.grad(ref, (x, w_fc, w_proj), grad)
    close(out, ref)
    for g, w in zip(got, want):
        close(g, w)


# --- Softcapped multi-token cross-entropy


def ce_inputs(n, v, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * 4).requires_grad_()
    targets = torch.randint(0, v, (n, k), generator=gen)
    targets[n - 1] = v - 1  # the last column, in the partial block
    targets[::3, k - 1] = -1  # the caller's -1: document boundary / end of batch
    targets[4] = -1  # a row with no target at all: loss 0, gradient 0
    weights = torch.tensor([1.0, 0.5, 0.25][:k])
    return logits, targets, weights


@pytest.mark.parametrize("k", [1, 3])
def test_softcap_cross_entropy_triton_forward_backward(triton_stack, k):
    logits, targets, weights = ce_inputs(24, 300, k)
    grad = torch.rand(24)  # not all ones: the backward must scale by grad_output
    loss = triton_stack.softcap_cross_entropy_triton(logits, targets, weights, block_v=128)
    (got,) = torch.autograd.grad(loss, logits, grad)
    ref = triton_stack.softcap_cross_entropy_reference(logits, targets, weights)
    (want,) = torch.autograd.grad(ref, logits, grad)
    close(loss, ref)
    close(got, want)
    assert loss[4] == 0 and not got[4].any()


def test_softcap_cross_entropy_triton_other_cap(triton_stack):
    logits, targets, weights = ce_inputs(6, 200, 3, seed=1)
    cap = (30.0, 0.0, 2.0)
    loss = triton_stack.softcap_cross_entropy_triton(logits, targets, weights, cap, block_v=64)
    close(loss, triton_stack.softcap_cross_entropy_reference(logits, targets, weights, cap))


# --- The references against independent formulations


def test_softcap_is_modded_nanogpts(stack):
    z = torch.tensor([-1e4, -5.0, 0.0, 1e4])
    u = stack.softcap(z)
    assert u[0] == 0 and u[3] == 23 and u[1] == 23 / 2
    torch.testing.assert_close(u[2], torch.tensor(23 / (1 + torch.e ** (-5 / 7.5))))


def test_softcap_cross_entropy_reference_is_weighted_cross_entropy(stack):
    logits, targets, weights = ce_inputs(24, 300, 3)
    logits = logits.detach()
    u = stack.softcap(logits)
    per_k = [F.cross_entropy(u, targets[:, k], ignore_index=-1, reduction="none") for k in range(3)]
    torch.testing.assert_close(stack.softcap_cross_entropy_reference(logits, targets[:, :1], weights[:1]),
                               per_k[0])
    torch.testing.assert_close(stack.softcap_cross_entropy_reference(logits, targets, weights),
                               sum(w * l for w, l in zip(weights, per_k)))


def test_relu2_mlp_reference_gradcheck(stack):
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w_fc = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    w_proj = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stack.relu2_mlp_reference, (x, w_fc, w_proj))
    hidden = torch.einsum("nd,hd->nh", x, w_fc).clamp(min=0) ** 2
    torch.testing.assert_close(stack.relu2_mlp_reference(x, w_fc, w_proj), torch.einsum("nh,dh->nd", hidden, w_proj))


def test_matrix_references(stack):
    A = torch.randn(3, 20, 30, dtype=torch.float64)
    torch.testing.assert_close(stack.xxt_reference(A), torch.einsum("bik,bjk->bij", A, A))
    S = stack.xxt_reference(A)
    b, c = POLAR_STEP
    torch.testing.assert_close(stack.ba_plus_caa_reference(S, b, c), torch.baddbmm(S, S, S, beta=b, alpha=c))


# --- Dispatch: CPU tensors take the references, never Triton


def test_dispatchers_use_references_on_cpu(stack, monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("a Triton launcher was called for a CPU tensor")

    for name in ("xxt_triton", "ba_plus_caa_triton", "relu2_mlp_triton", "softcap_cross_entropy_triton"):
        monkeypatch.setattr(stack, name, no_triton)
    A = torch.randn(2, 12, 12)
    assert torch.equal(stack.xxt(A), stack.xxt_reference(A))
    assert torch.equal(stack.ba_plus_caa(A, 2.0, 0.5), stack.ba_plus_caa_reference(A, 2.0, 0.5))
    x, w_fc, w_proj = torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16)
    assert torch.equal(stack.relu2_mlp(x, w_fc, w_proj), stack.relu2_mlp_reference(x, w_fc, w_proj))
    logits, targets, weights = ce_inputs(8, 40, 2)
    assert torch.equal(stack.softcap_cross_entropy(logits, targets, weights),
                       stack.softcap_cross_entropy_reference(logits, targets, weights))


# --- FP8 lm_head. torch 2.13's CPU build runs torch._scaled_mm with e4m3/e5m2 inputs, so the whole autograd
# Function is checked here; only its speed and CUDA's layout/alignment rules are GPU-only.


def test_fp8_not_supported_off_gpu(stack):
    assert not stack.fp8_supported("cpu")
    assert not stack.fp8_supported(torch.device("meta"))


def test_fp8_quantize_saturates_and_round_trips(stack):
    t = torch.tensor([1e6, -1e6, 0.3, -2.0])
    for dtype, top in ((torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)):
        back = stack.fp8_quantize(t, 0.5, dtype).float() * 0.5  # dequantised
        assert back[0] == top * 0.5 and back[1] == -top * 0.5
        torch.testing.assert_close(back[2:], t[2:], rtol=0.13, atol=0)
    assert stack.fp8_quantize(t, 0.5, torch.float8_e4m3fn).dtype == torch.float8_e4m3fn


def test_fp8_linear_matches_dequantized_reference(stack):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64, requires_grad=True)
    w = (torch.randn(48, 64) * 0.02).requires_grad_()
    x_s, w_s, g_s = 100 / 448, 1.6 / 448, 0.75 / 448 / 32  # modded-nanogpt's scales, grad_scale = 1/32
    out = stack.fp8_linear(x, w, x_s, w_s, g_s)
    grad = torch.randn_like(out) / 32
    out.backward(grad)

    def dq(t, s, dtype):
        return stack.fp8_quantize(t.detach(), s, dtype).float() * s

    xq, wq, gq = dq(x, x_s, torch.float8_e4m3fn), dq(w, w_s, torch.float8_e4m3fn), dq(grad, g_s, torch.float8_e5m2)
    close(out, xq @ wq.T)
    close(x.grad, gq @ wq)
    close(w.grad, gq.reshape(-1, 48).T @ xq.reshape(-1, 64))
    # ... and within fp8 precision of the unquantised product (e4m3: 3 mantissa bits, e5m2: 2)
    exact = x.detach() @ w.detach().T
    assert (out - exact).norm() / exact.norm() < 0.08
    assert (x.grad - grad @ w.detach()).norm() / (grad @ w.detach()).norm() < 0.12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the activations on a GPU
def test_fp8_linear_keeps_cudas_rule_for_any_token_count(stack, monkeypatch, dtype):
    """CUDA's _scaled_mm wants every dim a multiple of 16 and the weight gradient's inner dim is the tokens of one
    forward, which a user's --micro-batch-tokens (or a last, short row) need not make one: the rows are padded. The
    stand-in below enforces CUDA's rule on torch's CPU _scaled_mm; 37 tokens give what 37 of 48 padded rows give."""
    real = torch._scaled_mm

    def cuda_rule(a, b, **kw):
        assert all(d % 16 == 0 for d in (*a.shape, *b.shape)), f"_scaled_mm dims {tuple(a.shape)} x {tuple(b.shape)}"
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", cuda_rule)
    torch.manual_seed(0)
    scales = (100 / 448, 1.6 / 448, 0.75 / 448 / 32)
    x, w = torch.randn(37, 64).to(dtype), torch.randn(48, 64) * 0.02
    padded = torch.cat([x, torch.zeros(11, 64, dtype=dtype)]).requires_grad_()
    x.requires_grad_(), w.requires_grad_()
    grad = (torch.randn(37, 48) / 32).to(dtype)
    out = stack.fp8_linear(x, w, *scales)
    out.backward(grad)
    w_grad, w.grad = w.grad, None
    whole = stack._FP8Linear.apply(padded, w, *scales)
    whole.backward(torch.cat([grad, torch.zeros(11, 48, dtype=dtype)]))
    assert out.shape == (37, 48) and out.dtype == dtype and torch.equal(out, whole[:37])
    assert torch.equal(x.grad, padded.grad[:37]) and torch.equal(w_grad, w.grad)
    with pytest.raises(AssertionError, match="_scaled_mm dims"):  # unpadded, the stand-in refuses as CUDA would
        stack._FP8Linear.apply(x.detach(), w, *scales)


def test_fp8_needs_dims_that_are_multiples_of_16(stack):
    with pytest.raises(SystemExit):
        stack.parse_config(["--model-dim", "100"])
    with pytest.raises(ValueError, match=r"--fp8 \(on by default\) needs --model-dim a multiple of 16, got 100: use 96 "
                                         r"or 112, or --no-fp8"):
        stack.Config(model_dim=100)
    with pytest.raises(ValueError, match="--vocab-multiple a multiple of 16, got 8: use 16, or --no-fp8"):
        stack.Config(vocab_multiple=8)
    assert stack.parse_config(["--model-dim", "100", "--no-fp8"]).model_dim == 100


# --- The interpreter accepts things the GPU compiler rejects: compile every kernel for sm80/sm90 ahead of time
# (Triton's bundled ptxas, no GPU needed), in a fresh process because the stack above was loaded interpreted.

AOT_SCRIPT = UNINTERPRETED_STACK + textwrap.dedent("""
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_kernel(fn, signature, constexprs, cap, num_warps):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        constexprs = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", cap, 32), options=dict(num_warps=num_warps, num_stages=3))
        return kernel.metadata.shared

    def ints(*names):
        return {name: "i32" for name in names}

    def default(fn, name):  # the launchers' tile config
        return inspect.signature(fn).parameters[name].default

    block, block_k = default(stack.xxt_triton, "block"), default(stack.xxt_triton, "block_k")
    block_m, block_n, block_mk = default(stack.relu2_mlp_triton, "blocks")
    block_v = default(stack.softcap_cross_entropy_triton, "block_v")
    shared = {}
    for cap in (80, 90):
        sym = dict(a_ptr="*bf16", c_ptr="*bf16", **ints("M", "K"), stride_ab="i64",
                   **ints("stride_am", "stride_ak", "stride_cb", "stride_cm", "stride_cn"), b="fp32", c="fp32")
        for add_a in (False, True):
            shared[f"sym{cap}{add_a}"] = compile_kernel(stack._sym_matmul_kernel, sym,
                                                        dict(ADD_A=add_a, BLOCK=block, BLOCK_K=block_k, UPCAST=False), cap, 4)
        relu2 = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", post_ptr="*bf16",
                     **ints("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn"),
                     **ints("stride_cm", "stride_cn"))
        for forward in (True, False):
            shared[f"relu2{cap}{forward}"] = compile_kernel(stack._relu2_matmul_kernel, relu2,
                dict(FORWARD=forward, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_mk, UPCAST=False), cap, 8)
        ce = dict(z_ptr="*bf16", t_ptr="*i64", w_ptr="*fp32", loss_ptr="*fp32", dz_ptr="*bf16",
                  **ints("V", "K", "stride_z", "stride_t", "stride_dz"), cap_a="fp32", cap_b="fp32", cap_c="fp32")
        for n_targets in (1, 4):
            shared[f"ce{cap}{n_targets}"] = compile_kernel(stack._softcap_ce_kernel, ce,
                                                         dict(BLOCK_V=block_v, BLOCK_K=n_targets), cap, 4)
    print(json.dumps(shared))
""")


def test_kernels_compile_for_gpu(triton_stack, tmp_path):
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, STACK_PATH], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 12
    assert max(shared.values()) <= 99 * 1024  # fits an sm86/sm89 block's shared memory
