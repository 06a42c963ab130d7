"""What ``gymrl traces`` computes from a run's store: the runs, statistics per step, how the answers to
the same tasks changed between two steps, rescoring with the current verifier, and export.

Everything but :func:`rescore` needs only the store (SQLite, the standard library), so inspecting a run
does not import torch, Ray or vLLM. ``rescore`` starts the environment's server, as training does.
"""

import dataclasses
import json
import statistics
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gymrl.traces.store import TRACE_FILE, TraceFilter, TraceReader, TraceRecord

# ---- runs -------------------------------------------------------------------------------------------


def find_runs(runs_dir: Path) -> dict[str, Path]:
    """Run name -> run folder: the folders right under ``runs_dir`` (or it itself) that hold a trace store."""
    runs_dir = Path(runs_dir)
    runs = {p.parent.name: p.parent for p in sorted(runs_dir.glob(f"*/{TRACE_FILE}"))}
    if (runs_dir / TRACE_FILE).exists():
        runs.setdefault(runs_dir.resolve().name, runs_dir)
    return runs


def resolve_run(run: str | Path, runs_dir: Path) -> Path:
    """The folder of ``run``: a run folder itself, its ``traces.db``, or a name under ``runs_dir``."""
    given = Path(run)
    for folder in (given.parent if given.name == TRACE_FILE else given, Path(runs_dir) / str(run)):
        if (folder / TRACE_FILE).is_file():
            return folder
    raise FileNotFoundError(f"no run '{run}': neither {given / TRACE_FILE} nor {Path(runs_dir) / str(run) / TRACE_FILE} exists")


@dataclass
class RunInfo:
    name: str
    path: Path
    rollouts: int
    steps: int  # the last step with a rollout (0: only the evaluation before training)
    envs: list[str]
    last_write: float | None  # when the newest rollout was written (seconds since the epoch)
    git_revision: str


def run_info(name: str, folder: Path) -> RunInfo:
    reader = TraceReader(folder / TRACE_FILE)
    try:
        meta = reader.metadata()
        last = reader.page(order="-id", limit=1)
        last_step = reader.page(order="-step", limit=1)
        created = reader.rollout(last[0]["id"]).created if last else None
        return RunInfo(name, folder, reader.count(), last_step[0]["step"] if last_step else 0, reader.envs(),
                       created, str(meta.get("git_revision", "unknown")))
    finally:
        reader.close()


def list_runs(runs_dir: Path) -> list[RunInfo]:
    return [run_info(name, folder) for name, folder in find_runs(runs_dir).items()]


# ---- statistics per step ----------------------------------------------------------------------------

# Staleness: optimizer steps between the weights that sampled a rollout and the weights it is used
# with. A train rollout of step N feeds the update from version N-1 to N; an evaluation at step N
# runs on version N. The sync loop samples from the current weights, so both are 0 there.
_STALENESS = "step - policy_version - (split = 'train')"


@dataclass
class StepStats:
    split: str
    env: str
    step: int
    rollouts: int
    reward_mean: float
    completion_tokens_mean: float  # the model's tokens (tool results excluded)
    turns_mean: float
    tool_calls_mean: float
    staleness_mean: float
    staleness_max: int
    finish_reasons: dict[str, int] = field(default_factory=dict)


def step_stats(reader: TraceReader, f: TraceFilter | None = None) -> list[StepStats]:
    """Per split, environment and step: rewards, lengths, tool use, finish reasons and staleness."""
    where, args = (f or TraceFilter()).where()
    rows = reader.conn.execute(
        f"SELECT split, env, step, count(*), avg(reward), avg(completion_tokens), avg(num_turns), avg(num_tool_calls),"
        f" avg({_STALENESS}), max({_STALENESS}) FROM rollouts{where} GROUP BY split, env, step ORDER BY split, env, step",
        args,
    ).fetchall()
    stats = {tuple(r[:3]): StepStats(*r) for r in rows}
    for split, env, step, reason, n in reader.conn.execute(
        f"SELECT split, env, step, finish_reason, count(*) FROM rollouts{where} GROUP BY split, env, step, finish_reason",
        args,
    ):
        stats[(split, env, step)].finish_reasons[reason] = n
    return list(stats.values())


# ---- how answers changed between two steps ----------------------------------------------------------


@dataclass
class TaskDiff:
    """One task's rollouts at two steps: mean reward at each, and the first sample's answer at each."""

    env: str
    task_id: str
    rollouts_a: int
    reward_a: float
    response_a: str
    reason_a: str
    rollouts_b: int
    reward_b: float
    response_b: str
    reason_b: str

    @property
    def delta(self) -> float:
        return self.reward_b - self.reward_a

    @property
    def flipped(self) -> bool:
        """Mostly wrong at one step and mostly right at the other (mean reward across 0.5)."""
        return (self.reward_a >= 0.5) != (self.reward_b >= 0.5)


@dataclass
class StepDiff:
    step_a: int
    step_b: int
    split: str
    tasks: list[TaskDiff]  # flipped tasks first, then by the size of the change

    def count(self, sign: int) -> int:
        return sum((t.delta > 1e-9) - (t.delta < -1e-9) == sign for t in self.tasks)

    @property
    def improved(self) -> int:
        return self.count(1)

    @property
    def worsened(self) -> int:
        return self.count(-1)

    @property
    def flipped(self) -> int:
        return sum(t.flipped for t in self.tasks)

    @property
    def mean_a(self) -> float:
        return statistics.fmean(t.reward_a for t in self.tasks) if self.tasks else 0.0

    @property
    def mean_b(self) -> float:
        return statistics.fmean(t.reward_b for t in self.tasks) if self.tasks else 0.0


def _per_task(reader: TraceReader, f: TraceFilter) -> dict[tuple[str, str], tuple[int, float, str, str]]:
    where, args = f.where()
    groups = reader.conn.execute(
        f"SELECT env, task_id, count(*), avg(reward), min(id) FROM rollouts{where} GROUP BY env, task_id", args
    ).fetchall()
    out = {}
    for env, task_id, n, mean, first in groups:
        sample = reader.rollout(first)
        out[(env, task_id)] = (n, mean, sample.response, sample.reason)
    return out


def diff_steps(reader: TraceReader, step_a: int, step_b: int, split: str = "eval", env: str | None = None) -> StepDiff:
    """Tasks with rollouts at both steps (of ``split``): how their rewards and answers changed."""
    a = _per_task(reader, TraceFilter(split=split, env=env, step=step_a))
    b = _per_task(reader, TraceFilter(split=split, env=env, step=step_b))
    tasks = [TaskDiff(*key, *a[key], *b[key]) for key in sorted(a.keys() & b.keys())]
    tasks.sort(key=lambda t: (not t.flipped, -abs(t.delta)))
    return StepDiff(step_a, step_b, split, tasks)


# ---- rescoring stored answers with the environment's current verifier -------------------------------


@dataclass
class Rescored:
    id: int
    step: int
    split: str
    task_id: str
    old_reward: float
    old_reason: str
    new_reward: float
    new_reason: str
    new_breakdown: dict[str, float]
    response: str

    @property
    def delta(self) -> float:
        return self.new_reward - self.old_reward

    @property
    def changed(self) -> bool:
        return abs(self.delta) > 1e-9


@dataclass
class RescoreReport:
    env: str
    items: list[Rescored]

    @property
    def changed(self) -> list[Rescored]:
        return [r for r in self.items if r.changed]

    @property
    def up(self) -> int:
        return sum(r.delta > 1e-9 for r in self.items)

    @property
    def down(self) -> int:
        return sum(r.delta < -1e-9 for r in self.items)

    @property
    def mean_old(self) -> float:
        return statistics.fmean(r.old_reward for r in self.items) if self.items else 0.0

    @property
    def mean_new(self) -> float:
        return statistics.fmean(r.new_reward for r in self.items) if self.items else 0.0


def _env_config(meta: dict[str, Any], env: str) -> dict[str, Any]:
    envs = (meta.get("config") or {}).get("envs") or []
    for entry in envs:
        if entry.get("name") == env:
            return entry
    names = ", ".join(e.get("name", "?") for e in envs) or "none"
    raise ValueError(f"env '{env}' is not in this run's config (its envs: {names})")


def rescore(reader: TraceReader, env: str, f: TraceFilter | None = None, limit: int | None = None,
            workers: int = 8, chunk: int = 256) -> RescoreReport:
    """Replay the stored assistant turns of ``env``'s rollouts against the environment's current server
    (tool calls run again, then ``/verify``) and compare the new rewards with the stored ones. The
    environment's options come from the run's stored config; the store is only read."""
    from gymrl.config import EnvConfig
    from gymrl.envs.base import Task, row_messages
    from gymrl.envs.client import EnvClient
    from gymrl.envs.launcher import DEFAULT_GYM_PYTHON
    from gymrl.envs.sources import open_environment, resolve_gym_python, server_process
    from gymrl.rollout.runner import play_episode

    meta = reader.metadata()
    config = meta.get("config") or {}
    gym_python = resolve_gym_python((config.get("env_servers") or {}).get("gym_python") or DEFAULT_GYM_PYTHON)
    environment = open_environment(EnvConfig(**_env_config(meta, env)), gym_python, int(config.get("seed") or 0))
    f = dataclasses.replace(f or TraceFilter(), env=env)
    total = reader.count(f) if limit is None else min(limit, reader.count(f))
    parser = None
    items: list[Rescored] = []
    with server_process(environment, gym_python) as server, ThreadPoolExecutor(workers) as pool:
        environment.attach(EnvClient(env, server.url))
        try:
            for offset in range(0, total, chunk):
                jobs = []
                for summary in reader.page(f, offset, min(chunk, total - offset), order="id"):
                    record = reader.rollout(summary["id"])
                    row = reader.task_row(env, record.task_id)
                    task = Task(record.task_id, env, row_messages(row), row)
                    if task.tools and parser is None:
                        parser = _tool_call_parser(config)
                    turns = [t["content"] for t in record.turns if t["role"] == "assistant"] or [record.response]
                    jobs.append((record, task, turns))
                verdicts = pool.map(lambda job, parser=parser: play_episode(environment, job[1], job[2], parser)[0], jobs)
                for (record, _, _), verdict in zip(jobs, verdicts):
                    items.append(Rescored(record.id, record.step, record.split, record.task_id, record.reward,
                                          record.reason, verdict.reward, verdict.reason, verdict.breakdown,
                                          record.response))
        finally:
            environment.close()
    return RescoreReport(env, items)


def _tool_call_parser(config: dict[str, Any]):
    from gymrl.models.tokenizer import build_tokenizer
    from gymrl.rollout.tool_calls import ToolCallParser

    # The parsers want a tokenizer; any will do for text that is already decoded.
    name = (config.get("rollout") or {}).get("tool_call_parser") or "qwen3_coder"
    return ToolCallParser(name, build_tokenizer([]))


# ---- export -----------------------------------------------------------------------------------------


def iter_records(reader: TraceReader, f: TraceFilter | None = None, chunk: int = 500) -> Iterator[TraceRecord]:
    """Every rollout the filter selects, in full, in id order."""
    total = reader.count(f)
    for offset in range(0, total, chunk):
        for summary in reader.page(f, offset, chunk, order="id"):
            yield reader.rollout(summary["id"])


def export(reader: TraceReader, out: Path, fmt: Literal["jsonl", "datasets"] = "jsonl",
           f: TraceFilter | None = None) -> int:
    """Write the selected rollouts (turns, reward, reason, breakdown, tokens, logprobs) to ``out``: one JSON
    line each, or a ``datasets.Dataset`` saved with ``save_to_disk``. Returns how many were written."""
    rows = (dataclasses.asdict(r) for r in iter_records(reader, f))
    out = Path(out)
    if fmt == "jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with out.open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
                n += 1
        return n
    if fmt == "datasets":
        import datasets

        rows = list(rows)
        if not rows:
            raise ValueError("no rollouts match: an empty dataset has no columns to save")
        dataset = datasets.Dataset.from_list(rows)
        dataset.save_to_disk(str(out))
        return len(dataset)
    raise ValueError(f"--format must be jsonl or datasets, got '{fmt}'")
