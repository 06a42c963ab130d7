"""Start environment servers as their own processes (the NeMo Gym venv's Python) on free loopback
ports, wait until they answer, and stop them with their whole process group."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from gymrl.envs.client import EnvClient, EnvServerError
from gymrl.envs.registry import import_root, plugin_module

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GYM_PYTHON = REPO_ROOT / ".venv-gym" / "bin" / "python"


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
                 port: int | None = None, log_dir: Path | None = None, module: str | None = None):
        """``module``: the package whose ``app.py`` holds the server; by default the plugin's (see
        :mod:`gymrl.envs.registry`). Any module the NeMo Gym venv can import works, NeMo Gym's own
        ``resources_servers.*`` included."""
        self.env, self.gym_python, self.host = env, Path(gym_python), host
        self.module = module or plugin_module(env)
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"gymrl-env-{env}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> "EnvServer":
        if not self.gym_python.exists():
            raise EnvServerError(f"NeMo Gym venv not found at {self.gym_python}: run `make setup` (it creates .venv-gym)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": server_pythonpath(self.module), "PYTHONUNBUFFERED": "1"}
        env.pop("VIRTUAL_ENV", None)
        self.proc = subprocess.Popen(
            [str(self.gym_python), "-m", "gymrl.envs.serve", "--env", self.env, "--module", self.module,
             "--host", self.host, "--port", str(self.port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        client = EnvClient(self.env, self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-3:])
                    raise EnvServerError(f"env server '{self.env}' exited with code {self.proc.returncode} "
                                         f"(log: {self.log_path}):\n{tail}")
                if client.healthy():
                    return self
                time.sleep(0.2)
        finally:
            client.close()
        self.stop()
        raise EnvServerError(f"env server '{self.env}' did not answer on {self.url} within {timeout_s:.0f} s (log: {self.log_path})")

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
