"""A tiny model and a deterministic training loop for the optimizer tests, run in-process (one rank, no
torch.distributed) by tests/test_optimizer.py and under torchrun (gloo) as a script:

    torchrun --nproc_per_node=N tests/dist_optimizer_worker.py OUT_DIR

The script trains STEPS steps, saves {"model", "optim"} after SAVE_AT steps to OUT_DIR/ckpt.pt and the final
parameters to OUT_DIR/final.pt; then it resumes OUT_DIR/single_ckpt.pt (written by one process after SAVE_AT
steps) and saves where that ends to OUT_DIR/final_from_single.pt (rank 0 writes). The stack is loaded by path the way conftest does
(DECODERSTACK_STACK)."""
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, DIM, BATCH, SEQ = 40, 8, 8, 6
STEPS, SAVE_AT, COPY_AT = 6, 3, 2
LABELS = {
    "attn": dict(kind="normuon", lr=0.03, wd=0.5),
    "fc": dict(kind="normuon", lr=0.02, wd=0.5, lr_mul=2.0),
    "embed": dict(kind="adam", lr=0.01, wd=0.1, wd_mul=2.0, betas=(0.5, 0.95)),
    "head": dict(kind="adam", lr=0.02, wd=0.1, betas=(0.8, 0.95)),
    "scalar": dict(kind="adam", lr=0.01, lr_mul=5.0, betas=(0.9, 0.99)),
}
RULES = [(r"blocks\.\d+\.(fc|proj)", "fc"), (r"blocks\..*", "attn"), (r"embed", "embed"), (r"lm_head", "head"), (r".*", "scalar")]


def rule(name):
    """The label of the first pattern of RULES that matches the whole parameter name."""
    return next(label for pattern, label in RULES if re.fullmatch(pattern, name))
SHARD_NUMEL = 64  # embed and lm_head (320 elements) are sharded, the scalars replicated


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qk = nn.Parameter(torch.randn(2, DIM, DIM) / DIM ** 0.5)  # a stack of two matrices in one parameter
        self.v = nn.Parameter(torch.randn(DIM, DIM) / DIM ** 0.5)
        self.fc = nn.Parameter(torch.randn(2 * DIM, DIM) / DIM ** 0.5)  # tall
        self.proj = nn.Parameter(torch.randn(DIM, 2 * DIM) / DIM ** 0.5)  # wide

    def forward(self, x):
        a = torch.tanh(x @ self.qk[0].T) * torch.sigmoid(x @ self.qk[1].T)
        x = x + a @ self.v.T
        return x + F.relu(x @ self.fc.T).square() @ self.proj.T


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(VOCAB, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(3))  # 3 v matrices: the bank needs padding on 2 ranks
        self.lm_head = nn.Parameter(torch.randn(VOCAB, DIM) * 0.1)
        self.gains = nn.Parameter(torch.ones(3))
        self.bias = nn.Parameter(torch.zeros(VOCAB))

    def forward(self, ids):
        x = self.embed[ids]
        for gain, block in zip(self.gains, self.blocks):
            x = x + gain * block(F.rms_norm(x, (DIM,)))
        return F.rms_norm(x, (DIM,)) @ self.lm_head.T + self.bias


def make_model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def make_optimizer(stack, model):
    return stack.NorMuonAdam(model.named_parameters(), rule, LABELS, shard_numel=SHARD_NUMEL)


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def train_step(stack, model, opt, step, rank=0, world=1):
    """Gradients of this rank's equal slice of the step's batch (mean loss), so their average over ranks is the
    full-batch gradient; then one optimizer step with the schedules."""
    if step == COPY_AT:
        opt.copy_state("lm_head", "embed")
    inputs, targets = batch(step)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    logits = model(inputs[rows])
    F.cross_entropy(logits.reshape(-1, VOCAB), targets[rows].reshape(-1)).backward()
    opt.step(lr_factor=1.0 - step / (2 * STEPS), muon_momentum=stack.muon_momentum(step, STEPS, warmup=3, cooldown=2))
    opt.zero_grad()


def main(out_dir):
    import torch.distributed as dist
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import STACK_PATH, load_module
    stack = load_module(STACK_PATH, "decoderstack")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    opt = make_optimizer(stack, model)
    for step in range(STEPS):
        train_step(stack, model, opt, step, rank, world)
        if step + 1 == SAVE_AT:
            ckpt = {"model": model.state_dict(), "optim": opt.state_dict()}  # state_dict() is a collective
            if rank == 0:
                torch.save(ckpt, os.path.join(out_dir, "ckpt.pt"))
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out_dir, "final.pt"))
    # resume here a checkpoint that the test wrote from one process
    ckpt = torch.load(os.path.join(out_dir, "single_ckpt.pt"), weights_only=True)
    model = make_model(seed=1)
    model.load_state_dict(ckpt["model"])
    opt = make_optimizer(stack, model)
    opt.load_state_dict(ckpt["optim"])
    for step in range(SAVE_AT, STEPS):
        train_step(stack, model, opt, step, rank, world)
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out_dir, "final_from_single.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
