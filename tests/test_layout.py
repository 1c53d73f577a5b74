"""The stack is the record: what it holds and what it leaves to the files beside it (serve.py, export.py, report.py,
chat_cli.py), its flags (every one kept, each with its help), and the stack copied alone into an empty folder running
every phase without the libraries those files need. Its pretraining numbers equal the latest record's frozen stack's."""
import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, STACK_PATH, TINY_ARGS, unstamped
from load_stack import STACKS
from test_report import data_for_every_phase
from test_rl import RL_ARGS
from test_sft import SFT_ARGS

BESIDE = ("serve.py", "export.py", "report.py", "chat_cli.py", "load_stack.py")
LIBRARIES_BESIDE = ("fastapi", "uvicorn", "transformers", "matplotlib")  # what serving, export and the report need
LONGEST_STRING = 30  # lines a string literal of the stack may span, docstrings aside

# Every flag the stack took on 2026-12-05 (serve and export ones included) with its default, as the stack then had
# them; they are now the flags of the stack (its Config and groups), of serve.py and of export.py.
FLAGS_BEFORE = json.loads("""{"preset": "h100x8", "data_dir": "runs/data", "vocab_size": 0, "bos_id": -1,
"run_dir": "runs/h100x8", "phases": "pt", "seed": 0, "resume": false, "overwrite": false, "init_from": "", "compile": true,
"attn_backend": "auto", "dtype": "auto", "wandb": "auto", "n_layers": 11, "model_dim": 768, "n_heads": 6, "head_dim": 128,
"mlp_mult": 4, "vocab_multiple": 128, "long_window_layers": "3,10", "value_embed_layers": "1,2,8,9,10",
"bigram_rows_per_vocab": 7.5, "attn_scale": 0.1, "softcap": [23.0, 5.0, 7.5], "fp8": true,
"stages": [[423, 131072, 896, 128, 384, 1.0, [1.0, 0.5, 0.25], [1.0, 0.5, 0.0]], [424, 262144, 2048, 384, 896, 1.52,
[1.0, 0.5], [1.0, 0.0]], [423, 393216, 2048, 640, 1408, 1.73, [1.0], [1.0]], [15, 393216, 2048, 768, 1664, 1.73, [1.0],
[1.0]]], "micro_batch_tokens": 49152, "train_tokens": 0, "lr_warmup_steps": 0, "cooldown_frac": 0.6, "final_lr": 0.15,
"untie_frac": 0.667, "muon_lr": 0.023, "muon_wd": 0.028, "adam_lr": 0.008, "adam_wd": 0.006, "val_every": 250,
"val_tokens": 10485760, "val_final_tokens": 0, "checkpoint_every": 0, "keep_checkpoints": 2, "core_max_per_task": -1,
"core_batch_tokens": 32768, "chat_max_per_task": -1, "chat_batch_size": 16, "chat_max_new_tokens": 512,
"sandbox": "isolated", "rl_steps": 60, "rl_questions_per_step": 16, "rl_samples": 16, "rl_max_new_tokens": 256,
"rl_temperature": 1.0, "rl_top_k": 50, "rl_lr_mul": 0.05, "rl_batch_tokens": 16384, "rl_eval_every": 20,
"rl_eval_questions": 400, "rl_eval_samples": 8, "prompt": "", "prompt_format": "auto", "num_samples": 1,
"max_new_tokens": 256, "temperature": 0.8, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "decode_compile": false,
"host": "127.0.0.1", "port": 8000, "served_model_name": "", "serve_max_rows": 32, "serve_max_queue": 64,
"serve_timeout": 300.0, "log_every": 10, "sft_steps": 500, "sft_batch_tokens": 393216, "sft_lr_mul": 0.8,
"sft_warmup_frac": 0.0, "sft_cooldown_frac": 0.5, "sft_momentum_warmup": 300, "sft_eval_every": 100,
"sft_val_tokens": 4194304, "sft_chat_max_per_task": 0, "export_dir": "", "push_to_hub": ""}""")


@pytest.mark.parametrize("path", [STACK_PATH, STACKS["medium"]], ids=["small", "medium"])
def test_the_stack_imports_nothing_beside_it_and_keeps_no_code_in_strings(path):
    """Serving, export and the report import the stack, never the other way; code lives in files (chat.html,
    hf/), not in the stack's strings: none spans more than LONGEST_STRING lines but docstrings."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    imported, docstrings = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            docstrings.add(node.body[0].value)
    assert "torch" in imported and not imported & {*LIBRARIES_BESIDE, *(name[:-3] for name in BESIDE)}, imported
    strings = [node for node in ast.walk(tree) if isinstance(node, (ast.Constant, ast.JoinedStr)) and node not in docstrings]
    assert not [node.lineno for node in strings if node.end_lineno - node.lineno > LONGEST_STRING]


def test_flags_keep_their_names_and_defaults(stack):
    """The stack's Config (and its SFT, RL and sampling groups), serve.py's ServeConfig and export.py's ExportConfig
    together take exactly the flags the one Config took, each with its default."""
    pytest.importorskip("fastapi")
    import export
    import serve
    now = {}
    for cls in (stack.Config, serve.ServeConfig, export.ExportConfig):
        for name, (_, _, field) in stack.flags(cls).items():
            assert name not in now, f"--{name} twice"
            now[name] = json.loads(json.dumps(field.default, default=stack.dataclasses.astuple))
    assert now == FLAGS_BEFORE
    cfg, served = stack.parse_flags(["--preset", "cpu", "--sft-steps", "7", "--port", "9000", "--temperature", "0"],
                                    [stack.Config, serve.ServeConfig])
    assert (cfg.sft.steps, cfg.rl.steps, cfg.sample.temperature, served.port) == (7, 8, 0.0, 9000)  # rl: the preset's


@pytest.mark.parametrize("script", ["decoderstack_small_pt-eval-sft.py", "serve.py", "export.py", "chat_cli.py",
                                    "data/check.py"])
def test_help_says_what_every_flag_is(script):
    """--help gives every flag a line of its own help (the field's comment) and its default; the stack's lists the
    phases with what each reads and writes."""
    if script in ("serve.py", "export.py"):
        pytest.importorskip("fastapi")
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-2000:]
    helps, lines = {}, r.stdout.splitlines()
    for i, line in enumerate(lines):  # "  --flag TYPE  help", the help on the next line where the flag is long
        if line.startswith("  --"):
            words = line.split()
            helps[words[0]] = " ".join(words[2:]) or lines[i + 1].strip()
    mine = {"serve.py": {"host", "port", "served_model_name", "serve_max_rows", "serve_max_queue", "serve_timeout"},
            "export.py": {"export_dir", "push_to_hub"}}.get(script, set())
    others = {"host", "port", "served_model_name", "serve_max_rows", "serve_max_queue", "serve_timeout", "export_dir",
              "push_to_hub"} - mine
    added = {"data/check.py": {"inspect_tokens", "histogram"}}.get(script, set())  # flags new since the move
    assert set(helps) == {f"--{name.replace('_', '-')}" for name in FLAGS_BEFORE if name not in others} | {
        f"--{name.replace('_', '-')}" for name in added}
    assert all("(default " in text and not text.startswith("(default") for text in helps.values()), helps
    if script.startswith("decoderstack"):
        phases = r.stdout.split("phases (--phases")[1].splitlines()[1:7]
        assert [line.split()[0] for line in phases] == ["pt", "eval", "sft", "chat", "rl", "generate"]
        assert all("writes" in line for line in phases)


BLOCKED = """import runpy, sys
for name in {libraries!r}:
    sys.modules[name] = None  # an import of it raises ImportError
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_alone(stack_path, args, data, root):
    """The stack copied alone into ROOT/alone runs pt, eval, sft, chat, rl and generate on `data` with the libraries
    of the files beside it unimportable; (that folder, the finished process)."""
    alone = root / "alone"
    alone.mkdir()
    shutil.copy(stack_path, alone)
    r = subprocess.run([sys.executable, "-c", BLOCKED.format(libraries=LIBRARIES_BESIDE),
                        str(alone / os.path.basename(stack_path)), *args, "--data-dir", str(data), "--run-dir",
                        str(alone / "run"), "--core-max-per-task", "4", "--chat-max-new-tokens", "8", *SFT_ARGS, *RL_ARGS,
                        "--phases", "pt,eval,sft,chat,rl,generate", "--prompt", "The", "--max-new-tokens", "4"],
                       cwd=alone, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return alone, r


@pytest.mark.slow
def test_the_stack_alone_runs_every_phase(tiny_data, tok_dir, tmp_path):
    """Copied alone into an empty folder, with fastapi, uvicorn, transformers and matplotlib unimportable, the stack
    runs pt, eval, sft, chat, rl and generate on a prepared data directory; its log names the one file it ran."""
    data = data_for_every_phase(tmp_path, tiny_data, tok_dir)
    alone, r = run_alone(STACK_PATH, TINY_ARGS, data, tmp_path)
    script = alone / os.path.basename(STACK_PATH)
    metrics = json.loads((alone / "run" / "metrics.json").read_text())
    assert {"val_bpb", "core", "sft_val_loss", "chatcore", "gsm8k_pass_at"} <= set(metrics)
    assert [t["phase"] for t in metrics["phase_time_s"]] == ["pt", "eval", "sft", "chat", "rl"]
    assert "--- sample 1/1" in r.stdout and sorted(os.listdir(alone)) == ["decoderstack_small_pt-eval-sft.py", "run"]
    code = [line for line in (alone / "run" / "log.txt").read_text().splitlines() if line.startswith("code: ")]
    assert len(code) == 1 and code[0].startswith(f"code: {script.name} sha256 ")


def latest_record_stack():
    """The frozen stack of the latest record of this stack (the medium track's records hold the other file)."""
    records = [(path, json.load(open(path)))
               for path in sorted(glob.glob(os.path.join(ROOT, "baselines", "*", "record.json")))]
    path, meta = [(p, m) for p, m in records if m["script"] == os.path.basename(STACK_PATH)][-1]
    return os.path.join(os.path.dirname(path), meta["script"])


@pytest.mark.slow
def test_pretraining_numbers_equal_the_latest_records(tiny_data, tmp_path):
    """The cpu preset's pretraining (shrunk, seed 0) gives the latest record's frozen stack's val bpb and loss to the
    last digit and the same weights: moving code around changed no number. (A change to training comes with a new
    record, whose stack this then compares with.)"""
    from safetensors.torch import load_file
    runs = {}
    for name, script in (("record", latest_record_stack()), ("now", STACK_PATH)):
        run = tmp_path / name
        r = subprocess.run([sys.executable, script, *TINY_ARGS, "--data-dir", tiny_data, "--run-dir", str(run),
                            "--phases", "pt"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        metrics = json.loads((run / "metrics.json").read_text())
        weights = load_file(str(run / (run / "latest").read_text().strip() / "model.safetensors"))
        runs[name] = (metrics["val_bpb"], metrics["val_loss"], metrics["val_bpb_by_source"], weights)
    (bpb, loss, by_source, weights), (bpb_now, loss_now, by_source_now, weights_now) = runs["record"], runs["now"]
    assert (bpb, loss, by_source) == (bpb_now, loss_now, by_source_now)
    assert weights.keys() == weights_now.keys() and all((weights[k] == weights_now[k]).all() for k in weights)


def test_long_evaluations_say_how_far_they_are(stack, tiny_data, tok_dir, tmp_path, monkeypatch, capsys):
    """bits per byte, CORE, chat eval and pass@k print `what: done/total unit, ... so far, eta ...` every 30 s (here
    every unit: Progress's interval set to 0), rank 0's share counted, the last unit silent (its phase's own line
    follows)."""
    data = data_for_every_phase(tmp_path, tiny_data, tok_dir)
    run = tmp_path / "run"
    cfg = stack.parse_config([*TINY_ARGS, "--data-dir", str(data), "--run-dir", str(run), "--core-max-per-task", "4",
                              "--chat-max-new-tokens", "8", *RL_ARGS, "--rl-steps", "0"])
    rt = stack.Runtime(stack.torch.device("cpu"), stack.torch.float32, 0, 1, "sdpa")
    stack.phase_pt(cfg, rt, stack.Logger(cfg, rt))
    capsys.readouterr()
    monkeypatch.setattr(stack.Progress.__init__, "__defaults__", (0.0,))
    stack.phases_to_run(["eval", "chat", "rl"], cfg, rt, stack.Logger(cfg, rt))
    lines = unstamped(capsys.readouterr().out).splitlines()
    for what, unit in (("val bpb", "rows"), ("CORE", "examples"), ("chat eval", "examples"), ("pass@3", "questions")):
        said = [line for line in lines if line.startswith(f"{what}: ")]
        assert said and all(re.fullmatch(rf"{re.escape(what)}: (\d+)/(\d+) {unit}, \S+ \w+ so far, eta \S+ \w+", s)
                            for s in said), (what, lines)
        counts = [int(re.match(r".*?: (\d+)/(\d+)", s).group(1)) for s in said]
        total = int(re.match(r".*?: \d+/(\d+)", said[0]).group(1))
        assert counts == list(range(1, total)), (what, counts)  # every unit but the last
