"""Reward for Python solutions, checked by assert-style tests run in the sandbox (``rewards.sandbox``).

The solution is the last fenced ```python (or ```py) block after the thinking part; a response whose
``<think>`` is never closed has no answer part. One sandboxed program defines the solution, then runs
each test in its own try/except and reports it on a line tagged with a random nonce. The nonce, the
tests and the solution reach that program on stdin, so none of them is in a file, argument or
environment variable. A test counts only when its nonce-tagged "pass" line appears; a missing
nonce-tagged "done" line means the run was cut short (exit, crash, limit), and the tests not reported
count as failed. The result's breakdown gives ``tests_passed`` and ``tests_total``.

Defended (each has a test in tests/test_code_reward.py):

- printing fake "PASS" lines: they lack the nonce;
- ``sys.exit(0)`` anywhere: SystemExit is caught like any exception (at the top level it ends only the
  solution's own code, and the tests still run; in a test, it fails the test);
  ``os._exit(0)`` or a crash: the tests not yet reported count as failed and the done line is missing;
- redefining ``AssertionError``: ``assert`` raises the real one, and a test passes only when it raises
  nothing at all;
- patching ``builtins``, ``__builtins__``, ``os`` or ``sys``: the runner binds what it needs before the
  solution runs, and each test runs in a fresh namespace holding the solution's names plus a copy of
  the builtins taken before the solution ran (names that shadow a builtin are dropped, except
  ``entry_point``);
- values that compare equal to anything (``__eq__`` returning True): ``assert a == b`` in the tests is
  rewritten to a check that first compares each side with a fresh object, which nothing legitimate equals;
- tracers installed by the solution are removed before each test; a ``__main__`` block does not run;
  a solution that redirects or closes stdout still has its tests reported (on a copy of stdout).

Not defended, because the solution and the tests share one interpreter: code that digs the nonce or
the tests out of the runner's frames or memory (``sys._getframe(1).f_locals``, ``gc``) and forges lines
or hard-codes answers; a tracer the solution installs while a test runs; patches to modules the tests
import (``math.isclose = ...``); an ``__eq__`` that recognises the probe; objects that are merely truthy
in a bare ``assert f(x)``. Closing these needs the tests to check results in another process.
"""

import ast
import json
import re
import secrets
from typing import Literal

from rewards.sandbox import SandboxLimits, run_sandboxed
from rewards.types import RewardResult

_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str | None:
    """The last ```python block after the thinking part, or None when there is none."""
    _, sep, tail = response.rpartition("</think>")
    if not sep and "<think>" in response:  # thinking never finished: there is no answer part
        return None
    blocks = _FENCE.findall(tail if sep else response)
    return blocks[-1] if blocks else None


def score_code(response: str, tests: list[str] | str, *, entry_point: str | None = None,
               mode: Literal["fraction", "all"] = "fraction", limits: SandboxLimits | None = None) -> RewardResult:
    """Share of ``tests`` passed (``mode="fraction"``) or 1/0 for all of them (``mode="all"``).

    ``tests`` is a list of test snippets (MBPP style: ``"assert f(1) == 2"``), or one test script; a
    script that defines ``check(candidate)`` without calling it gets ``check(entry_point)`` appended
    (HumanEval style). Tests are trusted: one that does not parse raises ValueError.
    """
    if mode not in ("fraction", "all"):
        raise ValueError(f"mode must be 'fraction' or 'all', not {mode!r}")
    shown, prepared = _prepare_tests(tests, entry_point)
    total = len(prepared)
    code = extract_code(response)
    if code is None:
        return RewardResult(0.0, "no ```python block after the thinking part", {"tests_passed": 0, "tests_total": total})
    nonce = secrets.token_hex(16)
    payload = json.dumps({"tests": prepared, "solution": code, "entry_point": entry_point})
    result = run_sandboxed(_RUNNER, stdin=f"{nonce}\n{payload}", limits=limits or SandboxLimits())

    outcomes, setup_error, done = {}, None, False
    for key, status, detail in re.findall(re.escape(nonce) + r":(\w+):(\w*):([^\n]*)", result.stdout):
        if key == "done":
            done = True
        elif key == "setup":
            setup_error = detail
        elif key.isdigit() and int(key) < len(prepared):
            outcomes.setdefault(int(key), (status, detail))
    passed = sum(status == "pass" for status, _ in outcomes.values())
    reward = passed / total if mode == "fraction" else float(passed == total and done)
    breakdown = {"tests_passed": passed, "tests_total": total}
    if passed == total and done:
        return RewardResult(reward, f"{total}/{total} tests passed", breakdown)

    problems = [f"the solution raised {setup_error}"] if setup_error else []
    first_bad = next(i for i in range(total) if outcomes.get(i, ("missing",))[0] != "pass") if passed < total else None
    if first_bad is not None and first_bad in outcomes:
        problems.append(f"test {first_bad + 1} failed: {shown[first_bad]}: {outcomes[first_bad][1]}")
    if not done:
        why = result.killed_reason or f"exit code {result.exit_code}"
        where = f" before test {first_bad + 1} reported" if first_bad is not None and first_bad not in outcomes else ""
        problems.append(f"run cut short{where} ({why})")
    return RewardResult(reward, f"{passed}/{total} tests passed; " + "; ".join(problems), breakdown)


class _GuardEquality(ast.NodeTransformer):
    """``assert a == b`` becomes ``assert _gymrl_eq(a, b)`` (see ``eq`` in the runner)."""

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        test = node.test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
            node.test = ast.Call(ast.Name("_gymrl_eq", ast.Load()), [test.left, test.comparators[0]], [])
        return node


def _prepare_tests(tests: list[str] | str, entry_point: str | None) -> tuple[list[str], list[str]]:
    """(short descriptions for reasons, sources to run) of the tests."""
    if isinstance(tests, str):
        tree = ast.parse(tests)
        defines_check = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)
        calls_check = any(isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                          and getattr(n.value.func, "id", None) == "check" for n in tree.body)
        if entry_point and defines_check and not calls_check:
            tests += f"\n\ncheck({entry_point})\n"
        tests = [tests]
    if not tests:
        raise ValueError("score_code needs at least one test")
    shown, prepared = [], []
    for test in tests:
        try:
            tree = ast.fix_missing_locations(_GuardEquality().visit(ast.parse(test)))
        except SyntaxError as exc:
            raise ValueError(f"test does not parse: {test[:80]!r}: {exc}") from exc
        first = test.strip().splitlines()[0] if test.strip() else ""
        shown.append(repr(first[:80] + (" ..." if len(first) > 80 or "\n" in test.strip() else "")))
        prepared.append(ast.unparse(tree))
    return shown, prepared


# The program run in the sandbox. Its stdin is the nonce line, then the tests, the solution and the entry
# point as JSON, so none of them is in the program file. Everything the runner uses is bound to locals
# before the solution runs, so later patches to builtins, os or sys cannot reach it. Its lines:
# ``<nonce>:<test index>:pass|fail:<detail>``, ``<nonce>:setup:error:<detail>``, ``<nonce>:done::``.
_RUNNER = r'''
import builtins, json, os, sys

def _run():
    read, write, dup, exit_, settrace, setprofile = os.read, os.write, os.dup, os._exit, sys.settrace, sys.setprofile
    compile_, exec_, dict_, str_, type_ = compile, exec, dict, str, type
    ascii_, bool_, enumerate_ = ascii, bool, enumerate
    Exception_, BaseException_, AssertionError_ = Exception, BaseException, AssertionError
    chunks = []
    while chunk := read(0, 1 << 16):
        chunks.append(chunk)
    nonce, payload = b"".join(chunks).decode().split("\n", 1)
    payload = json.loads(payload)
    tests, solution, entry_point = payload["tests"], payload["solution"], payload["entry_point"]
    del chunks, payload
    out = dup(1)  # reports go here even if the solution redirects or closes stdout
    pristine = dict_(builtins.__dict__)

    def say(key, status="", detail=""):
        write(out, (nonce + ":" + key + ":" + status + ":" + detail[:300] + "\n").encode("utf-8", "replace"))

    def describe(exc):
        try:
            return ascii_(type_(exc).__name__ + ": " + str_(exc))[1:-1][:300]
        except BaseException_:
            return "an exception that cannot be shown"

    def short(value):
        try:
            return ascii_(value)[:100]
        except BaseException_:
            return "<unprintable>"

    probe = type_("Probe", (), {})()

    def eq(a, b):  # ``assert a == b``, refusing values that equal a fresh object
        for value in (a, b):
            try:
                fake = bool_(value == probe)
            except Exception_:
                fake = False
            if fake:
                raise AssertionError_(short(value) + " compares equal to anything")
        if not a == b:
            raise AssertionError_(short(a) + " != " + short(b))
        return True

    compiled = [compile_(test, "<test %d>" % (i + 1), "exec") for i, test in enumerate(tests)]
    names = {"__name__": "solution", "__builtins__": dict_(pristine)}
    try:
        exec_(compile_(solution, "<solution>", "exec"), names)
    except BaseException_ as exc:
        say("setup", "error", describe(exc))
    if entry_point and entry_point not in names:
        say("setup", "error", "NameError: entry point " + entry_point + " is not defined")
    for i, test in enumerate_(compiled):
        settrace(None)
        setprofile(None)
        scope = {k: v for k, v in names.items() if k not in pristine or k == entry_point}
        scope.update(__name__="test", __builtins__=dict_(pristine), _gymrl_eq=eq)
        try:
            exec_(test, scope)
        except BaseException_ as exc:
            say(str_(i), "fail", describe(exc))
        else:
            say(str_(i), "pass")
    say("done")
    exit_(0)

_run()
'''
