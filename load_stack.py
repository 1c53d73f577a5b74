"""The stacks as modules, for the files beside them (serve.py, export.py, report.py, chat_cli.py, bench/, tests/): each
is a script whose file name is no module name, so it is imported by its path, once per process.
load_stack() is the stack these files run: DECODERSTACK_STACK names it (small, medium, or the path of another copy,
e.g. a record's frozen stack: the tests and benches then run against it); without it, the stack that wrote the
checkpoint the command line points at (--init-from, else --run-dir's latest: state.json's "stack"); else the small one."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
STACKS = {"small": os.path.join(ROOT, "decoderstack_small_pt-eval-sft.py"),  # modded-nanogpt's 124M track
          "medium": os.path.join(ROOT, "decoderstack_medium_pt-eval-sft.py")}  # nanochat's time-to-GPT-2 track
MODULES = {"small": "decoderstack", "medium": "decoderstack_medium"}  # both load in one process, as the tests do


def resolve(name):
    """(file, module name) of stack `name`: small, medium, or a file (another copy, loaded as the small one's module)."""
    if name in STACKS:
        return STACKS[name], MODULES[name]
    if not os.path.isfile(name):
        sys.exit(f"error: no stack {name!r} (DECODERSTACK_STACK or a checkpoint's state.json): small, medium or a file")
    return name, "decoderstack"


STACK = resolve(os.environ.get("DECODERSTACK_STACK") or "small")[0]  # the stack file tests and benches run by default


def flag_value(argv, name):
    """The value of --name VALUE or --name=VALUE in argv (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def checkpoint_stack(argv):
    """The stack named by the checkpoint argv points at ("small" where it names none: written before the medium
    stack), or None when argv points at no checkpoint. A checkpoint that cannot be read is the stack's to report."""
    path = flag_value(argv, "--init-from")
    if not path and (run_dir := flag_value(argv, "--run-dir")):
        try:
            with open(os.path.join(run_dir, "latest")) as f:
                path = os.path.join(run_dir, f.read().strip())
        except OSError:
            return None
    try:
        with open(os.path.join(path, "state.json")) as f:
            return json.load(f).get("stack", "small")
    except (OSError, TypeError, ValueError, AttributeError):
        return None


def load_stack(name=None):
    """The stack module `name` (small, medium, a file), else the one of this process (see above); imported once."""
    name = name or os.environ.get("DECODERSTACK_STACK") or checkpoint_stack(sys.argv[1:]) or "small"
    path, module_name = resolve(name)
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]
