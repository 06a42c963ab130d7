"""The arguments of ``gymrl bench`` that every suite's ``run_suite`` takes, and the session the suites that
measure a running harness start from the config."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from gymrl.config import load_config
from gymrl.errors import USER_ERRORS, console, fail


@dataclass
class BenchArgs:
    config: Path
    out: Path
    repeats: int
    large_config: Path | None
    steps: int
    _cfg: object = None

    @property
    def cfg(self):
        """The run config, loaded on first use (suites without one never load it)."""
        if self._cfg is None:
            try:
                self._cfg = load_config(self.config)
            except USER_ERRORS as err:
                fail(err)
        return self._cfg


def with_session(args: BenchArgs, measure: Callable) -> Table:
    """``measure(session)`` on a session started from the config, closed afterwards."""
    from gymrl.session import start_session

    with console.status("starting: environment, model, Ray and vLLM engine(s)..."):
        session = start_session(args.cfg)
    try:
        return measure(session)
    finally:
        session.close()
