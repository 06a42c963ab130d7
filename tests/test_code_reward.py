"""score_code on right, wrong and hostile solutions: each must score as it should, with a reason."""

import pytest

from rewards.code import extract_code, score_code
from rewards.sandbox import SandboxLimits

TESTS = ["assert add_one(1) == 2", "assert add_one(-1) == 0", "assert add_one(41) == 42"]
FAST = SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_mb=256, max_processes=16, max_output_bytes=8192)


pytestmark = pytest.mark.usefixtures("hang_guard")


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code.strip()}\n```\n"


def score(code: str, tests=TESTS, limits=FAST, **kw):
    return score_code(block(code), tests, limits=limits, **kw)


def test_right_solution_scores_one():
    r = score("def add_one(x):\n    return x + 1")
    assert (r.reward, r.reason) == (1.0, "3/3 tests passed")
    assert score("def add_one(x):\n    return x + 1", mode="all").reward == 1.0


def test_wrong_solution_scores_zero_and_names_the_failing_test():
    r = score("def add_one(x):\n    return x")
    assert r.reward == 0.0
    assert r.reason.startswith("0/3 tests passed; test 1 failed: 'assert add_one(1) == 2'") and "1 != 2" in r.reason


def test_partly_right_solution_scores_the_fraction_or_zero_in_all_mode():
    code = "def add_one(x):\n    return 0 if x == -1 else 2"
    r = score(code)
    assert r.reward == pytest.approx(2 / 3) and "test 3 failed" in r.reason and "2 != 42" in r.reason
    assert r.breakdown == {"tests_passed": 2, "tests_total": 3}
    assert score("def add_one(x):\n    return x + 1").breakdown == {"tests_passed": 3, "tests_total": 3}
    assert score_code("no code", TESTS, limits=FAST).breakdown == {"tests_passed": 0, "tests_total": 3}
    r = score(code, mode="all")
    assert r.reward == 0.0 and r.reason.startswith("2/3 tests passed")


def test_no_code_block():
    for response in ["add_one = lambda x: x + 1", "", "```\ndef add_one(x): return x + 1\n```", "```python\nunclosed"]:
        r = score_code(response, TESTS, limits=FAST)
        assert (r.reward, r.reason) == (0.0, "no ```python block after the thinking part"), response


def test_code_only_inside_thinking_does_not_count():
    inside = "<think>\n" + block("def add_one(x):\n    return x + 1") + "</think>\nI am done."
    assert score_code(inside, TESTS, limits=FAST).reward == 0.0
    unfinished = "<think>\n" + block("def add_one(x):\n    return x + 1")  # thinking never closed
    assert score_code(unfinished, TESTS, limits=FAST).reward == 0.0
    after = inside.replace("I am done.", block("def add_one(x):\n    return x + 1"))
    assert score_code(after, TESTS, limits=FAST).reward == 1.0


def test_last_block_is_the_answer():
    response = block("def add_one(x):\n    return x") + "Fixed:\n" + block("def add_one(x):\n    return x + 1")
    assert extract_code(response).strip() == "def add_one(x):\n    return x + 1"
    assert score_code(response, TESTS, limits=FAST).reward == 1.0


def test_syntax_error():
    r = score("def add_one(x)\n    return x + 1")
    assert r.reward == 0.0 and "the solution raised SyntaxError" in r.reason


def test_empty_code_and_no_output():
    r = score_code("```python\n```", TESTS, limits=FAST)
    assert r.reward == 0.0 and "NameError" in r.reason
    r = score("def add_one(x):\n    pass")  # returns None, prints nothing
    assert r.reward == 0.0 and "None != 2" in r.reason


def test_giant_output_is_cut_off():
    r = score("while True:\n    print('x' * 1000, flush=True)\ndef add_one(x):\n    return x + 1")
    assert r.reward == 0.0 and "run cut short" in r.reason and "output limit" in r.reason


def test_giant_output_after_passing_tests_keeps_what_passed():
    code = "def add_one(x):\n    if x == 41:\n        while True: print('x' * 1000, flush=True)\n    return x + 1"
    r = score(code)
    assert r.reward == pytest.approx(2 / 3) and "before test 3 reported (output limit)" in r.reason


def test_infinite_loop_times_out():
    r = score("def add_one(x):\n    while True:\n        pass", limits=SandboxLimits(wall_seconds=5, cpu_seconds=1))
    assert r.reward == 0.0 and "test 1 failed" in r.reason  # the solution's process hit its limit; the tests fail
    assert "cpu limit" in r.reason or "wall timeout" in r.reason


def test_sleeping_solution_hits_the_wall_clock():
    r = score("import time\ntime.sleep(100)\ndef add_one(x):\n    return x + 1", limits=SandboxLimits(wall_seconds=1.5))
    assert r.reward == 0.0 and "(wall timeout)" in r.reason


def test_early_sys_exit_does_not_pass_tests():
    r = score("import sys\nsys.exit(0)\ndef add_one(x):\n    return x + 1")
    assert r.reward == 0.0 and "SystemExit" in r.reason
    r = score("import sys\ndef add_one(x):\n    sys.exit(0)")  # exiting from inside a test fails it
    assert r.reward == 0.0 and "test 1 failed" in r.reason and "SystemExit" in r.reason


def test_os_exit_does_not_pass_tests():
    r = score("import os\nos._exit(0)")
    assert r.reward == 0.0 and "the solution's process ended (exit code 0)" in r.reason
    r = score("import os\ndef add_one(x):\n    os._exit(0)", mode="all")
    assert r.reward == 0.0 and "test 1 failed" in r.reason and "process ended (exit code 0)" in r.reason


def test_fake_pass_lines_do_not_count():
    fake = """
import sys
for i in range(3):
    print(f"{i}:pass:", "PASS", "ok", "test passed")
    sys.stderr.write(f"{i}:pass:\\n")
print("done")
sys.stdout.flush()
import os
os._exit(0)
"""
    r = score(fake)
    assert r.reward == 0.0 and "the solution's process ended (exit code 0)" in r.reason


def test_redefining_assertion_error_or_patching_builtins_does_not_help():
    r = score("""
import builtins
class AssertionError(Exception):
    pass
builtins.AssertionError = AssertionError
builtins.exec = lambda *a, **k: None
builtins.compile = lambda *a, **k: None
builtins.print = lambda *a, **k: None
__builtins__["exec"] = lambda *a, **k: None
import os, sys
os.write = lambda fd, data: len(data)
sys.settrace(lambda *a: None)
def add_one(x):
    return 7
""")
    # The patches break only the solution's own process (here its literal_eval, whose compile() is gone).
    assert r.reward == 0.0 and r.reason.startswith("0/3 tests passed; test 1 failed")
    r = score("import builtins\nbuiltins.AssertionError = Exception\ndef add_one(x):\n    return 7")
    assert r.reward == 0.0 and r.reason.startswith("0/3 tests passed; test 1 failed") and "7 != 2" in r.reason


def test_shadowing_builtins_used_by_tests_does_not_help():
    code = """
import builtins
builtins.len = lambda x: 3
sorted = lambda x: [1, 2, 3]
def abs(x):
    return 0
def add_one(x):
    return None
"""
    for test in ["assert len(add_one(1)) == 3", "assert sorted(add_one(2)) == [1, 2, 3]"]:
        r = score(code, [test])
        assert r.reward == 0.0, (test, r)  # (the patched len() breaks the solution's own process)
    assert score(code, ["assert abs(-5) == 5"]).reward == 1.0  # the test's abs() is the real one


def test_always_equal_objects_do_not_pass():
    r = score("""
class Anything(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add_one(x):
    return Anything(0)
""")
    # Its result crosses as its repr(): the int 0, right only for add_one(-1).
    assert r.reward == pytest.approx(1 / 3) and "0 != 2" in r.reason


def test_main_block_does_not_run_and_input_is_empty():
    r = score("def add_one(x):\n    return x + 1\nif __name__ == '__main__':\n    import os\n    os._exit(1)")
    assert (r.reward, r.reason) == (1.0, "3/3 tests passed")
    r = score("def add_one(x):\n    return x + 1\nadd_one(int(input()))")  # stdin is empty: EOFError, tests still run
    assert r.reward == 1.0


def test_humaneval_style_check_function():
    tests = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(5) == 6\n"
    assert score("def add_one(x):\n    return x + 1", tests, entry_point="add_one").reward == 1.0
    r = score("def add_one(x):\n    return x", tests, entry_point="add_one")
    assert r.reward == 0.0 and "1 != 2" in r.reason
    r = score("def plus_one(x):\n    return x + 1", tests, entry_point="add_one")
    assert r.reward == 0.0 and "entry point add_one is not defined" in r.reason


def test_bad_tests_are_the_callers_error():
    with pytest.raises(ValueError):
        score("def add_one(x):\n    return x + 1", ["assert add_one(1) =="])
    with pytest.raises(ValueError):
        score("def add_one(x):\n    return x + 1", [])


def test_tracer_installed_by_the_solution_is_removed_before_the_tests():
    r = score("""
import sys
def tracer(frame, event, arg):  # make both sides of every equality check the same
    if event == "call" and "b" in frame.f_locals:
        frame.f_locals["a"] = frame.f_locals["b"]
    return tracer
sys.settrace(tracer)
def add_one(x):
    return 7
""")
    assert r.reward == 0.0 and "7 != 2" in r.reason


def test_solution_that_silences_stdout_still_gets_its_tests_reported():
    r = score("import os\nos.dup2(os.open(os.devnull, os.O_WRONLY), 1)\nos.close(2)\ndef add_one(x):\n    return x + 1")
    assert (r.reward, r.reason) == (1.0, "3/3 tests passed")
