"""Find environment plugins: a package ``environments.<name>`` with a ``load(**args)`` function."""

import importlib
import pkgutil

import environments
from gymrl.envs.base import Environment


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(environments.__path__) if m.ispkg)


def load_environment(name: str, args: dict | None = None) -> Environment:
    if name not in available():
        raise ValueError(f"unknown environment '{name}'; available: {', '.join(available())}")
    module = importlib.import_module(f"environments.{name}")
    try:
        return module.load(**(args or {}))
    except TypeError as err:
        raise ValueError(f"environment '{name}': bad env.args: {err}") from None
