"""The training progress bar: step, sampled reward, held-out reward, tokens/s."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, steps: int, console: Console):
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task("train", total=steps, stats="")

    def __enter__(self) -> "TrainProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, record: dict, eval_reward: float) -> None:
        stats = (
            f"reward {record['reward_mean']:.3f}  eval {eval_reward:.3f}  "
            f"{record['tokens_per_second']:.0f} tok/s  loss {record['loss']:+.4f}"
        )
        self._progress.update(self._task, completed=step, stats=stats)
