"""NeMo Gym's own environments, as NeMo Gym ships them: a resources server under ``resources_servers/<name>/``
of the installed nemo-gym (in ``.venv-gym``), its config YAML (``configs/<name>.yaml``: the resources server with
its options, an agent entry with its ``datasets``), and data files (``data/example.jsonl`` and the recorded
``data/example_rollouts.jsonl``).

This module reads those files from the harness side (it does not import nemo_gym, which lives in the other
venv): the server's package and options for :class:`~gymrl.envs.launcher.EnvServer`, and the datasets.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gymrl.envs.gymnasium import AGENT as GYMNASIUM_AGENT
from gymrl.envs.launcher import DEFAULT_GYM_PYTHON


class NemoGymConfigError(ValueError):
    """A NeMo Gym config or dataset gymrl cannot use; the message names the file and what is missing."""


def gym_root(gym_python: Path = DEFAULT_GYM_PYTHON) -> Path:
    """The folder holding the installed nemo-gym's ``resources_servers/`` (NeMo Gym's repository root, where
    its configs' ``jsonl_fpath`` are relative to and its servers run)."""
    venv = Path(gym_python).parent.parent
    found = sorted(venv.glob("lib/python3.*/site-packages/resources_servers"))
    if not found:
        raise NemoGymConfigError(f"no NeMo Gym resources_servers/ in {venv}: run `make setup` (it creates .venv-gym)")
    return found[-1].parent


def shipped(gym_python: Path = DEFAULT_GYM_PYTHON) -> list[str]:
    """Names of the resources servers the installed nemo-gym ships."""
    servers = gym_root(gym_python) / "resources_servers"
    return sorted(p.name for p in servers.iterdir() if (p / "app.py").is_file())


@dataclass(frozen=True)
class Dataset:
    name: str
    type: str  # train | validation | example
    path: Path


@dataclass(frozen=True)
class NemoGymServer:
    """One resources server of a NeMo Gym config: what gymrl needs to start it and to read its tasks."""

    name: str  # the server's instance name in the config (NeMo Gym's ``config.name``)
    module: str  # the package whose app.py holds the server, e.g. resources_servers.mcqa
    options: dict[str, Any]  # the server config's own keys, as the YAML gives them
    config_path: Path
    root: Path  # NeMo Gym's root: the servers run there, and dataset paths are relative to it
    datasets: list[Dataset] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)  # the NeMo Gym agents its config plays it with (simple_agent, ...)
    max_steps: int | None = None  # its agent's limit of model calls per episode (simple_agent's where the config
    # sets one; gymnasium_agent's, 10 unless set)

    @property
    def gymnasium(self) -> bool:
        """Played by NeMo Gym's gymnasium_agent (/reset and /step), not simple_agent (tools, then /verify)."""
        return GYMNASIUM_AGENT in self.agents and "simple_agent" not in self.agents

    @property
    def folder(self) -> Path:
        return self.root / Path(*self.module.split("."))

    def dataset(self, kind: str) -> Dataset | None:
        """The first dataset of that type (train, validation, example) whose file exists here."""
        return next((d for d in self.datasets if d.type == kind and d.path.is_file()), None)

    def needs_servers(self) -> list[str]:
        """Other NeMo Gym servers its options point at (an LLM judge's model server, say): gymrl does not start
        them, so the routes that use them need an external service."""
        found = []

        def walk(value: Any) -> None:
            if isinstance(value, dict):
                if value.get("type") in ("responses_api_models", "resources_servers", "responses_api_agents") and "name" in value:
                    found.append(f"{value['type']}/{value['name']}")
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)

        walk(self.options)
        return found

    def global_settings(self) -> list[str]:
        """Its options that NeMo Gym's global config (env.yaml, ng_run's command line) must give: a ``${name}`` or
        ``${oc.select:name,...}`` of a key outside the server's entry (a judge's URL, an API key, a file). gymrl
        reads no such config, so they stay unset (an ``${oc.env:NAME,default}`` resolves: it is not one of them)."""
        return [f"{key}={value}" for key, value in self.options.items()
                if isinstance(value, str) and re.search(r"\$\{(?!oc\.env:)", value)]


def _config_file(name_or_path: str | Path, root: Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise NemoGymConfigError(f"NeMo Gym config '{path}' does not exist")
        return path
    folder = root / "resources_servers" / str(name_or_path)
    if not (folder / "app.py").is_file():
        raise NemoGymConfigError(f"'{name_or_path}' is neither a NeMo Gym config YAML nor a resources server the "
                                 f"installed nemo-gym ships (`gymrl envs list` lists them)")
    own = folder / "configs" / f"{folder.name}.yaml"
    if own.is_file():
        return own
    configs = sorted((folder / "configs").glob("*.yaml"))
    if not configs:
        raise NemoGymConfigError(f"resources server '{name_or_path}' ships no config YAML in {folder / 'configs'}")
    return configs[0]


def load_server(name_or_path: str | Path, gym_python: Path = DEFAULT_GYM_PYTHON) -> NemoGymServer:
    """The resources server of a NeMo Gym config YAML (a path), or of the config a shipped server of that name
    comes with; its datasets are those of the agent entries that use it."""
    root = gym_root(gym_python)
    path = _config_file(name_or_path, root)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise NemoGymConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(doc, dict):
        raise NemoGymConfigError(f"{path}: not a NeMo Gym config (a mapping of server instances)")
    servers = [(instance, folder, entry) for instance, body in doc.items() if isinstance(body, dict)
               for folder, entry in (body.get("resources_servers") or {}).items()]
    if not servers:
        raise NemoGymConfigError(f"{path}: no resources server (an entry with a 'resources_servers:' key)")
    instance, folder, entry = servers[0]
    if not (root / "resources_servers" / folder / "app.py").is_file():
        raise NemoGymConfigError(f"{path}: resources server '{folder}' is not in the installed nemo-gym ({root})")
    datasets, agents, max_steps = [], [], None
    for body in doc.values():
        for kind, agent in (body.get("responses_api_agents") or {}).items() if isinstance(body, dict) else []:
            if not isinstance(agent, dict) or (agent.get("resources_server") or {}).get("name") != instance:
                continue
            agents.append(kind)
            if kind == "simple_agent" and isinstance(agent.get("max_steps"), int) and max_steps is None:
                max_steps = agent["max_steps"]
            if kind == GYMNASIUM_AGENT and max_steps is None:
                max_steps = agent["max_steps"] if isinstance(agent.get("max_steps"), int) else 10
            for d in agent.get("datasets") or []:
                if isinstance(d, dict) and d.get("jsonl_fpath"):
                    p = Path(d["jsonl_fpath"])
                    datasets.append(Dataset(str(d.get("name", p.stem)), str(d.get("type", "train")),
                                            p if p.is_absolute() else root / p))
    # serve.py imports the package's app.py; an entry served from another file of it (aviary's gsm8k_app.py) names it
    options = {k: v for k, v in (entry or {}).items() if k != "entrypoint" or v != "app.py"}
    return NemoGymServer(instance, f"resources_servers.{folder}", options, path, root, datasets, agents, max_steps)
