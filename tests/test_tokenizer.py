"""Tokenizer: training, pickle-free persistence, stack-side loading, special tokens, chat template."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import tokenizer
from common import DataError
from conftest import ROOT, copy_tree, edit_json, stdlib_text

UNICODE = "naïve café — 東京 🚀 ünïcödé\n\ttabs  and   spaces\r\n"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tokenizer.Tokenizer.load(tok_dir)


def test_roundtrip_and_stack_agrees(tok, tok_dir, stack):
    stack_tok = stack.Tokenizer(tok_dir)
    for text in stdlib_text()[:50] + [UNICODE, "", "x" * 5000]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert stack_tok.encode(text) == ids
    assert stack_tok.vocab_size == tok.vocab_size == 1024
    assert stack_tok.bos_id == tok.bos_id == tok.special("<|bos|>")


def test_special_tokens_never_come_from_text(tok):
    specials = set(tok.special_tokens.values())
    assert len(specials) == 9 and max(specials) == tok.vocab_size - 1
    text = "<|bos|>hello<|assistant_end|> <|python_start|>1+1<|python_end|>"
    ids = tok.encode(text)
    assert not specials & set(ids)
    assert tok.decode(ids) == text


def test_numbers_split_in_runs_of_two_digits(tok):
    ids = tok.encode("year 1234567 and 99")
    digit_tokens = [tok.decode([i]).strip() for i in ids if tok.decode([i]).strip().isdigit()]
    assert "".join(digit_tokens) == "123456799"
    assert max(map(len, digit_tokens)) <= 2


def test_token_bytes_weights_count_utf8_bytes(tok, tok_dir):
    token_bytes = np.load(os.path.join(tok_dir, "token_bytes.npy"), allow_pickle=False)
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (tok.vocab_size,)
    assert all(token_bytes[i] == 0 for i in tok.special_tokens.values())
    ids = tok.encode(UNICODE)
    assert token_bytes[ids].sum() == len(UNICODE.encode("utf-8"))


def test_saved_files_are_plain_text_and_json(tok_dir, tok):
    meta = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    assert set(meta) == {"version", "pattern", "special_tokens", "vocab_size", "sha256"} and meta["version"] == 2
    lines = open(os.path.join(tok_dir, "tokenizer.tiktoken")).read().splitlines()
    assert len(lines) == tok.vocab_size - 9
    assert [int(line.split()[1]) for line in lines] == list(range(len(lines)))


def test_load_errors_name_the_file(tmp_path, tok_dir):
    bad = tmp_path / "tok"
    bad.mkdir()
    for name in ("tokenizer.json", "token_bytes.npy"):
        (bad / name).write_bytes(open(os.path.join(tok_dir, name), "rb").read())
    with pytest.raises(DataError, match="tokenizer.tiktoken: missing"):
        tokenizer.Tokenizer.load(bad)
    (bad / "tokenizer.tiktoken").write_text("QQ== 0\nnot-base64!! 1\n")
    with pytest.raises(DataError, match=r"tokenizer.tiktoken:2:"):
        tokenizer.Tokenizer.load(bad)


def test_vocab_size_too_small():
    with pytest.raises(DataError, match="at least 265"):
        tokenizer.train(iter(["abc"]), 100)


def test_cli_train_excludes_and_reports_held_out(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = stdlib_text()
    third = len(texts) // 3
    (corpus / "a.txt").write_text("\n\n".join(texts[:third]))
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[third:2 * third]))
    (corpus / "val_held_out.txt").write_text("\n\n".join(texts[2 * third:]))
    out = tmp_path / "tokenizer"
    r = subprocess.run([sys.executable, "data/tokenizer.py", "train", "--input", str(corpus), "--exclude", "val_*",
                        "--vocab-size", "600", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "trained a 600-token tokenizer on 2 files" in r.stdout
    assert "held-out text (1 files)" in r.stdout and "ours" in r.stdout
    assert tokenizer.Tokenizer.load(out).vocab_size == 600


def test_cli_bad_input_is_one_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    r = subprocess.run([sys.executable, "data/tokenizer.py", "train", "--input", str(tmp_path / "bad.jsonl"),
                        "--vocab-size", "300", "--out", str(tmp_path / "tok")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.jsonl'}:2: malformed JSON (Expecting value)"]
    assert not (tmp_path / "tok").exists()


# -- chat template ---------------------------------------------------------------------------------------------

def supervised_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_render_conversation_masks(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "6*7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": "It is 42."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    ids, mask = tok.render_conversation(messages)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == ("<|bos|><|user_start|>Be brief.\n\nWhat is 6*7?<|user_end|><|assistant_start|>Let me compute. "
                               "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>It is 42.<|assistant_end|>"
                               "<|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>")
    assert supervised_text(tok, ids, mask) == ("Let me compute. <|python_start|>6*7<|python_end|>It is 42.<|assistant_end|>"
                                               "You're welcome.<|assistant_end|>")


def test_render_conversation_errors_and_truncation(tok):
    with pytest.raises(ValueError, match="message 1 has role 'user', expected 'assistant'"):
        tok.render_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="system message must be followed by a user message"):
        tok.render_conversation([{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}])
    ids, mask = tok.render_conversation([{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "ok"}], max_tokens=64)
    assert len(ids) == len(mask) == 64


def test_render_for_completion(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids = tok.render_for_completion(messages)
    assert tok.decode(ids) == "<|bos|><|user_start|>Hi<|user_end|><|assistant_start|>"
    assert messages[-1]["content"] == "Hello"  # the caller's list is untouched
    with pytest.raises(ValueError, match="last message must be the assistant"):
        tok.render_for_completion(messages[:1])


# ---- the stack's tokenizer reader: one clear error per malformed file --------------------------------------------------


@pytest.fixture
def tok_copy(tok_dir, tmp_path):
    return copy_tree(tok_dir, tmp_path / "tokenizer")


def edit_meta(tok, edit):
    edit_json(tok / "tokenizer.json", edit)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.pop("special_tokens"), "needs 'pattern' (text), 'vocab_size' (int) and 'special_tokens'"),
    (lambda m: m.update(special_tokens=["<|bos|>"]), "needs 'pattern'"),
    (lambda m: m.update(vocab_size="1024"), "needs 'pattern'"),
    (lambda m: m["special_tokens"].pop("<|bos|>"), "<|bos|> among them"),
    (lambda m: m.update(pattern="(unclosed"), "'pattern' is not a valid regular expression"),
])
def test_stack_tokenizer_rejects_malformed_metadata(stack, tok_copy, edit, problem):
    edit_meta(tok_copy, edit)
    with pytest.raises(stack.DataFormatError, match=re.escape(f"{tok_copy}/tokenizer.json: ") + ".*" + re.escape(problem)):
        stack.Tokenizer(str(tok_copy))


@pytest.mark.parametrize("edit", [
    lambda lines: lines[:5] + [lines[5].split()[0] + b" 3"] + lines[6:],  # a duplicate rank
    lambda lines: lines + [lines[7]],  # a duplicate token
])
def test_stack_tokenizer_rejects_duplicate_ranks_and_tokens(stack, tok_copy, edit):
    bpe = tok_copy / "tokenizer.tiktoken"
    bpe.write_bytes(b"\n".join(edit(bpe.read_bytes().splitlines())) + b"\n")
    with pytest.raises(stack.DataFormatError, match=re.escape(f"{bpe}: tokens and ranks must be unique")):
        stack.Tokenizer(str(tok_copy))


def test_training_refuses_to_fall_short_of_the_vocabulary_asked_for():
    """Before: --vocab-size 70000 on a small corpus trained ~1,900 tokens and exited 0 without a word."""
    with pytest.raises(tokenizer.DataError, match=r"trained only \d+ of the 70000 tokens asked for"):
        tokenizer.train(iter(["a small corpus, a few distinct pairs"] * 50), 70000)


# ---- importing a pickled tiktoken encoding (nanochat's tokenizer.pkl) without running the pickle --------------------

def test_a_pickled_tiktoken_encoding_imports_and_encodes_the_same(tok, tmp_path, stack):
    """Pickled by tiktoken itself; imported by the CLI into our files, which the stack reads and encodes identically."""
    import pickle
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(tok.enc))
    out = tmp_path / "imported"
    result = subprocess.run([sys.executable, "data/tokenizer.py", "import", str(path), "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imported = stack.Tokenizer(str(out))
    text = stdlib_text()[3][:4000] + " 12345 émigré <|bos|>"
    assert imported.encode(text) == tok.enc.encode_ordinary(text) and imported.vocab_size == tok.vocab_size
    assert imported.special_tokens == tok.special_tokens and imported.bos_id == tok.bos_id
    assert np.array_equal(np.load(out / "token_bytes.npy"), tok.token_bytes())


def hostile_pickles(marker):
    """Pickles that run `touch marker` when unpickled naively: os.system at the top, builtins.eval, and a REDUCE nested
    inside an otherwise well-formed tiktoken Encoding's state."""
    import builtins
    import pickle

    class System:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    class Eval:
        def __reduce__(self):
            return builtins.eval, (f"__import__('os').system('touch {marker}')",)

    cmd = f"touch {marker}".encode()
    nested = (b"\x80\x02ctiktoken.core\nEncoding\n)\x81}X\x07\x00\x00\x00pat_str" + b"cos\nsystem\nX"
              + len(cmd).to_bytes(4, "little") + cmd + b"\x85Rsb.")
    return {"os.system": pickle.dumps(System()), "builtins.eval": pickle.dumps(Eval()), "nested reduce": nested}


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested reduce"])
def test_a_hostile_pickle_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "ran"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(hostile_pickles(marker)[kind])
    with pytest.raises(DataError, match=f"{path}: refers to (os|posix|builtins)\\.(system|eval); only a pickled tiktoken Encoding is read"):
        tokenizer.import_pickled(str(path))
    assert not marker.exists()
    result = subprocess.run([sys.executable, "data/tokenizer.py", "import", str(path), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().startswith(f"error: {path}: refers to")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_what_is_not_an_encodings_state_is_one_error(tok, tmp_path):
    import pickle
    path = tmp_path / "tokenizer.pkl"
    for data, fragment in [(b"not a pickle", "not a readable pickled tiktoken Encoding"),
                           (pickle.dumps({"pat_str": "x"}), "not a tiktoken Encoding's state"),
                           (pickle.dumps(tok.enc)[:-40], "not a readable pickled tiktoken Encoding")]:
        path.write_bytes(data)
        with pytest.raises(DataError, match=f"{path}: {fragment}"):
            tokenizer.import_pickled(str(path))
