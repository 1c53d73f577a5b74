"""Optimizer section: Polar Express, NorMuon + Adam against hand-written references, cautious weight decay, the
momentum schedule, checkpoints (name-keyed, full state) and the sharded path under torchrun with gloo."""
import copy
import os
import socket
import subprocess
import sys

import pytest
import torch

import dist_optimizer_worker as W

# The published Polar Express coefficients (arXiv:2505.16932; 5 iterations, safety 2e-2, cushion 2), typed in
# independently of the stack so a changed constant fails.
COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def ref_polar(G, dtype=torch.float64):
    """The iteration written out directly: X X^T form for wide, X^T X form for tall (no transposing)."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in COEFFS:
        if X.size(-2) > X.size(-1):
            A = X.mT @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
    return X


def with_spectrum(shape, lo, hi, seed):
    """A random matrix (batch, m, n) whose singular values are spread log-uniformly over [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), k, dtype=torch.float64)
    return (U * s) @ V.mT


@pytest.mark.parametrize("shape", [(24, 56), (56, 24), (40, 40), (3, 16, 40), (2, 48, 12)])
def test_polar_express_orthogonalises(stack, shape):
    # Gaussian matrices for the rectangular shapes; a square Gaussian matrix has singular values near 0, which 5
    # iterations cannot lift, so the square case gets a spectrum spanning 2 decades (inside the design range).
    G = with_spectrum(shape, 1e-2, 1.0, 0).float() if shape[-1] == shape[-2] else torch.randn(shape, generator=torch.Generator().manual_seed(1))
    X = stack.polar_express(G)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.8 and s.max() < 1.2, (s.min(), s.max())
    # same singular vectors: X = U f(S) V^T, so X^T G (or G X^T) is symmetric positive semi-definite
    M = (X.mT @ G if shape[-2] >= shape[-1] else G @ X.mT).double()
    assert torch.allclose(M, M.mT, atol=1e-4 * M.abs().max())
    assert torch.linalg.eigvalsh((M + M.mT) / 2).min() > -1e-4 * M.abs().max()
    torch.testing.assert_close(X.double(), ref_polar(G), atol=2e-5, rtol=0)


def test_polar_express_maps_singular_values_by_the_scalar_polynomial(stack):
    # Built from its SVD, the expected output is U f(s / (1.02 |s|_2 + 1e-6)) V^T with f the composed polynomials.
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(32, 12, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    s = torch.logspace(-2, 0, 12, dtype=torch.float64)
    x = s / (s.norm() * 1.02 + 1e-6)
    for a, b, c in COEFFS:
        x = a * x + b * x ** 3 + c * x ** 5
    expected = (U * x) @ V.T
    torch.testing.assert_close(stack.polar_express(((U * s) @ V.T).float()).double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(stack.polar_express(((U * s) @ V.T).T.float()).double(), expected.T, atol=2e-5, rtol=0)
    # fewer steps apply fewer polynomials
    y = s / (s.norm() * 1.02 + 1e-6)
    for a, b, c in COEFFS[:2]:
        y = a * y + b * y ** 3 + c * y ** 5
    torch.testing.assert_close(stack.polar_express(((U * s) @ V.T).float(), steps=2).double(), (U * y) @ V.T, atol=2e-5, rtol=0)


def test_polar_express_bf16_runs_in_bf16(stack):
    X = stack.polar_express(torch.randn(16, 24), dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.7 and s.max() < 1.3


def test_muon_momentum_schedule(stack):
    m = lambda step: stack.muon_momentum(step, 1000)
    assert m(0) == pytest.approx(0.85) and m(150) == pytest.approx(0.90) and m(300) == pytest.approx(0.95)
    assert m(600) == pytest.approx(0.95) and m(950) == pytest.approx(0.95)
    assert m(975) == pytest.approx(0.90) and m(1000) == pytest.approx(0.85)


# -- hand-written single-process reference of the whole optimizer --------------------------------------------------

label_of = W.rule


class Reference:
    """NorMuon + Adam one parameter (and one matrix) at a time, straight from the description."""

    def __init__(self, model, beta2=0.9, eps=1e-10):
        self.model, self.beta2, self.eps, self.t, self.state = model, beta2, eps, 0, {}

    def step(self, lr_factor, mu):
        self.t += 1
        for name, p in self.model.named_parameters():
            spec = W.LABELS[label_of(name)]
            lr = spec["lr"] * spec.get("lr_mul", 1.0) * lr_factor
            wd = spec.get("wd", 0.0) * spec.get("wd_mul", 1.0)
            g = p.grad.detach()
            with torch.no_grad():
                if spec["kind"] == "normuon":
                    for i in range(p.numel() // (p.size(-2) * p.size(-1))):
                        P, G = p.view(-1, *p.shape[-2:])[i], g.reshape(-1, *p.shape[-2:])[i]
                        P.copy_(self.normuon(f"{name}.{i}", P, G, lr, wd, mu))
                else:
                    p.copy_(self.adam(name, p, g, lr, wd, spec.get("betas", (0.9, 0.95))))

    def normuon(self, key, P, G, lr, wd, mu):
        r, c = P.shape
        st = self.state.setdefault(key, {"buf": torch.zeros(r, c), "v": torch.zeros(r, 1) if r >= c else torch.zeros(1, c)})
        st["buf"] = mu * st["buf"] + (1 - mu) * G
        V = ref_polar((1 - mu) * G + mu * st["buf"], torch.float32)
        dim = 1 if r >= c else 0
        st["v"] = self.beta2 * st["v"] + (1 - self.beta2) * (V * V).mean(dim=dim, keepdim=True)
        U = V / st["v"].clamp_min(self.eps).sqrt()
        U = U * V.norm() / U.norm()
        lr = lr * max(1.0, r / c) ** 0.5
        decay = torch.where(U * P > 0, P, torch.zeros_like(P))
        return P - lr * U - lr * wd * decay

    def adam(self, key, p, g, lr, wd, betas):
        b1, b2 = betas
        st = self.state.setdefault(key, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        u = lr * (st["m"] / (1 - b1 ** self.t)) / ((st["v"] / (1 - b2 ** self.t)).sqrt() + self.eps)
        return p - u - lr * wd * torch.where(u * p > 0, p, torch.zeros_like(p))


def grads(model, step):
    inputs, targets = W.batch(step)
    torch.nn.functional.cross_entropy(model(inputs).reshape(-1, W.VOCAB), targets.reshape(-1)).backward()


def test_step_matches_hand_written_reference(stack):
    model, ref_model = W.make_model(), W.make_model()
    opt, ref = W.make_optimizer(stack, model), Reference(ref_model)
    for step in range(3):
        lr_factor, mu = 1.0 - 0.1 * step, 0.9 + 0.02 * step
        for m in (model, ref_model):
            grads(m, step)
        opt.step(lr_factor, mu)
        ref.step(lr_factor, mu)
        opt.zero_grad()
        ref_model.zero_grad()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"step {step}: {name}")
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), W.make_model().parameters()))


def test_adam_equals_torch_adam_without_decay(stack):
    model, ref_model = W.make_model(), W.make_model()
    labels = {"a": dict(kind="adam", lr=0.01, betas=(0.8, 0.95)), "b": dict(kind="adam", lr=0.003, lr_mul=2.0, betas=(0.5, 0.99))}
    rule = lambda name: "a" if name.startswith("blocks") else "b"
    opt = stack.NorMuonAdam(model.named_parameters(), rule, labels, eps=1e-8, shard_numel=64)
    torch_opt = torch.optim.Adam([
        dict(params=[p for n, p in ref_model.named_parameters() if rule(n) == "a"], lr=0.01, betas=(0.8, 0.95)),
        dict(params=[p for n, p in ref_model.named_parameters() if rule(n) == "b"], lr=0.006, betas=(0.5, 0.99)),
    ], eps=1e-8, weight_decay=0.0)
    for step in range(4):
        for m in (model, ref_model):
            grads(m, step)
        opt.step()
        torch_opt.step()
        opt.zero_grad()
        torch_opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)


def test_cautious_weight_decay_masks(stack):
    g = torch.Generator().manual_seed(3)
    p, grad = torch.randn(6, 16, 8, generator=g), torch.randn(6, 16, 8, generator=g)
    lr, wd = 0.05, 0.3

    def run(fn, wd, *state):
        state = [s.clone() for s in state]
        return fn(p.clone(), grad.clone(), *state, wd=wd)

    # NorMuon: decay lr*wd*p exactly where the update V (from the undecayed step) and p agree in sign, V*p > 0
    normuon = lambda p, g, m, v, wd: stack.normuon_update(p, g, m, v, 0.9, 0.9, lr, wd)
    buf, second = torch.randn(6, 16, 8, generator=g), torch.rand(6, 16, 1, generator=g)
    plain, decayed = run(normuon, 0.0, buf, second), run(normuon, wd, buf, second)
    V = (p - plain) / lr
    mask = V * p > 0
    assert 0.2 < mask.float().mean() < 0.8
    torch.testing.assert_close(plain - decayed, lr * wd * p * mask, atol=1e-6, rtol=0)
    # Adam: the mask is strict (u * p > 0); with a zero moment the update is 0 and nothing decays
    adam = lambda p, g, m, v, wd: stack.adam_update(p, g, m, v, 3, (0.9, 0.95), lr, wd)
    m, v = torch.randn(6, 16, 8, generator=g), torch.rand(6, 16, 8, generator=g)
    m[0] = 0
    grad[0] = 0
    plain, decayed = run(adam, 0.0, m, v), run(adam, wd, m, v)
    u = p - plain
    mask = u * p > 0
    assert 0.2 < mask.float().mean() < 0.8 and not mask[0].any()
    torch.testing.assert_close(plain - decayed, lr * wd * p * mask, atol=1e-6, rtol=0)


def test_labels_and_errors(stack):
    model = W.make_model()
    opt = W.make_optimizer(stack, model)
    kinds = {name: g.spec.kind for g in opt.groups for name in g.names}
    assert kinds["blocks.0.qk"] == "normuon" and kinds["blocks.2.proj"] == "normuon"
    assert kinds["embed"] == kinds["bias"] == kinds["gains"] == "adam"
    # one bank per (label, matrix shape): qk stacks (2,8,8) with v (8,8) -> 9 matrices in the "attn" bank
    attn = [g for g in opt.groups if g.label == "attn"]
    assert len(attn) == 1 and attn[0].n == 9
    with pytest.raises(ValueError, match="no label"):
        stack.NorMuonAdam(model.named_parameters(), lambda n: "attn" if n.startswith("blocks.") else None, W.LABELS)
    with pytest.raises(ValueError, match="kind"):
        stack.NorMuonAdam(model.named_parameters(), lambda n: "x", {"x": dict(kind="sgd", lr=1.0)})


def test_state_dict_round_trip_continues_bit_identically(stack, tmp_path):
    model = W.make_model()
    opt = W.make_optimizer(stack, model)
    for step in range(3):
        W.train_step(stack, model, opt, step)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["optim"]["state"]["blocks.0.qk"]["momentum"].shape == (2, 8, 8)
    assert ckpt["optim"]["state"]["blocks.0.fc"]["second_moment"].shape == (16, 1)
    assert ckpt["optim"]["state"]["blocks.0.proj"]["second_moment"].shape == (1, 16)
    assert ckpt["optim"]["state"]["embed"]["exp_avg"].shape == (W.VOCAB, W.DIM)
    assert ckpt["optim"]["state"]["gains"]["step"] == 3
    model2 = W.make_model(seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = W.make_optimizer(stack, model2)
    opt2.load_state_dict(ckpt["optim"])
    for step in range(3, 5):
        W.train_step(stack, model, opt, step)
        W.train_step(stack, model2, opt2, step)
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), name
    bad = copy.deepcopy(ckpt["optim"])
    del bad["state"]["gains"]
    with pytest.raises(ValueError, match="gains"):
        opt2.load_state_dict(bad)
    bad = copy.deepcopy(ckpt["optim"])
    bad["state"]["embed"]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="embed.exp_avg"):
        opt2.load_state_dict(bad)


def test_copy_state(stack):
    model = W.make_model()
    opt = W.make_optimizer(stack, model)
    for step in range(2):
        W.train_step(stack, model, opt, step)
    before = opt.state_dict()["state"]
    opt.copy_state("lm_head", "embed")
    after = opt.state_dict()["state"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(after["embed"][key], before["lm_head"][key])
        assert not torch.equal(before["embed"][key], before["lm_head"][key])
    assert torch.equal(after["gains"]["exp_avg"], before["gains"]["exp_avg"])


# -- distributed: torchrun with gloo on CPU ----------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_single(stack, save_path=None):
    model = W.make_model()
    opt = W.make_optimizer(stack, model)
    for step in range(W.STEPS):
        W.train_step(stack, model, opt, step)
        if step + 1 == W.SAVE_AT and save_path:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, save_path)
    return model


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process_and_checkpoints_move_between_world_sizes(stack, tmp_path):
    single = run_single(stack, tmp_path / "single_ckpt.pt")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_optimizer_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", worker, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, p in single.named_parameters():
        torch.testing.assert_close(final[name], p.detach(), atol=1e-5, rtol=0, msg=name)
    # 1 -> 2 ranks: the single-process checkpoint, resumed on 2 ranks, ends where the uninterrupted runs do
    from_single = torch.load(tmp_path / "final_from_single.pt", weights_only=True)
    for name, p in single.named_parameters():
        torch.testing.assert_close(from_single[name], final[name], atol=1e-5, rtol=0, msg=name)
    # 2 -> 1: the state saved from 2 ranks, loaded into this process, continues like the uninterrupted 2-rank run
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = W.make_model(seed=1)
    model.load_state_dict(ckpt["model"])
    opt = W.make_optimizer(stack, model)
    opt.load_state_dict(ckpt["optim"])
    for step in range(W.SAVE_AT, W.STEPS):
        W.train_step(stack, model, opt, step)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), final[name], atol=1e-5, rtol=0, msg=name)
