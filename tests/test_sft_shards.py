"""SFT shards: written by data/sft_shards.py, read by the stack; every input format, the mask, the split, bad input."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sft_shards
from common import DataError
from conftest import ROOT


def chat(messages):
    """nanochat's template written out by hand for user/assistant messages -> (messages, text, supervised, unsupervised)."""
    text = sup = unsup = ""
    for m in messages:
        if m["role"] == "user":
            text, unsup = text + f"<|user_start|>{m['content']}<|user_end|>", unsup + f"<|user_start|>{m['content']}<|user_end|>"
            continue
        text, unsup = text + "<|assistant_start|>", unsup + "<|assistant_start|>"
        for p in [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]:
            if p["type"] == "python_output":
                span = f"<|output_start|>{p['text']}<|output_end|>"
                text, unsup = text + span, unsup + span
            else:
                span = f"<|python_start|>{p['text']}<|python_end|>" if p["type"] == "python" else p["text"]
                text, sup = text + span, sup + span
        text, sup = text + "<|assistant_end|>", sup + "<|assistant_end|>"
    return messages, "<|bos|>" + text, sup, "<|bos|>" + unsup


def u(content):
    return {"role": "user", "content": content}


def a(content):
    return {"role": "assistant", "content": content}


GSM8K_ANSWER = "She sold 48/2 = <<48/2=24>>24 clips in May.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"
GSM8K_PARTS = [{"type": "text", "text": "She sold 48/2 = "}, {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
               {"type": "text", "text": "24 clips in May.\nIn total 48+24 = "}, {"type": "python", "text": "48+24"},
               {"type": "python_output", "text": "72"}, {"type": "text", "text": "72 clips.\n#### 72"}]


@pytest.fixture
def corpus(tmp_path):
    """One small file per input format -> (folder, expected conversations in input order)."""
    src = tmp_path / "src"
    src.mkdir()
    smol = [[u("What is 2+2?"), a("4")], [u("Name a color."), a("Blue."), u("Another?"), a("Green, café ☕.")]]
    pq.write_table(pa.table({"messages": smol}), src / "a_smol.parquet")
    system = [{"role": "system", "content": "Be brief."}, u("Hi"), a("Hello")]
    (src / "b_chat.jsonl").write_text(json.dumps({"messages": system}) + "\n\n" + json.dumps({"messages": smol[0]}) + "\n")
    sharegpt = [{"id": "x", "conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "A model."},
                                              {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}]
    (src / "c_sharegpt.json").write_text(json.dumps(sharegpt))
    (src / "d_gsm8k.jsonl").write_text(json.dumps({"question": "How many clips?", "answer": GSM8K_ANSWER}) + "\n")
    (src / "e_self_instruct.jsonl").write_text(json.dumps({"id": "t0", "instruction": "Sort the words.", "instances": [
        {"input": "pear apple", "output": "apple pear"}, {"input": "", "output": "Give me words."}]}) + "\n")
    (src / "f_gpteacher.json").write_text(json.dumps([
        {"instruction": "Write a haiku.", "input": "", "response": "Old pond, frog jumps in."},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"}]))
    expected = [chat(m) for m in smol]
    expected.append((system, "<|bos|><|user_start|>Be brief.\n\nHi<|user_end|><|assistant_start|>Hello<|assistant_end|>",
                     "Hello<|assistant_end|>", "<|bos|><|user_start|>Be brief.\n\nHi<|user_end|><|assistant_start|>"))
    expected += [chat(smol[0]),
                 chat([u("Who are you?"), a("A model."), u("Bye"), a("Bye!")]),
                 chat([u("How many clips?"), a(GSM8K_PARTS)]),
                 chat([u("Sort the words.\n\npear apple"), a("apple pear")]), chat([u("Sort the words."), a("Give me words.")]),
                 chat([u("Write a haiku."), a("Old pond, frog jumps in.")]), chat([u("Translate to French.\n\ncat"), a("chat")])]
    return src, expected


def expected_split(messages, val_percent):
    return "val" if int(hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest(), 16) % 100 < val_percent else "train"


def decoded(stack, tok, data_dir, split):
    """(text, supervised text, unsupervised text) of every conversation of a split, read with the stack's reader."""
    sft = stack.load_sft(data_dir, tok, split)
    out = []
    for i in range(len(sft.convs) - 1):
        tokens, mask = sft.conversation(i)
        assert set(np.unique(mask)) <= {0, 1}
        out.append((tok.decode(tokens), tok.decode(tokens[mask == 1]), tok.decode(tokens[mask == 0])))
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "data/sft_shards.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_gsm8k_calculator_calls_become_python_parts():
    assert sft_shards.gsm8k_parts(GSM8K_ANSWER) == GSM8K_PARTS
    assert sft_shards.gsm8k_parts("x = <<a=b=3>>") == [{"type": "text", "text": "x = "}, {"type": "python", "text": "a=b"},
                                                        {"type": "python_output", "text": "3"}]  # split on the last '='
    with pytest.raises(ValueError, match="no '=result'"):
        sft_shards.gsm8k_parts("<<48/2>>")


def test_every_format_renders_and_masks_as_expected(corpus, tok_dir, tmp_path, stack):
    src, expected = corpus
    files = sft_shards.expand_inputs([src], sft_shards.INPUT_EXTS)
    manifest, n_truncated = sft_shards.write_sft(files, tok_dir, str(tmp_path / "sft"), val_percent=50)
    assert all(sft_shards.split_of(m, p) == expected_split(m, p) for m, *_ in expected for p in range(101))
    tok = stack.Tokenizer(tok_dir)
    for split in ("val", "train"):
        want = [(text, sup, unsup) for messages, text, sup, unsup in expected if expected_split(messages, 50) == split]
        assert want, "the fixture should put conversations in both splits"
        assert decoded(stack, tok, str(tmp_path), split) == want  # input order within a split
        assert manifest["splits"][split]["n_convs"] == len(want) and n_truncated[split] == 0
    assert [(os.path.basename(s["file"]), s["n_convs"]) for s in manifest["sources"]] == [
        ("a_smol.parquet", 2), ("b_chat.jsonl", 2), ("c_sharegpt.json", 1), ("d_gsm8k.jsonl", 1), ("e_self_instruct.jsonl", 2), ("f_gpteacher.json", 2)]
    assert manifest["tokenizer_sha256"] == tok.sha256 and manifest["bos_id"] == tok.bos_id and manifest["max_tokens"] == 2048
    train = stack.load_sft(str(tmp_path), tok, "train")
    assert manifest["splits"]["train"]["n_supervised"] == int(train.mask.sum()) and manifest["splits"]["train"]["n_tokens"] == len(train.tokens)


def test_cli_split_ignores_input_order(corpus, tok_dir, tmp_path, stack):
    src, _ = corpus
    inputs = [src / "a_smol.parquet", src / "e_self_instruct.jsonl", src / "f_gpteacher.json"]
    tok = stack.Tokenizer(tok_dir)
    runs = []
    for name, order in (("fwd", inputs), ("rev", inputs[::-1])):
        result = run_cli("--input", *order, "--tokenizer", tok_dir, "--out", tmp_path / name / "sft", "--val-percent", 40)
        assert result.returncode == 0, result.stderr
        assert "val: " in result.stdout and "train: " in result.stdout
        runs.append({split: sorted(decoded(stack, tok, str(tmp_path / name), split)) for split in ("val", "train")})
        manifest = json.load(open(tmp_path / name / "sft" / "manifest.json"))
        assert [s["file"] for s in manifest["sources"]] == list(map(str, order))
    assert runs[0] == runs[1] and runs[0]["val"] and runs[0]["train"]


def test_max_tokens_cuts_long_conversations(corpus, tok_dir, tmp_path, stack):
    src, _ = corpus
    manifest, n_truncated = sft_shards.write_sft([str(src / "d_gsm8k.jsonl")], tok_dir, str(tmp_path / "sft"), val_percent=0, max_tokens=12)
    sft = stack.load_sft(str(tmp_path), stack.Tokenizer(tok_dir), "train")
    assert len(sft.tokens) == 12 and manifest["max_tokens"] == 12 and n_truncated == {"val": 0, "train": 1}
    assert manifest["splits"]["val"] == {"n_convs": 0, "n_tokens": 0, "n_supervised": 0}
    assert len(stack.load_sft(str(tmp_path), stack.Tokenizer(tok_dir), "val").tokens) == 0


BAD_INPUTS = {  # name: (file name, content, expected location, message fragment)
    "alternation": ("chat.jsonl", [{"messages": [u("a"), a("b")]}, {"messages": [u("a"), u("b"), a("c")]}], ":2:", "expected 'assistant'"),
    "unknown_record": ("rows.jsonl", [{"prompt": "x", "completion": "y"}], ":1:", "unrecognised record"),
    "malformed_line": ("rows.jsonl", '{"messages": []}\n\n{"messages": [\n', ":3:", "malformed JSON"),
    "sharegpt_speaker": ("share.json", [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}], "[0]:", "'bot'"),
    "trailing_user": ("chat.jsonl", [{"messages": [u("a"), a("b"), u("c")]}], ":1:", "ends with a user message"),
    "bad_part": ("chat.jsonl", [{"messages": [u("a"), a([{"type": "image", "text": "b"}])]}], ":1:", "unknown content part type 'image'"),
}


def write_bad(tmp_path, name):
    file_name, content, _, _ = BAD_INPUTS[name]
    path = tmp_path / file_name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content) if file_name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in content))
    return path


@pytest.mark.parametrize("name", ["alternation", "unknown_record", "malformed_line"])
def test_cli_bad_input_is_one_error_line_and_no_output(name, tok_dir, tmp_path):
    path, (_, _, where, fragment) = write_bad(tmp_path, name), BAD_INPUTS[name]
    out = tmp_path / "prepared" / "sft"
    result = run_cli("--input", path, "--tokenizer", tok_dir, "--out", out)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"error: {path}{where} ") and fragment in result.stderr, result.stderr
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("name", ["sharegpt_speaker", "trailing_user", "bad_part"])
def test_bad_conversations_name_the_record(name, tok_dir, tmp_path):
    path, (_, _, where, fragment) = write_bad(tmp_path, name), BAD_INPUTS[name]
    with pytest.raises(DataError) as e:
        sft_shards.write_sft([str(path)], tok_dir, str(tmp_path / "sft"))
    assert str(e.value).startswith(f"{path}{where} ") and fragment in str(e.value), str(e.value)
    assert not (tmp_path / "sft").exists()


def test_real_sft_data(shared_data, tok_dir, tmp_path, stack):
    sft_dir = os.path.join(shared_data, "sft")
    files = [os.path.join(sft_dir, "fastchat_dummy_conversation.json"), os.path.join(sft_dir, "self_instruct_seed_tasks.jsonl")]
    manifest, n_truncated = sft_shards.write_sft(files, tok_dir, str(tmp_path / "sft"), max_tokens=4096)
    assert [s["n_convs"] for s in manifest["sources"]] == [500, 175] and n_truncated == {"val": 0, "train": 0}
    tok = stack.Tokenizer(tok_dir)
    for split in ("val", "train"):
        sft = stack.load_sft(str(tmp_path), tok, split)
        assert len(sft.convs) - 1 == manifest["splits"][split]["n_convs"] > 0
        last = sft.convs[1:] - 1
        assert (np.asarray(sft.tokens)[last] == tok.special("<|assistant_end|>")).all() and (sft.mask[last] == 1).all()
        assert sft.mask[sft.convs[:-1]].sum() == 0 and 0.2 < sft.mask.mean() < 0.95
    text, sup, _ = decoded(stack, tok, str(tmp_path), "train")[0]
    assert text.startswith("<|bos|><|user_start|>Who are you?<|user_end|><|assistant_start|>") and sup.endswith("<|assistant_end|>")
