"""A generated set of small programming problems: (name, signature, description, reference body, tests).

Each problem is instantiated with seeded constants so train and eval rows differ in values, not only
in names. The reference solutions are the gold answers that ``gymrl envs test code`` checks.
"""

import random

# name, description template, reference implementation template, test templates ({k} is a constant)
TEMPLATES = [
    ("add_k", "return x plus {k}", "def add_k(x):\n    return x + {k}",
     ["assert add_k(0) == {k}", "assert add_k(5) == 5 + {k}", "assert add_k(-{k}) == 0"]),
    ("times_k", "return x times {k}", "def times_k(x):\n    return x * {k}",
     ["assert times_k(1) == {k}", "assert times_k(0) == 0", "assert times_k(3) == 3 * {k}"]),
    ("count_char", "return how many times the character '{c}' occurs in the string s",
     "def count_char(s):\n    return s.count('{c}')",
     ["assert count_char('') == 0", "assert count_char('{c}{c}x{c}') == 3", "assert count_char('xyz') == ('{c}' in 'xyz')"]),
    ("every_kth", "return the list of every {k}th element of xs, starting with the first",
     "def every_kth(xs):\n    return xs[::{k}]",
     ["assert every_kth([]) == []", "assert every_kth(list(range(10))) == list(range(10))[::{k}]", "assert every_kth([7]) == [7]"]),
    ("clamp_k", "return x limited to the range 0..{k}", "def clamp_k(x):\n    return max(0, min({k}, x))",
     ["assert clamp_k(-5) == 0", "assert clamp_k({k} + 9) == {k}", "assert clamp_k(1) == min(1, {k})"]),
    ("sum_over_k", "return the sum of the numbers in xs that are greater than {k}",
     "def sum_over_k(xs):\n    return sum(x for x in xs if x > {k})",
     ["assert sum_over_k([]) == 0", "assert sum_over_k([{k}, {k} + 1, {k} + 2]) == 2 * {k} + 3", "assert sum_over_k([-100]) == 0"]),
    ("repeat_k", "return the string s repeated {k} times", "def repeat_k(s):\n    return s * {k}",
     ["assert repeat_k('') == ''", "assert repeat_k('ab') == 'ab' * {k}", "assert len(repeat_k('x')) == {k}"]),
    ("mod_k", "return the remainder of x divided by {k}", "def mod_k(x):\n    return x % {k}",
     ["assert mod_k({k}) == 0", "assert mod_k({k} + 1) == 1 % {k}", "assert mod_k(100) == 100 % {k}"]),
]


def make_problem(index: int, rng: random.Random) -> dict:
    name, desc, body, tests = TEMPLATES[index % len(TEMPLATES)]
    values = {"k": rng.randint(2, 9), "c": rng.choice("abcdeg")}
    return {
        "entry_point": name,
        "description": desc.format(**values),
        "reference": body.format(**values),
        "tests": [t.format(**values) for t in tests],
    }
