"""HumanEval grading: code extraction, and the sandbox the generated code runs in (limits, no network, clean up)."""
import gzip
import json
import os
import resource
import socket
import subprocess
import sys
import time

import pytest

# A problem shaped like HumanEval/38: the prompt holds a finished helper the tests call, then the stub to write.
PROBLEM = {
    "task_id": "Fixture/0",
    "prompt": 'def double(x):\n    return 2 * x\n\n\ndef quadruple(x: int) -> int:\n    """ Four times x.\n    >>> quadruple(2)\n    8\n    """\n',
    "entry_point": "quadruple",
    "test": "\n\ndef check(candidate):\n    assert candidate(3) == double(6)\n    assert candidate(-1) == -4\n",
}


@pytest.mark.parametrize("completion, code", [
    ("Here it is:\n```python\ndef f(x):\n    return x\n```\nDone.", "def f(x):\n    return x\n"),
    ("```py\n    return x\n```\n```python\nprint(f(1))\n```", "    return x\n"),  # the first block, indentation kept
    ("```\ndef f(x):\n    return x\n```", "def f(x):\n    return x\n"),
    ("```python\ndef f(x):\n    return x", "def f(x):\n    return x"),  # generation stopped inside the block
    ("    return x\n", "    return x\n"),  # no block: the whole text
])
def test_extract_program_puts_the_code_after_the_prompt(stack, completion, code):
    assert stack.extract_program(completion, "def f(x):\n    '''doc'''\n") == "def f(x):\n    '''doc'''\n" + "\n" + code


@pytest.mark.parametrize("completion, passed", [
    ("    return double(double(x))\n", True),  # the body alone continues the prompt's stub
    ("Sure:\n```python\ndef quadruple(x):\n    return 4 * x\n```\nThe tests call double(), from the prompt.", True),
    ("```python\ndef quadruple(x):\n    return 4 * x\n\nif __name__ == '__main__':\n    input()\n    raise SystemExit(1)\n```", True),
    ("    return 3 * x\n", False),
    ("I think you should multiply by four.", False),
    ("```python\nimport sys\ndef quadruple(x):\n    return 0\nsys.exit(0)\n```", False),  # exiting early is not passing
])
def test_fixture_problem(stack, completion, passed):
    assert stack.humaneval_passed(completion, PROBLEM) is passed


def test_real_canonical_solutions_pass_and_wrong_ones_fail(stack, shared_data):
    with gzip.open(os.path.join(shared_data, "eval", "humaneval", "HumanEval.jsonl.gz"), "rt") as f:
        problems = {p["task_id"]: p for p in map(json.loads, f)}
    for task_id in ("HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/162"):
        p = problems[task_id]
        assert stack.humaneval_passed(p["canonical_solution"], p), task_id  # the body, as a base model continues
        # the whole function in a block, as nanochat's chat target for HumanEval is written (helpers come from the prompt)
        full = p["prompt"] + p["canonical_solution"]
        assert stack.humaneval_passed(f"```python\n{full[full.index('def ' + p['entry_point']):]}```", p), task_id
    assert not stack.humaneval_passed(problems["HumanEval/1"]["canonical_solution"], problems["HumanEval/0"])
    assert not stack.humaneval_passed("    return True\n", problems["HumanEval/0"])


def test_infinite_loops_and_sleeps_are_killed_at_the_timeout(stack):
    for program in ("while True:\n    pass\n", "import time\ntime.sleep(60)\n"):
        t0 = time.time()
        assert stack.run_sandboxed(program, timeout=1.0) == (False, "timed out after 1s")
        assert time.time() - t0 < 3


def process_state(pid):
    """'R', 'S', ... from /proc; None once it is gone. 'Z': dead, waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read().split("State:\t")[1][0]
    except FileNotFoundError:
        return None


def test_the_whole_process_group_is_killed(stack, tmp_path):
    """A process the program starts dies with it (or cannot start: RLIMIT_NPROC, which binds everyone but root)."""
    pid_file = tmp_path / "pid"
    program = (f"import os, time\nif os.fork() == 0:\n    open('pid', 'w').write(str(os.getpid()))\n"
               f"    os.rename('pid', {str(pid_file)!r})\n    time.sleep(60)\nwhile True:\n    pass\n")
    assert stack.run_sandboxed(program, timeout=1.0)[0] is False
    assert pid_file.exists() or os.geteuid() != 0
    if pid_file.exists():
        pid, deadline = int(pid_file.read_text()), time.time() + 5
        while process_state(pid) not in ("Z", None) and time.time() < deadline:
            time.sleep(0.05)
        assert process_state(pid) in ("Z", None), "the program's child outlived it"


def test_memory_bombs_fail_under_the_limit_without_touching_us(stack):
    before = resource.getrlimit(resource.RLIMIT_AS)
    assert stack.run_sandboxed("x = bytearray(2 << 30)\n") == (False, "MemoryError")
    t0 = time.time()
    assert stack.run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n", memory_mb=256) == (False, "MemoryError")
    assert time.time() - t0 < 5  # stopped by the limit, not the timeout
    assert stack.run_sandboxed("x = bytearray(100 << 20)\n") == (True, "passed")  # within 512 MB
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # the limits are set in the child only
    assert len(bytearray(1 << 30)) == 1 << 30


def test_no_network(stack):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        passed, reason = stack.run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
        assert not passed and reason == "OSError: network access is disabled in the sandbox"
        passed, reason = stack.run_sandboxed(f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)\n")
        assert not passed and "network access is disabled" in reason
        # Past the socket patch (the C type itself), a network namespace still cuts the program off, where we may make one.
        if subprocess.run([sys.executable, "-c", "import ctypes; exit(ctypes.CDLL(None).unshare(0x10000000 | 0x40000000))"]).returncode == 0:
            assert stack.run_sandboxed("import socket\nassert [name for _, name in socket.if_nameindex()] == ['lo']\n") == (True, "passed")
            raw = f"import socket\ns = socket.socket.__mro__[-2](socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
            passed, reason = stack.run_sandboxed(raw)
            assert not passed and "unreachable" in reason, reason
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_isolated_interpreter_and_environment(stack, monkeypatch):
    monkeypatch.setenv("DECODERSTACK_TEST_SECRET", "hunter2")
    program = ("import os, sys\nassert sys.flags.isolated and sys.stdin.read() == ''\n"
               "assert 'DECODERSTACK_TEST_SECRET' not in os.environ and 'hunter2' not in repr(os.environ), os.environ\n"
               "import builtins\nbuiltins.SANDBOX_WAS_HERE = True\n")
    assert stack.run_sandboxed(program) == (True, "passed")
    import builtins
    assert not hasattr(builtins, "SANDBOX_WAS_HERE")  # it ran in another interpreter, not ours


def test_files_stay_small_and_the_directory_is_removed(stack, tmp_path):
    where = tmp_path / "cwd"
    program = (f"import os\nopen('note.txt', 'w').write('x')\nopen({str(where)!r}, 'w').write(os.getcwd())\n"
               "open('big', 'wb').write(b'x' * (32 << 20))\n")
    passed, reason = stack.run_sandboxed(program)
    assert not passed and reason == "OSError: [Errno 27] File too large"  # RLIMIT_FSIZE
    cwd = where.read_text()
    assert os.path.basename(cwd).startswith("decoderstack-sandbox-") and not os.path.exists(cwd)


def test_errors_name_their_cause(stack):
    assert stack.run_sandboxed("def f(:\n") == (False, "SyntaxError: invalid syntax")
    assert stack.run_sandboxed("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n") == (False, "killed by SIGSEGV")
    assert stack.run_sandboxed("raise SystemExit(3)\n") == (False, "the program exited (3) before its end")
    assert stack.run_sandboxed("print('x' * 10**6)\n") == (True, "passed")  # stdout is discarded, not buffered by us
