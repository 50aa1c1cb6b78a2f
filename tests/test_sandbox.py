"""The code tool's sandbox (evals/sandbox.py): each test ATTEMPTS an escape from inside run_python
and asserts that it failed, and that the host saw no effect; ordinary code still runs.
The reference for "failed" is the host: the same action taken by this test process succeeds
(the planted file is readable, the listener accepts, the environ is readable), so a test cannot
pass because the attack itself was broken."""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from evals import sandbox
from evals.sandbox import run_python, sandbox_check

ROOT = Path(__file__).resolve().parent.parent
MEMORY_MB = 256

if shutil.which("bwrap") and sandbox_check():  # bwrap installed, yet the kernel forbids namespaces
    pytest.skip(f"the kernel forbids the sandbox here: {sandbox_check()}", allow_module_level=True)
# Without bwrap at all they skip, saying how to get it, except under CI, which installs it (.ci/run)
pytestmark = pytest.mark.usefixtures("sandbox_available")


def run(code: str, timeout: float = 20, memory_mb: int = MEMORY_MB) -> str:
    return run_python(textwrap.dedent(code), timeout, memory_mb)


def alive(token: str) -> list[int]:
    """Host pids whose command line contains `token` (the jail's processes are visible from here;
    the code itself runs as `python main.py`, so the token goes into a child's argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture(params=["cgroup", "watchdog"])
def limits(request, monkeypatch):
    """Run a test with the cgroup (when this machine allows one) and with the fallback."""
    if request.param == "cgroup" and sandbox.cgroup_layout() is None:
        pytest.skip("no cgroup can be created here (not root, or no delegated cgroup v2 subtree)")
    if request.param == "watchdog":
        monkeypatch.setattr(sandbox, "cgroup_create", lambda memory_mb: None)
    return request.param


# --- ordinary code ------------------------------------------------------------------------------


def test_output_contract():
    assert run("print('hello')") == "hello\n"
    assert run("import sys; print('out'); print('err', file=sys.stderr)") == "out\nerr\n"  # stdout + stderr
    out = run("1/0")
    assert out.startswith("Traceback (most recent call last):\n  File \"/tmp/focusft-tool-")
    assert out.endswith("main.py\", line 1, in <module>\n    1/0\n    ~^~\nZeroDivisionError: division by zero\n")
    assert run("import time; time.sleep(5)", timeout=1) == "no stdout here"
    env = run("import os, json; print(json.dumps(dict(os.environ)))")
    assert set(eval(env)) == {"PATH", "HOME", "TMPDIR", "PYTHONIOENCODING", "MPLBACKEND", "OMP_NUM_THREADS",
                              "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LC_CTYPE"}  # LC_CTYPE: PEP 538


def test_working_directory_is_private_and_writable():
    out = run("""
        import os
        open("data.txt", "w").write("42")
        print(open("data.txt").read(), sorted(os.listdir(".")), os.getcwd() == os.environ["HOME"])
    """)
    assert out == "42 ['data.txt', 'main.py'] True\n"
    assert run("import os; print(os.listdir('.'))") == "['main.py']\n"  # a fresh directory per call


@pytest.mark.parametrize("module", ["numpy", "sympy"])
def test_libraries_import(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed in this interpreter")
    code = {"numpy": "import numpy as np; print(np.arange(4).sum())", "sympy": "import sympy; print(sympy.sqrt(8))"}
    assert run(code[module], timeout=60, memory_mb=2048) == {"numpy": "6\n", "sympy": "2*sqrt(2)\n"}[module]


# --- the filesystem -----------------------------------------------------------------------------


def test_cannot_write_outside_the_working_directory(tmp_path):
    targets = [Path("/tmp") / f"escape-{uuid.uuid4().hex}", ROOT / f"escape-{uuid.uuid4().hex}",
               tmp_path / "escape", Path("/dev") / f"escape-{uuid.uuid4().hex}"]
    out = run(f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as e:
                print("denied", type(e).__name__)
    """)
    assert "WROTE" not in out and out.count("denied") == len(targets), out
    assert not any(t.exists() for t in targets)


def test_cannot_read_home_token_output_dir_or_project(tmp_path, monkeypatch):
    home, outdir = tmp_path / "home", tmp_path / "outputs"
    token = home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_SECRET")
    outdir.mkdir()
    (outdir / "results.jsonl").write_text('{"secret": 1}\n')
    monkeypatch.setenv("HOME", str(home))
    paths = [token, outdir / "results.jsonl", Path(__file__).resolve(), Path.home() / ".bash_history"]
    assert token.read_text() == "hf_SECRET"  # the reference: readable from the host
    out = run(f"""
        import os
        for path in {[str(p) for p in paths]!r} + [os.path.expanduser("~/.cache/huggingface/token")]:
            try:
                print("READ", path, open(path).read()[:20])
            except OSError as e:
                print("denied", type(e).__name__)
        print(os.listdir("/"))
    """)
    assert "READ" not in out and "SECRET" not in out and out.count("denied") == len(paths) + 1, out
    assert str(tmp_path) not in out.splitlines()[-1]


def test_cannot_overwrite_results_file(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text('{"correct": true}\n')
    out = run(f"""
        try:
            open({str(results)!r}, "w").write("forged")
            print("OVERWROTE")
        except OSError as e:
            print("denied", type(e).__name__)
    """)
    assert out == "denied FileNotFoundError\n"
    assert results.read_text() == '{"correct": true}\n'


# --- processes ----------------------------------------------------------------------------------


def test_setsid_child_dies_with_the_call(tmp_path):
    token = f"sandbox-orphan-{uuid.uuid4().hex}"
    marker = tmp_path / "marker"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w').write('escaped')  # {token}"
    code = f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {child!r}], start_new_session=True)
        print("started", flush=True)
        time.sleep(30)
    """
    t0 = time.monotonic()
    assert run(code, timeout=1.5) == "no stdout here"
    assert alive(token) == []  # checked at once: killed with the call, not at the end of its sleep
    time.sleep(max(0.0, t0 + 5 - time.monotonic()))
    assert not marker.exists() and alive(token) == []
    # also when the code ends by itself, leaving a detached child behind
    assert run(code.replace("time.sleep(30)", ""), timeout=10) == "started\n"
    assert alive(token) == []


def test_fork_bomb_is_bounded(limits):
    token = f"sandbox-bomb-{uuid.uuid4().hex}"
    out = run(f"""
        import os, time
        started = 0
        for _ in range(500):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.execv("/bin/sleep", ["{token}", "30"])  # argv[0]: the host can find it
            started += 1
        print(started)
    """, timeout=10)
    if limits == "watchdog" and os.geteuid() == 0:  # no RLIMIT_NPROC for root: the poll kills the tree
        assert out == "" or 0 < int(out) < sandbox.TOOL_PROCESSES, out
    else:
        assert 0 < int(out) < sandbox.TOOL_PROCESSES, out
    assert alive(token) == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_memory_is_bounded_for_the_whole_tree(limits):
    n = int(0.6 * MEMORY_MB * 2**20)  # each of the two processes alone fits under RLIMIT_AS
    out = run(f"""
        import os, time
        pid = os.fork()
        block = b"x" * {n}  # written, so resident
        time.sleep(1.5)  # both hold their block at the same time
        print("held", flush=True)
        if pid:
            os.waitpid(pid, 0)
    """, timeout=15)
    assert out.count("held") < 2, out
    assert run(f"block = b'x' * {n}; print('one fits')", timeout=15) == "one fits\n"  # the reference


def test_cannot_see_or_signal_other_processes():
    helper = subprocess.Popen(["sleep", "30"], env={"PLANTED_SECRET": "s3cr3t", "PATH": os.environ["PATH"]})
    try:
        deadline = time.monotonic() + 5  # the reference, once `sleep` has started
        while b"s3cr3t" not in Path(f"/proc/{helper.pid}/environ").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b"s3cr3t" in Path(f"/proc/{helper.pid}/environ").read_bytes()
        out = run(f"""
            import os
            print("ppid", os.getppid() in ({os.getpid()}, {helper.pid}))
            for pid in ({os.getpid()}, {helper.pid}):
                try:
                    os.kill(pid, 0)
                    print("SIGNALLED", pid)
                except OSError as e:
                    print("kill denied", type(e).__name__)
                try:
                    print("READ", open(f"/proc/{{pid}}/environ").read())
                except OSError as e:
                    print("environ denied", type(e).__name__)
            print("processes", len([p for p in os.listdir("/proc") if p.isdigit()]))
        """)
        assert "SIGNALLED" not in out and "READ" not in out and "s3cr3t" not in out, out
        assert out.count("denied") == 4 and "ppid False" in out
        assert int(out.split("processes ")[1]) <= 3  # bwrap's pid 1, the code (and a transient)
        assert helper.poll() is None
    finally:
        helper.kill()
        helper.wait()


def test_sandbox_dies_with_the_evaluator(tmp_path):
    token = f"sandbox-parent-{uuid.uuid4().hex}"
    evaluator = tmp_path / "evaluator.py"
    evaluator.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from evals.sandbox import run_python
        run_python("import os; os.execv('/bin/sleep', ['{token}', '60'])", 60, 256)
    """))
    proc = subprocess.Popen([sys.executable, str(evaluator)])
    try:
        deadline = time.monotonic() + 20
        while not alive(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive(token), "the sandboxed code did not start"
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup code of ours runs
        proc.wait()
    deadline = time.monotonic() + 5
    while alive(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(token) == []


# --- network ------------------------------------------------------------------------------------


def test_no_network_and_no_host_unix_socket(tmp_path):
    tcp = socket.create_server(("127.0.0.1", 0))
    path = str(tmp_path / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen()
    try:
        socket.create_connection(tcp.getsockname(), timeout=5).close()  # the references
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)
        probe.close()
        out = run(f"""
            import socket
            for family, address in ((socket.AF_INET, {tcp.getsockname()!r}), (socket.AF_UNIX, {path!r})):
                s = socket.socket(family)
                s.settimeout(5)
                try:
                    s.connect(address)
                    print("CONNECTED", address)
                except OSError as e:
                    print("denied", type(e).__name__)
        """)
        assert "CONNECTED" not in out and out.count("denied") == 2, out
    finally:
        tcp.close()
        unix.close()


def test_sandbox_check_names_the_install_command(monkeypatch):
    assert sandbox_check() is None
    sandbox_check.cache_clear()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    try:
        assert sandbox_check() == "bubblewrap not found: apt-get install bubblewrap (or dnf/pacman install bubblewrap)"
    finally:
        sandbox_check.cache_clear()
