"""Environment servers that die, stall or answer garbage: a supervised server comes back and the run goes on;
a broken one stops the run with a message that says why; every rollout trained on is in the traces."""

import json
import os
import signal
from collections import Counter

import pytest

from gymrl.envs.client import EnvClient, EnvServerError, EpisodeLost
from gymrl.envs.launcher import EnvServer, ServerSupervisor
from gymrl.envs.registry import load_environment
from gymrl.train.loop import train
from gymrl.train.metrics import read_metrics
from gymrl.train.producer import TooManyFailures


def failures(run_dir) -> list[dict]:
    path = run_dir / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill(server: EnvServer) -> int:
    pid = server.proc.pid
    os.killpg(pid, signal.SIGKILL)
    server.proc.wait()
    return pid


def test_a_killed_env_server_is_restarted_and_the_run_goes_on(reset_session, tmp_path, run_config, trained_per_step):
    session = reset_session()
    supervisor = session.envs["arithmetic"].client.supervisor
    before, killed = supervisor.generation, []

    def kill_after_step_1(step, record, eval_reward):
        if step == 1:  # step 2's groups are on their way: killed under them
            killed.append(kill(supervisor.server))

    with run_config(session, tmp_path, 3):
        summary = train(session, kill_after_step_1)
    assert summary["steps"] == 3 and not summary["interrupted"]
    assert supervisor.generation == before + 1 and supervisor.server.alive() and supervisor.server.proc.pid != killed[0]
    assert trained_per_step(tmp_path) == Counter({1: 128, 2: 128, 3: 128})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert sum(r.get("failed_groups", 0) for r in rows) == len(failures(tmp_path))  # every failure is logged


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    server = EnvServer("tool_use", log_dir=tmp_path_factory.mktemp("logs"))
    supervisor = ServerSupervisor(server.start(), max_restarts=1, interval_s=0.2).start()
    yield server, supervisor
    supervisor.stop()


def test_a_stateful_episode_on_a_restarted_server_is_lost_not_misscored(tool_server):
    server, supervisor = tool_server
    env = load_environment("tool_use", {})
    env.attach(EnvClient("tool_use", server.url, retries=3, supervisor=supervisor))
    task = next(t for t in env.tasks("eval") if t.row["kind"] == "kv")
    episode = env.open_episode(task)
    episode.call_tool("kv_set", {"key": task.row["target"], "value": task.row["initial_store"][task.row["source"]]})
    kill(server)
    with pytest.raises(EpisodeLost, match="restarted during the episode"):  # its store is gone with the old server
        episode.verify([])
    assert supervisor.generation == 1
    fresh = env.open_episode(task)  # a new episode runs on the new server
    source = task.row["source"]
    assert json.loads(fresh.call_tool("kv_get", {"key": source})) == {"value": task.row["initial_store"][source]}
    env.close()


def test_a_server_that_keeps_dying_is_given_up_with_its_log(tool_server):
    server, supervisor = tool_server  # its one restart was used by the test above
    kill(server)
    with pytest.raises(EnvServerError, match=r"no restart is left \(env_servers.max_restarts=1\); log: .*gymrl-env-tool_use"):
        supervisor.recover()
    with pytest.raises(EnvServerError, match="no restart is left"):  # and it stays given up
        supervisor.recover()


def test_garbage_and_slow_answers_fail_their_groups_and_the_run_goes_on(proxied_env, tmp_path, run_config, trained_per_step):
    session, proxy = proxied_env

    def faults(step, record, eval_reward):  # on the next step's /verify calls, for a while
        if step == 1:
            proxy.fault("garbage", window_s=1.0)  # bytes that are not JSON, to the first try and the retry
        elif step == 2:
            # past the client's 4 s timeout, for the first try and the retry (a group verifies in one request)
            proxy.fault("slow", window_s=10.0, delay_s=6.0)

    with run_config(session, tmp_path, 4, rollout={"max_failed_groups": 100}):  # a slow server fails many in a row
        summary = train(session, faults)
    assert summary["steps"] == 4 and trained_per_step(tmp_path) == Counter({s: 128 for s in range(1, 5)})
    reasons = [f["reason"] for f in failures(tmp_path)]
    assert any("JSONDecodeError" in r for r in reasons), reasons
    assert any("ReadTimeout" in r or "PoolTimeout" in r for r in reasons), reasons  # waited on, or for, a connection
    assert all(r.startswith("EnvServerError: env 'arithmetic' at http://127.0.0.1") for r in reasons), reasons
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert sum(r.get("failed_groups", 0) for r in rows) == len(reasons)


def test_a_server_that_only_answers_errors_stops_the_run_saying_why(proxied_env, tmp_path, run_config, trained_per_step):
    session, proxy = proxied_env

    def break_after_step_1(step, record, eval_reward):
        if step == 1:
            proxy.fault("error")

    with run_config(session, tmp_path, 3):
        with pytest.raises(TooManyFailures, match=r"8 rollout groups in a row failed \(rollout.max_failed_groups\); "
                                                  r"the last: EnvServerError: env 'arithmetic' .*HTTP 500"):
            train(session, break_after_step_1)
    assert trained_per_step(tmp_path) == Counter({1: 128})  # what was trained on is in the traces
    # The failed groups of the step that never came are logged too. The streak of 8 may hold a group whose
    # request was in flight when the fault began (a timeout or a cut answer), so the 500s are at least one.
    reasons = [f["reason"] for f in failures(tmp_path)]
    assert len(reasons) >= 8, reasons
    assert all(r.startswith("EnvServerError: env 'arithmetic' at http://127.0.0.1") for r in reasons), reasons
    assert any("HTTP 500" in r for r in reasons), reasons
