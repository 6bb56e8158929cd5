"""Run untrusted (model-generated) Python in a sandboxed subprocess.

    result = run_sandboxed("print(sum(range(10)))", limits=SandboxLimits(timeout_s=5))
    result.stdout == "45\\n"

The program runs as `python -I -B main.py` in a fresh directory that also holds `files`. Everything below is
enforced by the kernel, never by trusting the child:

- Namespaces (`unshare --net --pid --ipc --uts --mount-proc --fork --kill-child`): a new network namespace
  with no interface up (no route even to 127.0.0.1, so no host service is reachable), its own PID namespace
  (the trainer's processes are invisible, so they cannot be signalled; when the namespace's init dies, the
  kernel kills every process in it) and its own mount namespace, where a root-owned shell makes `/`
  read-only, puts a size-capped tmpfs on `/tmp` (the working directory, HOME and TMPDIR; `files` are copied
  into it) and on `/dev/shm`. The host's `/tmp` (for instance Ray's world-writable socket directories) is
  therefore invisible, and the child writes nothing to the host's disk.
- Dropped privileges (`setpriv`): uid/gid 65534 (nobody/nogroup), no supplementary groups, no capabilities
  (empty bounding set), no-new-privs. Root-only files (a user's home, keys) cannot be opened.
- Resource limits (`prlimit`, applied after the uid drop): RLIMIT_CPU, RLIMIT_AS (address space, per
  process), RLIMIT_FSIZE, RLIMIT_NPROC (per uid: counts every sandbox running as 65534 at that moment),
  RLIMIT_NOFILE, RLIMIT_CORE 0 (no core dumps).
- Wall clock and output, from the parent: stdout and stderr are read incrementally; when a stream passes
  `max_output_bytes` or the run passes `timeout_s`, the parent SIGKILLs the namespace's init, which the
  kernel lets die only together with every process of its namespace, then the process group. The call
  returns only after all of it is gone. If the parent dies first, `unshare` gets SIGKILL (a parent-death
  signal) and its `--kill-child` ends the namespace the same way; only the (root-only) host copy of the
  input files is left behind in $TMPDIR, as `align-sandbox-*`.
- stdin is /dev/null; the environment is rebuilt from scratch (PATH, HOME, TMPDIR, LANG only).

This needs Linux, root (to create the namespaces and drop to another uid) and util-linux. Without them
`run_sandboxed` fails closed with `SandboxUnavailable`, unless the caller passes `isolation="rlimits"`:
resource limits, a temporary directory, a scrubbed environment and a wall-clock kill of the process group
only. That mode is NOT a security boundary: the code runs as the caller's user, can read the caller's files,
reach the network and signal the caller's processes, and a process that leaves its session survives.

The interpreter is `python` if given, else the first of `sys.executable` and the system `python3` that the
sandbox user can run (checked once per process with a tiny program). A virtual environment under a home
directory the sandbox user cannot enter falls back to the system Python, which is fine for stdlib-only code.

Not covered: total memory and CPU across the sandbox's processes (RLIMIT_AS and RLIMIT_CPU are per process,
so the worst case is max_processes x the limit; a cgroup would bound the sum), world-readable files on the
host (readable, though with no network the only way out is the program's own output), and kernel exploits.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SANDBOX_UID = 65534  # nobody
SANDBOX_GID = 65534  # nogroup
ISOLATIONS = ("namespaces", "rlimits")
_TOOLS = ("unshare", "setpriv", "prlimit", "mount", "cp")
_PATH = "/usr/local/bin:/usr/bin:/bin"
_MiB = 1 << 20

# Runs as root inside the new namespaces; positional arguments: host work dir, tmpfs size in MiB, uid, gid,
# then the command. `cd` first: after /tmp is covered, the work dir stays reachable through the cwd.
# The command is not exec'd, so this shell stays the namespace's init: it keeps unshare's parent-death
# signal (a uid change would clear it) and the kernel kills the whole namespace when it dies.
_MOUNT_SCRIPT = """set -e
cd "$1"
mount -o remount,bind,ro /
mount -t tmpfs -o "size=$2m,mode=0700,uid=$3,gid=$4,nosuid,nodev" sandbox /tmp
cp -R . /tmp/
if [ -d /dev/shm ]; then mount -t tmpfs -o "size=1m,mode=1777,nosuid,nodev,noexec" sandbox /dev/shm; fi
cd /tmp
shift 4
"$@"
exit $?
"""

# isolation="rlimits": a tiny Python trampoline sets what limits the OS supports, then execs the program.
_RLIMIT_TRAMPOLINE = """import os, resource, sys
for name, value in zip(("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_CORE"),
                       sys.argv[1:7]):
    soft, hard = (int(v) for v in value.split(":"))
    try:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    except (AttributeError, ValueError, OSError):
        pass
os.execv(sys.argv[7], sys.argv[7:])
"""


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this machine (fail closed)."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock for the whole run; then the process tree is killed
    cpu_s: int | None = None  # RLIMIT_CPU per process (SIGXCPU, SIGKILL 1 s later); None: ceil(timeout_s)
    memory_mb: int = 1024  # RLIMIT_AS per process
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    disk_mb: int = 64  # size of the private tmpfs working directory (namespaces only)
    max_processes: int = 16  # RLIMIT_NPROC of the sandbox uid (processes and threads)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = _MiB  # per stream (stdout, stderr); more kills the run


@dataclass
class SandboxResult:
    returncode: int | None  # 128 + N when killed by signal N; None when the parent killed it
    stdout: str  # at most max_output_bytes, decoded as UTF-8 with replacement
    stderr: str
    timed_out: bool  # the wall-clock limit expired
    output_exceeded: bool  # a stream passed max_output_bytes
    duration_s: float


def run_sandboxed(
    code: str,
    *,
    files: Mapping[str, str | bytes] | None = None,
    limits: SandboxLimits | None = None,
    isolation: str = "namespaces",
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as `python -I -B main.py` in a fresh sandbox whose working directory also holds `files`
    (relative path -> content). Raises SandboxUnavailable when `isolation` cannot be provided here."""
    interpreter = sandbox_python(isolation, python)
    return _launch(code, files or {}, limits or SandboxLimits(), isolation, interpreter)


@functools.cache
def sandbox_python(isolation: str = "namespaces", python: str | None = None) -> str:
    """The interpreter the sandbox runs (see the module docstring), checked once by running a tiny program
    in the sandbox. Raises SandboxUnavailable with the reason when nothing works."""
    _require(isolation)
    candidates = [python] if python else [sys.executable, shutil.which("python3", path=_PATH)]
    failures = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        probe = _launch("print(6 * 7)", {}, SandboxLimits(timeout_s=30), isolation, candidate)
        if probe.returncode == 0 and probe.stdout.strip() == "42":
            return candidate
        failures.append(f"{candidate}: exit {probe.returncode}, {probe.stderr.strip()[-300:]!r}")
    raise SandboxUnavailable(f"no Python runs in the {isolation!r} sandbox: " + "; ".join(failures))


def _require(isolation: str) -> None:
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "rlimits":
        return
    missing = [tool for tool in _TOOLS if shutil.which(tool, path=_PATH) is None]
    problem = ("it needs Linux" if not sys.platform.startswith("linux")
               else "it needs root (to create namespaces and drop to another uid)" if os.geteuid() != 0
               else f"util-linux/coreutils tools are missing: {', '.join(missing)}" if missing
               else None)
    if problem:
        raise SandboxUnavailable(
            f"cannot sandbox model-generated code: {problem}. Pass isolation='rlimits' to run it with resource "
            "limits only (no network, filesystem, user or PID isolation: not a security boundary).")


def _launch(code: str, files: Mapping[str, str | bytes], limits: SandboxLimits, isolation: str,
            python: str) -> SandboxResult:
    workdir = Path(tempfile.mkdtemp(prefix="align-sandbox-"))
    try:
        _write_files(workdir, {**files, "main.py": code})
        home = "/tmp" if isolation == "namespaces" else str(workdir)
        env = {"PATH": _PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        argv = _argv(limits, isolation, python, workdir)
        start = time.monotonic()
        with subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) as process:
            try:
                stdout, stderr, timed_out, exceeded = _collect(process, limits, deadline=start + limits.timeout_s)
            finally:
                _kill_group(process, isolation)
        returncode = None if timed_out or exceeded else process.returncode
        if returncode is not None and returncode < 0:
            returncode = 128 - returncode
        return SandboxResult(returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                             timed_out, exceeded, time.monotonic() - start)
    finally:
        _remove_tree(workdir)


def _argv(limits: SandboxLimits, isolation: str, python: str, workdir: Path) -> list[str]:
    cpu_s = limits.cpu_s or max(1, math.ceil(limits.timeout_s))
    rlimits = {"cpu": (cpu_s, cpu_s + 1), "as": (limits.memory_mb * _MiB,) * 2,
               "fsize": (limits.file_size_mb * _MiB,) * 2, "nproc": (limits.max_processes,) * 2,
               "nofile": (limits.max_open_files,) * 2, "core": (0, 0)}
    program = [python, "-I", "-B", "main.py"]
    if isolation == "rlimits":
        values = [f"{soft}:{hard}" for soft, hard in rlimits.values()]
        return [python, "-I", "-c", _RLIMIT_TRAMPOLINE, *values, *program]
    tool = functools.partial(shutil.which, path=_PATH)
    return [
        tool("setpriv"), "--pdeathsig=KILL", "--",  # unshare dies with the thread that started it
        tool("unshare"), "--net", "--pid", "--ipc", "--uts", "--mount-proc", "--fork", "--kill-child", "--",
        "/bin/sh", "-c", _MOUNT_SCRIPT, "sandbox-init", str(workdir), str(limits.disk_mb),
        str(SANDBOX_UID), str(SANDBOX_GID),
        tool("setpriv"), f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups", "--no-new-privs",
        "--inh-caps=-all", "--bounding-set=-all", "--",
        # after the uid drop, so that the per-uid process count is checked against the sandbox user only
        tool("prlimit"), *(f"--{name}={soft}:{hard}" for name, (soft, hard) in rlimits.items()), "--",
        *program,
    ]


def _collect(process: subprocess.Popen, limits: SandboxLimits, deadline: float) -> tuple[bytes, bytes, bool, bool]:
    """Read both pipes until EOF and the process exits (left unreaped for `_kill_group`), keeping at most
    max_output_bytes of each, so a child printing gigabytes costs the parent no memory.
    Returns (stdout, stderr, timed_out, output_exceeded)."""
    buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
    timed_out = exceeded = False
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map() and not (timed_out or exceeded):
            remaining = deadline - time.monotonic()
            timed_out = remaining <= 0
            for key, _ in [] if timed_out else selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                room = limits.max_output_bytes - len(buffer)
                buffer += chunk[:room]
                exceeded = exceeded or len(chunk) > room
    if not (timed_out or exceeded):
        timed_out = not _exited(process, deadline)
    return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), timed_out, exceeded


def _exited(process: subprocess.Popen, deadline: float) -> bool:
    """Wait until the process exits or the deadline passes, without reaping it: while it is an unreaped
    zombie its pid, and so its process group id, cannot be reused by an unrelated process."""
    if not hasattr(os, "waitid"):  # macOS (isolation="rlimits" only): reap, accepting that small pid-reuse race
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.002)
    return False


def _kill_group(process: subprocess.Popen, isolation: str) -> None:
    """End everything the run started, and return only once it is gone.

    Namespaces: SIGKILL the namespace's init (unshare's child, which cannot be reaped, so its pid cannot be
    reused, until unshare waits for it). The kernel lets the init finish dying only after every other process
    of its PID namespace is gone, even those that left the process group; unshare then reaps it and exits.
    Then, and in rlimits mode, SIGKILL the process group (unshare, or the program and what stayed in its group)."""
    for stream in (process.stdout, process.stderr):
        stream.close()  # a writer blocked on a full pipe (unshare reporting its child's death) gets EPIPE
    namespace_inits = _child_pids(process.pid) if isolation == "namespaces" else []
    for pid in namespace_inits:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if namespace_inits:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _child_pids(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # gone already, or a kernel without CONFIG_PROC_CHILDREN: the group kill alone remains
        return []


def _write_files(workdir: Path, files: Mapping[str, str | bytes]) -> None:
    for name, content in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"sandbox file names must be relative paths inside the work dir, got {name!r}")
        path = workdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode("utf-8") if isinstance(content, str) else content
        path.write_bytes(data)


def _remove_tree(path: Path) -> None:
    """rmtree that also removes what a same-uid child (isolation="rlimits") made unreadable."""
    def make_writable_and_retry(function, failed_path, _):
        os.chmod(os.path.dirname(failed_path), 0o700)
        if os.path.isdir(failed_path):
            os.chmod(failed_path, 0o700)
        function(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)
