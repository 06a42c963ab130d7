"""What several suites measure with: the config's model and prompts for the suites that drive engines of their
own (spec, pool), and a GRPO run from given weights for the suites that compare runs (async, vs-trl)."""

from pathlib import Path


def model_and_prompts(cfg) -> tuple[Path, object, list[list[int]]]:
    """The config's model (built if it is a tiny one), the trainer's policy, and the first env's first
    ``prompts_per_step`` train prompts as token ids: what the engine-only suites measure with."""
    from gymrl.envs.sources import open_environments
    from gymrl.models.checkpoint import load_policy
    from gymrl.rollout.runner import encode_prompt
    from gymrl.session import resolve_model_path

    envs = list(open_environments(cfg).values())
    path = resolve_model_path(cfg.model, envs, [e.weight for e in cfg.envs])
    policy, tokenizer = load_policy(path)
    tasks = envs[0].tasks("train")[: cfg.train.prompts_per_step]
    return path, policy, [encode_prompt(tokenizer, t, cfg.rollout.chat_template_kwargs) for t in tasks]


def train_from(session, initial: dict, cfg, run_dir: Path, steps: int, max_staleness: int,
               sleep: bool = False) -> tuple[dict, list[dict]]:
    """Train ``steps`` steps of ``cfg`` from the weights ``initial`` (trainer and engines reset to them, version
    0), evaluating after the last; the run's summary and its step metrics. ``sleep``: the engines sleep through
    each trainer step (engine.sleep_while_training; they must have started with it)."""
    from gymrl.rollout.weight_sync import pack_policy
    from gymrl.train.loop import train
    from gymrl.train.metrics import read_metrics

    session.policy.load_state_dict(initial)
    session.pool.push_weights(pack_policy(session.policy), 0)
    session.cfg = cfg.model_copy(update={
        "run_dir": run_dir,
        "train": cfg.train.model_copy(update={"steps": steps, "max_staleness": max_staleness, "tensorboard": False,
                                              "checkpoint_every": 0}),
        "engine": cfg.engine.model_copy(update={"sleep_while_training": sleep}),
        "eval": cfg.eval.model_copy(update={"every": steps})})
    try:
        summary = train(session)
    finally:
        session.cfg = cfg
    return summary, [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]
