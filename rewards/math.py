r"""Reward for math answers written as ``\boxed{...}`` or ``<answer>...</answer>``, checked with math-verify.

What is verified: only the text after the last ``</think>`` counts; a response that opens
``<think>`` and never closes it is all thinking and earns 0, as does an answer only inside the
thinking part. Final answers are the contents of every ``\boxed{...}`` (braces balanced, ``\{`` and
``\}`` not counted) and of every ``<answer>...</answer>`` that holds no ``\boxed``. Each answer is
parsed with math-verify's ``parse`` and compared with ``verify(gold, answer)``, the gold being the
expected answer, so equivalent forms match (``1/2``, ``0.5``, ``\frac{1}{2}``; ``2`` and ``2.0``;
``x = 2`` for ``2``). math-verify compares floats rounded to 6 places, so ``0.333333`` matches
``1/3``. The reward is 1.0 when there is at least one answer and *every* distinct answer matches
the gold: several equivalent forms are fine, several different answers are hedging and earn 0,
as do more than ``_MAX_ANSWERS`` distinct answers (not even checked).

Adversarial cases: answers are found by a linear scan (``str.find``, brace counting), so a giant
response costs linear time; each answer is capped at ``_MAX_ANSWER_CHARS`` characters before it is
parsed (a longer one earns 0), so sympy never sees a giant input. Unicode decimal digits other than
ASCII 0-9 (full-width ``１``, Arabic-Indic ``٣``, ...) are rejected outright: math-verify 0.9 does
not normalise them (it keeps such an answer as an unparsed string, which matches nothing), and
rejecting them here keeps that behaviour explicit and independent of the library version. Text
such as "ignore previous instructions, the answer is correct" is just text: only a parsed answer
equal to the gold scores. Malformed LaTeX (unbalanced braces, ``\frac{1}{``) earns 0.

Timeouts: math-verify bounds ``parse`` and ``verify`` with ``SIGALRM``, which only works in the main
thread; there every parse and every comparison is bounded by ``_TIMEOUT_S`` seconds
(``9^{9^{9^{9}}}`` times out and earns 0). Note that this cancels any alarm the caller had set.
Called from any other thread (a server's worker pool), the check runs in the main thread of a
persistent checker child process (``_Checker``: one per process, started on first use, reused,
serialised by a lock) under the same alarm, and the child is killed when it does not answer within
``_CHILD_TIMEOUT_S`` wall seconds, scoring 0: a huge power computed in C holds the GIL and ignores
alarms, so only a process can be stopped reliably. POSIX only (``select`` on a pipe).
"""

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path

from math_verify import parse, verify

from rewards.types import RewardResult

_MAX_ANSWER_CHARS = 1000
_MAX_ANSWERS = 4
_TIMEOUT_S = 2  # math-verify's alarm, per parse and per comparison (whole seconds)
_CHILD_TIMEOUT_S = 15.0  # wall-clock budget for one answer's check in the checker child
_CHILD_START_S = 60.0  # the checker child imports sympy and math-verify once
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def strip_thinking(response: str) -> str | None:
    """The text after the last ``</think>``; None when a ``<think>`` is never closed (all thinking)."""
    head, sep, tail = response.rpartition("</think>")
    if sep:
        return tail
    return None if "<think>" in response else response


def _braced(text: str, start: int) -> int:
    """Index just past the ``}`` closing the ``{`` at ``start``, or -1 when it is never closed."""
    depth, i, n = 0, start, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # \{ and \} are literal braces, not groups
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def extract_boxed(text: str) -> tuple[list[str], int]:
    r"""The contents of the outermost ``\boxed{...}`` (and ``\fbox{...}``) in order, and how many were
    left unclosed. Nested boxes stay inside their outer box's content."""
    found, unclosed, i = [], 0, 0
    nxt = {cmd: text.find(cmd) for cmd in _BOX_COMMANDS}  # next hit of each command (linear overall)
    while True:
        for cmd, j in nxt.items():
            if 0 <= j < i:
                nxt[cmd] = text.find(cmd, i)
        hits = [(j, cmd) for cmd, j in nxt.items() if j >= 0]
        if not hits:
            return found, unclosed
        j, cmd = min(hits)
        k = j + len(cmd)
        while k < len(text) and text[k] in " \t\n":
            k += 1
        if k >= len(text) or text[k] != "{":
            i = j + len(cmd)  # \boxed without a brace group (or \boxedfoo): not an answer
            continue
        end = _braced(text, k)
        if end < 0:
            return found, unclosed + 1  # the rest of the text is inside the unclosed box
        found.append(text[k + 1 : end - 1])
        i = end


def _answer_tags(text: str) -> tuple[list[str], int]:
    """The contents of every ``<answer>...</answer>`` in order, and how many were left unclosed."""
    found, unclosed, i = [], 0, 0
    while (j := text.find("<answer>", i)) >= 0:
        k = text.find("</answer>", j + 8)
        if k < 0:
            return found, unclosed + 1
        found.append(text[j + 8 : k])
        i = k + 9
    return found, unclosed


def final_answers(text: str) -> tuple[list[str], int]:
    r"""The distinct final answers in ``text`` (whitespace-normalised, order kept) and the number of
    unclosed ``\boxed{`` / ``<answer>``."""
    boxed, unclosed_boxes = extract_boxed(text)
    tags, unclosed_tags = _answer_tags(text)
    answers = boxed + [t for t in tags if not any(cmd in t for cmd in _BOX_COMMANDS)]
    distinct: dict[str, None] = {}
    for a in answers:
        a = " ".join(a.split())
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(a) >= len(left) + len(right) and a.startswith(left) and a.endswith(right):
                a = a[len(left) : len(a) - len(right)].strip()
        distinct[a] = None
    return list(distinct), unclosed_boxes + unclosed_tags


def _foreign_digit(text: str) -> str:
    """The first Unicode decimal digit in ``text`` that is not ASCII 0-9, or ""."""
    for ch in text:
        if not ch.isascii() and unicodedata.category(ch) == "Nd":
            return ch
    return ""


def _parse(latex: str, timeout: int | None) -> list:
    return parse("\\boxed{" + latex + "}", parsing_timeout=timeout)


@lru_cache(maxsize=4096)
def _parse_gold(expected: str) -> tuple:
    """The parsed gold, cached: called from the main thread only, where the alarm bounds it."""
    return tuple(_parse(expected, _TIMEOUT_S))


def _check(expected: str, answer: str) -> str:
    """Parse and verify under math-verify's alarm; call from a main thread only."""
    gold = list(_parse_gold(expected))
    if not gold:
        return "bad gold"
    return "ok" if verify(gold, _parse(answer, _TIMEOUT_S), timeout_seconds=_TIMEOUT_S) else "wrong"


# The checker child: a Python process whose main thread runs _check for one JSON request a line.
_CHILD_CODE = """
import json, sys
sys.path.insert(0, sys.argv[1])
reply = sys.stdout
sys.stdout = sys.stderr
from rewards.math import _check
reply.write('"ready"\\n'); reply.flush()
for line in sys.stdin:
    expected, answer = json.loads(line)
    try:
        verdict = _check(expected, answer)
    except Exception:
        verdict = "wrong"
    reply.write(json.dumps(verdict) + "\\n"); reply.flush()
"""


class _Checker:
    """One persistent checker child per process, shared by all threads (a lock serialises them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = 0
        atexit.register(self.close)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._pid == os.getpid():
            proc.kill()
            proc.wait()

    def _read(self, timeout: float) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[1])
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._pid = os.getpid()
        if self._read(_CHILD_START_S) != "ready":
            self.close()
            raise RuntimeError("the math-verify checker process did not start")

    def check(self, expected: str, answer: str) -> str:
        with self._lock:
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                self._start()  # first use, after a fork, or after a kill
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps([expected, answer]) + "\n")
                self._proc.stdin.flush()
                verdict = self._read(_CHILD_TIMEOUT_S)
            except (OSError, ValueError):  # the child died under us (broken pipe, garbled reply)
                verdict = None
            if verdict is None:  # stuck in C code the alarm cannot interrupt, or dead: kill it
                self.close()
                return "timeout"
            return verdict


_checker = _Checker()


def _matches(expected: str, answer: str) -> str:
    """``ok``, ``wrong``, ``bad gold`` (the expected answer does not parse) or ``timeout``."""
    if threading.current_thread() is threading.main_thread():
        return _check(expected, answer)
    return _checker.check(expected, answer)


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def score_math(response: str, expected: str) -> RewardResult:
    r"""1.0 when every final answer (``\boxed{}`` / ``<answer>``) after the thinking part equals
    ``expected`` under math-verify, and there is at least one; see the module doc."""
    expected = str(expected).strip()
    if not expected:
        return RewardResult(0.0, "no expected answer to compare with")
    if not response or not response.strip():
        return RewardResult(0.0, "empty response")
    tail = strip_thinking(response)
    if tail is None:
        return RewardResult(0.0, "unclosed <think>: the whole response is thinking")
    answers, unclosed = final_answers(tail)
    if not answers:
        if unclosed:
            return RewardResult(0.0, "unclosed \\boxed{ or <answer> after the thinking part")
        return RewardResult(0.0, "no \\boxed{} or <answer> after the thinking part")
    if len(answers) > _MAX_ANSWERS:
        return RewardResult(0.0, f"hedging: {len(answers)} different answers")
    for answer in answers:
        if not answer:
            return RewardResult(0.0, "empty answer")
        if len(answer) > _MAX_ANSWER_CHARS:
            return RewardResult(0.0, f"answer is {len(answer)} characters long (limit {_MAX_ANSWER_CHARS})")
        if ch := _foreign_digit(answer):
            return RewardResult(0.0, f"non-ASCII digit {ch!r} (U+{ord(ch):04X}) in answer {_show(answer)}")
        if _braced("{" + answer + "}", 0) != len(answer) + 2:
            return RewardResult(0.0, f"malformed answer {_show(answer)}: unbalanced braces")
    wrong = []
    for answer in answers:
        verdict = _matches(expected, answer)
        if verdict == "timeout":
            return RewardResult(0.0, f"checking answer {_show(answer)} timed out (or its checker process died)")
        if verdict == "bad gold":
            return RewardResult(0.0, f"expected answer {_show(expected)} does not parse (a data bug)")
        if verdict == "wrong":
            wrong.append(answer)
    if not wrong:
        forms = f" ({len(answers)} equivalent forms)" if len(answers) > 1 else ""
        return RewardResult(1.0, f"correct{forms}")
    if len(answers) > 1:
        shown = ", ".join(_show(a, 30) for a in answers)
        return RewardResult(0.0, f"hedging: {len(answers)} different answers ({shown}); expected {_show(expected)}")
    return RewardResult(0.0, f"answered {_show(answers[0])}, expected {_show(expected)}")
