"""Shared fixtures. The expensive one, a real vLLM engine on a real Ray actor with the demo's tiny
model, is started once per test session and reset to the initial weights by ``fresh_session``."""

import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The shared engine session: a test that needs it (directly or through another fixture) is ``slow``, as are the
# ``engine`` tests; ``pytest -m "not slow"`` leaves them out while developing (CI runs everything).
SLOW_FIXTURES = {"session", "reset_session", "fresh_session"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) or item.get_closest_marker("engine"):
            item.add_marker(pytest.mark.slow)
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_cfg(tmp_path_factory):
    from gymrl.config import load_config

    return load_config(
        DEMO_CONFIG,
        {"run_dir": str(tmp_path_factory.mktemp("run")), "model.cache_dir": str(ROOT / ".cache" / "models")},
    )


@pytest.fixture(scope="session")
def demo_model(demo_cfg):
    """The demo's tiny model on disk (built once, cached under .cache/models), for tests that read it."""
    from gymrl.envs.registry import load_environment
    from gymrl.session import resolve_model_path

    envs = [load_environment(e.name, e.args) for e in demo_cfg.envs]
    return resolve_model_path(demo_cfg.model, envs, [e.weight for e in demo_cfg.envs])


@pytest.fixture(scope="session")
def session(demo_cfg):
    import ray

    from gymrl.session import start_session

    s = start_session(demo_cfg)
    initial = {k: v.detach().clone() for k, v in s.policy.state_dict().items()}
    s.initial_state = initial
    yield s
    s.close()
    ray.shutdown()


@pytest.fixture(scope="session")
def reset_session(session):
    """A function that puts the trainer and the engines back on the initial weights (version 0)."""
    from gymrl.rollout.weight_sync import pack_state_dict

    def reset():
        session.policy.load_state_dict(session.initial_state)
        session.pool.push_weights(pack_state_dict(session.policy.state_dict()), 0)
        return session

    return reset


@pytest.fixture
def fresh_session(reset_session):
    """The shared session, reset to the initial weights."""
    return reset_session()


@pytest.fixture
def hang_guard():
    """A sandbox that fails to kill its program would hang the suite; fail the test instead."""

    def hung(signum, frame):
        raise TimeoutError("the test hung: the sandbox did not stop its program")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
