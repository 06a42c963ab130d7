"""User-facing errors: the exceptions a user can fix from the message alone, and how a command shows one.

Both command-line apps (``gymrl.cli`` and ``gymrl.traces.cli``) import this module; neither imports the other's."""

import typer
from rich.console import Console

from gymrl.config import ConfigError

# Shown as one line, without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError, ValueError)

console = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width


def fail(err: Exception) -> None:
    """Print ``err`` as one line on stderr and exit with code 2."""
    console.print(f"[bold red]error:[/] {err}", highlight=False)
    raise typer.Exit(2)
