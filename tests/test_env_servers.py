"""Environment servers for real: NeMo Gym resources servers in the gym venv, spoken to over HTTP."""

import http.server
import shutil
import socket
import threading

import pytest

from gymrl.envs.authoring import check_environment, scaffold
from gymrl.envs.client import EnvClient, EnvServerError
from gymrl.envs.launcher import EnvServer
from gymrl.envs.registry import ENV_ROOT, available, load_environment, plugin_module


@pytest.fixture(scope="module")
def arithmetic_server():
    with EnvServer("arithmetic") as server:
        yield server


def test_verify_through_the_real_server(arithmetic_server):
    env = load_environment("arithmetic")
    env.attach(EnvClient("arithmetic", arithmetic_server.url))
    task = env.tasks("eval")[0]
    expected = task.row["expected"]
    right = env.verify(task, f"<think>x</think><answer>{expected}</answer>")
    wrong = env.verify(task, f"<answer>{expected + 1}</answer>")
    assert (right.reward, right.reason) == (1.0, "correct")
    assert wrong.reward == 0.0 and f"expected {expected}" in wrong.reason
    many = env.verify_many([(task, f"<answer>{expected}</answer>")] * 20)
    assert [r.reward for r in many] == [1.0] * 20
    env.close()


def test_verify_batch_gives_the_verdicts_of_verify(arithmetic_server):
    """POST /verify_batch (gymrl's launcher adds it): one round trip, the same verdicts as one /verify each."""
    env = load_environment("arithmetic")
    env.attach(EnvClient("arithmetic", arithmetic_server.url))
    tasks = env.tasks("eval")[:6]
    pairs = [(t, f"<answer>{t.row['expected'] + k % 2}</answer>") for k, t in enumerate(tasks)]
    batch = env.verify_batch(pairs)
    assert [(v.reward, v.reason) for v in batch] == [(v.reward, v.reason) for v in env.verify_many(pairs)]
    assert [v.reward for v in batch] == [1.0, 0.0] * 3
    assert env.verify_batch([]) == []
    env.close()


def test_verify_batch_falls_back_where_the_server_has_no_route():
    """A server whose verify reads its session (tool_use) gets no /verify_batch: verify_batch says so (None),
    once, and the runner verifies one rollout a request."""
    env = load_environment("tool_use")
    task = env.tasks("eval")[0]
    with EnvServer("tool_use") as server:
        env.attach(EnvClient("tool_use", server.url))
        assert env.verify_batch([(task, "<answer>1</answer>")]) is None
        assert env._batch_verify is False
        env.close()


def test_reward_breakdown_arrives_through_the_real_server():
    env = load_environment("sudoku", {"partial_credit": True})
    task = env.tasks("eval")[0]
    blanks = float(task.row["puzzle"].count("0"))
    cells = list(task.row["solution"])
    cells[task.row["puzzle"].index("0")] = "0"  # one blank cell left empty: the others are good
    grid = ["".join(cells[i : i + 4]) for i in range(0, 16, 4)]
    with EnvServer("sudoku") as server:
        env.attach(EnvClient("sudoku", server.url))
        solved = env.verify(task, env.gold_response(task))
        partial = env.verify(task, "<answer>" + "\n".join(grid) + "</answer>")
        env.close()
    assert solved.breakdown == {"cells_good": blanks, "cells_total": blanks}
    assert partial.breakdown == {"cells_good": blanks - 1, "cells_total": blanks}
    assert partial.reward == (blanks - 1) / blanks


def test_malformed_request_is_a_clear_error_not_a_retry(arithmetic_server):
    client = EnvClient("arithmetic", arithmetic_server.url)
    with pytest.raises(EnvServerError, match=r"/verify: 422"):
        client.post("/verify", {"response": {}})
    client.close()


def test_check_environment_passes_for_arithmetic():
    report = check_environment("arithmetic", max_tasks=5)
    assert report.ok, report.failures
    assert report.gold_checked == 10 and report.bad_checked == 30


def test_scaffolded_environment_passes_its_own_check():
    name = "scaffold_probe_env"
    shutil.rmtree(ENV_ROOT / name, ignore_errors=True)
    try:
        path = scaffold(name)
        assert (path / "app.py").is_file() and (path / "configs" / f"{name}.yaml").is_file()
        author_lines = sum(len(p.read_text().splitlines()) for p in (path / "__init__.py", path / "app.py"))
        assert author_lines <= 45  # "about 30 lines" of the author's own code, docstrings included
        report = check_environment(name)
        assert report.ok, report.failures
        with pytest.raises(FileExistsError):
            scaffold(name)
    finally:
        shutil.rmtree(ENV_ROOT / name, ignore_errors=True)


def test_dead_server_gives_a_clear_error():
    server = EnvServer("arithmetic").start()
    client = EnvClient("arithmetic", server.url, retries=2)
    assert client.healthy()
    server.stop()
    assert not server.alive()
    with pytest.raises(EnvServerError, match=r"failed after 3 tries: ConnectError"):
        client.verify({"responses_create_params": {"input": "x"}}, "y")


def test_server_that_never_answers_times_out():
    with socket.socket() as listener:  # accepts connections (backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        client = EnvClient("slow", f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=0.3, retries=1)
        with pytest.raises(EnvServerError, match=r"slow.*failed after 2 tries: ReadTimeout"):
            client.post("/verify", {})


def test_server_answering_garbage_is_retried_then_reported():
    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x00not json")

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = EnvClient("garbage", f"http://127.0.0.1:{httpd.server_port}", retries=1)
        with pytest.raises(EnvServerError, match="garbage.*failed after 2 tries"):
            client.post("/verify", {})
    finally:
        httpd.shutdown()


def test_server_that_cannot_start_reports_its_log():
    with pytest.raises(ValueError, match="unknown environment 'no_such_env'; available: .*arithmetic"):
        EnvServer("no_such_env")
    with pytest.raises(EnvServerError, match=r"(?s)exited with code 1 .*No module named 'environments.no_such_env'"):
        EnvServer("no_such_env", module="environments.no_such_env").start(timeout_s=30)


def test_missing_gym_venv_is_a_clear_error(tmp_path):
    with pytest.raises(EnvServerError, match="NeMo Gym venv not found"):
        EnvServer("arithmetic", gym_python=tmp_path / "python").start()


def test_env_bench_writes_results(tmp_path):
    import json

    from gymrl.bench.envs import run_env_bench

    run_env_bench(tmp_path, verify_calls=20)
    results = json.loads((tmp_path / "envs.json").read_text())
    assert set(results["verify_round_trip_ms"]) >= {"arithmetic", "code", "math", "sudoku"}
    assert any(k.startswith("tool_use (episode") for k in results["verify_round_trip_ms"])
    assert all(v > 0 for v in results["reward_checks_per_s"].values())
    assert results["sandboxed_code_runs_per_s"]["value"] > 0
    for latency in results["verify_round_trip_ms"].values():
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]


def test_installed_plugin_is_found_by_its_entry_point(tmp_path, monkeypatch):
    """A plugin installed as a package (here: a dist-info with an entry point on sys.path, as pip
    writes it) is listed, loaded and served from the NeMo Gym venv with its import root on the path."""
    site = tmp_path / "site"
    (site / "my_envs").mkdir(parents=True)
    (site / "my_envs" / "__init__.py").write_text("")
    scaffold("reverse_words", root=site / "my_envs")
    dist = site / "my_envs-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-envs\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gymrl.environments]\nreverse_words = my_envs.reverse_words\n")
    monkeypatch.syspath_prepend(str(site))

    assert "reverse_words" in available() and "arithmetic" in available()
    assert plugin_module("reverse_words") == "my_envs.reverse_words"
    assert len(load_environment("reverse_words").tasks("train")) == 8
    report = check_environment("reverse_words", max_tasks=5)
    assert report.ok, report.failures
