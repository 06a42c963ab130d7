"""Engine waits that must not be silent. ``rollout.timeout_s``: a generation that outlasts it is cancelled and
raised as an EngineError that names the key, and the pool's load count is given back (the next call is balanced as
before). An engine that Ray has no room for is warned about with what it needs. The engine stand-ins are real Ray
actors: one whose generate never returns, as a hung vLLM step would not, and one Ray cannot place."""

import logging
import threading
import time
from pathlib import Path

import pytest
import ray

from gymrl.config import SamplingConfig, load_config
from gymrl.rollout.pool import EngineError, EnginePool, wait_ready
from gymrl.session import init_ray

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@ray.remote(num_cpus=0)
class StuckEngine:
    def generate(self, prompts, n, sampling, seeds):
        time.sleep(120)


@ray.remote
class UnplacedEngine:
    def ready(self):
        return {"spec_fallback": None}


@pytest.fixture(scope="module")
def cluster():
    init_ray(load_config(DEMO_CONFIG))  # as the engine tests start Ray: whichever runs first, the same cluster


@pytest.fixture(scope="module")
def stuck(cluster):
    actor = StuckEngine.remote()
    yield actor
    ray.kill(actor)


def test_a_generation_past_the_timeout_is_aborted_and_names_the_key(stuck):
    pool = EnginePool([stuck], timeout_s=1.0)
    started = time.monotonic()
    expected = r"generation on engine\(s\) \[0\] took longer than 1 s \(rollout.timeout_s\)"
    with pytest.raises(EngineError, match=expected):
        pool.generate([[1, 2, 3], [4, 5]], 2, SamplingConfig())
    assert time.monotonic() - started < 15
    assert pool._load == [0]  # the aborted sequences no longer count as in flight
    assert pool.restarts == 0  # a slow generation is not a dead engine: nothing was restarted


def test_an_engine_ray_cannot_place_is_warned_about_with_what_it_needs(cluster, caplog):
    cfg = load_config(DEMO_CONFIG, {"engine.cpus_per_engine": 64}).engine
    actor = UnplacedEngine.options(num_cpus=64).remote()  # more than this Ray has: it is never placed
    threading.Timer(5.0, ray.kill, [actor]).start()  # ends the wait, as a user's Ctrl-C would
    with caplog.at_level(logging.WARNING, logger="gymrl.rollout.pool"):
        with pytest.raises(ray.exceptions.RayActorError):
            wait_ready([actor], cfg, warn_after_s=1.0)
    (warning,) = [r.getMessage() for r in caplog.records if "not ready after" in r.getMessage()]
    assert "1 of 1 engine(s) not ready after 1 s" in warning
    assert "Each engine needs CPU 64, GPU 0" in warning and "it can never be placed" in warning
    assert "engine.cpus_per_engine" in warning and "ray_num_cpus" in warning


@ray.remote(num_cpus=0)
class BroadcastReceiver:
    """An engine's side of a broadcast: it fails at once, or waits in the collective for a sender that never comes."""

    def worker_call(self, method, payload):
        if method == "fails":
            raise RuntimeError("the receiving worker failed")
        time.sleep(120)


@pytest.mark.parametrize("failing", ["receiver", "sender"])
def test_a_broadcast_whose_one_side_fails_is_raised_at_once(cluster, failing):
    """A push by broadcast has the engines receive while the sender sends beside them (``meanwhile``): when either
    side fails, the other would wait in the collective until its timeout (5 minutes); the failure comes at once."""
    actor = BroadcastReceiver.remote()
    pool = EnginePool([actor])

    def send():
        if failing == "sender":
            raise ConnectionError("the sender's rank died")
        time.sleep(120)

    started = time.monotonic()
    try:
        with pytest.raises((ConnectionError, ray.exceptions.RayTaskError), match="sender's rank died|worker failed"):
            pool.worker_call("fails" if failing == "receiver" else "waits", meanwhile=send)
    finally:
        ray.kill(actor)
    assert time.monotonic() - started < 15
