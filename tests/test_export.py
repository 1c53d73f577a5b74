"""export.py: transformers (trust_remote_code) runs the exported folder as the stack runs the checkpoint: each part of
hf/modeling_decoderstack.py computes what the stack function it mirrors computes, the whole model the same logits on
held-out text, the same token ids and chat rendering, the same greedy samples; export.py's command line and its
failures; the upload, through a stand-in for the Hub's API and the HF cache transformers downloads into."""
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import unicodedata

import pytest
import torch

import tokenizer as data_tokenizer
from conftest import ROOT, copy_tree, stdlib_text

transformers = pytest.importorskip("transformers")
import export as exporting  # noqa: E402  export.py beside the stack

EXPORT = os.path.join(ROOT, "export.py")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tok(stack, tok_dir):
    return stack.Tokenizer(tok_dir)


def features_model(stack, vocab_size):
    """A model in which every feature is active and shows: nonzero gates, lambdas and tables, untied embeddings
    that differ from lm_head, YaRN-grown frequencies and attention scale, windows (5 and 11) far shorter than the
    texts, and padded embedding rows (vocab_multiple 96)."""
    cfg = stack.Config(n_layers=4, model_dim=64, n_heads=2, head_dim=32, long_window_layers="1,3",
                       value_embed_layers="0,2,3", bigram_rows_per_vocab=2.0, vocab_multiple=96)
    torch.manual_seed(0)
    model = stack.GPT(dataclasses.replace(stack.ModelConfig.of(cfg, vocab_size), short_window=5, long_window=11))
    model.grow_window(16, 48)
    model.untie()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert model.lm_head.size(0) > vocab_size and model.scale != cfg.attn_scale
    return model.eval()


def stack_logits(stack, model, ids):
    """The stack's training forward of one document (packed attention, SDPA): logits (L, vocab)."""
    x, L = torch.tensor(ids), len(ids)
    cu = torch.full((128,), L, dtype=torch.int32)
    cu[0] = 0
    prev = torch.cat([torch.tensor([-1]), x[:-1]])
    with torch.no_grad():
        return model.logits(model.hidden(stack.Batch(x, prev, torch.arange(L), None, cu, L), model.windows(), "sdpa"))


def cpu_rt(stack):
    return stack.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa")


def load_hf(path, **kwargs):
    return (transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs).eval(),
            transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True, **kwargs))


@pytest.fixture(scope="module")
def features_export(stack, tok, tmp_path_factory):
    model = features_model(stack, tok.vocab_size)
    out = tmp_path_factory.mktemp("features") / "hf"
    exporting.export_hf(model, tok, str(out), model_name="features")
    return model, *load_hf(out)


@pytest.fixture(scope="module")
def trained_export(stack, tok, pretrained_run, tmp_path_factory):
    """The tiny pretrained checkpoint (untied, YaRN-grown in its second stage) and its export."""
    model, _ = stack.load_model(str(pretrained_run[1] / "ckpt_000008"))
    out = tmp_path_factory.mktemp("trained") / "hf"
    exporting.export_hf(model, tok, str(out))
    return model.eval(), *load_hf(out)


def held_out(request, source):
    """Held-out texts: the shared data's val files (skipped without them), or stdlib docstrings the tokenizer and the
    tiny run were not trained on (conftest trains both on the others)."""
    if source == "stdlib":
        return ["\n\n".join(stdlib_text()[-40:])]
    paths = sorted(glob.glob(os.path.join(request.getfixturevalue("shared_data"), "pretrain", "val_*")))
    if not paths:
        pytest.skip("the shared data has no pretrain/val_* files")
    return [open(p, encoding="utf-8").read() for p in paths]


# ---- the model: logits, the cache, generate ---------------------------------------------------------------------

@pytest.mark.parametrize("source", ["stdlib", "shared"])
@pytest.mark.parametrize("which", ["features", "trained"])
def test_logits_equal_the_stacks_on_held_out_text(stack, tok, request, which, source):
    model, hf, _ = request.getfixturevalue(f"{which}_export")
    texts = held_out(request, source)
    windows = model.windows()
    for text in texts:
        ids = [tok.bos_id, *tok.encode(text[:5000])][:400]
        assert len(ids) > 2 * max(windows)  # every layer's window slides
        with torch.no_grad():
            got = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(got, stack_logits(stack, model, ids), atol=1e-4, rtol=0)
        assert got.dtype == torch.float32 and got.size(-1) == tok.vocab_size  # not the padded rows


@functools.cache
def hf_modeling():
    """hf/modeling_decoderstack.py as a module (what trust_remote_code runs)."""
    spec = importlib.util.spec_from_file_location("modeling_decoderstack", os.path.join(ROOT, "hf", "modeling_decoderstack.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rms(x):
    return x.square().mean().sqrt()


# Each part of the modeling file and the stack function it mirrors (a change to one must go to the other): the part
# run on the same inputs and weights gives the same numbers. The whole model is held to the stack by the logits tests.
MIRRORS = ["norm", "softcap", "parse_ints", "GATE_DIMS", "ModelConfig", "Rotary", "Block", "GPT.bigram_ids"]


@pytest.mark.parametrize("stack_part", MIRRORS)
def test_each_part_of_the_modeling_file_mirrors_the_stack(stack, features_export, stack_part):
    hf_mod, (model, hf, _) = hf_modeling(), features_export
    torch.manual_seed(1)
    x, positions = torch.randn(1, 30, 64), torch.arange(30)[None]
    if stack_part in ("norm", "softcap"):
        args = (x * 7,) if stack_part == "norm" else (x * 7, stack.SOFTCAP)
        assert torch.equal(getattr(hf_mod, stack_part)(*args), getattr(stack, stack_part)(*args))
    elif stack_part == "parse_ints":
        for text in ("1,2, 8", "", "3,", 7):
            assert hf_mod.parse_ints(text) == stack.parse_ints(text)
    elif stack_part == "GATE_DIMS":
        assert hf_mod.GATE_DIMS == stack.GATE_DIMS
    elif stack_part == "ModelConfig":  # every field of the stack's model config is one of config.json's
        fields = {f.name for f in dataclasses.fields(stack.ModelConfig)}
        assert fields <= set(hf_mod.DecoderStackConfig.__annotations__) and fields <= set(hf.config.to_dict())
    elif stack_part == "Rotary":
        heads = torch.randn(1, 30, 2, 32)
        assert torch.equal(hf.rotary(heads, positions), model.rotary(heads, positions))
    elif stack_part == "Block":  # a layer with a value embedding and a window shorter than the text
        i = model.value_embed_layers[0]
        ve = torch.randn(1, 30, 64)
        cu = torch.full((128,), 30, dtype=torch.int32)
        cu[0] = 0
        attend = lambda q, k, v, window, scale: stack.attention(q[0], k[0], v[0], cu, 30, window, scale, "sdpa")[None]
        window = model.windows()[i]
        with torch.no_grad():
            want = model.blocks[i](x, ve, model.rotary, positions, model.scale, window, attend)
            got = hf.blocks[i](x, ve, hf.rotary, positions, float(hf.attn_scale), window, None)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert rms(want - x) > 0.01  # the block did something
    else:
        ids = torch.randint(0, model.vocab_size, (1, 30))
        prev = torch.cat([torch.tensor([[-1]]), ids[:, :-1]], dim=1)
        assert torch.equal(hf.bigram_ids(ids, prev), model.bigram_ids(ids, prev))


def test_cached_steps_equal_the_full_forward(tok, features_export):
    """A prefill then steps of 1 and 7 tokens through a transformers DynamicCache, last_ids carrying each row's
    previous token, give the full forward's logits (another last_ids gives others: it is read); without last_ids a
    non-empty cache is refused, and so is a mask with padding."""
    _, hf, _ = features_export
    ids = torch.tensor([[tok.bos_id, *tok.encode(" ".join(stdlib_text()[-5:]))][:60]])
    with torch.no_grad():
        full = hf(ids, use_cache=False).logits
        cache = transformers.DynamicCache(config=hf.config)
        pieces = [hf(ids[:, :20], cache=cache).logits]
        for start, end in [(20, 21), (21, 28), (28, 60)]:
            pieces.append(hf(ids[:, start:end], cache=cache, last_ids=ids[:, start - 1]).logits)
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
        cache = transformers.DynamicCache(config=hf.config)
        hf(ids[:, :20], cache=cache)
        assert (hf(ids[:, 20:21], cache=cache, last_ids=ids[:, 19] + 1).logits - full[:, 20:21]).abs().max() > 1e-3
        with pytest.raises(ValueError, match="last_ids"):
            hf(ids[:, :1], cache=cache)
        with pytest.raises(ValueError, match="attention_mask"):
            hf(ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0))


@pytest.mark.parametrize("which", ["features", "trained"])
def test_greedy_generate_equals_the_engine(stack, tok, request, which):
    """generate's greedy tokens (its KV cache, the exported eos ids) are the Engine's: a long plain-text prompt on
    the model with every feature, a chat prompt from the chat template on the trained model."""
    model, hf, hf_tok = request.getfixturevalue(f"{which}_export")
    if which == "features":
        prompt = [tok.bos_id, *tok.encode(stdlib_text()[-2])][:40]
    else:
        prompt = hf_tok.apply_chat_template([{"role": "system", "content": "Answer briefly."},
                                             {"role": "user", "content": "What does os.path.join do?"}],
                                            add_generation_prompt=True)["input_ids"]
        assert prompt == stack.chat_turn(tok, [tok.bos_id], "Answer briefly.\n\nWhat does os.path.join do?")
    (sample,), = stack.Engine(model, tok, model.windows(), cpu_rt(stack)).generate([prompt], 1, 20, temperature=0)
    assert sample.mask == [1] * len(sample.tokens)  # no calculator output was forced in
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20)
    assert out[0, len(prompt):].tolist() == sample.tokens
    if which == "features":
        assert len(sample.tokens) == 20  # no stop token came early: every step was compared


def test_half_precision_keeps_the_trained_frequencies(features_export):
    """Loaded in bf16, the RoPE frequencies and the attention scale stay fp32 (bf16 would shift a frequency by up
    to 0.4%); the logits are fp32 and close to fp32's."""
    model, hf, _ = features_export
    half = transformers.AutoModelForCausalLM.from_pretrained(hf.name_or_path, trust_remote_code=True,
                                                             dtype=torch.bfloat16)
    assert half.blocks[0].q.dtype == torch.bfloat16
    assert half.rotary.freqs.dtype == half.attn_scale.dtype == torch.float32
    assert torch.equal(half.rotary.freqs, model.rotary.freqs) and float(half.attn_scale) == model.scale
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        got, want = half(ids).logits, hf(ids).logits
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.5


# ---- the tokenizer and the chat template ------------------------------------------------------------------------

def unicode_text():
    """The characters assigned in the Unicode of this Python (not Cn, Cs, Co; of the 127,000 "other letters", Lo,
    mostly CJK and Hangul, one in 16), each after a letter, a space, a digit, a newline, an apostrophe and itself:
    the split pattern's classes (\\p{L}, \\p{N}, \\s, ...) on all of them."""
    categories = {c: unicodedata.category(chr(c)) for c in range(0x110000)}
    chars = [chr(c) for c, cat in categories.items()
             if cat not in ("Cn", "Cs", "Co") and (cat != "Lo" or c % 16 == 0)]
    return "".join(f"a{c}b {c}1{c}{c} \n{c}x'{c}" for c in chars)


@pytest.mark.parametrize("source", ["stdlib", "shared", "unicode"])
def test_tokenizer_ids_equal_the_stacks(stack, tok, features_export, request, source):
    """Plain text encodes to the stack's ids (Tokenizer.encode), <|bos|> first unless add_special_tokens=False, and
    decodes back to itself. The split pattern goes into tokenizer.json as it is (the tokenizers library's Oniguruma
    takes its possessive quantifiers); "unicode" shows its classes match tiktoken's on every assigned character."""
    hf_tok = features_export[2]
    texts = [unicode_text()] if source == "unicode" else held_out(request, source)
    split = json.loads(exporting.hf_tokenizer_files(tok)["tokenizer.json"])["pre_tokenizer"]["pretokenizers"][0]
    assert split["pattern"] == {"Regex": data_tokenizer.SPLIT_PATTERN}
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok.decode(ids) == text
    short = texts[0][:200]
    assert hf_tok(short)["input_ids"] == [tok.bos_id, *tok.encode(short)]


def test_the_tokenizer_loads_without_running_code(tok, features_export):
    """AutoTokenizer reads config.json, whose config class is our code: with trust_remote_code=False it loads the
    same tokenizer without it (with None it would ask on the terminal first)."""
    path, text = features_export[1].name_or_path, stdlib_text()[-1]
    plain = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    conv = [{"role": "user", "content": text}]
    assert plain(text)["input_ids"] == [tok.bos_id, *tok.encode(text)]
    assert plain.apply_chat_template(conv)["input_ids"] == features_export[2].apply_chat_template(conv)["input_ids"]


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You are terse.\nVery."}, {"role": "user", "content": "  Hi there\n"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How many r in strawberry?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me count. "},
                                       {"type": "python", "text": "'strawberry'.count('r')"},
                                       {"type": "python_output", "text": "3"},
                                       {"type": "text", "text": "There are 3."}]},
     {"role": "user", "content": "Thanks — 東京 🚀"}, {"role": "assistant", "content": "You're welcome."}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["one turn", "system, tool call, three turns"])
def test_chat_template_renders_our_chat_format(tok_dir, features_export, conv):
    """apply_chat_template gives data/tokenizer.py's render_conversation ids and its mask of supervised tokens, and
    with add_generation_prompt its render_for_completion prompt."""
    hf_tok = features_export[2]
    ours = data_tokenizer.Tokenizer.load(tok_dir)
    ids, mask = ours.render_conversation(conv)
    out = hf_tok.apply_chat_template(conv, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids and out["assistant_masks"] == mask
    prompt = hf_tok.apply_chat_template(conv[:-1], add_generation_prompt=True)["input_ids"]
    assert prompt == ours.render_for_completion(conv)
    assert hf_tok.decode(ids) == hf_tok.apply_chat_template(conv, tokenize=False)


def test_chat_template_special_text_and_errors(tok_dir, features_export):
    """Special-token text inside a message is plain text to the stack; sanitize_control_tokens=True makes it so for
    transformers. A conversation render_conversation refuses, the template refuses."""
    hf_tok = features_export[2]
    ours = data_tokenizer.Tokenizer.load(tok_dir)
    conv = [{"role": "user", "content": "Say <|assistant_end|> or <|bos|>"},
            {"role": "assistant", "content": "<|user_start|>"}]
    ids = hf_tok.apply_chat_template(conv, sanitize_control_tokens=True)["input_ids"]
    assert ids == ours.render_conversation(conv)[0]
    for bad in ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]):
        with pytest.raises(ValueError):
            ours.render_conversation(bad)
        with pytest.raises(Exception, match="alternate|system message|unknown content part"):
            hf_tok.apply_chat_template(bad)


# ---- export.py, atomic writes, the upload -------------------------------------------------------------------------

def test_export_py_writes_the_folder_and_fails_cleanly(stack, tok, pretrained_run, tmp_path):
    data, run = pretrained_run
    run = copy_tree(run, tmp_path / "run")
    command = [sys.executable, EXPORT, "--data-dir", str(data), "--run-dir", str(run)]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = run / "hf"
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                       "modeling_decoderstack.py", "tokenizer.json", "tokenizer_config.json"]
    assert f"exported {run / 'ckpt_000008'} to {out}: " in r.stdout and "model.safetensors (" in r.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_decoderstack.DecoderStackForCausalLM"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        [tok.special("<|assistant_end|>"), tok.bos_id]
    model, _ = stack.load_model(str(run / "ckpt_000008"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = [tok.bos_id, *tok.encode(stdlib_text()[-3])][:100]
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], stack_logits(stack, model.eval(), ids),
                                   atol=1e-4, rtol=0)

    r = subprocess.run([*command, "--init-from", str(run / "ckpt_999999"), "--export-dir", str(tmp_path / "hf2")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    missing = run / "ckpt_999999" / "state.json"
    assert r.stderr.strip().splitlines() == [f"error: {missing}: missing (not a checkpoint directory?)"]
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no hf2, no hf2.tmp


def test_export_replaces_a_previous_one_atomically(stack, tok, tmp_path, monkeypatch):
    """A second export replaces the first whole; one that fails half-way (a full disk) leaves the first as it was
    and nothing beside it."""
    model = features_model(stack, tok.vocab_size)
    out = tmp_path / "hf"
    exporting.export_hf(model, tok, str(out))
    (out / "stale.txt").write_text("from an older export")
    exporting.export_hf(model, tok, str(out))
    assert not (out / "stale.txt").exists()
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    import safetensors.torch

    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(exporting.ExportError, match=f"{out}: could not write the export \\(No space left on device\\)"):
        exporting.export_hf(model, tok, str(out))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["hf"]
    with pytest.raises(exporting.ExportError, match="300 tokens, the tokenizer 1024"):
        exporting.export_hf(features_model(stack, 300), tok, str(tmp_path / "other"))


def test_exporting_imports_no_transformers(tok_dir, tmp_path):
    """Training and export need only torch and safetensors: the modeling file is a file export.py copies."""
    script = f"""import sys
sys.path.insert(0, {ROOT!r})
import export
stack = export.ds
tok = stack.Tokenizer({tok_dir!r})
cfg = stack.Config(n_layers=2, model_dim=64, n_heads=2, head_dim=32)
model = stack.GPT(stack.ModelConfig.of(cfg, tok.vocab_size))
export.export_hf(model, tok, {str(tmp_path / "hf")!r})
print(sorted(m for m in ("transformers", "tokenizers", "huggingface_hub") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]" and os.path.isfile(tmp_path / "hf" / "model.safetensors")


def hub_cache(cache, repo_id, folder, commit=COMMIT):
    """What a download of `folder` from the model repo leaves in the HF cache: blobs/, snapshots/<commit>/ linking
    into them, refs/main naming the commit (test_hub.py's layout, for a model repo)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_push_to_hub_then_load_what_transformers_downloads(stack, tok, pretrained_run, tmp_path, monkeypatch, capsys):
    """--push-to-hub through export.py: the Hub's API is a stand-in that records the calls and puts the uploaded
    folder where a download would leave it (the HF cache); transformers then loads ORG/NAME from there, offline, and
    computes the checkpoint's logits. A failed upload is one error naming the repo, the export kept."""
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled
    data, run = pretrained_run
    run = copy_tree(run, tmp_path / "run")
    cache, calls = tmp_path / "cache", []

    class FakeApi:
        def create_repo(self, *args, **kwargs):
            calls.append(("create_repo", args, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", (), kwargs))
            hub_cache(cache, kwargs["repo_id"], kwargs["folder_path"])

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    exporting.main(["--data-dir", str(data), "--run-dir", str(run), "--push-to-hub", "org/tiny"])
    assert capsys.readouterr().out.splitlines()[-1] == f"pushed {run / 'hf'} to https://huggingface.co/org/tiny"
    (_, args, create), (_, _, upload) = calls
    assert args == ("org/tiny",) and create == {"exist_ok": True}
    assert upload["folder_path"] == str(run / "hf") and upload["repo_id"] == "org/tiny"
    assert "# tiny" in (run / "hf" / "README.md").read_text()

    hf, hf_tok = load_hf("org/tiny", cache_dir=str(cache))
    model, _ = stack.load_model(str(run / "ckpt_000008"))
    ids = hf_tok(stdlib_text()[-4])["input_ids"][:100]
    assert ids[0] == tok.bos_id
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], stack_logits(stack, model.eval(), ids),
                                   atol=1e-4, rtol=0)

    class OfflineApi:
        def create_repo(self, *args, **kwargs):
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    with pytest.raises(exporting.ExportError, match=f"hf://org/tiny: Cannot reach .* offline .* complete in {run / 'hf'}"):
        exporting.push_to_hub(str(run / "hf"), "org/tiny")
