"""An evaluation's numbers per environment: mean reward, pass@1 and pass@k, each with a 95% interval.

A sample passes when its reward is full (>= 1.0; partial credit is in the mean reward). pass@k is the
unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1),
``1 - C(n - c, k) / C(n, k)`` per task with n samples of which c pass, averaged over tasks. The intervals
are percentile bootstraps over tasks (2,000 resamples, seeded): tasks are the unit that varies, and a
bootstrap needs no normality of per-task scores that are often all 0 or 1.
"""

import json
import random
import statistics
from dataclasses import asdict, dataclass
from math import comb
from pathlib import Path

from gymrl.rollout.runner import Rollout

RESAMPLES = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn from n (c of them passing) passes."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def bootstrap_ci(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values``."""
    if len(set(values)) <= 1:
        return (values[0], values[0]) if values else (0.0, 0.0)
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(RESAMPLES))
    return means[int(0.025 * RESAMPLES)], means[int(0.975 * RESAMPLES) - 1]


@dataclass
class EnvReport:
    env: str
    tasks: int
    samples: int  # per task: k of pass@k
    mean_reward: float
    mean_reward_ci: tuple[float, float]
    pass_at_1: float
    pass_at_1_ci: tuple[float, float]
    pass_at_k: float
    pass_at_k_ci: tuple[float, float]


def summarize(rollouts: list[Rollout], samples: int) -> list[EnvReport]:
    """One report per environment, from rollouts grouped by task (``samples`` consecutive ones each)."""
    by_env: dict[str, list[list[Rollout]]] = {}
    for start in range(0, len(rollouts), samples):
        group = rollouts[start:start + samples]
        by_env.setdefault(group[0].env, []).append(group)
    reports = []
    for env, groups in by_env.items():
        reward = [statistics.fmean(r.reward for r in g) for g in groups]
        passed = [sum(r.reward >= 1.0 for r in g) for g in groups]
        at_1 = [pass_at_k(samples, c, 1) for c in passed]
        at_k = [pass_at_k(samples, c, samples) for c in passed]
        reports.append(EnvReport(env, len(groups), samples, statistics.fmean(reward), bootstrap_ci(reward),
                                 statistics.fmean(at_1), bootstrap_ci(at_1), statistics.fmean(at_k),
                                 bootstrap_ci(at_k)))
    return reports


def render_markdown(reports: list[EnvReport], source: str) -> str:
    k = reports[0].samples if reports else 1
    at_k = f" pass@{k} (95% CI) |" if k > 1 else ""  # with one sample pass@k is pass@1
    lines = [f"# Evaluation of {source}", "",
             f"| env | tasks | samples | mean reward (95% CI) | pass@1 (95% CI) |{at_k}",
             "| --- | ---: | ---: | --- | --- |" + (" --- |" if k > 1 else "")]
    for r in reports:
        shown = [(r.mean_reward, r.mean_reward_ci), (r.pass_at_1, r.pass_at_1_ci)]
        shown += [(r.pass_at_k, r.pass_at_k_ci)] if k > 1 else []
        cells = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, (lo, hi) in shown]
        lines.append(f"| {r.env} | {r.tasks} | {r.samples} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, reports: list[EnvReport], source: str, settings: dict) -> Path:
    """``report.json`` (the numbers and what produced them) and ``report.md`` in ``run_dir``."""
    (run_dir / "report.json").write_text(json.dumps(
        {"source": source, "settings": settings, "envs": [asdict(r) for r in reports]}, indent=2))
    (run_dir / "report.md").write_text(render_markdown(reports, source))
    return run_dir / "report.json"
