"""A rank of the sharded trainer (train.workers=2, gloo) SIGKILLed during a step, or during the gathering of the
weights (a push's or a checkpoint's): the call raises TrainerRankError naming the rank within a bound, instead of the other rank waiting in its collective until the
collective timeout; no rank actor is left alive, and the checkpoint written before the kill is intact."""

import os
import signal
import threading
import time

import pytest
from test_sharded_trainer import engineless_session, hand_made_batch

pytestmark = pytest.mark.slow  # two FSDP ranks on Ray


@pytest.mark.parametrize("during", ["step", "gather"])
def test_a_rank_killed_mid_call_stops_the_run_with_its_error(demo_cfg, demo_model, tmp_path, during):
    import ray

    from gymrl.session import init_ray
    from gymrl.train.checkpoint import SHARDS, list_checkpoints
    from gymrl.train.sharded import ShardedTrainer, TrainerRankError

    cfg = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update={
        "workers": 2, "micro_batch_size": 1, "dtype": "float32"})})  # one sequence a pass: a step of many passes
    init_ray(cfg)
    trainer = ShardedTrainer(engineless_session(cfg, demo_model))
    try:
        batch = hand_made_batch(trainer.policy.config.vocab_size, groups=4)
        trainer.step(batch)
        trainer.save_checkpoint(tmp_path, 1, {"policy_version": trainer.version}, keep=2)
        pids = [ray.get(rank.__ray_call__.remote(lambda self: os.getpid())) for rank in trainer.ranks]
        killed = []

        def kill():
            killed.append(time.monotonic())
            os.kill(pids[1], signal.SIGKILL)

        call = (lambda: trainer.step(batch)) if during == "step" else trainer.gather
        what = r"step \d+" if during == "step" else r"the gathering of the weights after step \d+"
        timer = threading.Timer(0.3, kill)  # into the first call below (or, on a slow machine, a later one)
        started = time.monotonic()
        timer.start()
        with pytest.raises(TrainerRankError, match=rf"trainer rank 1 of 2 died during {what}; every rank was "
                                                   r"stopped \(ActorDiedError: ") as error:
            for calls in range(1, 100):  # noqa: B007 (printed below)
                call()
        raised = time.monotonic()
        timer.join()
        assert raised - killed[0] < 60, f"the error came {raised - killed[0]:.1f} s after the kill"
        print(f"\nkilled {killed[0] - started:.2f} s into {during} call 1; call {calls} raised "
              f"{raised - killed[0]:.2f} s after the kill: {error.value}")
        for rank in trainer.ranks:  # rank 0 too: killed, not left waiting in its collective
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(rank.__ray_ready__.remote(), timeout=60)
    finally:
        trainer.close()
    [(step, folder)] = list_checkpoints(tmp_path)  # the one written before the kill, whole
    assert step == 1 and (folder / SHARDS).is_dir() and (folder / "policy" / "config.json").is_file()


def test_a_rank_that_hangs_alive_fails_the_step_after_the_collective_timeout(demo_cfg, demo_model):
    """Rank 1 alive but stuck (here: busy with a long call before the step reaches it): rank 0 waits in the step's
    first collective only train.collective_timeout_s, then the step fails naming it, and every rank is stopped."""
    from gymrl.session import init_ray
    from gymrl.train.sharded import ShardedTrainer, TrainerRankError

    cfg = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update={
        "workers": 2, "dtype": "float32", "collective_timeout_s": 5.0})})
    init_ray(cfg)
    trainer = ShardedTrainer(engineless_session(cfg, demo_model))
    try:
        batch = hand_made_batch(trainer.policy.config.vocab_size)
        trainer.ranks[1].__ray_call__.remote(lambda self: time.sleep(120))  # runs before rank 1's step
        started = time.monotonic()
        with pytest.raises(TrainerRankError, match=r"trainer rank 0 of 2 failed during step 1; every rank was stopped"):
            trainer.step(batch)
        assert time.monotonic() - started < 60  # the 5 s timeout, not rank 1's 120 s
    finally:
        trainer.close()
