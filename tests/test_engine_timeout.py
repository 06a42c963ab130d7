"""``rollout.timeout_s``: a generation that outlasts it is cancelled and raised as an EngineError that names the
key, and the pool's load count is given back (the next call is balanced as before). The engine stand-in is a real
Ray actor whose generate never returns, as a hung vLLM step would not."""

import time
from pathlib import Path

import pytest
import ray

from gymrl.config import SamplingConfig, load_config
from gymrl.rollout.engine import EngineError, EnginePool
from gymrl.session import init_ray

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@ray.remote(num_cpus=0)
class StuckEngine:
    def generate(self, prompts, n, sampling, seeds):
        time.sleep(120)


@pytest.fixture(scope="module")
def stuck():
    init_ray(load_config(DEMO_CONFIG))  # as the engine tests start Ray: whichever runs first, the same cluster
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
