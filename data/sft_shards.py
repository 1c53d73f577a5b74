"""Chat conversations -> SFT shards: per split a token file, a loss mask and conversation offsets (val first).

    python data/sft_shards.py --input PATH... --tokenizer DIR/tokenizer --out DIR/sft [--val-percent 5] [--max-tokens 2048]
    python data/sft_shards.py --input hf ...    (downloads smol-smoltalk and the GSM8K train split)

Inputs are .jsonl, .json (an array) and .parquet files, or folders of them. A record's keys say what it is:
  messages: [{role, content}]                        smoltalk style, used as is
  conversations: [{from: human|gpt|system, value}]   ShareGPT / FastChat
  question, answer                                   GSM8K: each <<expr=result>> becomes a python call and its output
  instruction, instances: [{input, output}]          self-instruct: one conversation per instance
  instruction, input, response|output                alpaca / GPTeacher
A conversation goes to val when sha1(its JSON) % 100 < --val-percent, so the split does not depend on input order
and duplicates never straddle it. Everything is rendered before anything is written: bad input leaves --out as it was.
"""
import argparse
import hashlib
import json
import os
import re
import time

import numpy as np

from common import DataError, expand_inputs, hf_download, read_records, run_cli, token_dtype, write_json, write_npy, write_token_file
from tokenizer import Tokenizer

FORMAT_VERSION = 1
INPUT_EXTS = (".jsonl", ".json", ".parquet")
HF_SOURCES = [("HuggingFaceTB/smol-smoltalk", ["data/*.parquet"]), ("openai/gsm8k", ["main/train-*.parquet"])]
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CALCULATOR_CALL = re.compile(r"<<([^>]*)>>")  # GSM8K's annotation of a calculator step: <<48/2=24>>


# ---------------------------------------------------------------------------------------------------------------
# Records -> conversations. Problems raise ValueError; the caller adds the record's location.

def string(obj, key):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def instruction_conversation(instruction, input_text, output):
    user = instruction + "\n\n" + input_text if input_text.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def gsm8k_parts(answer):
    """A GSM8K solution -> assistant content parts: the text between calculator calls, and each <<expr=result>> as a
    python call (supervised: the model learns to call the tool) plus its output (not supervised: the tool writes it)."""
    parts, pos = [], 0
    for call in CALCULATOR_CALL.finditer(answer):
        expr, eq, result = call.group(1).rpartition("=")
        if not eq:
            raise ValueError(f"calculator call {call.group(0)!r} has no '=result'")
        parts += [{"type": "text", "text": answer[pos:call.start()]},
                  {"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        pos = call.end()
    parts.append({"type": "text", "text": answer[pos:]})  # the rest, ending with the '#### N' line
    return [p for p in parts if p["text"] or p["type"] != "text"]


def to_conversations(rec):
    """One record -> a list of conversations (lists of {role, content}), recognised by the record's keys."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    if "messages" in rec:
        return [rec["messages"]]
    if "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list):
            raise ValueError("field 'conversations' must be a list of {from, value}")
        speakers = [string(t, "from") for t in turns]
        unknown = [s for s in speakers if s not in SHAREGPT_ROLES]
        if unknown:
            raise ValueError(f"unknown ShareGPT speaker {unknown[0]!r} (expected {'|'.join(SHAREGPT_ROLES)})")
        return [[{"role": SHAREGPT_ROLES[s], "content": string(t, "value")} for s, t in zip(speakers, turns)]]
    if "question" in rec and "answer" in rec:
        answer = gsm8k_parts(string(rec, "answer"))
        return [[{"role": "user", "content": string(rec, "question")}, {"role": "assistant", "content": answer}]]
    if "instruction" in rec and "instances" in rec:
        instances = rec["instances"]
        if not isinstance(instances, list) or not instances:
            raise ValueError("field 'instances' must be a non-empty list of {input, output}")
        return [instruction_conversation(string(rec, "instruction"), string(x, "input"), string(x, "output")) for x in instances]
    if "instruction" in rec and ("response" in rec or "output" in rec):
        input_text = string(rec, "input") if rec.get("input") is not None else ""
        output = string(rec, "response" if "response" in rec else "output")
        return [instruction_conversation(string(rec, "instruction"), input_text, output)]
    raise ValueError(f"unrecognised record with keys {sorted(rec)} (expected messages, conversations, question+answer, "
                     "instruction+instances or instruction+response|output)")


def check_conversation(messages):
    """Structure the tokenizer relies on; alternation and system placement are checked by render_conversation."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    is_part = lambda p: isinstance(p, dict) and isinstance(p.get("type"), str) and isinstance(p.get("text"), str)
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        content_ok = isinstance(content, str) or isinstance(content, list) and all(map(is_part, content))
        if not content_ok or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} must be {{role: system|user|assistant, content: string or [{{type, text}}]}}")
    if messages[-1]["role"] != "assistant":  # a trailing prompt has no answer to learn: the data is probably cut off
        raise ValueError(f"the conversation ends with a {messages[-1]['role']} message, not the assistant's")
    return messages


def split_of(messages, val_percent):
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    return "val" if int(digest, 16) % 100 < val_percent else "train"


# ---------------------------------------------------------------------------------------------------------------

def write_sft(files, tok_dir, out_dir, val_percent=5, max_tokens=2048):
    """Render every conversation of `files`, then write the val and train splits and the manifest into out_dir.
    Returns (manifest, number of conversations cut at max_tokens per split)."""
    from tqdm import tqdm
    tok = Tokenizer.load(tok_dir)
    dtype = token_dtype(tok.vocab_size)
    tokens, masks = {"val": [], "train": []}, {"val": [], "train": []}
    sources = []
    for path in files:
        n_convs = 0
        for loc, rec in tqdm(read_records(path), desc=os.path.basename(path), unit=" records", disable=None):  # None: on a tty only
            try:
                rendered = [(m, *tok.render_conversation(check_conversation(m), max_tokens)) for m in to_conversations(rec)]
            except ValueError as e:
                raise DataError(f"{loc}: {e}") from None
            for messages, ids, mask in rendered:
                split = split_of(messages, val_percent)
                tokens[split].append(np.array(ids, dtype=dtype))
                masks[split].append(np.array(mask, dtype=np.uint8))
            n_convs += len(rendered)
        sources.append({"file": path, "n_convs": n_convs})
    if not any(tokens.values()):
        raise DataError(f"no conversations in {', '.join(files)}")

    splits, n_truncated = {}, {}
    for split in ("val", "train"):
        convs = np.cumsum([0] + [len(t) for t in tokens[split]], dtype=np.int64)
        flat = np.concatenate(tokens[split]) if tokens[split] else np.zeros(0, dtype)
        mask = np.concatenate(masks[split]) if masks[split] else np.zeros(0, np.uint8)
        write_token_file(os.path.join(out_dir, f"{split}.bin"), flat, tok.vocab_size, tok.bos_id)
        write_npy(os.path.join(out_dir, f"{split}_mask.npy"), mask)
        write_npy(os.path.join(out_dir, f"{split}_convs.npy"), convs)
        splits[split] = {"n_convs": len(convs) - 1, "n_tokens": len(flat), "n_supervised": int(mask.sum())}
        # every conversation ends with <|assistant_end|> unless max_tokens cut it
        n_truncated[split] = int((flat[convs[1:] - 1] != tok.special("<|assistant_end|>")).sum())
    manifest = {"format": "sft", "version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                "tokenizer_sha256": tok.sha256, "max_tokens": max_tokens, "splits": splits, "sources": sources}
    write_json(os.path.join(out_dir, "manifest.json"), manifest)  # last, after the files it describes
    return manifest, n_truncated


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files or folders of .jsonl/.json/.parquet, or 'hf'")
    parser.add_argument("--tokenizer", required=True, help="DIR/tokenizer written by data/tokenizer.py")
    parser.add_argument("--out", required=True, help="DIR/sft")
    parser.add_argument("--val-percent", type=int, default=5, help="percent of conversations (by content hash) held out")
    parser.add_argument("--max-tokens", type=int, default=2048, help="longer conversations are cut to this many tokens")
    args = parser.parse_args()
    if not 0 <= args.val_percent <= 100 or args.max_tokens < 1:
        parser.error("--val-percent must be in 0..100 and --max-tokens at least 1")
    hf_files = lambda: [f for repo, patterns in HF_SOURCES for f in hf_download(repo, patterns)]
    files = [f for p in args.input for f in (hf_files() if p == "hf" else expand_inputs([p], INPUT_EXTS))]
    t0 = time.time()
    manifest, n_truncated = write_sft(files, args.tokenizer, args.out, args.val_percent, args.max_tokens)
    for s in manifest["sources"]:
        print(f"{s['file']}: {s['n_convs']:,} conversations")
    for split, s in manifest["splits"].items():
        print(f"{split}: {s['n_convs']:,} conversations, {s['n_tokens']:,} tokens, {s['n_supervised']:,} supervised, "
              f"{n_truncated[split]:,} cut at {args.max_tokens} tokens")
    print(f"wrote {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
