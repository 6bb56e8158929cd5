"""Code-execution reward for HumanEval-style rows: the fraction of a problem's unit tests the completion passes.

Rows carry `code_prompt` (the function signature and docstring; `prompt` is used instead when it is a string),
`test` (a `check(candidate)` function of asserts) and `entry_point` (the function's name). The code is the
first fenced Python block of the completion that defines `entry_point` (else its first fenced block, else the
raw text). Code that does not define `entry_point` continues the prompt, HumanEval-style, so the prompt goes
first; code that does define it is also run after the prompt, so that the prompt's imports and helper
functions exist (the candidate's definition replaces the prompt's stub).

Each top-level statement of `check`'s body that contains an assert is one test (`assert True` and other
constant asserts are not tests); the other statements (imports, helper variables) run in order as setup.
The candidate and its tests run in one sandboxed process per sample (rewards/sandbox.py), each test under its
own alarm, so one slow test does not cost the others. The value is passed / total; a completion that does not
compile, fails while being defined, or lacks `entry_point` scores 0; a sample whose sandbox never started the
harness scores None (kept out of the loss). `info` per sample: passed, total, timed_out, error (None, or the
first failure: syntax, definition, missing_entry_point, timeout, memory, output_limit, crashed, sandbox,
no_tests, assertion or the exception's name).

Trust model. The candidate's code is hostile and runs in the same interpreter as the test harness, so it
could try to forge the count. What stops the easy forgeries:
- The harness reports each result on a channel the candidate does not write to by accident: it moves the
  program's stdout to stderr before the candidate runs and keeps the original pipe for itself, and every
  report line carries a random nonce. The nonce comes in a file the harness deletes before any candidate
  code runs. Printing "passed", exiting early (os._exit(0), sys.exit) or killing the harness gives no passes.
- The parent counts: `total` comes from its own parse of the tests, only nonce-tagged `pass <i>` lines with
  0 <= i < total count, each index once.
- Tests run with a copy of the builtins taken before the candidate ran (patching `builtins.abs` or `len`
  does not reach them), and the harness binds the functions it uses before the candidate runs.
- `candidate(...)` must return plain built-in data (None, bool, int, float, complex, str, bytes and lists,
  tuples, sets, dicts of those, exact types): an object whose `__eq__` always returns True, the classic
  reward hack, fails the test instead of passing it.
Residual risk, stated plainly: inside one interpreter nothing is private. A candidate that walks the
interpreter's memory (frames, `gc.get_objects()`, ctypes) can find the nonce and the report descriptor and
forge any count; it can also patch attributes of shared modules a test relies on (e.g. `math.fabs`), or
special-case the exact test inputs. The sandbox bounds the damage to this sample's score, never the machine;
an RL run that starts getting full marks with odd code deserves a look at the completions.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards.base import Sample, Scores
from rewards.sandbox import SandboxLimits, SandboxResult, run_sandboxed, sandbox_python

_PYTHON_FENCES = ("python", "py", "python3", "")
# Errors that mean the candidate never got to a test: the value is 0, whatever else was reported.
_FATAL = ("syntax", "definition", "missing_entry_point")
_NO_TESTS = {"passed": 0, "total": 0, "timed_out": False, "error": "no_tests"}


def code_execution(
    samples: list[Sample],
    timeout_s: float = 10.0,
    test_timeout_s: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    isolation: str = "namespaces",
    python: str | None = None,
) -> Scores:
    """Fraction of the row's unit tests each completion passes (see the module docstring).

    timeout_s: wall clock for one sample's sandbox (definition and all its tests); test_timeout_s: per test.
    memory_mb: address-space limit of the sandboxed process. workers: samples run in parallel (threads that
    each wait on one sandbox; default min(8, CPU count)). isolation, python: see rewards/sandbox.py; the
    default fails closed where the sandbox is unavailable."""
    sandbox_python(isolation, python)  # fail closed once, up front, rather than once per sample
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    jobs = [_job(sample, test_timeout_s) for sample in samples]
    keys = [None if job is None else json.dumps(job, sort_keys=True) for job in jobs]
    unique = {key: job for key, job in zip(keys, jobs) if key is not None}  # a group often repeats a completion
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        outcomes = dict(zip(unique, pool.map(lambda job: _run(job, limits, isolation, python), unique.values())))
    info = [dict(outcomes[key] if key is not None else _NO_TESTS) for key in keys]
    return Scores([_value(outcome) for outcome in info], info)


def extract_code(completion: str, entry_point: str) -> str:
    """The completion's code: its first fenced Python (or untagged) block that defines `entry_point`, else its
    first such block, else the whole text. A fence left open (a completion cut at max tokens) runs to the end."""
    blocks = [code for language, code in _fenced_blocks(completion) if language in _PYTHON_FENCES]
    defining = [block for block in blocks if _defines(block, entry_point)]
    return (defining or blocks or [completion])[0]


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each ``` block, fences paired in order."""
    blocks, language, lines = [], None, []
    for line in text.split("\n"):
        fence = line.strip().startswith("```")
        if fence and language is None:
            language, lines = line.strip()[3:].strip().lower(), []
        elif fence:
            blocks.append((language, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(line)
    if language is not None:
        blocks.append((language, "\n".join(lines)))
    return blocks


def build_program(completion: str, row: dict[str, Any]) -> str:
    """The source to run: the code prompt followed by the completion's code (see the module docstring)."""
    entry_point = row["entry_point"]
    prompt = row.get("code_prompt") or (row["prompt"] if isinstance(row.get("prompt"), str) else "")
    code = extract_code(completion, entry_point)
    if not _defines(code, entry_point):
        return prompt + code
    return prompt + "\n\n" + code if prompt and _parses(prompt) else code


@functools.lru_cache(maxsize=1024)
def split_tests(test_source: str) -> tuple[str, tuple[tuple[str, bool], ...]]:
    """(setup, steps): the test module without `check`, and `check`'s body as (statement, is_test) pairs.
    Raises ValueError when there is no `check` function."""
    module = ast.parse(test_source)
    checks = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if not checks:
        raise ValueError("the test code defines no check(candidate) function")
    setup = ast.unparse(ast.Module([node for node in module.body if node is not checks[0]], type_ignores=[]))
    steps = tuple((ast.unparse(statement), _is_test(statement)) for statement in checks[0].body)
    return setup, steps


def _is_test(statement: ast.stmt) -> bool:
    asserts = [node for node in ast.walk(statement) if isinstance(node, ast.Assert)]
    return any(not isinstance(node.test, ast.Constant) for node in asserts)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def _job(sample: Sample, test_timeout_s: float) -> dict[str, Any] | None:
    """What the harness needs for one sample; None when the row has no usable tests."""
    try:
        setup, steps = split_tests(sample.row["test"])
    except (SyntaxError, ValueError):
        return None
    if not any(is_test for _, is_test in steps):
        return None
    return {"program": build_program(sample.completion, sample.row), "entry_point": sample.row["entry_point"],
            "setup": setup, "steps": steps, "test_timeout_s": test_timeout_s}


def _run(job: dict[str, Any], limits: SandboxLimits, isolation: str, python: str | None) -> dict[str, Any]:
    nonce = secrets.token_hex(16)
    files = {"job.json": json.dumps({**job, "nonce": nonce})}
    result = run_sandboxed(_HARNESS, files=files, limits=limits, isolation=isolation, python=python)
    return _read_report(result, nonce, total=sum(is_test for _, is_test in job["steps"]))


def _read_report(result: SandboxResult, nonce: str, total: int) -> dict[str, Any]:
    """Count the nonce-tagged `pass <i>` lines; the first failure or error names `error`."""
    started = finished = False
    passed: set[int] = set()
    error = None
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != nonce:
            continue
        kind, rest = fields[1], fields[2:]
        started = True
        finished = finished or kind in ("done", "error")
        if kind == "pass" and rest and rest[0].isdecimal() and int(rest[0]) < total:
            passed.add(int(rest[0]))
        elif kind in ("fail", "error") and error is None:
            error = rest[-1] if rest else kind
    if not started:  # the harness reports before any candidate code runs: the sandbox itself failed
        error = "sandbox"
    elif not finished:
        error = "timeout" if result.timed_out else "output_limit" if result.output_exceeded else "crashed"
    timed_out = result.timed_out or error == "timeout"
    outcome = {"passed": len(passed), "total": total, "timed_out": timed_out, "error": error}
    if not started:
        outcome["stderr"] = result.stderr[-500:]
    return outcome


def _value(outcome: dict[str, Any]) -> float | None:
    if outcome["error"] in ("sandbox", "no_tests"):
        return None
    if outcome["error"] in _FATAL:
        return 0.0
    return outcome["passed"] / outcome["total"]


def _sandbox_harness() -> None:
    """Runs inside the sandbox only, never in the trainer (its source is the sandboxed program).

    Reads job.json (program, entry_point, setup, steps, test_timeout_s, nonce) and deletes it, then reports
    `<nonce> started`, `<nonce> error <kind>`, `<nonce> pass <i>` / `<nonce> fail <i> <kind>` per test and
    `<nonce> done` on the original stdout. Kept compatible with older Pythons: the sandbox may run the
    system interpreter."""
    import builtins
    import json
    import os
    import signal

    # Everything the harness calls after the candidate ran is bound here, before it can patch anything.
    write, setitimer, itimer_real = os.write, signal.setitimer, signal.ITIMER_REAL
    exec_, compile_, type_, id_, callable_, isidentifier = exec, compile, type, id, callable, str.isidentifier
    dict_, set_, str_ = dict, set, str
    base_exception, assertion_error, memory_error = BaseException, AssertionError, MemoryError
    plain_scalars = {type(None), bool, int, float, complex, str, bytes}
    plain_containers = {list, tuple, set, frozenset}

    with open("job.json", encoding="utf-8") as handle:
        job = json.load(handle)
    os.unlink("job.json")
    report_fd = os.dup(1)
    os.dup2(2, 1)  # the candidate's prints go to stderr; the original stdout is the report channel
    tag = job.pop("nonce")
    test_timeout_s = job["test_timeout_s"]
    clean_builtins = dict(builtins.__dict__)

    def report(*fields):
        write(report_fd, ("\n" + " ".join((tag,) + fields) + "\n").encode())

    class TestTimeout(BaseException):
        pass

    class NonBuiltinResult(Exception):
        pass

    def on_alarm(signum, frame):
        raise TestTimeout()

    def run(code, namespace):
        """None when `code` ran to the end, else the kind of failure."""
        setitimer(itimer_real, test_timeout_s)
        try:
            exec_(code, namespace)
        except TestTimeout:
            return "timeout"
        except assertion_error:
            return "assertion"
        except memory_error:
            return "memory"
        except base_exception as error:
            name = type_(error).__name__
            return name if type_(name) is str_ and isidentifier(name) else "Exception"
        finally:
            setitimer(itimer_real, 0)
        return None

    def is_plain(value):
        pending, seen = [value], set_()
        while pending:
            item = pending.pop()
            kind = type_(item)
            if kind in plain_scalars:
                continue
            if kind not in plain_containers and kind is not dict:
                return False
            if id_(item) in seen:
                continue
            seen.add(id_(item))
            pending.extend(item if kind is not dict else [*item.keys(), *item.values()])
        return True

    signal.signal(signal.SIGALRM, on_alarm)
    report("started")
    try:
        program = compile_(job["program"], "candidate.py", "exec")
    except (SyntaxError, ValueError):
        report("error", "syntax")
        return
    namespace = {"__name__": "candidate", "__builtins__": builtins}
    failure = run(program, namespace)
    if failure is not None:
        report("error", "timeout" if failure == "timeout" else "definition")
        return
    function = namespace.get(job["entry_point"])
    if not callable_(function):
        report("error", "missing_entry_point")
        return

    def candidate(*args, **kwargs):
        result = function(*args, **kwargs)
        if not is_plain(result):
            raise NonBuiltinResult()
        return result

    tests = dict_(namespace, __builtins__=clean_builtins, candidate=candidate)
    run(compile_(job["setup"], "test_setup.py", "exec"), tests)
    index = 0
    for source, is_test in job["steps"]:
        failure = run(compile_(source, "test.py", "exec"), tests)
        if is_test and failure is None:
            report("pass", str_(index))
        elif is_test:
            report("fail", str_(index), failure)
        index += is_test
    report("done")


_HARNESS = inspect.getsource(_sandbox_harness) + "\n\n_sandbox_harness()\n"
