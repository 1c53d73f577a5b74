"""A DecoderStack checkpoint as a Hugging Face folder that transformers loads (trust_remote_code=True), and its upload.

    python export.py --preset cpu                                  # the run's latest checkpoint -> runs/cpu/hf
    python export.py --preset cpu --init-from CKPT --export-dir DIR --push-to-hub ORG/NAME

The folder holds our weights as they are, the code that runs them (hf/modeling_decoderstack.py, or for the medium
stack's checkpoints hf/modeling_decoderstack_medium.py, copied as it is: it must stand alone for trust_remote_code, so
it is a second implementation of the stack's GPT, which tests/test_export.py and tests/test_medium.py hold to the stack
logit by logit), our tokenizer in the HF format with the
chat template (hf/chat_template.jinja), a generation config and a model card (hf/model_card.md). Neither this file
nor the stack imports transformers. It takes the stack's flags (--preset, --data-dir, --run-dir, --init-from) and its
own below (--help lists them).
"""
import dataclasses
import json
import os
import shutil
import sys

import torch

from load_stack import load_stack

ds = load_stack()
HF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
CHAT_TEMPLATE, MODEL_CARD = (os.path.join(HF, name) for name in ("chat_template.jinja", "model_card.md"))
# per stack (the checkpoint's, which load_stack picked): the modeling file, its model_type and classes
ARCHITECTURES = {"small": ("modeling_decoderstack.py", "decoderstack", "DecoderStackConfig", "DecoderStackForCausalLM"),
                 "medium": ("modeling_decoderstack_medium.py", "decoderstack_medium", "DecoderStackMediumConfig",
                            "DecoderStackMediumForCausalLM")}
MODELING_FILE, MODEL_TYPE, CONFIG_CLASS, MODEL_CLASS = ARCHITECTURES[getattr(ds, "STACK_NAME", "small")]
MODELING = os.path.join(HF, MODELING_FILE)


@dataclasses.dataclass
class ExportConfig:
    """the export (export.py): where the folder goes, where it is uploaded"""
    export_dir: str = ""              # "": RUN_DIR/hf
    push_to_hub: str = ""             # ORG/NAME: also upload the folder to this model repo (created if missing; HF_TOKEN)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


HF_STOPS = ("<|assistant_end|>", "<|bos|>")  # where the Engine stops a sample: generate's eos_token_id


class ExportError(ds.DataFormatError):
    """The export could not be written or uploaded; the message says where and why."""


def byte_level_chars():
    """GPT-2's byte -> character table, the alphabet of byte-level BPE vocabularies: the printable Latin-1 bytes
    ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF) stand for themselves, the other 68 (controls, space, soft hyphen,
    ...) for U+0100 onwards, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def hf_tokenizer_json(tokenizer):
    """Our tokenizer in the HF tokenizers format (tokenizer.json): byte-level BPE over the tiktoken ranks, the special
    tokens as added tokens with their ids, <|bos|> prepended (every document starts with it) unless
    add_special_tokens=False. tiktoken merges, within a piece of the split pattern, the adjacent pair whose
    concatenation has the lowest rank, and takes a piece that is a token whole; HF's BPE merges the listed pair of
    lowest index. So every split of a token into two tokens is listed, in the order of the token's rank, and
    ignore_merges takes whole tokens: the same ids."""
    chars = byte_level_chars()
    n_ranks = min(tokenizer.special_tokens.values())  # the ranks are 0..n-1, then the special tokens
    pieces = [tokenizer.enc.decode_single_token_bytes(i) for i in range(n_ranks)]
    ranks = {piece: i for i, piece in enumerate(pieces)}
    text = lambda piece: "".join(chars[b] for b in piece)
    merges = sorted((rank, ranks[piece[:k]], ranks[piece[k:]]) for rank, piece in enumerate(pieces)
                    for k in range(1, len(piece)) if piece[:k] in ranks and piece[k:] in ranks)
    bos = {"SpecialToken": {"id": "<|bos|>", "type_id": 0}}
    doc = lambda name: {"Sequence": {"id": name, "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for name, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        # the pattern isolates the pieces tiktoken splits text into; ByteLevel then only maps bytes to characters
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {
            "type": "TemplateProcessing", "single": [bos, doc("A")], "pair": [bos, doc("A"), bos, doc("B")],
            "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [tokenizer.bos_id], "tokens": ["<|bos|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(piece): i for i, piece in enumerate(pieces)},
                  "merges": [[text(pieces[left]), text(pieces[right])] for _, left, right in merges]},
    }


def hf_tokenizer_files(tokenizer):
    """{file name: text} of the tokenizer folder AutoTokenizer loads: tokenizer.json (hf_tokenizer_json) and
    tokenizer_config.json (eos <|assistant_end|>, the chat template)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
              "clean_up_tokenization_spaces": False,  # decode gives back the text, spaces as they were
              "chat_template": read(CHAT_TEMPLATE).strip()}
    return {"tokenizer.json": json.dumps(hf_tokenizer_json(tokenizer), ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}


def hf_model_card(model_name, cfg):
    """README.md: what the model is and how transformers loads it (the Hub shows it as the model's page)."""
    return read(MODEL_CARD).format(model_name=model_name, cfg=cfg, modeling=MODELING_FILE)


def export_hf(model, tokenizer, out_dir, model_name="decoderstack"):
    """Write a Hugging Face folder of `model` to out_dir: config.json (the ModelConfig, auto_map to the stack's
    modeling file), model.safetensors (the state dict as it is), the modeling file, the tokenizer files,
    generation_config.json (eos: the Engine's stops) and a model card. Written into out_dir.tmp and moved into place
    whole, so a failure leaves out_dir as it was (absent, or the previous export) and no .tmp. Returns
    {file name: bytes}."""
    from safetensors.torch import save_file
    if model.vocab_size != tokenizer.vocab_size:
        raise ExportError(f"{out_dir}: the model has {model.vocab_size} tokens, the tokenizer {tokenizer.vocab_size}")
    cfg, special = model.cfg, tokenizer.special
    stops = [special(name) for name in HF_STOPS]
    module = MODELING_FILE.removesuffix(".py")
    config = {"architectures": [MODEL_CLASS], "model_type": MODEL_TYPE,
              "auto_map": {"AutoConfig": f"{module}.{CONFIG_CLASS}", "AutoModelForCausalLM": f"{module}.{MODEL_CLASS}"},
              **dataclasses.asdict(cfg), "bos_token_id": tokenizer.bos_id, "eos_token_id": stops, "dtype": "float32"}
    # pad = a stop: generate takes prompt tokens equal to a pad id that is no eos for padding (pad <|bos|> would
    # mask every document start)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops, "pad_token_id": stops[0]}
    texts = {"config.json": json.dumps(config, indent=1) + "\n",
             "generation_config.json": json.dumps(generation, indent=1) + "\n",
             MODELING_FILE: read(MODELING), "README.md": hf_model_card(model_name, cfg),
             **hf_tokenizer_files(tokenizer)}
    out_dir = os.path.abspath(out_dir)
    tmp, old = out_dir + ".tmp", out_dir + ".old.tmp"  # .tmp: what claim_run_dir also clears as a crash's leftovers
    for stale in (tmp, old):  # what an export killed half-way left
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.makedirs(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, text in texts.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.isdir(out_dir):  # a directory cannot be renamed over a non-empty one: park the previous export
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except OSError as e:  # e.g. a full disk
        if os.path.isdir(old) and not os.path.exists(out_dir):
            os.rename(old, out_dir)
        raise ExportError(f"{out_dir}: could not write the export ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return {name: os.path.getsize(os.path.join(out_dir, name)) for name in sorted(os.listdir(out_dir))}


def push_to_hub(out_dir, repo):
    """Upload an export_hf folder to the model repo `repo` (ORG/NAME, created if missing); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=out_dir, repo_id=repo, commit_message=f"Upload {os.path.basename(out_dir)}")
    except (OSError, HFValidationError) as e:  # HTTP, connection and offline-mode errors are all OSErrors
        raise ExportError(f"hf://{repo}: {e} (the export is complete in {out_dir})") from None
    return f"https://huggingface.co/{repo}"


def main(argv=None):
    """Export the latest checkpoint of --run-dir (or --init-from) to --export-dir (default RUN_DIR/hf), and upload it
    to --push-to-hub ORG/NAME when given."""
    cfg, export = ds.parse_flags(argv, [ds.Config, ExportConfig], prog="export.py", description=__doc__.split("\n\n")[0])
    try:
        tokenizer = ds.data_tokenizer(cfg.data_dir)
        model, _, path = ds.trained_model(cfg, ds.Runtime(torch.device("cpu"), torch.float32, 0, 1, "sdpa"))
        out_dir = export.export_dir or os.path.join(cfg.run_dir, "hf")
        name = export.push_to_hub.split("/")[-1] if export.push_to_hub else os.path.basename(os.path.abspath(cfg.run_dir))
        files = export_hf(model, tokenizer, out_dir, model_name=name)
        print(f"exported {path} to {out_dir}: " + ", ".join(f"{n} ({size:,} bytes)" for n, size in files.items()))
        if export.push_to_hub:
            print(f"pushed {out_dir} to {push_to_hub(out_dir, export.push_to_hub)}")
    except ds.DataFormatError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
