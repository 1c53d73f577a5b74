"""HumanEval grading: code extraction, and the sandbox model-written code runs in, attack by attack (each attack
below got through the sandbox before; every one is tried in both modes the sandbox promises it for)."""
import gzip
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

import pytest

from conftest import UNINTERPRETED_STACK

pytestmark = pytest.mark.filterwarnings("ignore:--sandbox=weak")


@pytest.fixture(scope="session")
def isolation(stack):
    """Where this machine cannot make the isolated sandbox, its tests skip (and the stack refuses HumanEval)."""
    try:
        stack.run_sandboxed("pass")
    except stack.SandboxUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def weak_python(stack):
    """An interpreter the weak sandbox can use: ours, unless it lies where the sandbox's uid may not go (the weak
    sandbox then refuses it, see below), else the system's python3."""
    for python in (stack.SANDBOX_PYTHON, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(python, os.X_OK):
            stack.SANDBOX_PYTHON, default = python, stack.SANDBOX_PYTHON
            try:
                stack.run_sandboxed("pass", sandbox="weak")
                return python
            except stack.SandboxUnavailable as e:
                reason = str(e)
            finally:
                stack.SANDBOX_PYTHON = default
    pytest.skip(reason)


@pytest.fixture(params=["isolated", "weak"])
def sandbox(request, stack, monkeypatch):
    if request.param == "isolated":
        request.getfixturevalue("isolation")
    else:
        monkeypatch.setattr(stack, "SANDBOX_PYTHON", request.getfixturevalue("weak_python"))
    return request.param


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


def processes_with(marker):
    """Pids whose command line holds marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read() and process_state(pid) not in ("Z", None):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_no_process_outlives_the_run(stack, sandbox):
    """setsid + a double fork, then an exec'd sleep, survived the old timeout kill. The program is one process now
    (RLIMIT_NPROC 1, binding since it is never root); a namespace's init would take any child with it."""
    marker = f"{time.time_ns() % 10**9 + 10**9}"  # sleep's argument: seconds, unique to this run
    program = (f"import os\nos.setsid()\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\nwhile True:\n    pass\n")
    t0 = time.time()
    passed, reason = stack.run_sandboxed(program, timeout=1.0, sandbox=sandbox)
    assert not passed and reason == "BlockingIOError: [Errno 11] Resource temporarily unavailable", reason
    assert time.time() - t0 < 3
    deadline = time.time() + 2
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == [], "the program's child outlived it"
    threads = "import threading\nthreading.Thread(target=lambda: None).start()\n"
    assert stack.run_sandboxed(threads, sandbox=sandbox) == (False, "RuntimeError: can't start new thread")


def test_it_signals_nothing_outside(stack, sandbox):
    """It killed an unrelated process and sent us SIGUSR1; os.kill(-1, SIGKILL) would have taken the host down. The
    program tries kill(-1) only once it has been shown it cannot reach either (so a broken sandbox fails, not the host)."""
    if sandbox == "weak" and os.geteuid() != 0:
        pytest.skip("the weak sandbox keeps our uid when we are not root")
    victim = subprocess.Popen(["sleep", "30"])
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    program = (f"import os, signal\nfor pid, sig in (({victim.pid}, signal.SIGKILL), ({os.getpid()}, signal.SIGUSR1)):\n"
               f"    try:\n        os.kill(pid, sig)\n    except OSError:\n        continue\n"
               f"    raise AssertionError(f'signalled {{pid}}')\ntry:\n    os.kill(-1, signal.SIGKILL)\n"
               f"except ProcessLookupError:  # nobody it may signal\n    pass\n")
    try:
        assert stack.run_sandboxed(program, sandbox=sandbox) == (True, "passed")
        time.sleep(0.2)
        assert victim.poll() is None and not received
    finally:
        signal.signal(signal.SIGUSR1, previous)
        victim.kill()
        victim.wait()


def test_memory_bombs_fail_under_the_limit_without_touching_us(stack):
    before = resource.getrlimit(resource.RLIMIT_AS)
    assert stack.run_sandboxed("x = bytearray(2 << 30)\n") == (False, "MemoryError")
    t0 = time.time()
    assert stack.run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n", memory_mb=256) == (False, "MemoryError")
    assert time.time() - t0 < 5  # stopped by the limit, not the timeout
    assert stack.run_sandboxed("x = bytearray(100 << 20)\n") == (True, "passed")  # within 512 MB
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # the limits are set in the child only
    assert len(bytearray(1 << 30)) == 1 << 30


def test_no_network(stack, sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        passed, reason = stack.run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                                             sandbox=sandbox)
        assert not passed and reason == "OSError: network access is disabled in the sandbox"
        passed, reason = stack.run_sandboxed(f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)\n",
                                             sandbox=sandbox)
        assert not passed and "network access is disabled" in reason
        # past the socket patch (the C type itself), the syscall filter refuses the socket
        raw = f"import socket\ns = socket.socket.__mro__[-2](socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
        assert stack.run_sandboxed(raw, sandbox=sandbox) == (False, "PermissionError: [Errno 1] Operation not permitted")
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_no_network_of_any_family(stack, sandbox, tmp_path):
    """UDP, a UNIX socket on the filesystem (it crossed the network namespace: a path is not a network address), an
    abstract UNIX socket, a socketpair: each attempt fails, and no server hears anything."""
    tmp_path.chmod(0o755)
    path = str(tmp_path / "open.sock")
    abstract = f"\0decoderstack-test-{os.getpid()}"
    servers = []
    for family, kind, address in ((socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0)),
                                  (socket.AF_UNIX, socket.SOCK_STREAM, path),
                                  (socket.AF_UNIX, socket.SOCK_STREAM, abstract)):
        server = socket.socket(family, kind)
        server.bind(address)
        if kind == socket.SOCK_STREAM:
            server.listen()
        server.settimeout(0.2)
        servers.append(server)
    os.chmod(path, 0o777)
    udp_port = servers[0].getsockname()[1]
    program = (f"import socket\nraw = socket.socket.__mro__[-2]\nattempts = [\n"
               f"    lambda: raw(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp_port})),\n"
               f"    lambda: raw(socket.AF_UNIX, socket.SOCK_STREAM).connect({path!r}),\n"
               f"    lambda: raw(socket.AF_UNIX, socket.SOCK_STREAM).connect({abstract!r}),\n"
               f"    lambda: socket.socketpair(),\n"
               f"    lambda: raw(socket.AF_NETLINK, socket.SOCK_RAW, 0),\n]\n"
               f"for i, attempt in enumerate(attempts):\n    try:\n        attempt()\n    except OSError:\n        continue\n"
               f"    raise AssertionError(f'attempt {{i}} got through')\n")
    try:
        assert stack.run_sandboxed(program, sandbox=sandbox) == (True, "passed")
        with pytest.raises(socket.timeout):
            servers[0].recvfrom(16)
        for server in servers[1:]:
            with pytest.raises(socket.timeout):
                server.accept()
    finally:
        for server in servers:
            server.close()


def test_isolated_interpreter_and_environment(stack, monkeypatch):
    monkeypatch.setenv("DECODERSTACK_TEST_SECRET", "hunter2")
    program = ("import os, sys\nassert sys.flags.isolated and sys.stdin.read() == ''\n"
               "assert 'DECODERSTACK_TEST_SECRET' not in os.environ and 'hunter2' not in repr(os.environ), os.environ\n"
               "import builtins\nbuiltins.SANDBOX_WAS_HERE = True\n")
    assert stack.run_sandboxed(program) == (True, "passed")
    import builtins
    assert not hasattr(builtins, "SANDBOX_WAS_HERE")  # it ran in another interpreter, not ours


def test_files_stay_small_and_the_directory_is_removed(stack, sandbox):
    program = ("import os\nopen('note.txt', 'w').write('x')\ntry:\n    open('big', 'wb').write(b'x' * (80 << 20))\n"
               "except OSError as e:\n    raise RuntimeError(f'{os.getcwd()} {e.strerror}')\n")
    passed, reason = stack.run_sandboxed(program, sandbox=sandbox)
    cwd, error = reason.removeprefix("RuntimeError: ").split(" ", 1)
    # the 64 MB tmpfs fills up first (isolated); RLIMIT_FSIZE stops the file where there is none (weak)
    assert not passed and error == {"isolated": "No space left on device", "weak": "File too large"}[sandbox]
    assert os.path.basename(os.path.dirname(cwd)).startswith("decoderstack-sandbox-") and not os.path.exists(cwd)


def test_one_disk_budget_and_nothing_written_outside(stack, isolation):
    """Four 15 MB files, each under the old per-file limit, were written outside the temp dir. Isolated, everything
    but the working directory is read-only (even a world-writable directory: /tmp) and the directory holds disk_mb."""
    outside = f"/tmp/decoderstack-test-{os.getpid()}-{time.time_ns()}.bin"
    program = (f"import errno\nwritten = []\nfor i in range(4):\n    try:\n"
               f"        open(f'{{i}}.bin', 'wb').write(b'x' * (15 << 20))\n        written.append(i)\n"
               f"    except OSError as e:\n        assert e.errno == errno.ENOSPC, e\n"
               f"assert written == [0, 1], written\ntry:\n    open({outside!r}, 'wb')\nexcept OSError as e:\n"
               f"    assert e.errno == errno.EROFS, e\nelse:\n    raise AssertionError('wrote outside')\n")
    try:
        assert stack.run_sandboxed(program, disk_mb=40) == (True, "passed")
        assert not os.path.exists(outside)
    finally:
        if os.path.exists(outside):
            os.unlink(outside)


def test_the_weak_sandbox_refuses_a_python_its_uid_cannot_read(stack):
    """Dropped to its own uid, the program could not import the standard library from a Python under /root (pyenv,
    conda): every HumanEval answer with an import would silently fail. The isolated sandbox binds the installation
    back in; the weak one refuses, naming the directory."""
    prefix = os.path.realpath(sys.base_prefix)
    ancestors = [os.sep + os.path.join(*prefix.split(os.sep)[1:i + 1]) for i in range(1, prefix.count(os.sep) + 1)]
    hidden = [d for d in ancestors if not os.stat(d).st_mode & 0o001]
    if os.geteuid() != 0 or not hidden:
        pytest.skip("needs root and a Python in a directory other users may not enter")
    with pytest.raises(stack.SandboxUnavailable, match=f"lies in {hidden[0]}, which other users may not enter"):
        stack.run_sandboxed("pass", sandbox="weak")


def test_deep_trees_and_a_replaced_cwd_leave_nothing_behind(stack, sandbox, tmp_path, monkeypatch):
    """A 1,100-deep directory chain (a RecursionError in the old cleanup), a directory we may not enter, and the cwd
    swapped for a link to a directory of ours (an OSError, and a cleanup that might follow it): the run ends normally,
    nothing is left in the temp dir and the link's target is untouched."""
    parent = tempfile.mkdtemp(prefix="decoderstack-test-")  # not under tmp_path: the program must reach its cwd
    os.chmod(parent, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", parent)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    program = (f"import os\nhere = os.getcwd()\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\n"
               f"open('bottom', 'w').write('x')\nos.chmod('.', 0)\nos.chdir(here)\nos.mkdir('locked')\nos.chmod('locked', 0)\n"
               f"try:\n    os.rename(here, here + '-moved')\n    os.symlink({str(precious)!r}, here)\nexcept OSError:\n    pass\n")
    try:
        assert stack.run_sandboxed(program, sandbox=sandbox) == (True, "passed")
        assert os.listdir(parent) == []
    finally:
        os.rmdir(parent)
    assert os.listdir(precious) == ["keep.txt"] and (precious / "keep.txt").read_text() == "mine"


def test_it_cannot_write_what_we_own(stack, sandbox, tmp_path):
    """The child kept our uid: as root it could write any file, drop a .pth into site-packages (code run at the next
    Python start, and the next sandbox start as root) or rewrite the stack's own source."""
    if sandbox == "weak" and os.geteuid() != 0:
        pytest.skip("the weak sandbox keeps our uid when we are not root")
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    pth = os.path.join(sysconfig.get_paths()["purelib"], "decoderstack-sandbox-test.pth")
    targets = [str(ours / "planted.txt"), pth, os.path.abspath(stack.__file__)]
    program = (f"import os\nfor path, mode in zip({targets!r}, ('w', 'w', 'r+b')):\n    try:\n        open(path, mode)\n"
               f"    except OSError:\n        continue\n    raise AssertionError(f'opened {{path}} for writing')\n"
               f"assert os.getuid() != 0 or os.uname().sysname != 'Linux'\ntry:\n    os.setuid(0)\nexcept OSError:\n    pass\n"
               f"else:\n    raise AssertionError('became root')\n")
    source = open(stack.__file__, "rb").read()
    try:
        assert stack.run_sandboxed(program, sandbox=sandbox) == (True, "passed")
        assert os.listdir(ours) == [] and not os.path.exists(pth)
        assert open(stack.__file__, "rb").read() == source
    finally:
        if os.path.exists(pth):
            os.unlink(pth)


def test_what_we_run_with_is_out_of_reach(stack, sandbox, monkeypatch):
    """Where unshare was refused the child read our environment and wrote our memory through /proc/PID."""
    if sandbox == "weak" and os.geteuid() != 0:
        pytest.skip("the weak sandbox keeps our uid when we are not root")
    monkeypatch.setenv("DECODERSTACK_TEST_SECRET", "hunter2")
    program = (f"for path, mode in (('/proc/{os.getpid()}/environ', 'rb'), ('/proc/{os.getpid()}/mem', 'wb')):\n"
               f"    try:\n        open(path, mode)\n    except OSError:\n        continue\n"
               f"    raise AssertionError(f'opened {{path}}')\n")
    assert stack.run_sandboxed(program, sandbox=sandbox) == (True, "passed")


@pytest.mark.parametrize("completion", [
    "    import os\n    os._exit(0)\n",  # before check() can fail
    "```python\nimport atexit, os\natexit.register(lambda: os._exit(0))\ndef quadruple(x):\n    return 0\n```",
    "```python\nimport sys\ndef quadruple(x):\n    sys.exit(0)\n```",  # inside check()
    "```python\ndef quadruple(x):\n    raise KeyboardInterrupt\n```",
    # a forged report on every descriptor it might have been given, then a clean exit
    "```python\nimport os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'ready\\npassed\\n')\n    except OSError:\n"
    "        pass\nos._exit(0)\n```",
])
def test_a_pass_cannot_be_faked(stack, sandbox, completion):
    assert stack.humaneval_passed(completion, PROBLEM, sandbox=sandbox) is False
    assert stack.humaneval_passed("    return 4 * x\n", PROBLEM, sandbox=sandbox) is True


def test_memory_is_one_budget(stack, sandbox):
    """Three children held 400 MB each under a 512 MB per-process limit: children and threads cannot be made now."""
    program = ("import os\npids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
               "        x = bytearray(400 << 20)\n        os._exit(0)\n    pids.append(pid)\nfor pid in pids:\n    os.waitpid(pid, 0)\n")
    assert stack.run_sandboxed(program, sandbox=sandbox) == (False, "BlockingIOError: [Errno 11] Resource temporarily unavailable")


WITHOUT_UNSHARE = UNINTERPRETED_STACK + """
import warnings
weak_python = sys.argv[2]
launcher = {"__name__": "launcher"}
exec(stack.sandbox_launcher(), launcher)
launcher["sandbox_deny_syscalls"](["unshare"])  # what a container's seccomp profile does
out = {}
try:
    stack.run_sandboxed("pass")
except stack.SandboxUnavailable as e:
    out["isolated"] = str(e)
program = f"for path in ('/proc/{os.getpid()}/environ', '/proc/{os.getpid()}/mem'):\\n    try:\\n        open(path, 'rb').read(1)\\n    except OSError:\\n        continue\\n    raise AssertionError(path)\\n"
stack.SANDBOX_PYTHON = weak_python
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out["weak"] = [stack.run_sandboxed(program, sandbox="weak") for _ in range(2)]
out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, stack.SandboxWarning)]
print(json.dumps(out))
"""


def test_without_namespaces_it_refuses_or_says_it_is_weak(stack, weak_python):
    """Where unshare is refused (containers with seccomp) the old sandbox ran on without a word. Now the isolated
    sandbox refuses, naming the flag, and --sandbox=weak runs, saying once what it lacks."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("the syscall filter is written for Linux on x86_64 and aarch64")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_UNSHARE, stack.__file__, weak_python], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["isolated"] == ("cannot set up the isolated sandbox for model-written code: unshare: Operation not "
                               "permitted (--sandbox=weak runs HumanEval without namespaces; README: Security)")
    assert out["weak"] == [[True, "passed"]] * 2
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("--sandbox=weak: model-written code runs without namespaces")


def test_the_cli_refuses_an_unknown_sandbox(stack):
    with pytest.raises(SystemExit):
        stack.parse_config(["--preset", "cpu", "--sandbox", "none"])


def test_errors_name_their_cause(stack):
    assert stack.run_sandboxed("def f(:\n") == (False, "SyntaxError: invalid syntax")
    assert stack.run_sandboxed("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n") == (False, "killed by SIGSEGV")
    assert stack.run_sandboxed("raise SystemExit(3)\n") == (False, "the program exited (3) before its end")
    assert stack.run_sandboxed("print('x' * 10**6)\n") == (True, "passed")  # stdout is discarded, not buffered by us


AS_A_PLAIN_USER = UNINTERPRETED_STACK + """
ours = sys.argv[3]
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)  # from here on, a plain user with no capability
stack.SANDBOX_PYTHON = sys.argv[2]
programs = {
    "pass": "pass",
    "write ours": f"open({ours!r} + '/x', 'w')",
    "fork": "import os\\nos.fork()",
    "proc": "import os\\nassert os.listdir('/proc') == [], os.listdir('/proc')",
    "remount": "import ctypes\\nassert ctypes.CDLL(None).umount2(b'/proc', 2) == 0, 'umount refused'",
    "socket": "import socket\\nsocket.socket.__mro__[-2]()",
}
out = {}
for name, program in programs.items():
    try:
        out[name] = stack.run_sandboxed(program)
    except stack.SandboxUnavailable as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def test_as_a_plain_user_the_isolated_sandbox_holds(stack, weak_python):
    """Not root, the program keeps our uid inside a user namespace: what we own is still read-only to it, it still
    cannot fork, see /proc, undo a mount or open a socket."""
    if os.geteuid() != 0:
        pytest.skip("becomes a plain user from root")
    ours = tempfile.mkdtemp(prefix="decoderstack-test-")  # not under tmp_path, which only root may enter
    os.chown(ours, 65534, 65534)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        result = subprocess.run([sys.executable, "-c", AS_A_PLAIN_USER, stack.__file__, weak_python, ours], env=env,
                                capture_output=True, text=True, timeout=120, cwd="/")
        assert os.listdir(ours) == []
    finally:
        shutil.rmtree(ours)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    if isinstance(out["pass"], str):
        pytest.skip(f"this machine refuses a plain user's namespaces: {out['pass']}")
    assert out == {"pass": [True, "passed"],
                   "write ours": [False, f"OSError: [Errno 30] Read-only file system: '{ours}/x'"],
                   "fork": [False, "BlockingIOError: [Errno 11] Resource temporarily unavailable"],
                   "proc": [True, "passed"],
                   "remount": [False, "AssertionError: umount refused"],
                   "socket": [False, "PermissionError: [Errno 1] Operation not permitted"]}
