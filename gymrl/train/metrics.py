"""Run metrics: one JSON line per step, flushed as written (a crash keeps every finished step)."""

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_rewards(metrics_path: Path, out: Path) -> None:
    """Training reward per step and held-out greedy reward at each evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval_reward/")})
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train reward (sampled)", alpha=0.7)
    for key in ["eval_reward"] + (eval_keys if len(eval_keys) > 1 else []):
        points = [(r["step"], r[key]) for r in rows if key in r]
        label = "held-out reward (greedy)" if key == "eval_reward" else f"held-out {key.split('/', 1)[1]}"
        ax.plot(*zip(*points), "o-", label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
