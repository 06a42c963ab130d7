"""Reward for Python solutions, checked by assert-style tests run in the sandbox (``rewards.sandbox``).

The solution is the last fenced ```python (or ```py) block after the thinking part; a response whose
``<think>`` is never closed has no answer part. The sandboxed program runs in two processes. The solution
runs in a child forked before anything secret is read, with no stdin, its stdout sent to stderr, and only a
request and a reply pipe to the parent. The parent, which never runs model code, reads the tests and a
random nonce on stdin, makes itself non-dumpable (the child cannot open its ``/proc`` memory or file
descriptors, nor ptrace it) and runs each test in its own try/except. A call a test makes to a name the
solution defined goes to the child as ``repr()`` text of plain values and comes back as the ``repr()`` of
the result; both sides read it with ``ast.literal_eval``, so only plain values cross (numbers, strings,
bytes, None, booleans, and lists, tuples, sets, dicts of them; generators, ranges and dict views come back
as lists, frozensets as sets). The parent reports each test on a line tagged with the nonce; a test counts
only when its nonce-tagged "pass" line appears; a missing nonce-tagged "done" line means the run was cut
short (a limit, the parent killed), and the tests not reported count as failed. The result's breakdown
gives ``tests_passed`` and ``tests_total``.

So the verdict is the parent's alone, and the solution can only answer calls. Defended (each has a test in
tests/test_code_reward.py or tests/test_hostile_inputs.py):

- printing fake "PASS" lines, or writing to any descriptor: the child has no descriptor of the report and
  does not know the nonce;
- digging the nonce, the tests or the reporting function out of frames or memory (``sys._getframe``,
  ``gc``, ``/proc/<parent>/mem``): they live only in the parent;
- ``sys.exit(0)`` or ``os._exit(0)`` anywhere, a crash, a limit hit by the solution: its process ends, the
  tests that still call it fail, and the parent reports every test and "done";
- redefining ``AssertionError``, patching ``builtins``, ``os``, ``sys``, modules the tests import, or
  installing tracers: all of that happens in the child; the tests' ``assert`` runs in the parent;
- values that compare equal to anything (``__eq__`` returning True) or are merely truthy: a result crosses
  as its ``repr()`` read as a plain value, so it is that value (an ``int`` subclass is its int) or the call
  raises TypeError; ``assert a == b`` is rewritten to name both sides when they differ;
- a ``__main__`` block does not run; input() reads an empty stdin.

Limits of the design: tests may pass the solution plain values only and get plain values back (a test that
passes a lambda, checks an object's methods or expects a list to be changed in place fails); the solution
can still read the runner's own source (nothing secret) and use the CPU, memory and time the sandbox
allows. Not defended: kernel exploits and the other gaps listed in ``rewards.sandbox``.
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
    """``assert a == b`` becomes ``assert _gymrl_eq(a, b)``, which names both sides when they differ."""

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


# The program run in the sandbox, in two processes. Its stdin is the nonce line, then the tests, the solution and
# the entry point as JSON, so none of them is in the program file. Before reading it the program forks the
# solution's process (the child), which closes stdin, sends its stdout to stderr and keeps only two pipes to the
# parent; the parent then makes itself non-dumpable, so the child cannot read its memory or descriptors through
# /proc or ptrace. The parent alone knows the nonce and the tests and writes the report; it never runs model
# code: the child executes the solution, and each call a test makes to a name the solution defined is sent to
# the child as repr() text and answered with the repr() of the result, both read back with ast.literal_eval.
# Its lines: ``<nonce>:<test index>:pass|fail:<detail>``, ``<nonce>:setup:error:<detail>``, ``<nonce>:done::``.
_RUNNER = r"""
import ast, builtins, ctypes, json, os, signal, sys, types

MAX_REPLY = 1 << 20  # bytes of one reply from the solution's process


def describe(exc):
    try:
        return ascii(type(exc).__name__ + ": " + str(exc))[1:-1][:300]
    except BaseException:
        return "an exception that cannot be shown"


def short(value):
    try:
        return ascii(value)[:100]
    except BaseException:
        return "<unprintable>"


def child(requests, replies):
    # The solution's process. It never sees the nonce or the tests: they are read after the fork.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # its prints count against the output limit, and can never reach the report
    for fd in range(3, 1024):
        if fd not in (requests, replies):
            try:
                os.close(fd)
            except OSError:
                pass
    reader, writer = os.fdopen(requests, "r", encoding="utf-8"), os.fdopen(replies, "w", encoding="utf-8")
    literal, dumps, loads = ast.literal_eval, json.dumps, json.loads
    lazy = (types.GeneratorType, map, filter, zip, range, reversed, enumerate, type({}.keys()), type({}.values()),
            type({}.items()))

    def plain(value):  # iterators become lists, frozensets sets: what a test compares them with
        if isinstance(value, lazy):
            return list(value)
        if isinstance(value, frozenset):
            return set(value)
        return value

    def reply(message):
        writer.write(dumps(message) + "\n")
        writer.flush()

    names = {"__name__": "solution"}
    for line in reader:
        message = loads(line)
        if message["op"] == "load":
            error = None
            try:
                exec(compile(message["code"], "<solution>", "exec"), names)
            except BaseException as exc:
                error = describe(exc)
            values = {}
            for key, value in list(names.items()):
                if not key.startswith("__") and not callable(value) and not isinstance(value, types.ModuleType):
                    values[key] = repr(value)[:10000]
            reply({"error": error, "callables": [k for k, v in names.items() if callable(v) and not k.startswith("__")],
                   "values": values})
        else:
            try:
                result = names[message["name"]](*literal(message["args"]), **literal(message["kwargs"]))
                reply({"value": repr(plain(result))})
            except BaseException as exc:
                reply({"raised": type(exc).__name__, "error": describe(exc).partition(": ")[2]})


def main():
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(requests_w)
        os.close(replies_r)
        try:
            child(requests_r, replies_w)
        finally:
            os._exit(0)
    os.close(requests_r)
    os.close(replies_w)
    if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem, fd or ptrace for the child
        raise SystemExit("prctl(PR_SET_DUMPABLE) failed")
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    nonce, payload = b"".join(chunks).decode().split("\n", 1)
    payload = json.loads(payload)
    tests, solution, entry_point = payload["tests"], payload["solution"], payload["entry_point"]
    pristine = dict(builtins.__dict__)
    buffer = [b""]

    def say(key, status="", detail=""):
        os.write(1, (nonce + ":" + key + ":" + status + ":" + detail[:300] + "\n").encode("utf-8", "replace"))

    class SolutionProcessError(Exception):
        pass

    ended = []

    def gone():  # how the solution's process ended, once it has
        if not ended:
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                how = {signal.SIGXCPU: "cpu limit", signal.SIGXFSZ: "file size limit"}.get(sig, "killed by " + signal.Signals(sig).name)
            else:
                how = "exit code %d" % os.WEXITSTATUS(status)
            ended.append(SolutionProcessError("the solution's process ended (" + how + ")"))
        return ended[0]

    def ask(message):
        if ended:
            raise ended[0]
        try:
            os.write(requests_w, (json.dumps(message) + "\n").encode())
        except OSError:
            raise gone() from None
        while b"\n" not in buffer[0]:
            chunk = os.read(replies_r, 1 << 16)
            if not chunk:
                raise gone()
            buffer[0] += chunk
            if len(buffer[0]) > MAX_REPLY:
                raise SolutionProcessError("the solution's process sent a reply over %d bytes" % MAX_REPLY)
        line, _, buffer[0] = buffer[0].partition(b"\n")
        try:
            reply = json.loads(line)
            assert isinstance(reply, dict)
            return reply
        except Exception:
            raise SolutionProcessError("the solution's process sent a garbled reply") from None

    def returned(name, text):
        try:
            return ast.literal_eval(text)
        except Exception:
            raise TypeError(name + " returned " + short(text)[:80] + ", not a plain value (numbers, strings, "
                            "bytes, None, True/False and lists, tuples, sets, dicts of them)") from None

    def proxy(name):
        def call(*args, **kwargs):
            try:
                text_args, text_kwargs = repr(args), repr(kwargs)
                ast.literal_eval(text_args), ast.literal_eval(text_kwargs)
            except Exception:
                raise TypeError("only plain values can be passed to " + name) from None
            reply = ask({"op": "call", "name": name, "args": text_args, "kwargs": text_kwargs})
            if "value" in reply:
                return returned(name, str(reply["value"]))
            raised, error = str(reply.get("raised"))[:100], str(reply.get("error"))[:300]
            kind = getattr(builtins, raised, None)
            if not (isinstance(kind, type) and issubclass(kind, Exception) and kind is not AssertionError):
                kind, error = RuntimeError, raised + ": " + error  # SystemExit, the solution's own classes, ...
            raise kind(error)
        call.__name__ = name
        return call

    defined = {}
    try:
        loaded = ask({"op": "load", "code": solution})
        if loaded.get("error"):
            say("setup", "error", str(loaded["error"]))
        for name in loaded.get("callables", []):
            defined[str(name)] = proxy(str(name))
        for name, text in dict(loaded.get("values", {})).items():
            try:
                defined[str(name)] = ast.literal_eval(str(text))
            except Exception:
                pass
    except SolutionProcessError as exc:
        say("setup", "error", describe(exc))
    if entry_point and entry_point not in defined:
        say("setup", "error", "NameError: entry point " + entry_point + " is not defined")

    def eq(a, b):  # ``assert a == b``, with both sides in the message
        if not a == b:
            raise AssertionError(short(a) + " != " + short(b))
        return True

    for i, test in enumerate(tests):
        scope = {k: v for k, v in defined.items() if k not in pristine or k == entry_point}
        scope.update(__name__="test", __builtins__=dict(pristine), _gymrl_eq=eq)
        try:
            exec(compile(test, "<test %d>" % (i + 1), "exec"), scope)
        except BaseException as exc:
            say(str(i), "fail", describe(exc))
        else:
            say(str(i), "pass")
    say("done")
    os.kill(pid, signal.SIGKILL)
    os._exit(0)


main()
"""
