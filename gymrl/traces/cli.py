"""``gymrl traces``: inspect the rollouts a run stored (see gymrl/traces/store.py). The commands only
parse options and print; what they compute is in gymrl/traces/query.py."""

import sqlite3
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gymrl.errors import USER_ERRORS, fail
from gymrl.traces import query
from gymrl.traces.store import TRACE_FILE, TraceFilter, TraceReader, TraceRecord

traces_app = typer.Typer(no_args_is_help=True, help="Rollout traces: list, show, stats, diff, rescore, export, serve.")


@traces_app.command()
def serve(
    runs_dir: str = typer.Option("runs", help="Folder whose subfolders are runs (each with a traces.db)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; loopback by default (there is no login)."),
    port: int = typer.Option(8050, help="Port to listen on."),
) -> None:
    """Web viewer: runs, reward curves per environment, a filterable rollout table, per-token views."""
    from pathlib import Path

    from gymrl.traces.viewer import serve as serve_viewer

    if not Path(runs_dir).is_dir():
        raise typer.BadParameter(f"no folder '{runs_dir}'", param_hint="--runs-dir")
    serve_viewer(Path(runs_dir), host, port)


RUNS_DIR = typer.Option(Path("runs"), "--runs-dir", help="Folder whose subfolders are runs; RUN may be a name there.")
RUN = typer.Argument(..., help="A run folder (with a traces.db), or a run's name under --runs-dir.")
STEP = typer.Option(None, help="Only this step (evaluations: the step they ran after; 0 = before training).")
ENV = typer.Option(None, "--env", help="Only this environment.")
SPLIT = typer.Option(None, help="Only train or eval rollouts.")


@contextmanager
def _user_errors(*more: type[Exception]):
    """A mistake the user can fix (a missing run, an unknown env or rollout) is one line and exit code 2."""
    try:
        yield
    except KeyError as err:  # the store's "no rollout N", without KeyError's quotes
        fail(ValueError(err.args[0] if err.args else err))
    except USER_ERRORS + (sqlite3.DatabaseError,) + more as err:
        fail(err)


@contextmanager
def _open(run: str, runs_dir: Path):
    with _user_errors():
        reader = TraceReader(query.resolve_run(run, runs_dir) / TRACE_FILE)
    try:
        yield reader
    finally:
        reader.close()


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def _report(title: str, columns: list[str], rows: list[list], summary: str = "") -> None:
    """A table (model text in ``Text`` cells, never read as markup), then a one-line summary."""
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    if summary:
        console.print(summary, highlight=False)


def _short(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


@traces_app.command("list")
def list_runs(runs_dir: Path = RUNS_DIR) -> None:
    """Runs with a trace store: rollouts, steps, environments, last write, code revision."""
    with _user_errors():
        if not runs_dir.is_dir():
            raise FileNotFoundError(f"no folder '{runs_dir}'")
        runs = query.list_runs(runs_dir)
    if not runs:
        Console().print(f"no runs with a {TRACE_FILE} under {runs_dir}", highlight=False)
        return
    _report(f"runs in {runs_dir}", ["run", "rollouts", "steps", "envs", "last write", "git revision"],
            [[r.name, f"{r.rollouts:,}", str(r.steps), ", ".join(r.envs), _when(r.last_write), r.git_revision[:12]]
             for r in runs])


def render_rollout(r: TraceRecord) -> Panel:
    """A rollout as a terminal panel: prompt, every turn with its tool calls and results, the verdict.
    Model text goes into ``Text`` objects, never through rich's markup."""
    styles = {"system": "magenta", "user": "cyan", "assistant": "green", "tool": "yellow"}
    parts: list = []
    for m in r.prompt + r.turns:
        role = m["role"] if m["role"] != "tool" else f"tool result ({m.get('name', '?')})"
        line = Text(f"{role}: ", style=f"bold {styles.get(m['role'], 'white')}")
        line.append(m.get("content") or "")
        parts.append(line)
        for call in m.get("tool_calls") or []:
            parts.append(Text("  -> call ", style="bold yellow") + Text(f"{call['name']}({call['arguments']})"))
    verdict = Text(f"reward {r.reward:.3f}", style="bold green" if r.reward >= 0.5 else "bold red")
    verdict.append(f"  {r.reason}")
    if r.breakdown:
        verdict.append("  [" + ", ".join(f"{k}={v:g}" for k, v in r.breakdown.items()) + "]")
    parts.append(verdict)
    title = (f"#{r.id}  {r.env} / {r.task_id}  {r.split} step {r.step}  sample {r.sample}  {r.finish_reason}  "
             f"{sum(r.mask)} tokens, {r.num_turns} turn(s), {r.num_tool_calls} tool call(s)  policy v{r.policy_version}")
    return Panel(Group(*parts), title=Text(title), title_align="left")


@traces_app.command()
def show(
    run: str = RUN,
    step: int | None = STEP,
    env: str | None = ENV,
    split: str | None = SPLIT,
    min_reward: float | None = typer.Option(None, help="Only rollouts with at least this reward."),
    max_reward: float | None = typer.Option(None, help="Only rollouts with at most this reward."),
    task: str | None = typer.Option(None, help="Only this task id."),
    text: str | None = typer.Option(None, help="Only responses containing this text."),
    order: str = typer.Option("id", help="Sort column (id, step, reward, completion_tokens, ...); -column descends."),
    limit: int = typer.Option(5, help="Rollouts shown."),
    offset: int = typer.Option(0, help="Rollouts skipped first."),
    id_: int | None = typer.Option(None, "--id", help="Show this one rollout (the filters are ignored)."),
    runs_dir: Path = RUNS_DIR,
) -> None:
    """Rollouts in full in the terminal: prompt, turns, tool calls and results, reward, reason, breakdown."""
    console = Console()
    with _open(run, runs_dir) as reader, _user_errors():
        if id_ is not None:
            console.print(render_rollout(reader.rollout(id_)))
            return
        f = TraceFilter(split=split, env=env, step=step, task_id=task, min_reward=min_reward,
                        max_reward=max_reward, text=text)
        rows = reader.page(f, offset, limit, order)
        total = reader.count(f)
        for row in rows:
            console.print(render_rollout(reader.rollout(row["id"])))
    shown = f"{offset + 1}-{offset + len(rows)}" if rows else "none"
    console.print(f"{total:,} rollouts match; shown: {shown} (order {order})", highlight=False)


@traces_app.command()
def stats(run: str = RUN, env: str | None = ENV, split: str | None = SPLIT, runs_dir: Path = RUNS_DIR) -> None:
    """Per environment and step (train and eval): reward, length, turns, tool calls, finish reasons, staleness.

    Staleness: optimizer steps between the weights that sampled a rollout and the weights it trained or
    was evaluated with (0 in the sync loop)."""
    with _open(run, runs_dir) as reader:
        rows = query.step_stats(reader, TraceFilter(split=split, env=env))
    _report(f"{run}: per step", ["split", "env", "step", "rollouts", "reward", "length", "turns", "tool calls",
                                 "finish reasons", "staleness"],
            [[s.split, s.env, str(s.step), str(s.rollouts), f"{s.reward_mean:.3f}", f"{s.completion_tokens_mean:.1f}",
              f"{s.turns_mean:.2f}", f"{s.tool_calls_mean:.2f}",
              ", ".join(f"{k} {v}" for k, v in sorted(s.finish_reasons.items(), key=lambda kv: -kv[1])),
              f"{s.staleness_mean:.1f} (max {s.staleness_max})"] for s in rows])


@traces_app.command()
def diff(
    run: str = RUN,
    step_a: int = typer.Argument(..., help="The earlier step."),
    step_b: int = typer.Argument(..., help="The later step."),
    env: str | None = ENV,
    split: str = typer.Option("eval", help="eval (the same held-out tasks at every evaluation) or train."),
    limit: int = typer.Option(20, help="Tasks listed."),
    runs_dir: Path = RUNS_DIR,
) -> None:
    """How the answers to the same tasks changed between two steps; tasks that flipped come first."""
    with _open(run, runs_dir) as reader, _user_errors():
        d = query.diff_steps(reader, step_a, step_b, split, env)
        if not d.tasks:
            raise ValueError(f"no {split} task has rollouts at both step {step_a} and step {step_b}"
                             + (" (try --split train)" if split == "eval" else ""))
    _report(f"{run}: {split} step {step_a} -> {step_b}",
            ["env", "task", f"reward @{step_a}", f"reward @{step_b}", "change", f"answer @{step_a}", f"answer @{step_b}"],
            [[t.env, t.task_id, f"{t.reward_a:.2f}", f"{t.reward_b:.2f}", ("flipped " if t.flipped else "") + f"{t.delta:+.2f}",
              Text(_short(t.response_a, 50)), Text(_short(t.response_b, 50))] for t in d.tasks[:limit]],
            f"{len(d.tasks)} tasks at both steps: mean reward {d.mean_a:.3f} -> {d.mean_b:.3f}; "
            f"improved {d.improved}, worsened {d.worsened}, flipped {d.flipped}")


@traces_app.command()
def rescore(
    run: str = RUN,
    env: str = typer.Option(..., "--env", help="The environment whose rollouts are rescored by its current server."),
    limit: int | None = typer.Option(None, help="Rescore at most this many rollouts (in id order)."),
    step: int | None = STEP,
    split: str | None = SPLIT,
    examples: int = typer.Option(10, help="Rollouts listed in the table (changed ones first)."),
    runs_dir: Path = RUNS_DIR,
) -> None:
    """Score the stored answers again with the environment's current server and report what changed.

    Each rollout's assistant turns are replayed (their tool calls run again), then /verify scores the
    episode. The store is only read."""
    from gymrl.envs.client import EnvServerError

    with _open(run, runs_dir) as reader, _user_errors(EnvServerError):
        with Console(stderr=True).status(f"starting the {env} server and rescoring..."):
            report = query.rescore(reader, env, TraceFilter(step=step, split=split), limit)
    listed = sorted(report.items, key=lambda r: not r.changed)[:examples]  # stable: changed first, in id order
    _report(f"{run}: {env} rescored (changed first)",
            ["id", "step", "task", "old", "new", "old reason", "new reason", "response"],
            [[str(r.id), f"{r.split} {r.step}", r.task_id, f"{r.old_reward:.2f}", f"{r.new_reward:.2f}",
              Text(_short(r.old_reason, 40)), Text(_short(r.new_reason, 40)), Text(_short(r.response, 40))] for r in listed],
            f"rescored {len(report.items)} rollouts of {env}: mean reward {report.mean_old:.3f} -> "
            f"{report.mean_new:.3f}; changed {len(report.changed)} (up {report.up}, down {report.down})")


@traces_app.command()
def export(
    run: str = RUN,
    out: Path = typer.Option(..., "--out", help="The JSONL file, or the folder of the saved dataset."),
    format_: str = typer.Option("jsonl", "--format", help="jsonl (one rollout a line) or datasets (save_to_disk)."),
    step: int | None = STEP,
    env: str | None = ENV,
    split: str | None = SPLIT,
    runs_dir: Path = RUNS_DIR,
) -> None:
    """Export rollouts (turns, reward, reason, breakdown, tokens, logprobs) to JSONL or a datasets dataset."""
    with _user_errors():
        if format_ not in ("jsonl", "datasets"):
            raise ValueError(f"--format must be jsonl or datasets, got '{format_}'")
    with _open(run, runs_dir) as reader, _user_errors():
        n = query.export(reader, out, format_, TraceFilter(split=split, env=env, step=step))
    Console().print(f"wrote {n:,} rollouts to {out}", highlight=False)
