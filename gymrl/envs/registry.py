"""Find environment plugins: a folder convention for this repository, entry points for installed packages.

A plugin is a package with a ``Tasks`` class (``__init__.py``) and an ``app.py`` holding its NeMo Gym
resources server. gymrl finds
- every ``environments/<name>/`` of this repository that has both files, and
- every entry point in the group ``gymrl.environments`` of an installed distribution, its value the
  plugin package's import path, e.g. in a plugin's ``pyproject.toml``::

      [project.entry-points."gymrl.environments"]
      reverse = "my_envs.reverse"

The server of an installed plugin runs in the NeMo Gym venv with the plugin's import root on its
``PYTHONPATH``, so the package needs to be installed in the harness venv only (its own dependencies
must exist in both).
"""

import dataclasses
import importlib
import importlib.util
from importlib.metadata import entry_points
from pathlib import Path

import environments
from gymrl.envs.base import Environment

ENV_ROOT = Path(environments.__file__).parent
ENTRY_POINT_GROUP = "gymrl.environments"


def plugin_modules() -> dict[str, str]:
    """Environment name -> import path of its plugin package; the repository's folders win a clash."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found |= {
        p.name: f"environments.{p.name}"
        for p in ENV_ROOT.iterdir()
        if (p / "__init__.py").is_file() and (p / "app.py").is_file()
    }
    return dict(sorted(found.items()))


def available() -> list[str]:
    return list(plugin_modules())


def plugin_module(name: str) -> str:
    modules = plugin_modules()
    if name not in modules:
        raise ValueError(f"unknown environment '{name}'; available: {', '.join(modules)}")
    return modules[name]


def import_root(module: str) -> Path:
    """The folder to put on ``sys.path`` for ``module`` to import (for the server's venv)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"plugin package '{module}' cannot be imported")
    root = Path(spec.origin).parent  # the package folder
    for _ in module.split("."):
        root = root.parent
    return root


def make_tasks(name: str, cls: type, args: dict) -> object:
    """``cls(**args)``, each option checked against the dataclass's field types first (pydantic's lax mode:
    ``"9"`` for an int is 9, a list for a tuple is a tuple); an unknown option or a bad value is a ValueError
    naming ``envs[NAME].args.KEY``."""
    if not dataclasses.is_dataclass(cls):
        try:
            return cls(**args)
        except TypeError as err:
            raise ValueError(f"envs[{name}].args: {err}") from None
    options = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in args if k not in options]
    if unknown:
        raise ValueError(f"envs[{name}].args.{unknown[0]}: unknown option of environment '{name}'; its options: "
                         f"{', '.join(options)}")
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(cls).validate_python(dict(args))
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        raise ValueError(f"envs[{name}].args{'.' + key if key else ''}: {e['msg']} (got {e.get('input')!r})") from None


def load_environment(name: str, args: dict | None = None) -> Environment:
    module = importlib.import_module(plugin_module(name))
    return Environment(name, make_tasks(name, module.Tasks, args or {}))
