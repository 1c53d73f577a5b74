"""The notebooks run top to bottom on the CPU with tiny settings, so they cannot rot: nbclient executes each one with
a cell of parameters injected after the cell tagged "parameters" (papermill's convention); any cell error fails."""
import json
import os
import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, TINY_ARGS

NOTEBOOKS = os.path.join(ROOT, "notebooks")


def execute(name, **params):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    source = "# Parameters injected by tests/test_notebooks.py\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    # the kernel inherits this process's environment (conftest: TRITON_INTERPRET=1, WANDB_MODE, HF_HUB_OFFLINE)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    return nb


def outputs(nb, kind):
    """Text of the stream outputs, or the MIME types of the rich outputs, of every code cell."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    if kind == "text":
        return "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")
    return [mime for c in cells for o in c.outputs if o.output_type in ("display_data", "execute_result") for mime in o.data]


def test_notebooks_are_clean():
    """Committed without outputs, and each with one parameters cell."""
    for name in ("tutorial.ipynb", "quickstart_colab.ipynb"):
        nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear the outputs before committing"
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_tutorial_runs(tmp_path):
    nb = execute("tutorial.ipynb", ROOT=ROOT, DEVICE="cpu")
    text = outputs(nb, "text")
    for claim in ("max |attention - attention_reference| =", "max |xxt_triton - xxt_reference| =",
                  "after Polar Express:", "max |cached logits - forward logits| =", "header words 0..5: [20240520, 1,"):
        assert claim in text, claim
    assert "DataFormatError:" in text and "truncated?" in text


@pytest.fixture
def hub_mirror(tiny_data, tok_dir, tmp_path):
    """tiny_data plus a small CORE file (test_core_eval's tasks) and SFT conversations (test_sft's), published to a
    local mirror by data/hub.py: the notebook downloads it as it would from the hub."""
    import json
    import core_shards
    import hub
    import sft_shards
    from test_core_eval import MAX_LEN, TASKS, write_bundle
    from test_sft import conversations
    src = tmp_path / "src"
    shutil.copytree(tiny_data, src)
    core_shards.write_core(write_bundle(tmp_path / "bundle", TASKS), tok_dir, str(src / "core"), max_len=MAX_LEN)
    (tmp_path / "conversations.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations()))
    sft_shards.write_sft([str(tmp_path / "conversations.jsonl")], tok_dir, str(src / "sft"), val_percent=20)
    hub.upload(str(src), local=str(tmp_path / "mirror"))
    return str(tmp_path / "mirror")


@pytest.mark.slow  # ~15 s alone on 2 cores (five subprocesses of the stack)
def test_quickstart_runs_tiny_on_cpu(hub_mirror, tmp_path):
    from test_sft import SFT_ARGS
    tiny = [a for i, a in enumerate(TINY_ARGS) if a != "--preset" and (i == 0 or TINY_ARGS[i - 1] != "--preset")]
    run_dir = tmp_path / "run"
    nb = execute("quickstart_colab.ipynb", TINY=True, PRESET="cpu", EXTRA_ARGS=tiny + SFT_ARGS + ["--core-max-per-task", "4"],
                 HUB_LOCAL_MIRROR=hub_mirror, DATA_DIR=str(tmp_path / "data"), RUN_DIR=str(run_dir),
                 PROMPTS=["The module"], MAX_NEW_TOKENS=8, REPO_URL="file:///nonexistent")
    text = outputs(nb, "text")
    assert "checksums verified" in text and "also prepared: core, sft" in text  # hub.py download
    assert "step 8/8 val bpb" in text and "final val bpb" in text
    assert re.search(r"^CORE +-?\d", text, re.M)                               # the eval cell
    assert "sft step 12/12 val loss" in text                                 # the chat fine-tuning cell
    assert "image/png" in outputs(nb, "rich")                                 # the loss curve
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "(chat prompt)" in text and "--- sample 1/1" in text               # generate from the SFT checkpoint
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val_bpb", "core", "sft_val_loss"} <= set(metrics)
