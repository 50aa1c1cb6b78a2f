"""The code tool's sandbox (GPQA): run model-written Python in a fresh process with limits on
time, memory, output size and, where the kernel allows, no network. One entry point:
`run_python(code, timeout, memory_mb) -> str`."""

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs first in the tool's process: set the limits, then exec a fresh interpreter on the code (so
# its tracebacks show only the model's file). resource is POSIX-only; elsewhere no limits.
SANDBOX_BOOT = """import os, resource, sys
for kind, limit in ((resource.RLIMIT_AS, int(sys.argv[1])), (resource.RLIMIT_FSIZE, int(sys.argv[2]))):
    try:
        resource.setrlimit(kind, (limit, limit))
    except (ValueError, OSError):
        pass
os.execv(sys.executable, [sys.executable, "-I", sys.argv[3]])
"""
TOOL_OUTPUT_BYTES = 16 * 2**20  # RLIMIT_FSIZE: a print loop cannot fill the disk


@functools.lru_cache(maxsize=None)
def network_isolation() -> list[str]:
    """The command prefix that runs tool code without network: `unshare -rn` (new user and network
    namespaces, no privileges needed) where the kernel allows it; [] elsewhere (macOS, Windows, a
    container without user namespaces), and then the code has the host's network."""
    exe = shutil.which("unshare")
    if exe is None:
        return []
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return [exe, "-rn"] if ok else []


def run_python(code: str, timeout: float, memory_mb: int) -> str:
    """Run `code` in a fresh Python process in an empty temporary directory and return stdout +
    stderr, as the official sandbox reports a finished run ("no stdout here" when it ran out of
    time). Limits: wall clock (the whole process group is killed), address space (RLIMIT_AS),
    output size, no network where `network_isolation` can provide it; a minimal environment (no
    tokens or paths of ours)."""
    with tempfile.TemporaryDirectory(prefix="focusft-tool-") as tmp:
        main = Path(tmp) / "main.py"
        main.write_text(code, encoding="utf-8")
        if os.name == "posix":
            cmd = [*network_isolation(), sys.executable, "-I", "-c", SANDBOX_BOOT, str(memory_mb * 2**20),
                   str(TOOL_OUTPUT_BYTES), str(main)]
        else:
            cmd = [sys.executable, "-I", str(main)]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "TMPDIR": tmp, "PYTHONIOENCODING": "utf-8",
               "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(Path(tmp) / "out", "wb") as out, open(Path(tmp) / "err", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)  # its own process group: killed as a whole
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                kill_process_group(proc)
        if timed_out:
            return "no stdout here"  # SandboxFusion's run_status is not "Finished": Open-AgentRL's text
        read = lambda name: (Path(tmp) / name).read_bytes().decode("utf-8", errors="replace")  # noqa: E731
        return read("out") + read("err")


def kill_process_group(proc: subprocess.Popen):
    """Kill the process and whatever it started (a background child must not outlive its call)."""
    if hasattr(os, "killpg"):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        proc.kill()
    proc.wait()
