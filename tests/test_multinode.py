"""Multi-node Ray: engine.ray_resources and train.ray_resources place the engines and the trainer ranks on the nodes
that have those custom resources, and the run records where each ran (summary.json's ``placement``).

The slow test starts a real two-node Ray cluster on this host (a head, and a second raylet that joins it), each node
with a custom resource of its own, and runs ``gymrl train --set ray_address=...`` against it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gymrl.config import ConfigError, load_config
from gymrl.envs.launcher import free_port
from gymrl.resources import resource_problems
from gymrl.rollout.pool import actor_resources

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
RAY = Path(sys.executable).parent / "ray"


def test_ray_resources_reach_the_engine_actor_and_are_checked(tmp_path):
    cfg = load_config(DEMO_CONFIG, {"run_dir": str(tmp_path), "engine.ray_resources": {"rollout_node": 1}})
    assert actor_resources(cfg.engine) == {"num_cpus": 1.0, "num_gpus": 0, "resources": {"rollout_node": 1.0}}
    # A local Ray has no custom resources: the engines would wait forever, so the run is refused before it starts.
    assert resource_problems(cfg)[0].startswith("engine.ray_resources={'rollout_node': 1.0} asks for custom Ray")
    assert resource_problems(cfg.model_copy(update={"ray_address": "10.0.0.1:6379"})) == []


@pytest.mark.parametrize("overrides, message", [
    ({"engine.ray_resources": {"GPU": 1}}, "engine.ray_resources: 'GPU' is Ray's own resource"),
    ({"train.workers": 2, "train.ray_resources": {"trainer_node": 0}},
     "train.ray_resources: the amount of 'trainer_node' must be > 0"),
    ({"train.ray_resources": {"trainer_node": 1}}, "train.ray_resources places the sharded trainer's ranks"),
])
def test_bad_ray_resources_are_refused_by_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO_CONFIG, {"run_dir": str(tmp_path), **overrides})


class TwoNodeCluster:
    """A Ray head and a second raylet joined to it, both on this host, each with its own temp dir, ports and custom
    resource. ``ray start --block`` stays in the foreground; stopping it stops that node's processes."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray 2.60 turns token authentication on for `ray start --head`; the joining raylet and the driver need it too
        # (the token: ~/.ray/auth_token, written by the head when missing).
        self.env = os.environ | {"RAY_AUTH_MODE": "token"}
        self.procs: list[subprocess.Popen] = []

    def start_node(self, name: str, resources: dict, num_cpus: int, *head: str) -> None:
        log = (self.root / f"{name}.log").open("w")
        ports = [f"--{key}={free_port()}" for key in (
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port")]
        proc = subprocess.Popen(
            [str(RAY), "start", *head, "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
             f"--resources={json.dumps(resources)}", f"--temp-dir={self.root / name}", "--disable-usage-stats", *ports],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 120
        while "block forever" not in (self.root / f"{name}.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n{(self.root / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def start(self) -> None:
        self.start_node("head", {"gymrl_engine_node": 1}, 2, "--head", f"--port={self.port}",
                        "--include-dashboard=false", f"--ray-client-server-port={free_port()}")
        self.start_node("worker", {"gymrl_trainer_node": 2}, 1, f"--address={self.address}")
        self.node_ids = self.nodes_by_resource()

    def nodes_by_resource(self) -> dict[str, str]:
        """{custom resource: id of the alive node that has it}, as the cluster's GCS tells a driver (in a child
        process: this one may hold the test session's own Ray)."""
        script = ("import json, ray; ray.init(address='%s', logging_level='ERROR'); "
                  "print(json.dumps({k: n['NodeID'] for n in ray.nodes() if n['Alive'] for k in n['Resources']}))")
        done = subprocess.run([sys.executable, "-c", script % self.address], env=self.env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """SIGTERM to each `ray start --block` (it stops its node's processes), then SIGKILL to the process group of
        any that does not exit; the worker node first."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def two_nodes():
    root = Path(tempfile.mkdtemp(prefix="gmn-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = TwoNodeCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_engines_and_trainer_ranks_run_on_the_nodes_their_resources_name(two_nodes, tmp_path):
    run_dir = tmp_path / "run"
    sets = {"ray_address": two_nodes.address, "run_dir": str(run_dir), "model.cache_dir": str(ROOT / ".cache/models"),
            "train.steps": 3, "train.workers": 2, "eval.every": 1000, "train.checkpoint_every": 0,
            "engine.ray_resources": '{gymrl_engine_node: 1}', "train.ray_resources": '{gymrl_trainer_node: 1}'}
    done = subprocess.run(
        [sys.executable, "-m", "gymrl.cli", "train", str(DEMO_CONFIG), *(f"--set={k}={v}" for k, v in sets.items())],
        cwd=ROOT, env=two_nodes.env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and not summary["interrupted"] and summary["policy_version"] == 3
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]

    placement = summary["placement"]
    engine_node, trainer_node = (two_nodes.node_ids[k] for k in ("gymrl_engine_node", "gymrl_trainer_node"))
    assert engine_node != trainer_node
    assert [e["node_id"] for e in placement["engines"]] == [engine_node]
    assert [r["node_id"] for r in placement["trainer_ranks"]] == [trainer_node] * 2
    assert placement["driver"]["hostname"] == socket.gethostname()  # the trainer of workers=1 would run there


@pytest.mark.slow
def test_a_run_without_ray_address_starts_a_ray_of_its_own(two_nodes, tmp_path):
    """With a cluster that `ray start` left running here, named by RAY_ADDRESS or not, a run without ray_address
    starts a local Ray of its own (Ray's address=None would attach to the running one, then refuse num_cpus)."""
    script = """if True:
        import os, sys, ray
        from gymrl.config import load_config
        from gymrl.session import init_ray
        cfg = load_config(sys.argv[1], {"run_dir": sys.argv[2], "ray_num_cpus": 1})
        for _ in range(2):  # RAY_ADDRESS naming the running cluster, then unset
            init_ray(cfg)
            print("gcs", ray.get_runtime_context().gcs_address, ray.cluster_resources().get("gymrl_engine_node", 0))
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
    """
    done = subprocess.run([sys.executable, "-c", script, str(DEMO_CONFIG), str(tmp_path)], cwd=ROOT, text=True,
                          env=two_nodes.env | {"RAY_ADDRESS": two_nodes.address}, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (f"no ray_address: starting a local Ray cluster of its own; set ray_address to join a running one "
            f"(RAY_ADDRESS={two_nodes.address} is not used)") in done.stderr
    runs = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("gcs ")]
    assert len(runs) == 2
    for address, engine_nodes in runs:
        assert address.rsplit(":", 1)[1] != str(two_nodes.port) and engine_nodes == "0"  # not the running cluster
