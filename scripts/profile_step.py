"""Time (and, under py-spy, profile) gymrl GRPO steps on one config: ``python scripts/profile_step.py CONFIG
[--steps N] [--staleness K] [--out DIR]``. Prints each step's phases from metrics.jsonl.

Profile with py-spy (every process: the trainer, Ray's workers, the vLLM engine core and worker, the env server):
``py-spy record --subprocesses --format raw -o /tmp/prof.txt -- python scripts/profile_step.py configs/bench_small.yaml``
"""

import argparse
import json
import time
from pathlib import Path

KEYS = ("step_seconds", "generate_seconds", "train_seconds", "push_seconds", "wait_seconds", "verify_seconds",
        "logprob_gap", "completion_tokens", "engine_tokens_per_s/0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gymrl_profile_step"))
    a = parser.parse_args()
    from gymrl.config import load_config
    from gymrl.session import start_session
    from gymrl.train.loop import train

    cfg = load_config(a.config)
    cfg = cfg.model_copy(update={
        "run_dir": a.out,
        "train": cfg.train.model_copy(update={"steps": a.steps, "max_staleness": a.staleness, "tensorboard": False,
                                              "checkpoint_every": 0}),
        "eval": cfg.eval.model_copy(update={"every": a.steps})})
    started = time.perf_counter()
    session = start_session(cfg)
    print(f"session up in {time.perf_counter() - started:.1f} s", flush=True)
    try:
        started = time.perf_counter()
        train(session)
        print(f"{a.steps} steps in {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        session.close()
    for line in (a.out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "reward_mean" in r:
            print(r["step"], " ".join(f"{k.split('/')[0]}={r[k]:.3f}" for k in KEYS if k in r), flush=True)


if __name__ == "__main__":
    main()
