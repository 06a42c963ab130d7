"""Where an environment comes from: a gymrl plugin (``environments/<name>``), or a NeMo Gym environment used
unchanged: a NeMo Gym config or shipped server (``nemo_gym:``), a server package plus JSONL tasks (``module:``
and ``data:``), or a running server plus JSONL tasks (``url:`` and ``data:``).

:func:`open_environment` gives the harness an :class:`~gymrl.envs.base.Environment` either way, and
:func:`server_process` the process that serves it; a NeMo Gym server's own requirements are installed the first
time it starts (a line says so, :mod:`gymrl.envs.server_deps`).
"""

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gymrl.config import EnvConfig, RunConfig
from gymrl.envs.base import Environment, ServerSpec, Split
from gymrl.envs.launcher import DEFAULT_GYM_PYTHON, REPO_ROOT, EnvServer
from gymrl.envs.nemo_gym import NemoGymConfigError, NemoGymServer, gym_root, load_server
from gymrl.envs.registry import load_environment
from gymrl.envs.server_deps import ensure_installed


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a NeMo Gym JSONL file; a row gymrl cannot play is an error naming the file and line."""
    if not path.is_file():
        raise NemoGymConfigError(f"task file '{path}' does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise NemoGymConfigError(f"{path}:{number}: not JSON ({err.msg})") from None
        params = row.get("responses_create_params") if isinstance(row, dict) else None
        if not isinstance(params, dict) or "input" not in params:
            raise NemoGymConfigError(f"{path}:{number}: a task row needs responses_create_params with an input "
                                     "(NeMo Gym's format)")
        rows.append(row)
    if not rows:
        raise NemoGymConfigError(f"task file '{path}' has no rows")
    return rows


def _prompt(row: dict[str, Any]) -> str:
    return json.dumps(row["responses_create_params"]["input"], sort_keys=True)


def _row_key(row: dict[str, Any]) -> str:
    """A row apart from its id: rows of one prompt may still be other tasks (grl_sokoban's seed is its puzzle)."""
    return json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True)


@dataclass
class JsonlTasks:
    """Task rows of NeMo Gym JSONL files, played as they are: every field of a row goes to ``/verify``.

    Held-out rows are ``eval_data``'s, or else the rows of a seeded ``eval_fraction`` of ``data``'s distinct
    prompts (one row each), whose prompts ``train`` never returns; where every row has one prompt, of its distinct
    rows (a seed apart). A tiny model's warm-up answers from a row's
    ``answer`` field (the field NeMo Gym's reasoning_gym, math and QA datasets carry): 30% right, the rest wrong
    (one more for a number, another row's answer otherwise), so that the starting policy has something to learn."""

    data: str
    eval_data: str | None = None
    eval_fraction: float = 0.1
    seed: int = 0
    warmup_correct: float = 0.3  # share of right answers in a tiny model's warm-up, as the demo's plugins have it
    digest: str = field(init=False, default="")  # of the files' bytes: a changed file is another task set

    def __post_init__(self) -> None:
        self._rows = {"all": read_rows(Path(self.data))}
        files = [Path(self.data)] + ([Path(self.eval_data)] if self.eval_data else [])
        self.digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        if self.eval_data:
            self._rows |= {"train": self._rows["all"], "eval": read_rows(Path(self.eval_data))}
            return
        rows = self._rows["all"]
        key = _prompt if len({_prompt(r) for r in rows}) > 1 else _row_key  # one prompt: the rows' other fields
        prompts = list(dict.fromkeys(key(r) for r in rows))  # distinct, in order
        if len(prompts) < 2:
            raise NemoGymConfigError(f"task file '{self.data}' has {len(prompts)} distinct prompt: a held-out split "
                                     "needs at least two (or give eval_data)")
        random.Random(self.seed).shuffle(prompts)
        held_out = set(prompts[:max(1, round(self.eval_fraction * len(prompts)))])
        first = {p: r for r in reversed(rows) if (p := key(r)) in held_out}
        self._rows |= {"train": [r for r in rows if key(r) not in held_out],
                       "eval": [r for r in rows if first.get(key(r)) is r]}

    def rows(self, split: Split) -> list[dict[str, Any]]:
        return self._rows[split]

    def _answer(self, row: dict[str, Any]) -> str:
        if "answer" not in row:
            raise ValueError(f"task rows of '{self.data}' have no 'answer' field, which a tiny model's warm-up "
                             "needs; train a real model (model.path) on them instead")
        return str(row["answer"])

    def warmup_response(self, row: dict[str, Any], rng: random.Random) -> str:
        answer = self._answer(row)
        if rng.random() >= self.warmup_correct:
            try:
                answer = str(int(answer) + 1)  # always the same mistake: greedy decoding starts out wrong
            except ValueError:
                others = [str(r["answer"]) for r in self._rows["all"] if str(r.get("answer")) != answer]
                answer = rng.choice(others) if others else answer
        return f"<answer>{answer}</answer>"

    def gold_response(self, row: dict[str, Any]) -> str:
        return f"<answer>{self._answer(row)}</answer>"


def _resolve(path: Path | str) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path.cwd() / path


def open_environment(cfg: EnvConfig, gym_python: Path = DEFAULT_GYM_PYTHON, seed: int = 0) -> Environment:
    """The environment an ``envs:`` entry names, its server described but not started."""
    if not cfg.is_nemo_gym:
        return load_environment(cfg.name, cfg.args)
    max_steps, gymnasium = None, False
    if cfg.nemo_gym:
        server = load_server(cfg.nemo_gym, gym_python)
        max_steps, gymnasium = server.max_steps, server.gymnasium
        train = _resolve(cfg.data) if cfg.data else _dataset(server, "train", cfg.nemo_gym)
        held_out = _resolve(cfg.eval_data) if cfg.eval_data else (
            None if cfg.data else getattr(server.dataset("validation"), "path", None))
        if held_out is None and gymnasium and len({_row_key(r) for r in read_rows(train)}) < 2:
            held_out = train  # rows all alike (blackjack deals on /reset): eval plays them, dealt anew
        spec = server_spec(server, cfg.options)
    else:
        train, held_out = _resolve(cfg.data), _resolve(cfg.eval_data) if cfg.eval_data else None
        spec = _module_spec(cfg.module, cfg.options, gym_python) if cfg.module else None
    tasks = JsonlTasks(str(train), str(held_out) if held_out else None, cfg.eval_fraction, seed)
    return Environment(cfg.name, tasks, server=spec, nemo_gym=True, max_steps=max_steps, gymnasium=gymnasium)


def server_spec(server: NemoGymServer, options: dict[str, Any] | None = None) -> ServerSpec:
    """A shipped NeMo Gym server as it runs: in its own folder, its config's options (``options`` replacing keys),
    its own requirements."""
    return ServerSpec(server.module, server.options | (options or {}), server.folder, server.folder.name)


def resolve_gym_python(path: Path | str) -> Path:
    """A configured ``env_servers.gym_python``: a relative path is taken from the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def gym_python_of(cfg: RunConfig) -> Path:
    return resolve_gym_python(cfg.env_servers.gym_python)


def open_environments(cfg: RunConfig) -> dict[str, Environment]:
    """Every environment of a run config, by name."""
    return {e.name: open_environment(e, gym_python_of(cfg), cfg.seed) for e in cfg.envs}


def _module_spec(module: str, options: dict[str, Any], gym_python: Path) -> ServerSpec:
    """A server package; one of the installed nemo-gym's runs in its own folder, with its requirements."""
    parts = module.split(".")
    if parts[0] == "resources_servers" and len(parts) == 2:
        folder = gym_root(gym_python) / "resources_servers" / parts[1]
        if (folder / "app.py").is_file():
            return ServerSpec(module, dict(options), folder, parts[1])
    return ServerSpec(module, dict(options))


def _dataset(server, kind: str, source: str) -> Path:
    found = server.dataset(kind) or server.dataset("example")
    if found is None:
        listed = ", ".join(f"{d.name} ({d.type}: {d.path})" for d in server.datasets) or "none"
        raise NemoGymConfigError(f"{server.config_path}: no {kind} or example dataset file here for '{source}' "
                                 f"(its datasets: {listed}); give the tasks as data: FILE.jsonl")
    return found.path


def check_tool_routes(env: Environment) -> None:
    """Every tool a task row offers the model must be a route of its attached server: a row whose tools the server
    does not serve is an error naming the file, the row and the tool, before any episode is played."""
    routes = env.client.routes()
    for split in ("train", "eval"):
        for number, task in enumerate(env.tasks(split), 1):
            names = {t.get("name") or (t.get("function") or {}).get("name") for t in task.tools}
            missing = sorted(n for n in names if n not in routes)
            if missing:
                source = env.config["data"] if split == "train" or not env.config["eval_data"] else env.config["eval_data"]
                raise NemoGymConfigError(f"{source}: task '{task.id}' ({split} row {number}) offers tool '{missing[0]}', "
                                         f"which server '{env.name}' does not serve (its routes: "
                                         f"{', '.join(sorted(routes))})")


def server_process(env: Environment, gym_python: Path = DEFAULT_GYM_PYTHON, log_dir: Path | None = None,
                   say: Callable[[str], None] = print) -> EnvServer:
    """The (not yet started) server process of an environment: its plugin's app, or a NeMo Gym server in its own
    folder with its config's options, its own requirements installed first."""
    spec = env.server
    if spec is None:
        return EnvServer(env.name, gym_python, log_dir=log_dir)
    packages = None
    if spec.requirements_of is not None and spec.cwd is not None:
        packages = ensure_installed(spec.requirements_of, spec.cwd, gym_python, say)
    return EnvServer(env.name, gym_python, log_dir=log_dir, module=spec.module, options=spec.options, cwd=spec.cwd,
                     import_paths=[packages] if packages else None)
