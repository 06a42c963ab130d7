"""Tool use over several turns: a calculator, a key-value store whose end state is checked, and a lookup in a
store seeded per episode.

The model calls the server's tools in Nemotron-3's ``qwen3_coder`` XML style (or JSON inside
``<tool_call>`` with ``tool_format: json``), reads their results and ends with ``<answer>...</answer>``.
Rows are NeMo Gym JSONL rows with the ``tools`` in ``responses_create_params``; ``kv`` rows carry
the store that ``/seed_session`` loads. The warm-up's off-policy mistakes (``warmup_correct``) are an
answer off by one after a correct calculator call, and a copied value off by one.
"""

import json
import random
from dataclasses import dataclass
from functools import cache

from environments.tool_use.tools import ROW_MAKERS, generate_rows, tool_output


@cache
def _rows(kinds: tuple[str, ...], n_train: int, n_eval: int, seed: int) -> dict[str, list[dict]]:
    held_out = generate_rows(kinds, n_eval, seed, "eval")
    return {"train": generate_rows(kinds, n_train, seed, "train", {r["id"] for r in held_out}), "eval": held_out}


def tool_call_text(name: str, arguments: dict[str, str], tool_format: str) -> str:
    if tool_format == "json":
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


@dataclass(frozen=True)
class Tasks:
    kinds: tuple[str, ...] = ("calc", "kv")
    n_train: int = 400
    n_eval: int = 40
    seed: int = 0
    tool_format: str = "qwen3_coder"  # or "json"
    warmup_correct: float = 1.0

    def __post_init__(self):
        if self.tool_format not in ("qwen3_coder", "json"):
            raise ValueError(f"tool_format must be 'qwen3_coder' or 'json', got {self.tool_format!r}")
        if not set(self.kinds) <= set(ROW_MAKERS) or not self.kinds:
            raise ValueError(f"kinds must be drawn from {tuple(ROW_MAKERS)}, got {self.kinds!r}")

    def rows(self, split: str) -> list[dict]:
        return _rows(tuple(self.kinds), self.n_train, self.n_eval, self.seed)[split]

    def _episode(self, row: dict, slip: int = 0) -> list[dict]:
        """The turns of a correct episode; ``slip`` puts an off-by-one mistake in its last step."""
        def call(name: str, arguments: dict[str, str], reply: dict) -> list[dict]:
            return [{"role": "assistant", "content": tool_call_text(name, arguments, self.tool_format)},
                    {"role": "tool", "content": tool_output(reply)}]

        if row["kind"] == "calc":
            expression = row["id"].removeprefix("calc-")
            return call("calculator", {"expression": expression}, {"result": row["expected"]}) + [
                {"role": "assistant", "content": f"<answer>{row['expected'] + slip}</answer>"}]
        value = row["initial_store"][row["source"]]
        if row["kind"] == "lookup":
            return call("kv_get", {"key": row["source"]}, {"value": value}) + [
                {"role": "assistant", "content": f"<answer>{int(value) + slip}</answer>"}]
        copied = str(int(value) + slip)
        return (call("kv_get", {"key": row["source"]}, {"value": value})
                + call("kv_set", {"key": row["target"], "value": copied}, {"ok": True})
                + [{"role": "assistant", "content": "<answer>done</answer>"}])

    def gold_response(self, row: dict) -> list[dict]:
        return self._episode(row)

    def warmup_response(self, row: dict, rng: random.Random) -> list[dict]:
        return self._episode(row, 0 if rng.random() < self.warmup_correct else 1)
