"""The stack imported by path (it is a script, not a package), for the bench scripts."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACK = os.path.join(ROOT, "decoderstack_small_pt-eval-sft.py")


def load_stack():
    spec = importlib.util.spec_from_file_location("decoderstack", STACK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["decoderstack"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
