"""The stack as a module, for the files beside it (serve.py, export.py, report.py, bench/, tests/): it is a script
whose file name is no module name, so it is imported by its path, once per process, as `decoderstack`.
DECODERSTACK_STACK names another copy (e.g. a record's frozen stack: the tests and benches then run against it)."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
STACK = os.environ.get("DECODERSTACK_STACK") or os.path.join(ROOT, "decoderstack_small_pt-eval-sft.py")


def load_stack():
    """The stack module (imported on the first call)."""
    if "decoderstack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("decoderstack", STACK)
        module = importlib.util.module_from_spec(spec)
        sys.modules["decoderstack"] = module  # dataclasses look their module up by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["decoderstack"]
            raise
    return sys.modules["decoderstack"]
