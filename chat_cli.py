"""Chat with a DecoderStack checkpoint in the terminal, through the stack's engine (KV cache, sampling, calculator).

    python chat_cli.py --preset cpu                                            # the run's latest checkpoint
    python chat_cli.py --preset cpu --init-from runs/cpu/sft_ckpt_000040 --temperature 0

It takes the stack's flags (--preset, --data-dir, --run-dir, --init-from, --dtype, --seed, and the sampling ones:
--prompt-format, --max-new-tokens, --temperature, --top-k, --top-p, --min-p, --decode-compile). Type a message and
Enter; an empty line starts a new conversation; Ctrl-D quits. A base (pretrained) model continues the text instead.
"""
import sys

from load_stack import load_stack

ds = load_stack()


def chat(engine, tokenizer, is_chat, options, lines, write):
    """Answer each line of `lines` in one conversation (an empty line starts a new one), the reply streamed to write()
    piece by piece; options: Engine.generate's sampling keywords, the seed moving on by one per reply."""
    conversation, options = [tokenizer.bos_id], dict(options)
    for line in lines:
        if not line.strip():
            conversation = [tokenizer.bos_id]
            continue
        prompt = (ds.chat_turn(tokenizer, conversation, line.strip()) if is_chat
                  else conversation + tokenizer.encode(line))
        reply, shown = [], ""

        def stream(_, token):  # each new piece of the reply (a token may end mid-character: decode all, print the rest)
            nonlocal shown
            reply.append(token)
            now = tokenizer.decode([t for t in reply if t not in engine.stops])
            write(now[len(shown):])
            shown = now

        drawn = engine.generate([prompt], 1, on_token=stream, **options)[0][0]
        write("\n")
        ended = [] if drawn.stopped or not is_chat else [tokenizer.special("<|assistant_end|>")]
        conversation = prompt + drawn.tokens + ended
        options["seed"] += 1


def main(argv=None):
    cfg = ds.parse_flags(argv, [ds.Config], prog="chat_cli.py", description=__doc__.split("\n\n")[0])[0]
    rt = ds.init_runtime(cfg)
    if rt.world_size > 1:
        sys.exit("error: the chat runs in one process: run it without torchrun")
    try:
        engine, _, path, is_chat = ds.trained_engine(cfg, rt)  # is_chat: a message is a user turn, else plain text
    except ds.DataFormatError as e:
        sys.exit(f"error: {e}")
    sample = cfg.sample
    options = dict(max_new_tokens=sample.max_new_tokens, temperature=sample.temperature, top_k=sample.top_k,
                   top_p=sample.top_p, min_p=sample.min_p, seed=cfg.seed)
    print(f"chatting with {path} ({'chat' if is_chat else 'text'}): type a message, an empty line to start over, "
          "Ctrl-D to quit", flush=True)

    def write(text):
        print(text, end="", flush=True)

    chat(engine, engine.tokenizer, is_chat, options, sys.stdin, write)


if __name__ == "__main__":
    main()
