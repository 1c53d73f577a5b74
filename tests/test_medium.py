"""The medium stack (decoderstack_medium_pt-eval-sft.py): nanochat's GPT, optimizer and schedules in the small stack's
frame. Its model, Muon step and schedules are held to models/nanochat/train_nanochat.py (a separate implementation of
nanochat, itself held to nanochat's own checkpoints by test_nanochat_checkpoints.py); its scaling rules to nanochat's
base_train arithmetic; its KV cache to its training forward; and the files beside the stacks (serve.py with the openai
client, export.py under transformers) to its checkpoints, which they recognise by state.json's "stack"."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_module, unstamped
from load_stack import STACKS, checkpoint_stack, load_stack

MEDIUM_PATH = STACKS["medium"]
NANOCHAT_PATH = os.path.join(ROOT, "models", "nanochat", "train_nanochat.py")
VOCAB = 300
# a depth-2 model (width 64, 2 heads of 32) for seconds-long runs: 8 steps of 1,024 tokens, its own reference model
MEDIUM_TINY = ["--preset", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-doc-len", "128",
               "--long-window", "128", "--short-window", "32", "--train-tokens", "8192", "--batch-tokens", "1024",
               "--micro-batch-tokens", "512", "--reference-depth", "2", "--reference-batch-tokens", "1024",
               "--val-tokens", "2048", "--val-every", "4", "--log-every", "1", "--checkpoint-every", "0",
               "--wandb", "disabled"]


@pytest.fixture(scope="session")
def medium():
    return load_stack("medium")


@pytest.fixture(scope="session")
def nanochat():
    return load_module(NANOCHAT_PATH, "train_nanochat")


def medium_model(medium, depth=4, perturb=True, **overrides):
    """A depth-4 model (width 64, 2 heads of 32) whose every gate, lambda and table is nonzero, so a feature that one
    side mishandles shows."""
    cfg = medium.Config(**{"depth": depth, "aspect_ratio": 16, "head_dim": 32, "max_doc_len": 64, "long_window": 64,
                           "short_window": 8, **overrides})
    torch.manual_seed(0)
    model = medium.GPT(medium.ModelConfig.of(cfg, VOCAB))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def document_logits(medium, model, ids, windows=None):
    """The training forward of one document (BOS-started, alone in its pack): logits (L, vocab)."""
    L = len(ids)
    cu = torch.full((8,), L, dtype=torch.int32)
    cu[0] = 0
    prev = torch.cat([torch.tensor([-1]), ids[:-1]])
    with torch.no_grad():
        h = model.hidden(medium.Batch(ids, prev, torch.arange(L), None, cu, L), windows or model.windows(), "sdpa")
        return model.logits(h)


# ---- nanochat's model, optimizer, schedules and scaling rules ----------------------------------------------------

def test_the_model_is_nanochats_gpt(medium, nanochat):
    """Weights copied into the nanochat peer's GPT (nanochat's module layout and names) give the same logits on a
    document: the same architecture, init ranges aside. The medium's softcap is nanochat's tanh cap plus 15."""
    model = medium_model(medium)
    cfg = nanochat.Config(n_layers=4, model_dim=64, n_heads=2, seq_len=64, window_pattern="SSSL", vocab_multiple=64)
    peer = nanochat.GPT(cfg, VOCAB)
    windows = peer.windows = [16, 16, 16, 64]  # SSSL (nanochat's S, a quarter rounded up to 128, would cover it all)
    names = {"wte.weight": "embed", "lm_head.weight": "lm_head", "resid_lambdas": "resid_lambdas",
             "x0_lambdas": "x0_lambdas", "smear_lambda": "smear_lambda", "backout_lambda": "backout_lambda",
             "smear_gate.weight": "smear_gate"}
    for i in range(4):
        names.update({f"blocks.{i}.attn.c_{a}.weight": f"blocks.{i}.{b}" for a, b in zip("qkv", "qkv")})
        names.update({f"blocks.{i}.attn.c_proj.weight": f"blocks.{i}.o", f"blocks.{i}.mlp.c_fc.weight": f"blocks.{i}.fc",
                      f"blocks.{i}.mlp.c_proj.weight": f"blocks.{i}.proj"})
        if model.blocks[i].ve_gate is not None:
            names[f"blocks.{i}.attn.ve_gate.weight"] = f"blocks.{i}.ve_gate"
    ours = dict(model.named_parameters())
    state = {k: ours[v].detach().reshape(peer.state_dict()[k].shape) for k, v in names.items()}
    state.update({f"value_embeds.{layer}.weight": model.value_embeds[j].detach()
                  for j, layer in enumerate(model.value_embed_layers)})
    peer.load_state_dict(state)  # strict: every parameter of nanochat's GPT has its counterpart
    assert model.value_embed_layers == [1, 3] and sorted(peer.value_embeds) == ["1", "3"]
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (60,))
    with torch.no_grad():
        want = peer(ids[None])[0]
    got = document_logits(medium, model, ids, windows)
    torch.testing.assert_close(got - 15, want, atol=2e-5, rtol=1e-5)
    # and not vacuously: the smear, the backout and the value embeddings each move the logits
    for name in ("smear_lambda", "backout_lambda"):
        with torch.no_grad():
            saved = getattr(model, name).clone()
            getattr(model, name).zero_()
            assert (document_logits(medium, model, ids, windows) - got).abs().max() > 1e-3, name
            getattr(model, name).copy_(saved)


def test_the_windows_tile_ssl_with_the_last_layer_long(medium):
    model = medium_model(medium, depth=6, perturb=False)
    assert model.windows() == [8, 8, 8, 64, 8, 64]
    assert model.windows(4, 32) == [4, 4, 4, 32, 4, 32]
    assert medium_model(medium, depth=6, perturb=False, window_pattern="L").windows() == [64] * 6
    with pytest.raises(ValueError, match="window-pattern"):
        medium.Config(window_pattern="SXL")


def test_the_softcap_is_nanochats_tanh_cap_shifted(medium):
    z = torch.linspace(-200, 200, 1001)
    torch.testing.assert_close(medium.softcap(z, medium.SOFTCAP) - 15, 15 * torch.tanh(z / 15), atol=2e-5, rtol=0)


def test_the_muon_step_is_nanochats(medium, nanochat):
    """Two steps of the medium's Muon rule on stacks of tall, wide and square matrices equal the nanochat peer's
    (MuonEq, Polar Express, Muon+, NorMuon, cautious decay), state included; fp32 on both sides."""
    torch.manual_seed(3)
    for shape in ((3, 48, 16), (2, 16, 40), (2, 24, 24)):
        p0 = torch.randn(shape)
        p_ours, p_peer = p0.clone(), p0.clone()
        m_ours, m_peer = torch.zeros(shape), torch.zeros(shape)
        v_shape = (shape[0], shape[1], 1) if shape[1] >= shape[2] else (shape[0], 1, shape[2])
        v_ours, v_peer = torch.zeros(v_shape), torch.zeros(v_shape)
        for _ in range(2):
            g = torch.randn(shape)
            p_ours = medium.normuon_update(p_ours, g, m_ours, v_ours, 0.9, 0.9, 0.02, 0.1)
            nanochat.muon_update(p_peer, g, m_peer, v_peer, 0.9, 0.02, 0.1)
        torch.testing.assert_close(p_ours, p_peer, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v_ours, v_peer, atol=1e-6, rtol=1e-4)
        assert (p_ours - p0).abs().max() > 1e-3


def test_the_adamw_step_is_torchs(medium):
    torch.manual_seed(4)
    p0 = torch.randn(50)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)
    p, m, v = p0.clone(), torch.zeros(50), torch.zeros(50)
    for step in range(1, 4):
        g = torch.randn(50)
        ref.grad = g.clone()
        opt.step()
        p = medium.adam_update(p, g, m, v, step, (0.8, 0.95), 0.01, 0.05)
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-5)


def test_the_schedules_are_nanochats(medium, nanochat):
    """lr, Muon momentum and Muon weight decay at every step of a 200-step run equal the nanochat peer's functions."""
    cfg = medium.Config(lr_warmup_steps=10, momentum_warmup=40, cooldown_frac=0.65, final_lr=0.05)
    stages = [medium.Stage(200, 4096, 512, 128, 512, 1.0, (1.0,), (1.0,))]
    peer = nanochat.Config(warmup_steps=10, momentum_warmup_steps=40, warmdown_frac=0.65, final_lr_frac=0.05,
                           weight_decay=1.0)
    for step in range(200):
        p = medium.plan_step(cfg, stages, step)
        assert p.lr_factor == pytest.approx(nanochat.lr_multiplier(peer, step, 200), abs=1e-12), step
        assert p.momentum == pytest.approx(nanochat.muon_momentum(peer, step, 200), abs=1e-12), step
        assert p.wd_factor == pytest.approx(nanochat.muon_weight_decay(peer, step, 200), abs=1e-12), step


def expected_scaling_params(depth, vocab):
    """nanochat's scaling parameters (blocks + lm_head) from its shapes: 12 d^2 per block, a 12 x heads gate on the
    value-embedding layers, the padded lm_head."""
    dim = -(-depth * 64 // 128) * 128
    heads, padded = dim // 128, -(-vocab // 64) * 64
    ve_layers = sum(1 for i in range(depth) if i % 2 == (depth - 1) % 2)
    return depth * 12 * dim * dim + ve_layers * 12 * heads + padded * dim


@pytest.mark.parametrize("depth, dim, heads", [(12, 768, 6), (20, 1280, 10), (24, 1536, 12), (26, 1664, 13)])
def test_the_depth_dial_derives_nanochats_model_and_horizon(medium, depth, dim, heads):
    """At nanochat's 32,768-token vocabulary: width and heads from depth; tokens = 8 x scaling parameters; the batch
    2^19 x (tokens / d12's)^0.383 rounded to a power of two; lrs x sqrt(batch / 2^19); Muon's weight decay 0.28 x
    that x d12's tokens / tokens. d24 (the leaderboard model): 1536 wide, 12 heads, a 2^20 batch, as nanochat's."""
    cfg = medium.Config(depth=depth)
    assert (cfg.model_dim, cfg.n_heads) == (dim, heads)
    plan = medium.scaling_plan(cfg, 32768)
    params, reference = expected_scaling_params(depth, 32768), expected_scaling_params(12, 32768)
    assert (plan.params, plan.reference_params) == (params, reference)
    batch = 2 ** round(math.log2(2**19 * (params / reference) ** 0.383))
    assert plan.batch_tokens == batch and plan.tokens == int(8 * params) and plan.steps == int(8 * params) // batch
    assert plan.lr_scale == pytest.approx((batch / 2**19) ** 0.5)
    assert plan.muon_wd == pytest.approx(0.28 * (batch / 2**19) ** 0.5 * reference / params)
    if depth == 24:
        assert batch == 2**20 and 5.5e9 < plan.tokens < 6.0e9  # ~5,570 steps of 1M tokens
    labels = medium.optimizer_labels(cfg, 32768)
    width = (dim / 768) ** -0.5
    assert labels["matrix"]["lr"] == pytest.approx(0.02 * plan.lr_scale)
    assert labels["embed"]["lr"] == pytest.approx(0.3 * width * plan.lr_scale)
    assert labels["value_embed"]["lr"] == pytest.approx(0.15 * width * plan.lr_scale)
    assert labels["lm_head"]["lr"] == pytest.approx(0.008 * width * plan.lr_scale)
    assert (labels["resid"]["lr"], labels["x0"]["lr"]) == pytest.approx((0.005 * plan.lr_scale, 0.5 * plan.lr_scale))
    assert labels["smear"]["lr"] == 0.2


def test_muon_takes_every_block_parameter_adamw_the_rest(medium):
    model = medium_model(medium, perturb=False)
    opt = medium.make_optimizer(model, medium.Config(depth=4, aspect_ratio=16, head_dim=32))
    kinds = {name: g.spec.kind for g in opt.groups for name in g.names}
    assert kinds.keys() == dict(model.named_parameters()).keys()
    assert {n for n, k in kinds.items() if k == "normuon"} == {n for n, _ in model.named_parameters() if n.startswith("blocks.")}


# ---- the KV cache serves the training forward exactly -------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True], ids=["sliced", "static"])
def test_prefill_then_decode_equals_training_forward(medium, static):
    model = medium_model(medium)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (60,))
    windows = [3, 7, 5, 20]
    ref = document_logits(medium, model, ids, windows)
    cache = medium.KVCache(model, 1, 60, "cpu", torch.float32, static=static)
    with torch.no_grad():
        got = [model.decode(ids[None, :1], cache, windows)[0], model.decode(ids[None, 1:18], cache, windows)[0]]
        got += [model.decode(ids[None, t:t + 1], cache, windows)[0] for t in range(18, 60)]
    torch.testing.assert_close(torch.cat(got), ref, atol=2e-5, rtol=1e-5)


def test_a_document_in_a_pack_is_scored_as_alone(medium):
    """Packed after another document, a document's logits are its own: attention and the smear stop at its start."""
    model = medium_model(medium)
    torch.manual_seed(5)
    a, b = torch.randint(0, VOCAB, (25,)), torch.randint(0, VOCAB, (30,))
    ids = torch.cat([a, b])
    cu = torch.tensor([0, 25, 55, 55, 55, 55, 55, 55], dtype=torch.int32)
    prev = torch.cat([torch.tensor([-1]), a[:-1], torch.tensor([-1]), b[:-1]])
    positions = torch.cat([torch.arange(25), torch.arange(30)])
    with torch.no_grad():
        packed = model.logits(model.hidden(medium.Batch(ids, prev, positions, None, cu, 30), model.windows(), "sdpa"))
    torch.testing.assert_close(packed[25:], document_logits(medium, model, b), atol=2e-5, rtol=1e-5)
    prev[25] = a[-1]  # the smear reaching across the boundary would change b's first token
    with torch.no_grad():
        leaked = model.logits(model.hidden(medium.Batch(ids, prev, positions, None, cu, 30), model.windows(), "sdpa"))
    assert (leaked[25] - packed[25]).abs().max() > 1e-3


# ---- every phase, and the files beside the stack, on a medium checkpoint ------------------------------------------

@pytest.fixture(scope="module")
def medium_run(tiny_data, tok_dir, tmp_path_factory):
    """The medium stack copied alone into an empty folder runs pt, eval, sft, chat, rl and generate (with fastapi,
    uvicorn, transformers and matplotlib unimportable); returns (data, run directory, stdout)."""
    from test_layout import run_alone
    from test_report import data_for_every_phase
    root = tmp_path_factory.mktemp("medium")
    data = data_for_every_phase(root, tiny_data, tok_dir)
    alone, r = run_alone(MEDIUM_PATH, MEDIUM_TINY, data, root)
    assert sorted(os.listdir(alone)) == ["decoderstack_medium_pt-eval-sft.py", "run"]
    return data, alone / "run", r.stdout


@pytest.mark.slow
def test_the_medium_stack_alone_runs_every_phase(medium_run):
    data, run, stdout = medium_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val_bpb", "core", "sft_val_loss", "chatcore", "gsm8k_pass_at"} <= set(metrics)
    assert [t["phase"] for t in metrics["phase_time_s"]] == ["pt", "eval", "sft", "chat", "rl"]
    assert metrics["val_bpb"] < 12 and "--- sample 1/1" in stdout
    log = unstamped((run / "log.txt").read_text())
    assert re.search(r"^scaling rules \(reference d2\): [\d,]+ scaling parameters, 8,192 tokens .* batch 1,024, 8 steps, "
                     r"lrs x 1\.0000, Muon weight decay 0\.2800$", log, re.M), log[:3000]
    assert re.search(r"^CORE -?[\d.]+ (?:beats|is below) GPT-2's 0\.256525, the track's target \(over 4 examples per task, "
                     r"not every one: no claim\)$", log, re.M)
    losses = [float(x) for x in re.findall(r"^step \d+/8 loss (\S+)", log, re.M)]
    assert len(losses) == 8 and losses[-1] < losses[0]  # it learns
    for name in ("latest_pt", "latest_sft", "latest_rl"):
        state = json.loads((run / (run / name).read_text().strip() / "state.json").read_text())
        assert state["stack"] == "medium" and state["model"]["window_pattern"] == "SSSL"
    assert checkpoint_stack(["--run-dir", str(run)]) == "medium"


@pytest.mark.slow
def test_each_stack_refuses_the_others_checkpoint_in_one_error_naming_it(stack, medium, medium_run, pretrained_run):
    """A checkpoint of the other stack is a model this one does not build: load_model's one error names its
    state.json; loading its weights into this stack's model (--init-from, --resume) names its safetensors."""
    run = medium_run[1]
    ckpts = {"small": pretrained_run[1] / "ckpt_000008", "medium": run / (run / "latest_pt").read_text().strip()}
    for this, other in ((stack, "medium"), (medium, "small")):
        with pytest.raises(this.CheckpointError, match=rf"^{re.escape(str(ckpts[other]))}/state.json: 'model' is not a "
                                                       r"model this stack builds \(.*unexpected keyword argument"):
            this.load_model(str(ckpts[other]))
        own, _ = this.load_model(str(ckpts["small" if other == "medium" else "medium"]))
        with pytest.raises(this.CheckpointError, match=rf"^{re.escape(str(ckpts[other]))}/model.safetensors: does not "
                                                       "load into this model"):
            this.load_checkpoint(str(ckpts[other]), own)


@pytest.mark.slow
def test_serve_picks_the_medium_stack_and_answers_the_openai_client(medium, medium_run):
    """serve.py --run-dir RUN on a medium run (its latest checkpoint: RL's, a chat model): load_stack reads the
    checkpoint's stack; the openai client's greedy chat reply is the medium Engine's greedy reply."""
    import openai
    import serve as serving
    data, run, _ = medium_run
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *MEDIUM_TINY, "--data-dir", str(data),
                             "--run-dir", str(run), "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "DECODERSTACK_STACK": ""})
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://\S+) ", line)
        assert url, line + proc.stderr.read()[-3000:] if proc.poll() is not None else line
        client = openai.OpenAI(base_url=url.group(1) + "/v1", api_key="none")
        reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, max_tokens=6,
                                               temperature=0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tok = medium.Tokenizer(str(data / "tokenizer"))
    model, _ = medium.load_model(str(run / (run / "latest").read_text().strip()))
    rt = medium.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")
    want = medium.Engine(model.eval(), tok, model.windows(), rt).generate([serving.chat_prompt(tok, messages)], 1, 6,
                                                                          temperature=0.0)[0][0]
    assert reply.choices[0].message.content == tok.decode(want.tokens) and reply.usage.completion_tokens == len(want.tokens)


@pytest.mark.slow
def test_export_ships_the_medium_modeling_file_held_to_the_stacks_logits(medium, medium_run, tmp_path):
    """export.py --run-dir RUN writes modeling_decoderstack_medium.py; transformers loads the folder; its logits equal
    the stack's on a document, and its cached greedy generation is the stack's."""
    transformers = pytest.importorskip("transformers")
    data, run, _ = medium_run
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *MEDIUM_TINY, "--data-dir", str(data),
                        "--run-dir", str(run), "--export-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "DECODERSTACK_STACK": ""}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "decoderstack_medium" and "modeling_decoderstack_medium.py" in os.listdir(out)
    assert "modeling_decoderstack.py" not in os.listdir(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    model, _ = medium.load_model(str(run / (run / "latest").read_text().strip()))
    model.eval()
    torch.manual_seed(6)
    ids = torch.randint(0, model.vocab_size, (40,))
    with torch.no_grad():
        got = hf(ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(got, document_logits(medium, model, ids), atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        generated = hf.generate(ids[None, :10], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 10:]
        cache = medium.KVCache(model, 1, 32, "cpu", torch.float32)
        out_ids, step = [], ids[None, :10]
        for _ in range(8):
            step = model.decode(step, cache, model.windows(), last_only=True)[:, -1].argmax(-1, keepdim=True)
            out_ids.append(int(step))
    assert generated.tolist() == out_ids


def test_load_stack_reads_the_checkpoints_stack(tmp_path):
    """--init-from or --run-dir's latest checkpoint names its stack; a checkpoint without one is the small stack's;
    no checkpoint, no choice."""
    ckpt = tmp_path / "run" / "ckpt_000001"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "latest").write_text("ckpt_000001")
    (ckpt / "state.json").write_text(json.dumps({"stack": "medium", "step": 1}))
    assert checkpoint_stack(["--run-dir", str(tmp_path / "run")]) == "medium"
    assert checkpoint_stack([f"--init-from={ckpt}"]) == "medium"
    (ckpt / "state.json").write_text(json.dumps({"step": 1}))
    assert checkpoint_stack(["--init-from", str(ckpt)]) == "small"
    assert checkpoint_stack(["--run-dir", str(tmp_path / "nothing")]) is None and checkpoint_stack([]) is None


@pytest.mark.slow
def test_warm_up_compiles_every_graph_of_the_h100x8_schedule(medium, tiny_data, tmp_path, monkeypatch):
    """The h100x8 schedule of d24 (nanochat's: ~5,570 steps of 2^20 tokens, one stage, fixed windows) walked as the
    warm-up walks it has one shape variant per rank; a narrow model on the preset's micro-batches, windows and
    document length, run for 12 steps under a counting backend (test_compile_schedule's), compiles its graphs in the
    warm-up and none in the timed loop."""
    from test_compile_schedule import counting_backend, free_port
    import torch.distributed as dist
    cfg = medium.parse_config(["--preset", "h100x8"])
    stages = medium.scaled_stages(cfg, 32768)
    assert stages[0].batch_tokens == 2**20 and 5500 < stages[0].steps < 5600
    variants = {(T, accum, p.max_doc_len, p.short_window, p.long_window)
                for _, p, T, accum in medium.pretrain_steps(cfg, stages, 8)}
    assert variants == {(32768, 4, 2048, 768, 2048)}
    graphs, at_warm_up_end = [], []
    real_compile, real_warm_up = torch.compile, medium.warm_up_compiled
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counting_backend(graphs)))
    monkeypatch.setattr(medium, "warm_up_compiled", lambda *a: (real_warm_up(*a), at_warm_up_end.append(len(graphs)))[0])
    cfg = medium.parse_config(["--preset", "h100x8", "--depth", "2", "--aspect-ratio", "16", "--head-dim", "32",
                               "--train-tokens", str(12 * 2**20), "--batch-tokens", str(2**20), "--val-every", "1000000",
                               "--val-tokens", "4096", "--log-every", "200", "--data-dir", tiny_data,
                               "--run-dir", str(tmp_path), "--wandb", "disabled"])
    rt = medium.Runtime(torch.device("cpu"), torch.float32, 0, 8, "sdpa")  # rank 0 of 8: its micro-batches
    torch._dynamo.reset()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        medium.phase_pt(cfg, rt, medium.Logger(cfg, rt))
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert at_warm_up_end == [len(graphs)] and metrics["pt_compile_graphs"] == len(graphs) and 1 <= len(graphs) <= 4
    assert f"compiled {len(graphs)} graphs for steps 0-12" in open(tmp_path / "log.txt").read()


def test_the_paper_estimate_counts_between_matmuls_alone_and_nanochats_upper_bound(medium):
    """bench/paper.py's FLOPs for the d24 run lie between 6 per token per matmul weight (attention left out) and
    nanochat's estimate_flops (every token attending to a full window); its hours follow from them and the MFU."""
    from paper import H100_BF16, paper
    cfg = medium.parse_config(["--preset", "h100x8"])
    r = paper(medium, cfg, 32768, 8)
    L, dim, heads, padded = 24, 1536, 12, 32768
    matmuls = 12 * dim * dim * L + padded * dim  # blocks (gates aside) and lm_head
    windows = [768, 768, 768, 2048] * 6
    nanochat = 6 * (matmuls + 12 * heads * 12) + sum(12 * heads * 128 * min(w, 2048) for w in windows)
    assert 6 * matmuls < r["flops_per_token"] < nanochat
    assert r["tokens"] == r["steps"] * 2**20 and r["flops"] == pytest.approx(r["flops_per_token"] * r["tokens"])
    assert r["hours_at_mfu_50"] == pytest.approx(r["flops"] / (8 * H100_BF16 * 0.5) / 3600)
    assert r["optimizer_state_per_rank_gib"] < r["optimizer_state_gib"] / 4  # sharded over the 8 ranks


# the small stack's flags for what the medium does another way: its model, schedule, optimizer lrs and FP8
SMALL_ONLY = {"n_layers", "model_dim", "n_heads", "long_window_layers", "value_embed_layers", "bigram_rows_per_vocab",
              "attn_scale", "fp8", "stages", "untie_frac", "adam_lr", "adam_wd"}


def test_flags_are_the_small_stacks_where_the_concept_is_the_same(stack, medium):
    """Every flag of the small stack but SMALL_ONLY is the medium's too, with the same default (the model's and
    schedule's where nanochat's differ; run_dir per track); every medium flag has its help and default in --help."""
    small, med = ({name: f.default for name, (_, _, f) in s.flags(s.Config).items()} for s in (stack, medium))
    assert set(small) - set(med) == SMALL_ONLY
    differ = {name for name in set(small) & set(med) if small[name] != med[name]}
    assert differ == {"run_dir", "softcap", "vocab_multiple", "micro_batch_tokens", "lr_warmup_steps", "cooldown_frac",
                      "final_lr", "muon_lr", "muon_wd"}
    r = subprocess.run([sys.executable, MEDIUM_PATH, "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    helps = {line.split()[0]: " ".join(line.split()[2:]) or lines[i + 1].strip()
             for i, line in enumerate(lines) if line.startswith("  --")}
    assert set(helps) == {f"--{name.replace('_', '-')}" for name in med}
    assert all("(default " in text and not text.startswith("(default") for text in helps.values()), helps
    phases = r.stdout.split("phases (--phases")[1].splitlines()[1:7]
    assert [line.split()[0] for line in phases] == ["pt", "eval", "sft", "chat", "rl", "generate"]
