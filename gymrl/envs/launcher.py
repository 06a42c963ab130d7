"""Start environment servers as their own processes (the NeMo Gym venv's Python) on free loopback
ports, wait until they answer, keep them alive (:class:`ServerSupervisor`), and stop them with their
whole process group."""

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from gymrl.envs.client import EnvClient, EnvServerError
from gymrl.envs.registry import import_root, plugin_module

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GYM_PYTHON = REPO_ROOT / ".venv-gym" / "bin" / "python"
log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_pythonpath(module: str) -> str:
    """PYTHONPATH of a server process: this repository, plus the plugin's import root when the plugin
    is a package installed beside the harness (the NeMo Gym venv does not have it)."""
    paths = [str(REPO_ROOT)]
    try:
        root = import_root(module)
    except (ImportError, ValueError):
        root = None  # not importable here: the NeMo Gym venv must have it (e.g. resources_servers.*)
    if root is not None and root != REPO_ROOT:
        paths.append(str(root))
    return os.pathsep.join(paths)


class EnvServer:
    """One environment server process; a context manager that always stops it."""

    def __init__(self, env: str, gym_python: Path = DEFAULT_GYM_PYTHON, host: str = "127.0.0.1",
                 port: int | None = None, log_dir: Path | None = None, module: str | None = None,
                 options: dict | None = None, cwd: Path | None = None, import_paths: list[Path] | None = None):
        """``module``: the package whose ``app.py`` holds the server; by default the plugin's (see
        :mod:`gymrl.envs.registry`). Any module the NeMo Gym venv can import works, NeMo Gym's own
        ``resources_servers.*`` included, with ``options`` (its config's keys) and ``cwd``: the folder it runs in,
        first on its import path too (NeMo Gym runs ``python app.py`` in the server's folder); ``import_paths``:
        folders before everything else on its import path (a server's own packages)."""
        self.env, self.gym_python, self.host = env, Path(gym_python), host
        self.module = module or plugin_module(env)
        self.options, self.cwd, self.import_paths = options or {}, cwd or REPO_ROOT, list(import_paths or [])
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"gymrl-env-{env}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> "EnvServer":
        if not self.gym_python.exists():
            raise EnvServerError(f"NeMo Gym venv not found at {self.gym_python}: run `make setup` (it creates .venv-gym)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")  # a restarted server appends: the log keeps why the last one died
        first = [*self.import_paths, *([self.cwd] if self.cwd != REPO_ROOT else [])]
        path = os.pathsep.join([*map(str, first), server_pythonpath(self.module)])
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        env.pop("VIRTUAL_ENV", None)
        self.proc = subprocess.Popen(
            [str(self.gym_python), "-m", "gymrl.envs.serve", "--env", self.env, "--module", self.module,
             "--host", self.host, "--port", str(self.port), "--parent-pid", str(os.getpid()),
             "--options", json.dumps(self.options)],
            cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        client = EnvClient(self.env, self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise EnvServerError(f"env server '{self.env}' exited with code {self.proc.returncode} "
                                         f"(log: {self.log_path}):\n{self.log_tail()}")
                if client.healthy():
                    return self
                time.sleep(0.2)
        finally:
            client.close()
        self.stop()
        raise EnvServerError(f"env server '{self.env}' did not answer on {self.url} within {timeout_s:.0f} s (log: {self.log_path})")

    def log_tail(self, lines: int = 3) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "EnvServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerSupervisor:
    """Keeps a started server alive. A thread checks every ``interval_s`` that its process runs, and a client
    whose connection is refused asks through :meth:`recover`; either way a dead server is started again on
    the same port (clients keep their URL), after a backoff of 0.5 s, 1 s, 2 s, ... (at most 10 s), at most
    ``max_restarts`` times. ``generation`` counts the restarts: an episode whose session lived on an
    earlier server knows its state is gone."""

    def __init__(self, server: EnvServer, start_timeout_s: float = 60.0, max_restarts: int = 3,
                 interval_s: float = 1.0):
        self.server, self.start_timeout_s, self.max_restarts = server, start_timeout_s, max_restarts
        self.generation = 0  # restarts so far
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._gave_up: EnvServerError | None = None
        self._thread = threading.Thread(target=self._watch, args=(interval_s,), daemon=True,
                                        name=f"supervise-{server.env}")

    def start(self) -> "ServerSupervisor":
        self._thread.start()
        return self

    def _watch(self, interval_s: float) -> None:
        while not self._stopped.wait(interval_s):
            if not self.server.alive():
                try:
                    self.recover()
                except EnvServerError as err:
                    log.error("%s", err)
                    return

    def recover(self) -> int:
        """Start the server again if it died; returns its generation. Raises :class:`EnvServerError`, naming the
        server's log, once the restarts are used up (and for every call after that)."""
        with self._lock:
            if self._gave_up is not None:
                raise self._gave_up
            if self._stopped.is_set():
                raise EnvServerError(f"env server '{self.server.env}' was stopped")
            if self.server.alive():
                return self.generation
            code = self.server.proc.returncode if self.server.proc is not None else None
            if self.generation >= self.max_restarts:
                self._gave_up = EnvServerError(
                    f"env server '{self.server.env}' died (exit code {code}) and no restart is left "
                    f"(env_servers.max_restarts={self.max_restarts}); log: {self.server.log_path}\n{self.server.log_tail()}")
                raise self._gave_up
            log.warning("env server '%s' died (exit code %s); restarting it (%d of %d)", self.server.env, code,
                        self.generation + 1, self.max_restarts)
            time.sleep(min(0.5 * 2**self.generation, 10.0))
            self.generation += 1
            self.server.start(self.start_timeout_s)
            return self.generation

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            self.server.stop()
