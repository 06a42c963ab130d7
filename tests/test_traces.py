"""The trace store: every field round-trips, filters and pages select what they say, a killed writer
loses nothing it committed, a torn WAL tail is skipped with a warning, a resumed run cuts the store and
the metrics back to its checkpoint; the run's PNG plots."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from gymrl.traces.store import TRACE_FILE, TraceFilter, TraceReader, TraceRecord, TraceWriter, run_metadata

ROOT = Path(__file__).resolve().parents[1]


def record(**fields) -> TraceRecord:
    """A two-turn tool-use rollout; logprobs are exact in float32, so the round trip compares equal."""
    base = dict(
        step=3, split="train", env="tool_use", task_id="t1", sample=2, reward=0.75, reason="3/4 right",
        finish_reason="stop", policy_version=2, engine_id=1,
        prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3+5?"}],
        turns=[{"role": "assistant", "content": "<tool_call>...</tool_call>",
                "tool_calls": [{"name": "calculator", "arguments": '{"expression": "3+5"}'}]},
               {"role": "tool", "content": "8", "tool_call_id": "c0", "name": "calculator"},
               {"role": "assistant", "content": "<answer>8</answer>"}],
        response="<answer>8</answer>", prompt_ids=[5, 6, 7], completion_ids=[10, 11, 12, 13, 14],
        mask=[1, 1, 0, 1, 1], logprobs=[-0.5, -0.25, 0.0, -1.5, -0.125], versions=[2, 2, 2, 2, 2],
        breakdown={"cells_good": 3.0, "cells_total": 4.0}, timings={"generate": 0.5, "tools": 0.01, "verify": 0.02},
        spec_acceptance=0.5, spec_mean_accepted=1.75,
    )
    return TraceRecord(**(base | fields))


@pytest.fixture
def store(tmp_path):
    path = tmp_path / TRACE_FILE
    writer = TraceWriter(path, run_metadata({"envs": [{"name": "tool_use", "args": {}}]}))
    yield path, writer
    writer.close()


def test_round_trip_keeps_every_field(store):
    path, writer = store
    written = record()
    writer.add_task("tool_use", "t1", {"id": "t1", "expected": 8})
    rid = writer.write(written)
    reader = TraceReader(path)
    got = reader.rollout(rid)
    assert got.id == rid and got.created > 0
    assert got == TraceRecord(**(vars(written) | {"id": rid, "created": got.created}))
    assert (got.num_turns, got.num_tool_calls) == (2, 1)
    (summary,) = reader.page()
    assert summary["completion_tokens"] == 4 and summary["num_turns"] == 2 and summary["num_tool_calls"] == 1
    assert summary["response"] == "<answer>8</answer>" and "turns" not in summary
    assert reader.task_row("tool_use", "t1") == {"id": "t1", "expected": 8}
    with pytest.raises(KeyError, match="task 'nope'"):
        reader.task_row("tool_use", "nope")
    with pytest.raises(KeyError, match="no rollout 99"):
        reader.rollout(99)
    # Speculative decoding off: the columns are NULL, not 0.
    plain = reader.rollout(writer.write(record(spec_acceptance=None, spec_mean_accepted=None)))
    assert plain.spec_acceptance is None and plain.spec_mean_accepted is None
    reader.close()


def test_metadata_says_which_run_made_the_traces(store):
    path, _ = store
    meta = TraceReader(path).metadata()
    assert meta["config"] == {"envs": [{"name": "tool_use", "args": {}}]}
    assert len(meta["git_revision"]) == 40 or meta["git_revision"] == "unknown"
    assert {"torch", "ray"} <= set(meta["versions"]) and meta["started"] > 0


def test_write_batch_stores_the_loop_s_rollouts_and_task_rows(store):
    from gymrl.envs.base import Task
    from gymrl.rollout.runner import Rollout, RolloutBatch

    path, writer = store
    tasks = [Task("a", "arithmetic", [{"role": "user", "content": "1+1?"}], {"id": "a", "expected": 2}),
             Task("b", "arithmetic", [{"role": "user", "content": "2+2?"}], {"id": "b", "expected": 4})]
    rollouts = [Rollout(t.id, t.env, [1, 2], [3, 4, 5], [1, 1, 1], [-0.5, -0.5, -0.5], f"<answer>{k}</answer>",
                        "stop", float(k == 0), "r", 4, engine_id=k, breakdown={"x": 1.0},
                        turns=[{"role": "assistant", "content": f"<answer>{k}</answer>"}])
                for t in tasks for k in range(2)]
    writer.write_batch(RolloutBatch(rollouts, 2, 1.5, 0.25, 0.0), tasks, step=5, split="train")
    reader = TraceReader(path)
    rows = reader.page()
    assert [(r["task_id"], r["sample"], r["step"], r["engine_id"]) for r in rows] == [
        ("a", 0, 5, 0), ("a", 1, 5, 1), ("b", 0, 5, 0), ("b", 1, 5, 1)]
    full = reader.rollout(rows[1]["id"])
    assert full.prompt == tasks[0].messages and full.versions == [4, 4, 4] and full.policy_version == 4
    assert full.timings == {"generate": 1.5, "tools": 0.0, "verify": 0.25} and full.breakdown == {"x": 1.0}
    assert reader.task_row("arithmetic", "b") == {"id": "b", "expected": 4}
    assert reader.envs() == ["arithmetic"]


@pytest.fixture
def many(store):
    """24 rollouts: steps 0-3, envs a/b, tasks t0-t2, rewards 0/0.5/1, finish stop or length."""
    path, writer = store
    for i in range(24):
        writer.write(record(step=i // 6, env="ab"[i % 2], task_id=f"t{i % 3}", reward=[0.0, 0.5, 1.0][i % 3],
                            split="eval" if i // 6 == 0 else "train", finish_reason="length" if i % 4 == 0 else "stop",
                            response=f"answer {i}"))
    return TraceReader(path)


@pytest.mark.parametrize("f, want", [
    (TraceFilter(), range(1, 25)),
    (TraceFilter(split="eval"), range(1, 7)),
    (TraceFilter(env="b"), range(2, 25, 2)),
    (TraceFilter(step=2), range(13, 19)),
    (TraceFilter(min_step=1, max_step=2), range(7, 19)),
    (TraceFilter(task_id="t1"), range(2, 25, 3)),
    (TraceFilter(min_reward=0.5), [i + 1 for i in range(24) if i % 3]),
    (TraceFilter(max_reward=0.5), [i + 1 for i in range(24) if i % 3 < 2]),
    (TraceFilter(finish_reason="length"), range(1, 25, 4)),
    (TraceFilter(text="answer 1"), [2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]),
    (TraceFilter(env="a", step=3, min_reward=0.5), [21, 23]),
])
def test_each_filter_selects_its_rollouts(many, f, want):
    assert [r["id"] for r in many.page(f, limit=100)] == list(want)
    assert many.count(f) == len(want)


def test_pages_and_order(many):
    assert [r["id"] for r in many.page(offset=5, limit=3)] == [6, 7, 8]
    by_reward = many.page(order="-reward", limit=100)
    assert [r["reward"] for r in by_reward] == sorted((r["reward"] for r in by_reward), reverse=True)
    assert [r["id"] for r in by_reward[:8]] == [3, 6, 9, 12, 15, 18, 21, 24]  # ties in id order
    assert [r["id"] for r in many.page(order="-step", limit=2)] == [19, 20]
    assert many.page(offset=100) == []


@pytest.mark.parametrize("order", ["prompt", "reward; DROP TABLE rollouts", "", "-"])
def test_a_bad_order_column_is_a_value_error(many, order):
    with pytest.raises(ValueError, match="cannot order by"):
        many.page(order=order)
    assert many.count() == 24


def test_a_missing_store_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace store"):
        TraceReader(tmp_path / "nope" / TRACE_FILE)
    assert not (tmp_path / "nope").exists()


WRITER = textwrap.dedent("""
    import sys
    from gymrl.traces.store import TraceRecord, TraceWriter

    heavy = [m for m in ("torch", "ray", "vllm", "transformers") if m in sys.modules]
    assert not heavy, heavy
    writer = TraceWriter(sys.argv[1], {"config": {}})
    writer.add_task("e", "t", {"id": "t"})
    i = 0
    while True:
        n = 50 + i % 100
        rid = writer.write(TraceRecord(
            step=i // 64, split="train", env="e", task_id="t", sample=i, reward=i % 2, reason=f"r{i}",
            finish_reason="stop", policy_version=0, engine_id=0, prompt=[{"role": "user", "content": "q" * 200}],
            turns=[{"role": "assistant", "content": f"a{i}" * n}], response=f"a{i}" * n, prompt_ids=list(range(40)),
            completion_ids=list(range(n)), mask=[1] * n, logprobs=[-1.0] * n, versions=[0] * n,
            breakdown={"i": i}, timings={}))
        print(rid, i, flush=True)
        i += 1
""")


def test_a_killed_writer_loses_nothing_it_committed(tmp_path):
    """A separate process (the store needs nothing heavy) writes as fast as it can and prints each id
    once its transaction committed; SIGKILL lands mid-stream, usually inside a write."""
    path = tmp_path / TRACE_FILE
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    printed = []
    try:
        for line in proc.stdout:
            printed.append(tuple(map(int, line.split())))
            if len(printed) == 300:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # Not communicate(timeout=...): it reads the pipe's fd directly and would miss the lines that the
        # loop above already buffered.
        rest = proc.stdout.read()
    printed += [tuple(map(int, line.split())) for line in rest.splitlines() if line.strip()]
    assert proc.returncode == -signal.SIGKILL and len(printed) >= 300
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn tail is expected here; its own test checks the warning
        reader = TraceReader(path)
    for rid, i in printed:
        r = reader.rollout(rid)
        n = 50 + i % 100
        assert (r.sample, r.reason, r.breakdown, r.response) == (i, f"r{i}", {"i": i}, f"a{i}" * n)
        assert r.completion_ids == list(range(n)) and r.logprobs == [-1.0] * n
    # At most the rollout in flight at the kill is past the last printed id, and nothing is half there.
    assert reader.count() in (len(printed), len(printed) + 1)
    assert reader.conn.execute("SELECT count(*) FROM tokens").fetchone()[0] == reader.count()
    assert reader.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_torn_wal_tail_is_skipped_with_a_warning(store, tmp_path):
    path, writer = store
    ids = [writer.write(record(task_id=f"t{i}")) for i in range(5)]
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 32  # the writer is open: nothing is checkpointed yet
    copy = tmp_path / "copy" / TRACE_FILE
    copy.parent.mkdir()
    shutil.copy(path, copy)
    shutil.copy(wal, f"{copy}-wal")
    os.truncate(f"{copy}-wal", wal.stat().st_size - 7)  # the last frame (the last commit) is cut short
    with pytest.warns(UserWarning, match="torn tail of .* bytes"):
        reader = TraceReader(copy)
    assert reader.count() == 4
    assert [reader.rollout(i).task_id for i in ids[:4]] == ["t0", "t1", "t2", "t3"]
    with pytest.raises(KeyError):
        reader.rollout(ids[4])
    reader.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact store opens without a warning
        TraceReader(path).close()


def test_reward_and_length_plots_per_environment(tmp_path):
    from gymrl.train.metrics import plot_lengths, plot_rewards

    rows = [{"step": 0, "eval_reward": 0.1, "eval_reward/a": 0.0, "eval_reward/b": 0.2}]
    rows += [{"step": s, "reward_mean": s / 10, "reward/a": s / 20, "reward/b": s / 10, "mean_completion_length": 20 - s,
              "completion_length/a": 10 + s, "completion_length/b": 30 - s} for s in range(1, 11)]
    rows.append({"step": 10, "eval_reward": 0.9, "eval_reward/a": 0.8, "eval_reward/b": 1.0})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_rewards(metrics, tmp_path / "reward_curve.png")
    plot_lengths(metrics, tmp_path / "length_curve.png")
    for name in ("reward_curve.png", "length_curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / name).stat().st_size > 1000


def test_a_resumed_run_sets_aside_what_came_after_its_checkpoint(store):
    path, writer = store
    assert writer.offset() == 0
    for step in (1, 1, 2):
        writer.write(record(step=step))
    offset = writer.offset()  # the checkpoint is taken here
    writer.write(record(step=3))
    writer.write(record(step=3))  # the interrupted run got this far
    assert writer.set_aside(offset) == 2 and offset == 3
    assert writer.write(record(step=3, sample=5)) == 6  # the resumed run makes step 3 again
    reader = TraceReader(path)
    assert [(r["step"], r["sample"]) for r in reader.page(TraceFilter(split="train"))] == [(1, 2), (1, 2), (2, 2), (3, 5)]
    kept = reader.page(TraceFilter(split="interrupted-train"))  # nothing the interrupted run made is lost
    assert [(r["id"], r["step"]) for r in kept] == [(4, 3), (5, 3)]
    assert reader.rollout(4).completion_ids == reader.rollout(6).completion_ids == [10, 11, 12, 13, 14]
    reader.close()
    assert writer.set_aside(offset) == 1  # a second resume from the same checkpoint: only the new row moves
    with pytest.warns(UserWarning, match="ends at rollout 6, before the checkpoint's 9"):
        assert writer.set_aside(9) == 0


def test_a_resumed_run_truncates_the_metrics_to_its_checkpoint(tmp_path):
    from gymrl.train.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1})
    offset = log.offset()  # the checkpoint is taken here
    log.write({"step": 2})
    with path.open("a") as f:
        f.write('{"step": 3, "los')  # killed mid-line
    log = MetricsLog(path, resume_at=offset)
    log.write({"step": 2, "resumed": True})
    assert read_metrics(path) == [{"step": 1}, {"step": 2, "resumed": True}]
    with pytest.raises(ValueError, match=f"cannot resume '{path}' at byte 999: it has only"):
        MetricsLog(path, resume_at=999)
    assert MetricsLog(path).offset() == 0  # a new run starts an empty file
