"""The tool_use environment's tools and task generator, pure Python (both venvs import it).

Three kinds of task, each needing its tools:
- ``calc``: "What is 37*48?" with a ``calculator`` tool; the answer is checked.
- ``kv``: "Copy the value of key ab to key cd." with ``kv_get`` and ``kv_set`` on a key-value store
  seeded per episode; the store's end state is checked.
- ``lookup``: "What number is stored under key ab?" with ``kv_get`` on a store seeded per episode with
  two-digit numbers; the answer counts only if the episode read that key (the number cannot be known
  otherwise: a held-out task's store is one training never saw).
"""

import ast
import json
import operator
import random
import string

MAX_EXPRESSION = 200
MAX_MAGNITUDE = 10**12

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def calculate(expression: str) -> int:
    """Integer arithmetic (+ - * // %, parentheses, unary minus) on an expression from the model.

    Parsed with ``ast`` and evaluated node by node: no names, calls, attributes or powers, and every
    intermediate value bounded, so no input runs code or makes a huge number. Raises ``ValueError``.
    """
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            result = node.value
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            result = -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
                raise ValueError("division by zero")
            result = _BINARY[type(node.op)](left, right)
        else:
            raise ValueError(f"unsupported syntax: {type(node).__name__}")
        if abs(result) > MAX_MAGNITUDE:
            raise ValueError("number too large")
        return result

    return value(tree.body)


def tool_output(obj: dict) -> str:
    """A tool reply as the server's HTTP body renders it (compact JSON), so warm-up text matches it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _function(name: str, description: str, params: dict[str, str]) -> dict:
    return {
        "type": "function", "name": name, "description": description, "strict": True,
        "parameters": {"type": "object", "properties": {k: {"type": "string", "description": d} for k, d in params.items()},
                       "required": list(params), "additionalProperties": False},
    }


CALCULATOR = _function("calculator", "Evaluate an integer arithmetic expression.", {"expression": "e.g. 12*34"})
KV_GET = _function("kv_get", "Read the value stored under a key.", {"key": "the key"})
KV_SET = _function("kv_set", "Store a value under a key.", {"key": "the key", "value": "the value"})


def calc_row(a: int, b: int) -> dict:
    return {
        "id": f"calc-{a}*{b}", "kind": "calc", "expected": a * b,
        "responses_create_params": {"input": [{"role": "user", "content": f"What is {a}*{b}?"}], "tools": [CALCULATOR]},
    }


def kv_row(rng: random.Random, n_keys: int = 3) -> dict:
    keys = rng.sample([a + b for a in string.ascii_lowercase for b in string.ascii_lowercase], n_keys + 1)
    store = {k: str(rng.randrange(1000, 10000)) for k in keys[:n_keys]}
    src, dst = keys[0], keys[n_keys]  # dst is a new key
    return {
        "id": f"kv-{src}-{dst}-{store[src]}", "kind": "kv", "initial_store": store, "source": src, "target": dst,
        "responses_create_params": {"input": [{"role": "user", "content": f"Copy the value of key {src} to key {dst}."}],
                                    "tools": [KV_GET, KV_SET]},
    }


def lookup_row(rng: random.Random, n_keys: int = 3) -> dict:
    keys = rng.sample([a + b for a in string.ascii_lowercase for b in string.ascii_lowercase], n_keys)
    store = {k: str(rng.randrange(10, 100)) for k in keys}
    key = keys[0]
    return {
        "id": "lookup-" + "-".join(f"{k}{v}" for k, v in store.items()), "kind": "lookup", "initial_store": store,
        "source": key, "expected": int(store[key]),
        "responses_create_params": {"input": [{"role": "user", "content": f"What number is stored under key {key}?"}],
                                    "tools": [KV_GET]},
    }


ROW_MAKERS = {"calc": lambda rng: calc_row(rng.randrange(11, 100), rng.randrange(11, 100)), "kv": kv_row,
              "lookup": lookup_row}


def generate_rows(kinds: tuple[str, ...], n: int, seed: int, split: str, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` distinct rows, the kinds in turn; ``exclude`` holds ids (of the other split) to leave out."""
    rng = random.Random(f"{seed}-{split}")
    rows: dict[str, dict] = {}
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"could not draw {n} distinct tool_use tasks of kinds {kinds}")
        kind = kinds[len(rows) % len(kinds)]
        row = ROW_MAKERS[kind](rng)
        if row["id"] not in exclude:
            rows.setdefault(row["id"], row)
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    import argparse

    from environments.jsonl import write_jsonl

    p = argparse.ArgumentParser(description="Write tool_use task rows as NeMo Gym JSONL.")
    p.add_argument("--n", type=int, required=True, help="number of rows")
    p.add_argument("--kinds", default="calc,kv", help="comma-separated: calc, kv, lookup")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "eval"))
    p.add_argument("--out", required=True, help="output JSONL path")
    args = p.parse_args(argv)
    write_jsonl(generate_rows(tuple(args.kinds.split(",")), args.n, args.seed, args.split), args.out)


if __name__ == "__main__":
    main()
