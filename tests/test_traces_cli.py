"""``gymrl traces`` on a store written with TraceWriter: list, show, stats, diff, export, and rescore
against the arithmetic environment's real server."""

import json

import pytest
from typer.testing import CliRunner

from gymrl.cli import app
from gymrl.traces.store import TRACE_FILE, TraceFilter, TraceReader, TraceRecord, TraceWriter, run_metadata

ENV = {"COLUMNS": "250", "NO_COLOR": "1"}  # wide enough that no table cell wraps


def invoke(*args: str):
    return CliRunner().invoke(app, ["traces", *map(str, args)], env=ENV)


def table_rows(output: str) -> list[list[str]]:
    """The body cells of the rich tables in ``output``."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")]
            for line in output.splitlines() if line.startswith("│")]


def record(step, split, env, task_id, sample, reward, response, **fields) -> TraceRecord:
    base = dict(
        step=step, split=split, env=env, task_id=task_id, sample=sample, reward=reward, reason=f"reason {task_id}",
        finish_reason="stop", policy_version=step - (split == "train"), engine_id=0,
        prompt=[{"role": "user", "content": f"question {task_id}"}],
        turns=[{"role": "assistant", "content": response}], response=response, prompt_ids=[1, 2],
        completion_ids=list(range(10 + step)), mask=[1] * (10 + step), logprobs=[-0.5] * (10 + step),
        versions=[0] * (10 + step), breakdown={}, timings={"generate": 0.1},
    )
    return TraceRecord(**(base | fields))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/demo: eval at steps 0 and 2 (tasks e1 flips to right, e2 stays wrong, e3 goes wrong), train at
    steps 1 and 2 for two environments, one tool-use episode, and a response with rich markup in it."""
    runs = tmp_path_factory.mktemp("runs")
    writer = TraceWriter(runs / "demo" / TRACE_FILE, run_metadata({"envs": [{"name": "arithmetic", "args": {}}]}))
    for step, rewards in [(0, (0.0, 0.0, 1.0)), (2, (1.0, 0.0, 0.0))]:
        for task, reward in zip(("e1", "e2", "e3"), rewards):
            writer.write(record(step, "eval", "arithmetic", task, 0, reward, f"<answer>{task} at {step}</answer>"))
    for step in (1, 2):
        for sample in range(4):
            writer.write(record(step, "train", "arithmetic", "t1", sample, sample / 4, f"try {sample}"))
            writer.write(record(step, "train", "sudoku", "s1", sample, 1.0, "grid", finish_reason="length",
                                breakdown={"cells_good": 4.0, "cells_total": 4.0}))
    writer.write(record(2, "train", "tool_use", "k1", 0, 1.0, "<answer>8</answer>", turns=[
        {"role": "assistant", "content": "let me call", "tool_calls": [{"name": "calculator", "arguments": '{"expression": "3+5"}'}]},
        {"role": "tool", "content": "8", "tool_call_id": "c0", "name": "calculator"},
        {"role": "assistant", "content": "<answer>8</answer>"}]))
    writer.write(record(2, "train", "tool_use", "k2", 0, 0.0, "[bold red]not markup[/] <script>x</script>"))
    writer.close()
    (runs / "not_a_run").mkdir()
    return runs


def test_list_shows_each_run(runs):
    result = invoke("list", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    (row,) = table_rows(result.output)
    assert row[:4] == ["demo", "24", "2", "arithmetic, sudoku, tool_use"]
    assert row[4].startswith("20") and row[5]  # the last write's time, the git revision


def test_show_filters_and_renders_turns(runs):
    result = invoke("show", "demo", "--runs-dir", runs, "--env", "sudoku", "--step", "2", "--limit", "2")
    assert result.exit_code == 0, result.output
    assert result.output.count("sudoku / s1") == 2 and "arithmetic" not in result.output
    assert "[cells_good=4, cells_total=4]" in result.output and "4 rollouts match; shown: 1-2" in result.output

    result = invoke("show", runs / "demo", "--split", "eval", "--max-reward", "0.5", "--order", "-step")
    assert "<answer>e1 at 2</answer>" not in result.output and "<answer>e3 at 2</answer>" in result.output
    assert "4 rollouts match" in result.output

    result = invoke("show", runs / "demo" / TRACE_FILE, "--task", "k1")
    assert "-> call calculator" in result.output and '{"expression": "3+5"}' in result.output
    assert "tool result (calculator): 8" in result.output and "reward 1.000" in result.output


def test_show_prints_model_text_literally(runs):
    reader = TraceReader(runs / "demo" / TRACE_FILE)
    (row,) = reader.page(TraceFilter(task_id="k2"))
    reader.close()
    result = invoke("show", "demo", "--runs-dir", runs, "--id", row["id"])
    assert result.exit_code == 0 and "[bold red]not markup[/] <script>x</script>" in result.output


@pytest.mark.parametrize("args, message", [
    (("show", "nope"), "no run 'nope'"),
    (("show", "demo", "--id", "999"), "no rollout 999"),
    (("show", "demo", "--order", "prompt"), "cannot order by 'prompt'"),
    (("stats", "not_a_run"), "no run 'not_a_run'"),
    (("diff", "demo", "1", "2"), "no eval task has rollouts at both step 1 and step 2 (try --split train)"),
    (("rescore", "demo", "--env", "sudoku"), "env 'sudoku' is not in this run's config (its envs: arithmetic)"),
    (("export", "demo", "--out", "x", "--format", "csv"), "--format must be jsonl or datasets"),
])
def test_user_errors_are_one_line_and_exit_code_2(runs, args, message):
    result = invoke(*args, "--runs-dir", runs)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_list_of_a_missing_folder_is_a_user_error(tmp_path):
    result = invoke("list", "--runs-dir", tmp_path / "nowhere")
    assert result.exit_code == 2 and "no folder" in result.output


def test_stats_per_env_and_step(runs):
    result = invoke("stats", "demo", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    rows = {tuple(row[:3]): row[3:] for row in table_rows(result.output)}
    assert len(rows) == 2 + 4 + 1  # eval: 2 steps; train: 2 steps x 2 envs, and tool_use once
    assert rows[("train", "arithmetic", "1")][:3] == ["4", "0.375", "11.0"]
    assert rows[("train", "tool_use", "2")][:5] == ["2", "0.500", "12.0", "1.50", "0.50"]
    assert rows[("eval", "arithmetic", "2")][:2] == ["3", "0.333"]
    assert rows[("train", "sudoku", "2")][5] == "length 4" and rows[("train", "tool_use", "2")][5] == "stop 2"
    # The sync loop's rollouts are never stale: train rollouts of step N come from version N-1.
    assert {r[6] for r in rows.values()} == {"0.0 (max 0)"}


def test_diff_lists_flipped_tasks_first(runs):
    result = invoke("diff", "demo", "0", "2", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    assert [r[1] for r in rows] == ["e1", "e3", "e2"]
    assert [r[2:5] for r in rows] == [["0.00", "1.00", "flipped +1.00"], ["1.00", "0.00", "flipped -1.00"],
                                      ["0.00", "0.00", "+0.00"]]
    assert "<answer>e1 at 0</answer>" in result.output and "<answer>e1 at 2</answer>" in result.output
    assert "3 tasks at both steps: mean reward 0.333 -> 0.333; improved 1, worsened 1, flipped 2" in result.output
    train = invoke("diff", "demo", "1", "2", "--split", "train", "--env", "arithmetic", "--runs-dir", runs)
    assert "1 tasks at both steps: mean reward 0.375 -> 0.375" in train.output


def test_export_jsonl_and_datasets(runs, tmp_path):
    result = invoke("export", "demo", "--runs-dir", runs, "--out", tmp_path / "out.jsonl", "--env", "tool_use")
    assert result.exit_code == 0 and "wrote 2 rollouts" in result.output
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in lines] == ["k1", "k2"]
    assert lines[0]["turns"][0]["tool_calls"][0]["name"] == "calculator" and lines[0]["reward"] == 1.0
    assert lines[0]["completion_ids"] == list(range(12)) and lines[0]["logprobs"] == [-0.5] * 12

    import datasets

    result = invoke("export", "demo", "--runs-dir", runs, "--out", tmp_path / "ds", "--format", "datasets")
    assert result.exit_code == 0 and "wrote 24 rollouts" in result.output
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert len(ds) == 24 and {"prompt", "turns", "reward", "reason", "breakdown", "completion_ids", "mask"} <= set(ds.column_names)
    assert ds[0]["prompt"] == [{"role": "user", "content": "question e1"}]


def test_rescore_against_the_real_arithmetic_server(tmp_path):
    """Stored rewards deliberately wrong for some rollouts: rescoring with the current verifier finds
    exactly those, in the right direction."""
    from gymrl.envs.registry import load_environment

    tasks = load_environment("arithmetic").tasks("eval")[:4]
    writer = TraceWriter(tmp_path / "r" / TRACE_FILE, run_metadata({"envs": [{"name": "arithmetic", "args": {}}]}))
    cases = [  # (answer is right, stored reward)
        (True, 1.0), (True, 0.0), (False, 1.0), (False, 0.0)]
    for task, (right, stored) in zip(tasks, cases):
        writer.add_task("arithmetic", task.id, task.row)
        answer = task.row["expected"] + (0 if right else 1)
        writer.write(record(1, "train", "arithmetic", task.id, 0, stored, f"<think>{task.id}</think><answer>{answer}</answer>",
                            prompt=task.messages))
    writer.close()
    result = invoke("rescore", tmp_path / "r", "--env", "arithmetic")
    assert result.exit_code == 0, result.output
    assert "rescored 4 rollouts of arithmetic: mean reward 0.500 -> 0.500; changed 2 (up 1, down 1)" in result.output
    rows = table_rows(result.output)
    assert [(r[0], r[3], r[4]) for r in rows] == [("2", "0.00", "1.00"), ("3", "1.00", "0.00"),  # changed first
                                                 ("1", "1.00", "1.00"), ("4", "0.00", "0.00")]
    assert rows[0][6] == "correct" and "expected" in rows[1][6]  # the current verifier's reasons
