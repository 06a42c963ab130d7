"""A NeMo Gym server's own dependencies: its ``requirements.txt`` (minus the editable nemo-gym line), installed
from the package registry into a folder of its own, ``.venv-gym/server-deps/<server>/`` (``pip install
--target``), which goes first on that server's import path. NeMo Gym gives each server a venv of its own for the
same reason: servers pin versions that clash with each other (numpy 2.2.6 in one, 2.4.4 in another), so they
cannot share one.

Versions are pinned as NeMo Gym's venv for the server would have them, keeping .venv-gym's wherever they fit:
NeMo Gym installs nemo-gym (mostly unpinned requirements) and the server's requirements together, so
math-verify==0.8.0 gets the latex2sympy2_extended==1.10.2 it pins (.venv-gym: 1.11.0) and datasets==4.0.0 an older
dill. That resolution is made against .venv-gym first (``pip install --dry-run``, which keeps what is installed
where it fits); the versions it moves, and ``requirements-gym.lock`` (what .venv-gym has) for the rest, constrain
the install. Pinning every package at .venv-gym's version instead refused those servers for conflicts NeMo Gym
does not have. The versions a server's install resolved are kept in ``requirements-gym-servers.lock`` under a
``# [server]`` line, so the next install (another machine, CI) takes the same ones. An install prints one line
saying what it installs, and one more naming the versions that differ from .venv-gym's; a conflict with nemo-gym
itself, or a requirement that cannot come from the registry (a git URL, a local path), is a one-line error naming
the server and the requirements that clash.
"""

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path

from gymrl.envs.launcher import REPO_ROOT

GYM_LOCK = REPO_ROOT / "requirements-gym.lock"
# Frameworks of several GB each (PyPI's Linux torch brings the CUDA libraries): not installed behind a command
# that only meant to start a server; the error says so.
FRAMEWORKS = {"torch", "torchvision", "torchaudio", "tensorflow", "jax", "vllm"}
SERVERS_LOCK = REPO_ROOT / "requirements-gym-servers.lock"


class DependencyError(ValueError):
    """A server requirement that cannot be installed here; the message names the server and the requirement."""


def pyproject_requirements(server: str, path: Path) -> list[str]:
    """The ``[project] dependencies`` of a server that ships a pyproject.toml instead of a requirements.txt
    (code_fim); one that ``[tool.uv.sources]`` takes from a git repository is not on the package registry."""
    doc = tomllib.loads(path.read_text())
    sources = doc.get("tool", {}).get("uv", {}).get("sources", {})
    found = []
    for requirement in doc.get("project", {}).get("dependencies", []):
        source = sources.get(requirement) or sources.get(package_name(requirement)) or {}
        if "git" in source:
            raise DependencyError(f"server '{server}': requirement '{requirement}' comes from the git repository "
                                  f"{source['git']}, not the package registry ({path}, [tool.uv.sources])")
        found.append(requirement)
    return found


def server_requirements(server: str, folder: Path) -> list[str]:
    """The registry requirements of a server's requirements.txt (or its pyproject.toml's): no comments, no nemo-gym
    itself."""
    path = folder / "requirements.txt"
    found = []
    lines = path.read_text().splitlines() if path.is_file() else []
    if not path.is_file() and (folder / "pyproject.toml").is_file():
        path, lines = folder / "pyproject.toml", pyproject_requirements(server, folder / "pyproject.toml")
    for line in lines:
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"^(-e\s+)?(nemo[-_]gym\b|\.\./\.\./?$)", line) or "@ ../" in line:
            continue  # the editable nemo-gym install (by name, or as the repository root ../../): .venv-gym is that
        if line.startswith("-") or "://" in line or line.startswith((".", "/")):
            raise DependencyError(f"server '{server}': requirement '{line}' cannot be installed from the package "
                                  f"registry ({path})")
        if package_name(line) in FRAMEWORKS:
            raise DependencyError(f"server '{server}': requirement '{line}' is a framework of several GB; gymrl does "
                                  f"not install it on its own (install it into .venv-gym yourself)")
        found.append(line)
    return found


def package_name(requirement: str) -> str:
    """``numpy`` of ``numpy==2.2.3``, ``sacrebleu`` of ``sacrebleu[ja,ko]>=2.4``, normalised as pip compares names."""
    name = re.split(r"[\[<>=!~;@ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = SERVERS_LOCK) -> dict[str, list[str]]:
    """``# [server]`` sections of pins."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines() if path.is_file() else []:
        header = re.match(r"^# \[(.+)\]$", line.strip())
        if header:
            current = sections.setdefault(header.group(1), [])
        elif line.strip() and not line.startswith("#") and current is not None:
            current.append(line.strip())
    return sections


def write_lock(sections: dict[str, list[str]], path: Path = SERVERS_LOCK) -> None:
    text = ["# Versions each NeMo Gym server's own requirements resolved to (gymrl/envs/server_deps.py writes it)."]
    for name in sorted(sections):
        text += [f"# [{name}]", *sorted(sections[name], key=str.lower)]
    path.write_text("\n".join(text) + "\n")


def deps_dir(gym_python: Path, server: str) -> Path:
    return Path(gym_python).parent.parent / "server-deps" / server


def installed(gym_python: Path, server: str) -> Path | None:
    """The server's packages folder when an earlier install made one."""
    target = deps_dir(gym_python, server)
    return target if (target / ".gymrl-requirements").is_file() else None


def ensure_installed(server: str, folder: Path, gym_python: Path, say: Callable[[str], None] = print,
                     lock: Path = SERVERS_LOCK) -> Path | None:
    """The folder of the server's own packages, installed the first time (or when its requirements change);
    None for a server with no requirements of its own."""
    requirements = server_requirements(server, folder)
    if not requirements:
        return None
    target = deps_dir(gym_python, server)
    stamp = hashlib.sha256(json.dumps(requirements).encode()).hexdigest()
    if (target / ".gymrl-requirements").is_file() and (target / ".gymrl-requirements").read_text() == stamp:
        return target
    pins = read_lock(lock)
    say(f"installing the requirements of NeMo Gym server '{server}' into {target}: {', '.join(requirements)}")
    venv_pins = [line for line in GYM_LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        nemo_gym = next(pin for pin in venv_pins if package_name(pin) == "nemo-gym")
        moved = nemo_gym_resolution(server, nemo_gym, requirements, gym_python, pins.get(server, []), Path(tmp))
        venv = {package_name(pin): pin.split("==")[-1] for pin in venv_pins}
        other = [f"{pin} (.venv-gym: {venv[package_name(pin)]})" for pin in moved
                 if venv.get(package_name(pin), pin.split("==")[-1]) != pin.split("==")[-1]]
        if other:
            say(f"server '{server}' needs other versions than .venv-gym's, as in NeMo Gym's own venv for it: "
                f"{', '.join(other)}")
        constraints, report, staged = Path(tmp) / "constraints.txt", Path(tmp) / "report.json", Path(tmp) / "packages"
        own = {package_name(pin) for pin in requirements + moved}
        constraints.write_text("\n".join([pin for pin in venv_pins if package_name(pin) not in own] + moved) + "\n")
        proc = subprocess.run(
            [str(gym_python), "-m", "pip", "install", "--disable-pip-version-check", "--target", str(staged),
             "-c", str(constraints), "--report", str(report), *requirements],
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise DependencyError(f"server '{server}': installing {', '.join(requirements)} failed: "
                                  f"{conflict(proc.stdout + proc.stderr)}")
        installed = json.loads(report.read_text()).get("install", [])
        pins[server] = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installed]
        (staged / ".gymrl-requirements").write_text(stamp)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(target)
    write_lock(pins, lock)
    return target


def nemo_gym_resolution(server: str, nemo_gym: str, requirements: list[str], gym_python: Path, pins: list[str],
                        tmp: Path) -> list[str]:
    """The packages NeMo Gym's own venv for the server has that .venv-gym lacks or has at other versions: the
    installed nemo-gym (``nemo_gym``, its pin) and the server's requirements, under its lock section's pins,
    resolved together against .venv-gym (``--dry-run``: nothing installed). nemo-gym without its dev extra: the
    server runs without pytest or ruff. A conflict here is real, NeMo Gym's own install would hit it too."""
    (tmp / "pins.txt").write_text("\n".join(pins) + "\n")
    proc = subprocess.run(
        [str(gym_python), "-m", "pip", "install", "--disable-pip-version-check", "--dry-run", "-c",
         str(tmp / "pins.txt"), "--report", str(tmp / "moved.json"), nemo_gym, *requirements],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise DependencyError(f"server '{server}': {', '.join(requirements)} cannot be installed with {nemo_gym}: "
                              f"{conflict(proc.stdout + proc.stderr)}")
    moved = json.loads((tmp / "moved.json").read_text()).get("install", [])
    return [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in moved]


def conflict(pip_output: str) -> str:
    """What clashes, from pip's "The conflict is caused by:" lines (``math-verify 0.8.0 depends on
    latex2sympy2_extended==1.10.2; The user requested (constraint) ...``; pip prints them only without ``-q``),
    else pip's last error line."""
    lines = pip_output.splitlines()
    causes = []
    for line in lines[lines.index("The conflict is caused by:") + 1:] if "The conflict is caused by:" in lines else []:
        if not line.strip():
            break
        causes.append(line.strip())
    if causes:
        return "; ".join(dict.fromkeys(causes))[:500]
    return ([line for line in lines if line.startswith("ERROR")] or lines or ["pip failed"])[-1][:300]
