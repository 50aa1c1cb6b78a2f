"""The code tool's sandbox: run the model's Python in a fresh, throw-away jail and return what it printed.

One call = one jail, built by bubblewrap (`bwrap`, the tool Flatpak uses) from Linux namespaces:

    evaluator ─ launcher (joins the call's cgroups, execs) ─ bwrap ─┬─ pid 1 (bwrap's reaper)
                                                                    └─ python main.py ─ (children)
    mounts:  /usr /bin /lib* read-only, the interpreter's prefix read-only, a few /etc files,
             a fresh /proc (only the jail's processes), a minimal /dev,
             a private tmpfs as the working directory (the only writable place, with /dev/shm)
    unshared: user (uid 65534 inside, no capabilities), pid, network (loopback only, down),
              ipc, uts, cgroup

Per escape, the mechanism that stops it:
- writing outside the working dir:  everything else is a read-only bind or the read-only root
- reading $HOME, tokens, outputs, the project: not mounted (only system dirs and the interpreter are)
- the evaluator's environment:      a minimal env; /proc shows only the jail's own processes
- network, host Unix sockets:        a new network namespace; no host path holds a socket
- signalling other processes:        a new pid namespace (the evaluator has no pid in it)
- outliving the call (setsid, fork): the pid namespace dies with its pid 1, which bwrap
                                     (--die-with-parent) kills when bwrap or the evaluator dies; on
                                     timeout we kill bwrap (and every process of the call's cgroup)
- memory, processes, CPU of the whole tree: one cgroup per call (v1 or v2) when we may create one;
  else a watchdog that polls the tree (its summed PSS, its process count) and RLIMIT_NPROC, which
  the kernel counts per user namespace (but never applies to a jail run by root: see SANDBOX_BOOT).
  Always also per process: RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE (output size), no core dumps.
See docs/sandbox.md for what it does NOT guarantee.
"""

import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOL_OUTPUT_BYTES = 16 * 2**20  # RLIMIT_FSIZE: a print loop cannot fill the disk
TOOL_PROCESSES = 64  # processes and threads of one call (pids.max / RLIMIT_NPROC)
CALLS = itertools.count()  # cgroup names unique within the evaluator (tool calls run in threads)
SANDBOX_UID = 65534  # the jail's uid as the code sees it ("nobody"); outside, the evaluator's uid
WATCHDOG_PERIOD = 0.02  # seconds between two sums of the tree's memory when no memory cgroup is available
SYSTEM_PATHS = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime"]

# Runs first inside the jail: set the per-process limits, then exec a fresh interpreter on the code
# (so its tracebacks show only the model's file). RLIMIT_NPROC is set HERE, inside the new user
# namespace: the kernel counts it per (user namespace, uid), so it counts only this jail's processes;
# set before bwrap it would count every process of the evaluator's uid on the machine.
# NOTE: bwrap maps the jail's uid 65534 onto the uid that runs bwrap, and the kernel never applies
# RLIMIT_NPROC to uid 0: when the evaluator is root, only the pids cgroup (or the watchdog) bounds
# the process count. (Dropping to nobody before bwrap would fix that, but nobody cannot bind an
# interpreter that lives in /root, mode 0700.)
# Without the jail (jail=False) RLIMIT_NPROC is passed as "-", not set: outside a user namespace it
# would count every process of the evaluator's uid.
SANDBOX_BOOT = """import os, resource, sys
limits = ((resource.RLIMIT_AS, sys.argv[1]), (resource.RLIMIT_FSIZE, sys.argv[2]),
          (resource.RLIMIT_NPROC, sys.argv[3]), (resource.RLIMIT_CPU, sys.argv[4]), (resource.RLIMIT_CORE, "0"))
for kind, limit in limits:
    if limit != "-":
        resource.setrlimit(kind, (int(limit), int(limit)))
os.environ.pop("PWD", None)  # set by bwrap's --chdir; the tool's environment had none
os.execv(sys.executable, [sys.executable, "-I", sys.argv[5]])
"""

# Runs first outside the jail, as the evaluator's user: move itself into the call's cgroups, then
# exec bwrap. Everything bwrap starts inherits the cgroups, so no process escapes the accounting.
# (Popen's preexec_fn could do this, but it is unsafe in a threaded program and tool calls run in
# threads.)
LAUNCH = """import os, sys
n = int(sys.argv[1])
for procs in sys.argv[2:2 + n]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
os.execv(sys.argv[2 + n], sys.argv[2 + n:])
"""


def run_python(code: str, timeout: float, memory_mb: int, *, python: str | None = None, jail: bool = True) -> str:
    """Run `code` in a fresh jail (see the module docstring) whose working directory is an empty
    private temporary directory, and return stdout + stderr, as the official sandbox reports a
    finished run ("no stdout here" when it ran out of time). Limits: wall clock (every process of
    the call is killed), memory_mb for the whole process tree and per process (RLIMIT_AS),
    TOOL_PROCESSES processes, CPU time, output size; no network; a minimal environment.
    `python`: the interpreter that runs the code (default: this one, sys.executable); its prefixes
    and sys.path directories are mounted read-only. Raises RuntimeError when the sandbox is
    unavailable (call `sandbox_check` first).
    NOTE: jail=False (the GPQA command's --unsafe-tool-sandbox) runs the code WITHOUT the jail: a
    plain process in a temporary directory with the same environment, the rlimits (not
    RLIMIT_NPROC) and the call's cgroup if one can be created; it can read and write whatever the
    evaluator's user can, use the network and signal the user's processes."""
    python = python or sys.executable
    why = sandbox_check() if jail else None
    if why:
        raise RuntimeError(why)
    # The host side of the call: main.py to copy in, out and err to read back. The jail never sees
    # this directory; its working directory is a tmpfs mounted at the same path, so tracebacks read
    # as if the code ran here.
    with tempfile.TemporaryDirectory(prefix="focusft-tool-") as tmp:
        main = Path(tmp) / "main.py"
        main.write_text(code, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "TMPDIR": tmp, "PYTHONIOENCODING": "utf-8",
               "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        timed_out = not run_call(tmp, env, timeout, memory_mb, python, jail)
        if timed_out:
            return "no stdout here"  # SandboxFusion's run_status is not "Finished": Open-AgentRL's text
        read = lambda name: (Path(tmp) / name).read_bytes().decode("utf-8", errors="replace")  # noqa: E731
        return read("out") + read("err")


def run_call(tmp: str, env: dict, timeout: float, memory_mb: int, python: str, jail: bool) -> bool:
    """Run tmp/main.py in a jail (or, jail=False, without), stdout and stderr to tmp/out and
    tmp/err; False on timeout."""
    groups = cgroup_create(memory_mb)
    with contextlib.ExitStack() as stack:
        stack.callback(cgroup_remove, groups)  # last: once every process is gone
        src = stack.enter_context(open(Path(tmp) / "main.py", "rb"))
        out = stack.enter_context(open(Path(tmp) / "out", "wb"))
        err = stack.enter_context(open(Path(tmp) / "err", "wb"))
        if jail:
            inner = bwrap_command(tmp, src.fileno(), timeout, memory_mb, python)
        else:
            inner = [python, "-I", "-c", SANDBOX_BOOT, *map(str, process_limits(timeout, memory_mb, nproc="-")),
                     f"{tmp}/main.py"]
        proc = subprocess.Popen(launch_command(groups or [], inner), cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, pass_fds=(src.fileno(),), start_new_session=True)
        try:
            return wait_within_limits(proc, timeout, None if groups else memory_mb * 2**20)
        finally:
            kill_tree(proc, groups)


def launch_command(groups: list[Path], bwrap: list[str]) -> list[str]:
    """LAUNCH (join the cgroups) in front of a bwrap command line."""
    return [sys.executable, "-I", "-S", "-c", LAUNCH, str(len(groups)), *(str(g / "cgroup.procs") for g in groups),
            *bwrap]


@functools.lru_cache(maxsize=None)
def sandbox_check() -> str | None:
    """None when `run_python` can jail code here, else a one-line reason (with the fix)."""
    if sys.platform != "linux":
        return f"the code tool's sandbox needs Linux namespaces (this is {sys.platform})"
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap not found: apt-get install bubblewrap (or dnf/pacman install bubblewrap)"
    probe = launch_command([], [exe, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid",
                                str(SANDBOX_UID), "--ro-bind", "/", "/", "--proc", "/proc", "true"])
    try:
        r = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap cannot start: {e}"
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["exit status %d" % r.returncode])[-1]
        return (f"bubblewrap cannot create namespaces here ({msg}): allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1, or a container with --privileged/seccomp)")
    return None


def sandbox_limits() -> str:
    """One line for the log: how the whole tree's memory and process count are bounded here."""
    layout = cgroup_layout()
    if layout:
        return f"memory, processes and CPU of each call bounded by a cgroup ({layout[0]})"
    nproc = " (not for root: by the watchdog only)" if os.geteuid() == 0 else ""
    return ("no cgroup can be created here: each call's memory bounded by a watchdog summing the tree's PSS "
            f"(every {WATCHDOG_PERIOD * 1000:.0f} ms), its processes by RLIMIT_NPROC in its user namespace{nproc}")


def sandbox_name() -> str:
    """The short name recorded with the results, e.g. "bubblewrap + cgroup v1 (memory, pids, cpu)"."""
    layout = cgroup_layout()
    if layout is None:
        return "bubblewrap + watchdog (no cgroup)"
    controllers = ", ".join(layout[1]) if layout[0] == "v1" else "memory, pids, cpu"
    return f"bubblewrap + cgroup {layout[0]} ({controllers})"


# ---------------------------------------------------------------------------------------------
# The jail


@functools.lru_cache(maxsize=None)
def bwrap_features() -> frozenset[str]:
    """The optional bwrap flags this version has (--size 0.7+, --disable-userns 0.8+)."""
    text = subprocess.run([shutil.which("bwrap"), "--help"], capture_output=True, text=True).stdout
    return frozenset(f for f in ("--size", "--disable-userns") if f in text)


@functools.lru_cache(maxsize=None)
def interpreter_paths(python: str) -> tuple[str, ...]:
    """The directories the interpreter `python` needs: its prefixes (a venv has two) and the
    sys.path it computes with -I (site-packages, .pth additions), minus what SYSTEM_PATHS already
    covers. NOTE: pyenv/conda/venv interpreters live in $HOME: we bind these directories only, never
    $HOME. An interpreter that does not start gives (): the jail then reports why it cannot run it."""
    ask = ("import json, sys\n"
           "print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]))")
    try:
        r = subprocess.run([python, "-I", "-c", ask], capture_output=True, text=True, timeout=60)
        paths = set(json.loads(r.stdout)) if r.returncode == 0 else set()
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return ()
    paths = {q for p in paths if p and os.path.isdir(p) for q in (os.path.abspath(p), os.path.realpath(p))}
    covered = lambda p, roots: any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)  # noqa: E731
    keep = sorted(p for p in paths if not covered(p, SYSTEM_PATHS[:7]))
    return tuple(p for p in keep if not covered(p, [q for q in keep if q != p]))


def bwrap_command(workdir: str, code_fd: int, timeout: float, memory_mb: int, python: str) -> list[str]:
    """The bwrap command line for one call: the mounts, the namespaces, then SANDBOX_BOOT."""
    sized = lambda: ["--size", str(memory_mb * 2**20)] if "--size" in bwrap_features() else []  # noqa: E731
    cmd = [shutil.which("bwrap"), "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID),
           "--gid", str(SANDBOX_UID), "--die-with-parent", "--new-session"]
    if "--disable-userns" in bwrap_features():
        cmd += ["--disable-userns"]  # no nested user namespace: less kernel surface from inside
    for path in SYSTEM_PATHS:
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            cmd += ["--ro-bind", path, path]
    for path in interpreter_paths(python):
        cmd += ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev", *sized(), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            *sized(), "--tmpfs", workdir, "--file", str(code_fd), f"{workdir}/main.py",
            "--chdir", workdir, "--remount-ro", "/"]
    limits = process_limits(timeout, memory_mb, nproc=TOOL_PROCESSES)
    return [*cmd, python, "-I", "-c", SANDBOX_BOOT, *map(str, limits), f"{workdir}/main.py"]


def process_limits(timeout: float, memory_mb: int, nproc) -> list:
    """SANDBOX_BOOT's arguments: RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC ("-": unset), RLIMIT_CPU."""
    return [memory_mb * 2**20, TOOL_OUTPUT_BYTES, nproc, math.ceil(timeout) + 1]


def wait_within_limits(proc: subprocess.Popen, timeout: float, memory_limit: int | None) -> bool:
    """Wait for the call to end; False when the wall clock ran out. With memory_limit (no cgroup),
    poll the tree: stop the wait as soon as its summed memory exceeds the limit or it holds more
    than TOOL_PROCESSES processes (the caller then kills the tree; the model reads whatever was
    printed until then). NOTE: a poll bounds only approximately: a tree can overshoot for one period."""
    if memory_limit is None:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return False
        tree = descendants(proc.pid)
        if len(tree) > TOOL_PROCESSES + 2 or sum(pss_bytes(pid) for pid in tree) > memory_limit:  # + bwrap's 2
            return True
        time.sleep(WATCHDOG_PERIOD)
    return True


def kill_tree(proc: subprocess.Popen, groups: list[Path] | None):
    """Kill every process of the call, and return once they are gone. SIGKILL to the launcher's
    process group reaches bwrap; its --die-with-parent then kills the jail's pid 1, and the kernel
    kills every process of a pid namespace whose pid 1 dies (setsid or double-forked ones
    included). Every process of the cgroup (or of the tree, listed BEFORE the kill: once bwrap dies
    its orphans leave the tree) is killed as well, so nothing depends on one mechanism only."""
    pids = cgroup_pids(groups) if groups else descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for _ in range(500):  # SIGKILL is asynchronous: wait for the kernel to finish
        if groups:  # a cgroup's members are ours: kill again whatever a racing fork started
            pids = cgroup_pids(groups)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        else:  # a bare pid may be reused once freed: only watch these go
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not pids:
            return
        time.sleep(0.01)


def descendants(root: int) -> list[int]:
    """Every process below `root`, from the parent links in /proc (orphans inside the jail are
    re-parented to its pid 1, which is below root, so a setsid child is still found)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state ppid"
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def pss_bytes(pid: int) -> int:
    """Proportional resident memory of one process (0 if it is gone): pages shared by n processes
    count 1/n in each, so a sum over forked children is not inflated (RSS would count them n times)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# ---------------------------------------------------------------------------------------------
# One cgroup per call. v1 (one hierarchy per controller, as on this project's machines) and v2
# (one unified hierarchy). We create the call's group under the evaluator's own group, so the
# machine's own limits still apply above it. This needs write access to that group: root, or a
# delegated v2 subtree (systemd-run --user --scope -p Delegate=yes ...); otherwise the watchdog.


@functools.lru_cache(maxsize=None)
def cgroup_layout() -> tuple[str, dict[str, Path]] | None:
    """("v1" or "v2", {controller: the evaluator's own group directory}), if a probe group can be
    created there with a memory and a pids limit; None otherwise."""
    if sys.platform != "linux":
        return None
    own = {}  # controller -> path of our group, from lines "id:controllers:path"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path.lstrip("/")
    root = Path("/sys/fs/cgroup")
    if {"memory", "pids"} <= own.keys():
        layout = ("v1", {c: root / c / own[c] for c in ("memory", "pids", "cpu") if c in own})
    elif "" in own and (root / "cgroup.controllers").exists():
        layout = ("v2", {"": root / own[""]})
    else:
        return None
    try:
        cgroup_remove(cgroup_create(64, layout))
    except OSError:
        return None
    for parent in layout[1].values():  # groups left by an evaluator that was killed (empty: removable)
        for group in parent.glob("focusft-sandbox-*-*"):
            if not Path("/proc", group.name.split("-")[2]).exists():
                cgroup_remove([group])
    return layout


def cgroup_create(memory_mb: int, layout=None) -> list[Path] | None:
    """The call's groups (one per v1 controller, one in v2) with its limits: memory_mb for the
    tree (swap included where the kernel accounts it), TOOL_PROCESSES tasks, one CPU core."""
    layout = layout or cgroup_layout()
    if layout is None:
        return None
    name = f"focusft-sandbox-{os.getpid()}-{next(CALLS)}"
    limit = str(memory_mb * 2**20)
    if layout[0] == "v1":
        settings = {"memory": {"memory.limit_in_bytes": limit, "memory.memsw.limit_in_bytes": limit},
                    "pids": {"pids.max": str(TOOL_PROCESSES)},
                    "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}}
    else:
        settings = {"": {"memory.max": limit, "memory.swap.max": "0", "pids.max": str(TOOL_PROCESSES),
                         "cpu.max": "100000 100000"}}
    groups = []
    try:
        for controller, parent in layout[1].items():
            groups.append(parent / name)
            groups[-1].mkdir()
            for file, value in settings[controller].items():
                optional = file in ("memory.memsw.limit_in_bytes", "memory.swap.max") or file.startswith("cpu")
                if optional and not (groups[-1] / file).exists():
                    continue  # no swap accounting / no cpu controller: still bounded by the rest
                (groups[-1] / file).write_text(value)
    except OSError:
        cgroup_remove(groups)
        raise
    return groups


def cgroup_pids(groups: list[Path]) -> list[int]:
    """The processes still in the call's groups (the first group holds them all)."""
    try:
        return [int(p) for p in (groups[0] / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def cgroup_remove(groups: list[Path] | None):
    """Remove the call's groups; a group can be removed only once its last process has been reaped,
    which the kernel finishes shortly after SIGKILL, hence the retries."""
    for group in reversed(groups or []):
        for _ in range(200):
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
