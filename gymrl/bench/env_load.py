"""``gymrl bench --suite env-load``: how much concurrent /verify traffic one environment server takes.

For each environment, its real NeMo Gym server is started on a loopback port and sent /verify requests
(the held-out tasks' gold answers and a wrong answer each, as gymrl's client sends them) by ``c`` clients at
once, c = 1, 2, 4, 8, ... Each level runs ``level_seconds`` and at least ``min_requests`` requests (both, within
the request budget; in-flight requests finish) and records throughput (answered requests per second of wall
time), p50 and p99 latency, and the errors (HTTP status other than 200, transport errors, timeouts, and a
reward that differs from the one the same payload got alone).

The knee is the highest concurrency whose throughput is more than ``gain`` (10%) above that of every lower
level, counting only levels with no errors and p99 within ``p99_bound_ms``. The ramp goes on until a level
breaks (errors, or p99 over the bound), ``max_concurrency`` is reached, or the request or time budget is
spent (``plateau``, when set, also stops it after that many levels in a row without the gain). The load
generator is one asyncio loop in this process, on the same machine as the server: on a small machine it takes
CPU from the server, so the figures are a floor (the load average is recorded before and after).
"""

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import write_results
from gymrl.envs.client import responses_api_response

DEFAULT_ENVS = ("arithmetic", "math", "code")


@dataclass(frozen=True)
class LoadBudget:
    max_concurrency: int = 256
    max_requests: int = 20_000  # over all levels of one environment
    max_seconds: float = 90.0  # over all levels of one environment
    level_seconds: float = 5.0  # each level sends requests for this long...
    min_requests: int = 100  # ...and at least this many (and 4 per client), unless the request budget ends
    p99_bound_ms: float = 2000.0
    gain: float = 0.10
    plateau: int | None = None
    timeout_s: float = 30.0


def requests_per_level(concurrency: int, budget: LoadBudget) -> int:
    """The fewest requests a level sends (it goes on until ``level_seconds`` have passed too)."""
    return max(budget.min_requests, 4 * concurrency)


def _payloads(env, tasks: int = 16) -> list[tuple[bytes, float | None]]:
    """(request body, None) for the gold and a wrong answer of up to ``tasks`` held-out tasks; :func:`_calibrate`
    fills in the reward each gets alone."""
    out = []
    for task in env.tasks("eval")[:tasks]:
        gold = env.gold_response(task)
        if not isinstance(gold, str):
            raise ValueError(f"env-load: environment '{env.name}' has tool tasks; only text /verify is load-tested")
        for text in (gold, "<think>guess</think>\\boxed{-1} <answer>-1</answer>\n```python\npass\n```"):
            body = task.row | {"response": responses_api_response(text)}
            out.append((json.dumps(body).encode(), None))
    return out


class _Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: POST a JSON body, read the status and the body.

    The load generator shares the machine with the server, so it must cost little: httpx's AsyncClient spent
    about 8 ms of CPU per request at 32 connections here (twice the server's own), which made throughput fall
    with concurrency; this costs a fraction of that."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def _level(url: str, payloads: list[tuple[bytes, float | None]], concurrency: int, least: int, total: int,
                 budget: LoadBudget) -> dict:
    """``concurrency`` clients send requests until ``level_seconds`` have passed and ``least`` were sent, or
    ``total`` were sent."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    started = time.perf_counter()
    deadline = started + budget.level_seconds
    address = httpx.URL(url)

    async def worker() -> None:
        nonlocal sent
        conn = _Connection(address.host, address.port)
        try:
            while sent < total and (sent < least or time.perf_counter() < deadline):
                body, expected = payloads[sent % len(payloads)]
                sent += 1
                t = time.perf_counter()
                try:
                    status, data = await asyncio.wait_for(conn.post("/verify", body), budget.timeout_s)
                    if status != 200:
                        kind = f"HTTP {status}"
                    elif expected is not None and json.loads(data).get("reward") != expected:
                        kind = "wrong reward"
                    else:
                        kind = None
                except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError) as err:
                    kind = "timeout" if isinstance(err, asyncio.TimeoutError) else type(err).__name__
                    await conn.close()  # the connection's state is unknown: a fresh one for the next request
                latencies.append(1000 * (time.perf_counter() - t))
                if kind:
                    errors[kind] = errors.get(kind, 0) + 1
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    n_errors = sum(errors.values())
    return {"concurrency": concurrency, "requests": n, "wall_s": wall, "req_per_s": (n - n_errors) / wall,
            "p50_ms": latencies[n // 2], "p99_ms": latencies[max(0, -(-n * 99 // 100) - 1)],
            "max_ms": latencies[-1], "errors": n_errors, "error_kinds": errors, "error_rate": n_errors / n}


def find_knee(levels: list[dict], budget: LoadBudget) -> dict | None:
    """The level at the knee (see the module doc), or None when even concurrency 1 broke."""
    knee, best = None, 0.0
    for level in levels:
        if level["errors"] or level["p99_ms"] > budget.p99_bound_ms:
            break
        if knee is None or level["req_per_s"] > best * (1 + budget.gain):
            knee = level
        best = max(best, level["req_per_s"])
    return knee


def _why_stopped(levels: list[dict], budget: LoadBudget, spent: tuple[int, float]) -> str | None:
    last = levels[-1]
    if last["errors"]:
        return f"errors at concurrency {last['concurrency']}: {last['error_kinds']}"
    if last["p99_ms"] > budget.p99_bound_ms:
        return f"p99 {last['p99_ms']:.0f} ms over the {budget.p99_bound_ms:.0f} ms bound at concurrency {last['concurrency']}"
    flat = budget.plateau is not None and len(levels) > budget.plateau
    best = max(level["req_per_s"] for level in levels[:-budget.plateau]) if flat else None
    if best is not None and all(level["req_per_s"] <= best * (1 + budget.gain) for level in levels[-budget.plateau:]):
        return f"throughput flat (within {budget.gain:.0%}) for {budget.plateau} levels"
    if spent[0] >= budget.max_requests:
        return "request budget spent"
    if spent[1] >= budget.max_seconds:
        return "time budget spent"
    return None


def load_test(url: str, payloads: list[tuple[bytes, float | None]], budget: LoadBudget) -> dict:
    """Ramp the concurrency against the server at ``url`` (see the module doc); levels, knee and why it stopped."""
    levels: list[dict] = []
    requests, started, stopped = 0, time.perf_counter(), None
    concurrency = 1
    while concurrency <= budget.max_concurrency:
        total = budget.max_requests - requests
        if total < concurrency:
            stopped = "request budget spent"
            break
        level = asyncio.run(_level(url, payloads, concurrency, requests_per_level(concurrency, budget), total, budget))
        levels.append(level)
        requests += level["requests"]
        stopped = _why_stopped(levels, budget, (requests, time.perf_counter() - started))
        if stopped:
            break
        concurrency *= 2
    knee = find_knee(levels, budget)
    return {"levels": levels, "knee": knee, "stopped": stopped or f"reached max concurrency {budget.max_concurrency}",
            "requests": requests, "seconds": time.perf_counter() - started}


def _calibrate(url: str, payloads: list[tuple[bytes, float | None]], timeout_s: float) -> list[tuple[bytes, float]]:
    """Each payload's reward when it is sent alone (a reply under load must be the same)."""
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        out = []
        for body, _ in payloads:
            reply = client.post("/verify", content=body, headers={"content-type": "application/json"})
            reply.raise_for_status()
            out.append((body, reply.json()["reward"]))
    return out


def run_envload_bench(out: Path, envs: tuple[str, ...] = DEFAULT_ENVS, budget: LoadBudget = LoadBudget()) -> Table:
    from gymrl.envs.launcher import EnvServer
    from gymrl.envs.registry import load_environment

    load_before = os.getloadavg()
    results: dict = {"budget": budget.__dict__, "load_average_before": load_before, "envs": {}}
    rows = []
    for name in envs:
        env = load_environment(name)
        with EnvServer(name) as server:
            payloads = _calibrate(server.url, _payloads(env), budget.timeout_s)
            result = load_test(server.url, payloads, budget)
        results["envs"][name] = result
        knee = result["knee"]
        for level in result["levels"]:
            mark = " (knee)" if knee is not None and level["concurrency"] == knee["concurrency"] else ""
            rows.append((name, f"{level['concurrency']}{mark}", level["requests"], f"{level['req_per_s']:.1f}",
                         f"{level['p50_ms']:.1f}", f"{level['p99_ms']:.1f}", f"{level['error_rate']:.1%}"))
    results["load_average_after"] = os.getloadavg()
    notes = [f"{name}: knee at concurrency {r['knee']['concurrency']}: {r['knee']['req_per_s']:.1f} req/s, "
             f"p99 {r['knee']['p99_ms']:.1f} ms; stopped: {r['stopped']}" if r["knee"] else
             f"{name}: no knee (concurrency 1 already broke); stopped: {r['stopped']}"
             for name, r in results["envs"].items()]
    notes.append(f"load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
                 f"{', '.join(f'{x:.2f}' for x in results['load_average_after'])}; {os.cpu_count()} CPUs, load "
                 "generator on the same machine")
    return write_results(out, "env-load", results, rows,
                         ["env", "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "errors"],
                         "gymrl bench --suite env-load", notes)


def run_suite(a: BenchArgs) -> Table:
    return run_envload_bench(a.out)
