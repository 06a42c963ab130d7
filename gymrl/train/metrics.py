"""Run metrics: one JSON line per step, flushed as written (a crash keeps every finished step)."""

import json
import os
from pathlib import Path


class MetricsLog:
    """metrics.jsonl, and the same numbers as TensorBoard scalars when ``tensorboard_dir`` is given.
    ``resume_at``: keep the file up to this byte offset (an :meth:`offset` saved with a checkpoint) and
    append after it, so the rows an interrupted run wrote after its checkpoint are not duplicated (and
    TensorBoard's events after that step are purged); None starts an empty file."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resume_at: int | None = None,
                 resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=purge)
        if resume_at is None:
            self.path.write_text("")
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        if resume_at > size:  # every row is fsynced when written: the file was replaced or cut since
            raise ValueError(f"cannot resume '{self.path}' at byte {resume_at}: it has only {size} bytes")
        os.truncate(self.path, resume_at)

    def offset(self) -> int:
        """Bytes written so far (all of them on disk): where a resumed run picks up."""
        return self.path.stat().st_size

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows written so far; a torn last line (a run killed mid-write, or one being written) is skipped."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            rows.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _envs(rows: list[dict], prefix: str) -> list[str]:
    return sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith(prefix + "/")})


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return ([p[0] for p in points], [p[1] for p in points])


def finish_step_plot(plt, fig, ax, out: Path, ylabel: str, bottom: float) -> None:
    """Label a per-step plot's axes, add its grid and legend, and write it to ``out``."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=bottom)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_rewards(metrics_path: Path, out: Path) -> None:
    """Training reward per step and held-out greedy reward at each evaluation, as a PNG; with several
    environments, one more panel per environment with its own two curves."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    envs = sorted(set(_envs(rows, "reward")) | set(_envs(rows, "eval_reward")))
    panels = [("all environments", "reward_mean", "eval_reward")]
    if len(envs) > 1:
        panels += [(env, f"reward/{env}", f"eval_reward/{env}") for env in envs]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 if len(panels) == 1 else 4.5 * len(panels), 4), squeeze=False)
    for ax, (title, train_key, eval_key) in zip(axes[0], panels):
        ax.plot(*_series(rows, train_key), label="train reward (sampled)", alpha=0.7)
        ax.plot(*_series(rows, eval_key), "o-", label="held-out reward (greedy)", markersize=4)
        ax.set_title(title if len(panels) > 1 else "reward")
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_lengths(metrics_path: Path, out: Path) -> None:
    """Mean completion length (the model's tokens) per training step, and per environment when there
    are several, as a PNG."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    envs = _envs(rows, "completion_length")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(rows, "mean_completion_length"), label="all environments" if len(envs) > 1 else "mean")
    for env in envs if len(envs) > 1 else []:
        ax.plot(*_series(rows, f"completion_length/{env}"), label=env, alpha=0.8)
    finish_step_plot(plt, fig, ax, out, "completion tokens (mean)", 0)


ACCEPTED_LENGTH = "mean accepted length (tokens per verify step)"


def plot_acceptance(metrics_path: Path, out: Path) -> bool:
    """Speculative decoding's mean accepted length (tokens per verify step) over the steps, on the training
    rollouts (per environment when there are several) and on the greedy held-out evaluations, as a PNG. False
    (nothing written) when the run had no drafts."""
    rows = read_metrics(metrics_path)
    if not any("spec_mean_accepted_length" in r for r in rows):
        return False
    plt = _pyplot()
    envs = _envs(rows, "spec_mean_accepted_length")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(rows, "spec_mean_accepted_length"), label="train rollouts (sampled)", alpha=0.8)
    for env in envs if len(envs) > 1 else []:
        ax.plot(*_series(rows, f"spec_mean_accepted_length/{env}"), label=env, alpha=0.6)
    ax.plot(*_series(rows, "eval_spec_mean_accepted_length"), "o-", label="held-out (greedy)", markersize=4)
    finish_step_plot(plt, fig, ax, out, ACCEPTED_LENGTH, 1)
    return True
