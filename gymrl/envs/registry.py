"""Find environment plugins: packages ``environments/<name>/`` with a ``Tasks`` class and an ``app.py``."""

import importlib
from pathlib import Path

import environments
from gymrl.envs.base import Environment

ENV_ROOT = Path(environments.__file__).parent


def available() -> list[str]:
    return sorted(p.name for p in ENV_ROOT.iterdir() if (p / "__init__.py").is_file() and (p / "app.py").is_file())


def load_environment(name: str, args: dict | None = None) -> Environment:
    if name not in available():
        raise ValueError(f"unknown environment '{name}'; available: {', '.join(available())}")
    module = importlib.import_module(f"environments.{name}")
    try:
        tasks = module.Tasks(**(args or {}))
    except TypeError as err:
        raise ValueError(f"environment '{name}': bad env.args: {err}") from None
    return Environment(name, tasks)
