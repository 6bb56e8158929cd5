"""The code sandbox and the code-execution reward, attacked: each hostile completion must be contained, score 0
and leave this process (the trainer's stand-in) and the machine healthy."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from rewards import sandbox
from rewards.base import Sample
from rewards.code import _read_report, _value, build_program, code_execution, extract_code, split_tests
from rewards.sandbox import (
    SANDBOX_UID,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    run_sandboxed,
    sandbox_python,
)
from tests.conftest import ROOT
from tests.helpers.processes import script

ADD_ROW = {
    "code_prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "test": ("METADATA = {}\n\n\ndef check(candidate):\n    assert True\n    assert candidate(1, 2) == 3\n"
             "    assert candidate(2, 2) == 4\n    assert candidate(0, 5) == 5\n    assert candidate(-1, 1) == 0\n"),
    "entry_point": "add",
}
FAST = {"timeout_s": 3.0, "test_timeout_s": 0.5, "workers": 2}


@pytest.fixture(scope="module")
def sandboxed():
    try:
        sandbox_python()
    except SandboxUnavailable as error:
        pytest.skip(f"no sandbox here: {error}")


def score(completion: str, row: dict = ADD_ROW, **args) -> tuple[float | None, dict]:
    scores = code_execution([Sample([], completion, row)], **{**FAST, **args})
    return scores.values[0], scores.info[0]


def hostile(body: str) -> str:
    """A completion that runs `body` when defined and whose `add` is right only if `body` set `escaped`."""
    return f"escaped = False\n{body}\n\ndef add(a, b):\n    return a + b if escaped else None\n"


def sandbox_uid_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as handle:
                uid_line = next(line for line in handle if line.startswith("Uid:"))
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, StopIteration, PermissionError):
            continue
        if int(uid_line.split()[1]) == SANDBOX_UID:
            pids.add(int(entry))
    return pids


def work_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("align-sandbox-")}


def visible_in_sandbox() -> Path:
    """A writable directory that the sandbox sees: outside /tmp (covered there by the sandbox's own tmpfs) and
    reachable by any uid. The checkout when it qualifies (a clone under /tmp or /root does not), else /var/tmp."""
    for place in (ROOT, Path("/var/tmp")):
        place = place.resolve()
        reachable = all(p.stat().st_mode & stat.S_IXOTH for p in (place, *place.parents))
        if not place.is_relative_to("/tmp") and reachable and os.access(place, os.W_OK):
            return place
    pytest.skip("no writable directory outside /tmp that every uid can reach (tried the checkout and /var/tmp)")


@pytest.fixture
def outside(tmp_path):
    """Root-owned directories outside /tmp (so visible inside the sandbox): a 0755 dir and a fake 0700 home
    with a 0600 secret. Removed afterwards."""
    base = visible_in_sandbox() / f".sandbox-test-{uuid.uuid4().hex[:8]}"
    home = base / "home"
    home.mkdir(parents=True)
    os.chmod(base, 0o755)
    os.chmod(home, 0o700)
    secret = home / "secret.txt"
    secret.write_text("hunter2")
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    yield base, secret, tmp_path
    shutil.rmtree(base)


# Scoring


def test_canonical_humaneval_solutions_score_one(sandboxed):
    rows = [json.loads(line) for line in (ROOT / "data" / "code-tiny" / "heldout.jsonl").read_text().splitlines()]
    samples = [Sample(row["prompt"], row["answer"], row) for row in rows[:6]]
    scores = code_execution(samples, workers=2)
    assert scores.values == [1.0] * 6, scores.info
    assert all(info["passed"] == info["total"] > 0 and info["error"] is None for info in scores.info)


def test_partial_and_fenced_and_broken_completions(sandboxed):
    partial = "Here you go:\n```python\ndef add(a, b):\n    return abs(a) + b\n```\nprint(add(1, 2))"
    continuation = "    return a + b\n"  # HumanEval style: continues the prompt
    wrong_type_hints = "```python\nfrom typing import List\ndef add(a: List, b):\n    return a + b\n```"
    samples = [Sample([], text, ADD_ROW) for text in
               (partial, continuation, wrong_type_hints, "def add(a, b) return a + b", "x = 1\n", partial)]
    samples[4].row = {**ADD_ROW, "code_prompt": ""}  # with the prompt, its stub `add` (returning None) would run
    scores = code_execution(samples, **FAST)
    assert scores.values == [0.75, 1.0, 1.0, 0.0, 0.0, 0.75]
    info = scores.info
    assert (info[0]["passed"], info[0]["total"], info[0]["error"]) == (3, 4, "assertion")
    assert info[3]["error"] == "syntax" and info[4]["error"] == "missing_entry_point"


def test_test_splitting_and_code_extraction():
    setup, steps = split_tests(ADD_ROW["test"])
    assert "METADATA" in setup and "check" not in setup
    assert [is_test for _, is_test in steps] == [False, True, True, True, True]  # `assert True` is no test
    assert extract_code("a\n```py\nx = 1\n```\n```python\ndef add(a, b): ...\n```", "add") == "def add(a, b): ...\n"
    assert extract_code("```python\ndef add(a, b):\n    return 1", "add") == "def add(a, b):\n    return 1"
    assert extract_code("```bash\nls\n```\nthen\n```\ndef add(a, b): ...\n```\nok", "add") == "def add(a, b): ...\n"
    program = build_program("def add(a, b):\n    return a + b", {**ADD_ROW, "prompt": [], "code_prompt": None})
    assert program == "def add(a, b):\n    return a + b"  # no code prompt: the completion alone
    row = {"prompt": ADD_ROW["code_prompt"], "test": ADD_ROW["test"], "entry_point": "add"}
    assert build_program("    return a + b\n", row).startswith("def add(a: int, b: int)")
    # Without the nonce nothing counts; with no report at all the sandbox failed: no score, not a zero.
    forged = SandboxResult(0, "N started\nX pass 0\nN pass 1\nN pass 1\nN pass 9\nN done\n", "", False, False, 0.1)
    assert _read_report(forged, "N", total=4) == {"passed": 1, "total": 4, "timed_out": False, "error": None}
    broken = _read_report(SandboxResult(1, "", "mount: permission denied", False, False, 0.1), "N", total=4)
    assert broken["error"] == "sandbox" and _value(broken) is None


def test_forged_reports_and_always_equal_results_score_zero(sandboxed):
    forge = ("import os, sys\nfor i in range(4):\n    print('pass', i)\n    sys.__stdout__.write(f'x pass {i}\\n')\n"
             "    os.write(3, f'pass {i}\\n'.encode())\nos._exit(0)\n")
    always_equal = ("class Anything:\n    def __eq__(self, other):\n        return True\n\n"
                    "def add(a, b):\n    return Anything()\n")
    patched_builtins = "import builtins\nbuiltins.abs = lambda x: 0\n\ndef add(a, b):\n    return 7\n"
    row = {**ADD_ROW, "test": ADD_ROW["test"] + "    assert abs(candidate(3, 4) - 1) < 1\n"}
    samples = [Sample([], forge, row), Sample([], always_equal, row), Sample([], patched_builtins, row)]
    scores = code_execution(samples, **FAST)
    assert scores.values == [0.0, 0.0, 0.0], scores.info
    assert scores.info[1]["error"] == "NonBuiltinResult"


# Containment


def test_infinite_loops_are_killed(sandboxed):
    before_pids, start = sandbox_uid_pids(), time.monotonic()
    value, info = score("def add(a, b):\n    while True:\n        pass\n")  # each test hits its alarm
    assert value == 0.0 and info["timed_out"] and info["error"] == "timeout"
    # Ignoring the alarm leaves the wall clock: the parent kills the namespace.
    value, info = score("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
                        timeout_s=1.5)
    assert value == 0.0 and info["timed_out"]
    assert time.monotonic() - start < 8
    assert not sandbox_uid_pids() - before_pids


def test_fork_bomb_is_bounded_and_cleaned_up(sandboxed):
    before_pids, start = sandbox_uid_pids(), time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    value, info = score(bomb + "\ndef add(a, b):\n    return a + b\n", timeout_s=2.0)
    assert value == 0.0 and info["timed_out"], info
    assert time.monotonic() - start < 6
    probe = time.monotonic()
    subprocess.run(["true"], check=True)  # the machine still starts processes, promptly
    assert time.monotonic() - probe < 2
    assert not sandbox_uid_pids() - before_pids  # no process of the sandbox uid outlives the run


def test_memory_file_size_disk_process_cpu_and_core_limits(sandboxed):
    value, info = score("def add(a, b):\n    block = bytearray(10 * 2**30)\n    return a + b\n")
    assert value == 0.0 and info["error"] == "memory"
    probe = """import resource
print(resource.getrlimit(resource.RLIMIT_CORE), resource.getrlimit(resource.RLIMIT_NPROC)[0])
for name, size, count in (("big", 4 << 20, 1), ("many", 1 << 20, 12)):
    try:
        for i in range(count):
            with open(f"{name}{i}", "wb") as handle:
                handle.write(bytes(size))
        print(name, "written")
    except OSError as error:
        print(name, "refused", error.errno)
forks = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        forks += 1
except OSError as error:
    print("forks", forks, error.errno)
"""
    limits = SandboxLimits(file_size_mb=2, disk_mb=8, max_processes=7)
    result = run_sandboxed("import os, time\n" + probe, limits=limits)
    # EFBIG, ENOSPC, and EAGAIN once the sandbox uid has 7 processes
    assert result.stdout.splitlines() == ["(0, 0) 7", "big refused 27", "many refused 28", "forks 6 11"], result
    result = run_sandboxed("while True:\n    pass", limits=SandboxLimits(timeout_s=5, cpu_s=1))
    assert result.returncode == 128 + signal.SIGXCPU and result.duration_s < 3  # RLIMIT_CPU, not the wall clock


def test_cannot_write_outside_or_read_root_only_files(sandboxed, outside):
    base, secret, test_tmp = outside
    targets = [base / "pwned", test_tmp / "pwned", ROOT / "pwned", ROOT / ".venv" / "pwned.pth"]
    body = "\n".join([f"for path in {[str(t) for t in targets]!r} + [{sys.executable!r}]:",
                      "    try:", "        open(path, 'a').write('x')", "        escaped = True",
                      "    except OSError:", "        pass"])
    assert score(hostile(body))[0] == 0.0
    assert not any(target.exists() for target in targets)
    body = f"try:\n    escaped = open({str(secret)!r}).read() == 'hunter2'\nexcept OSError:\n    pass"
    assert score(hostile(body))[0] == 0.0
    result = run_sandboxed(f"import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.listdir('/tmp'))\n"
                           f"print(os.path.exists({str(test_tmp)!r}), os.path.exists({str(base)!r}))")
    assert result.stdout.splitlines() == [f"{SANDBOX_UID} 65534 [] ['main.py']", "False True"], result


def test_no_network(sandboxed):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        body = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "    escaped = True\nexcept OSError:\n    pass")
        assert score(hostile(body))[0] == 0.0
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected


def test_cannot_signal_the_trainer(sandboxed):
    # A stand-in trainer running as the sandbox uid: only the PID namespace protects it.
    trainer = subprocess.Popen(["sleep", "60"], user=SANDBOX_UID, group=65534, extra_groups=[])
    try:
        body = "\n".join([
            "import os, signal",
            "if os.getuid() == 0:",  # never run the rest outside a sandbox
            "    raise SystemExit('not sandboxed')",
            f"for pid in ({trainer.pid}, {os.getpid()}, os.getppid(), 1, -1):",
            "    try:", "        os.kill(pid, signal.SIGKILL)", "    except OSError:", "        pass",
            "os.killpg(os.getpgid(0), signal.SIGKILL)",
        ])
        value, info = score(hostile(body))
        assert value == 0.0
        assert trainer.poll() is None  # still running
    finally:
        trainer.kill()
        trainer.wait()


def test_sandbox_dies_with_its_parent(sandboxed):
    before_pids, before_dirs = sandbox_uid_pids(), work_dirs()
    parent = subprocess.Popen([sys.executable, "-c", "from rewards.sandbox import SandboxLimits, run_sandboxed\n"
                               "run_sandboxed('import time\\ntime.sleep(60)', limits=SandboxLimits(timeout_s=60))"],
                              cwd=ROOT)
    try:
        # a bound on the start, not a timing assertion: with the other test worker's Ray runs on both cores the
        # start took over 30 s twice on 2026-12-01
        deadline = time.monotonic() + 120
        while not sandbox_uid_pids() - before_pids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_uid_pids() - before_pids, "the sandboxed program never started"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while sandbox_uid_pids() - before_pids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sandbox_uid_pids() - before_pids
    finally:  # a failure must not leave a sandbox-uid process behind: it would count against later tests' limits
        parent.kill()
        for pid in sandbox_uid_pids() - before_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in work_dirs() - before_dirs:  # a killed parent cannot remove its work dir
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name))


def test_huge_output_is_capped_without_memory_growth(sandboxed):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flood = "import sys\nchunk = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n"
    value, info = score(flood + "\ndef add(a, b):\n    return a + b\n")
    assert value == 0.0 and info["error"] == "output_limit"
    result = run_sandboxed(flood, limits=SandboxLimits(max_output_bytes=1 << 16))
    assert result.output_exceeded and len(result.stdout) == 1 << 16 and result.returncode is None
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


def test_temporary_directories_are_removed(sandboxed):
    existing = work_dirs()
    score("def add(a, b):\n    open('junk', 'w').write('x')\n    return a + b\n")
    run_sandboxed("while True: pass", limits=SandboxLimits(timeout_s=0.5))
    assert work_dirs() <= existing


# Fail closed


def test_fails_closed_without_root_unless_weaker_mode_is_chosen(monkeypatch):
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    sandbox_python.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="isolation='rlimits'"):
            run_sandboxed("print(1)")
        with pytest.raises(SandboxUnavailable):
            code_execution([Sample([], "def add(a, b):\n    return a + b\n", ADD_ROW)])
        weak = run_sandboxed("import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)",
                             isolation="rlimits", limits=SandboxLimits(memory_mb=512))
        assert weak.stdout.strip() == "512"
    finally:
        sandbox_python.cache_clear()


@pytest.mark.slow
def test_bench_sandbox_scores_canonical_solutions(tmp_path):
    out = tmp_path / "bench_sandbox.json"
    script("bench_sandbox.py", "--samples", "4", "--workers", "1", "--starts", "4", "--repeats", "1",
           "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["what"] for r in rows][-1] == "code_execution, 1 worker" and all(r["executions_per_s"] > 0 for r in rows)
