"""The package's layout: every module imports on its own, no import circle, and the layering rule of the README's
layout section (a module imports only from its own package or from lower layers)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gymrl.envs.launcher import DEFAULT_GYM_PYTHON

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gymrl", "rewards", "environments")

# Lowest first. A module's layer is that of its longest matching prefix; it may import modules of lower layers,
# and of its own layer only within its own package (gymrl.models.* among themselves, say). The README states it.
LAYERS = [
    ("gymrl", "gymrl.utf8", "rewards", "environments"),  # gymrl's and environments' __init__: no code
    ("gymrl.models.spec",),  # the tiny model's spec, which the config holds: pydantic only
    ("gymrl.config",),
    ("gymrl.errors", "gymrl.resources"),
    ("gymrl.models",),
    ("gymrl.memory",),  # the dry run's memory plan, from a checkpoint's config.json
    ("gymrl.envs",),
    ("environments.",),  # the plugins (their packages and servers)
    ("gymrl.rollout",),
    ("gymrl.traces",),  # the trace store, which the trainer writes
    ("gymrl.session",),
    ("gymrl.train",),
    ("gymrl.plan", "gymrl.eval"),
    # Tools over everything below: environment checks, trace replay, the viewer, the benchmarks, the CLIs.
    ("gymrl.envs.authoring", "gymrl.traces.query", "gymrl.traces.viewer", "gymrl.traces.cli", "gymrl.bench"),
    ("gymrl.cli",),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            mods[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file: lazy imports inside functions, and those under
    ``if TYPE_CHECKING``, count too (a circle through them is still a circle for a reader)."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parent + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix if prefix.endswith(".") else prefix + ".")) \
                    and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer is not None, f"{module} is in no layer of LAYERS: add it"
    return layer


def _package(module: str) -> str:
    """gymrl's subpackage (gymrl.models, ...), or the top package (rewards, environments)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "gymrl" else parts[0]


def test_no_import_cycles():
    """Tarjan's strongly connected components of the module graph: every one must be a single module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert len(GRAPH) > 50 and not cycles, cycles


def test_imports_follow_the_layers():
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})" for m, targets in sorted(GRAPH.items())
           for t in sorted(targets)
           if _layer(t) > _layer(m) or (_layer(t) == _layer(m) and _package(t) != _package(m))]
    assert not bad, "\n".join(bad)


def test_layering_check_catches_an_upward_import():
    """The check itself: the models importing the trainer, or the rollout code importing a CLI, is refused."""
    assert _layer("gymrl.train.loop") > _layer("gymrl.models.tiny")
    assert _layer("gymrl.cli") > _layer("gymrl.rollout.engine")
    assert _layer("gymrl.traces.store") < _layer("gymrl.traces.viewer")
    assert _layer("environments.arithmetic.app") > _layer("gymrl.envs.base")


# Imports each module first, in a child forked from an interpreter that has loaded third-party packages only (torch
# and transformers take most of an import's time), so that no other module of the project is loaded before it.
_IMPORT_EACH = r"""
import importlib, os, sys, traceback
for heavy in sys.argv[2].split(","):
    if heavy:
        importlib.import_module(heavy)
failed = []
for module in sys.argv[1].split(","):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc(limit=-3).encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(module + ": " + message.strip().splitlines()[-1])
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _server_side() -> set[str]:
    """Modules that run only in the environment servers' venv: those importing NeMo Gym, and what imports them."""
    def imports_nemo_gym(path: Path) -> bool:
        tree = ast.parse(path.read_text())
        return any(isinstance(n, ast.Import) and any(a.name.split(".")[0] == "nemo_gym" for a in n.names)
                   or isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "nemo_gym"
                   for n in ast.walk(tree))

    side = {m for m, path in MODULES.items() if imports_nemo_gym(path)}
    while grown := {m for m, targets in GRAPH.items() if targets & side} - side:
        side |= grown
    return side


def _import_each(python: Path, modules: list[str], heavy: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", _IMPORT_EACH, ",".join(modules), heavy], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    server_side = _server_side()
    assert {"gymrl.envs.serve", "gymrl.envs.nemo_server", "environments.arithmetic.app"} <= server_side
    harness = _import_each(Path(sys.executable), sorted(set(MODULES) - server_side), "torch,transformers")
    servers = _import_each(DEFAULT_GYM_PYTHON, sorted(server_side), "")
    assert harness.returncode == 0, harness.stdout + harness.stderr[-3000:]
    assert servers.returncode == 0, servers.stdout + servers.stderr[-3000:]


def test_import_check_reports_a_broken_module(tmp_path):
    """The forked check fails, naming the module, when a module cannot be imported on its own."""
    (tmp_path / "broken_mod.py").write_text("import gymrl.no_such_module\n")
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, "json,broken_mod", ""], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert proc.returncode == 1 and "broken_mod: ModuleNotFoundError" in proc.stdout, proc.stdout + proc.stderr
