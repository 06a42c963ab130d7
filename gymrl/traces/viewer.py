"""``gymrl traces serve``: a local web viewer of the runs in a folder.

Pages: the runs; a run (reward curves per environment from its metrics.jsonl, drawn on the server as
SVG, and a filterable table of its rollouts, paginated in SQL so that a run of 100k rollouts stays fast);
a rollout (prompt, turns, tool calls and results, the verifier's reward, reason and breakdown, and a
per-token view coloured by logprob or by policy version). JSON twins live under ``/api/``.

Model text is untrusted HTML. Jinja autoescapes every value (no template marks model text safe), and
every response carries a Content-Security-Policy that allows no script at all, so even a slip in
escaping could not run one. The pages need no JavaScript: the colouring toggle is plain CSS.
"""

import ipaddress
import json
import math
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gymrl.traces.query import find_runs, run_info
from gymrl.traces.store import TRACE_FILE, TraceFilter, TraceReader
from gymrl.train.metrics import read_metrics

HERE = Path(__file__).parent
PAGE_SIZE = 50
# No script may run on these pages; styles and images come only from this server.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
FINISH_REASONS = ("stop", "length", "max_turns", "context_full")  # gymrl/rollout/runner.py's
ORDERS = {"id": "oldest first", "-id": "newest first", "-reward": "reward, high first", "reward": "reward, low first"}
# Query parameter -> TraceFilter field type.
FILTERS = {"env": str, "split": str, "task_id": str, "min_step": int, "max_step": int, "min_reward": float,
           "max_reward": float, "finish_reason": str, "text": str}
# Logprob thresholds of the colour classes lp0 (p > 0.9) .. lp7 (p < 0.01).
LOGPROB_BUCKETS = (math.log(0.9), math.log(0.7), math.log(0.5), math.log(0.3), math.log(0.1), math.log(0.03),
                   math.log(0.01))
LOGPROB_LEGEND = ("> 0.9", "> 0.7", "> 0.5", "> 0.3", "> 0.1", "> 0.03", "> 0.01", "< 0.01")
VERSION_COLOURS = 8  # policy versions cycle through classes v0..v7

templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined)


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(**context), status_code=status_code)


def when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else ""


# ---- runs -------------------------------------------------------------------------------------------

def run_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def run_summary(name: str, run: Path) -> dict[str, Any]:
    info = run_info(name, run)
    with closing(TraceReader(run / TRACE_FILE)) as reader:
        meta = reader.metadata()
    summary = {"name": name, "rollouts": info.rollouts, "steps": info.steps, "envs": info.envs}
    evals = [r["eval_reward"] for r in run_metrics(run) if "eval_reward" in r]
    model = (meta.get("config") or {}).get("model") or {}
    return summary | {
        "git_revision": str(meta.get("git_revision", ""))[:12], "started": when(meta.get("started")),
        "model": "tiny (built)" if model.get("build_tiny") is not None else model.get("path", ""),
        "eval_reward": evals[-1] if evals else None,
    }


# ---- reward curves as SVG ---------------------------------------------------------------------------

@dataclass
class Line:
    label: str
    css: str  # class of the line: train | eval
    points: str  # SVG polyline points
    dots: list[tuple[float, float, str]]  # x, y, tooltip


@dataclass
class Chart:
    title: str
    width: int
    height: int
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    lines: list[Line]
    left: int
    bottom: float
    right: float


def reward_charts(rows: list[dict[str, Any]]) -> list[Chart]:
    """One chart per environment (and one of the mean when there are several): the sampled training
    reward per step and the held-out greedy reward at each evaluation."""
    envs = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith(("reward/", "eval_reward/"))})
    keys = [(env, f"reward/{env}", f"eval_reward/{env}") for env in envs]
    if len(envs) != 1:
        keys.insert(0, ("all environments", "reward_mean", "eval_reward"))
    charts = []
    for title, train_key, eval_key in keys:
        train = [(r["step"], r[train_key]) for r in rows if train_key in r]
        held_out = [(r["step"], r[eval_key]) for r in rows if eval_key in r]
        if train or held_out:
            charts.append(chart(title, [("train reward (sampled)", "train", train),
                                        ("held-out reward (greedy)", "eval", held_out)]))
    return charts


def chart(title: str, series: list[tuple[str, str, list[tuple[float, float]]]], width: int = 440,
          height: int = 220) -> Chart:
    left, right, top, bottom = 44, width - 12, 12, height - 34
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))

    def sx(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * (right - left), 1)

    def sy(y: float) -> float:
        return round(bottom - (y - y0) / (y1 - y0) * (bottom - top), 1)

    step = max(1, math.ceil((x1 - x0) / 6))
    x_ticks = [(sx(x), str(x)) for x in range(int(x0), int(x1) + 1, step)]
    y_ticks = [(sy(y0 + (y1 - y0) * i / 4), f"{y0 + (y1 - y0) * i / 4:g}") for i in range(5)]
    lines = [Line(label, css, " ".join(f"{sx(x)},{sy(y)}" for x, y in pts),
                  [(sx(x), sy(y), f"{label}, step {x}: {y:.3f}") for x, y in pts])
             for label, css, pts in series if pts]
    return Chart(title, width, height, x_ticks, y_ticks, lines, left, bottom, right)


# ---- rollouts table ---------------------------------------------------------------------------------

def parse_filter(params: Any) -> tuple[TraceFilter, dict[str, str], list[str]]:
    """The table's filter from the query string; returns it, the values as typed, and what did not parse."""
    values, typed, errors = {}, {}, []
    for key, kind in FILTERS.items():
        raw = params.get(key, "")
        raw = raw if key == "text" else raw.strip()
        if not raw:
            continue
        typed[key] = raw
        try:
            values[key] = kind(raw)
        except ValueError:
            errors.append(f"{key}: '{raw}' is not {'an integer' if kind is int else 'a number'}; ignored")
    return TraceFilter(**values), typed, errors


def page_number(params: Any) -> int:
    try:
        return max(1, int(params.get("page", "1")))
    except ValueError:
        return 1


def rollout_page(reader: TraceReader, params: Any) -> dict[str, Any]:
    """One page of the filtered table: the rows, the total count, and where the page is."""
    f, typed, errors = parse_filter(params)
    order = params.get("order", "id") if params.get("order", "id") in ORDERS else "id"
    total = reader.count(f)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(page_number(params), pages)
    rows = reader.page(f, (page - 1) * PAGE_SIZE, PAGE_SIZE, order)
    return {"rows": rows, "total": total, "page": page, "pages": pages, "page_size": PAGE_SIZE,
            "first": (page - 1) * PAGE_SIZE + 1 if rows else 0, "last": (page - 1) * PAGE_SIZE + len(rows),
            "filters": typed, "filtered": f != TraceFilter(), "order": order, "errors": errors}


def page_query(table: dict[str, Any], page: int) -> str:
    return urlencode(table["filters"] | ({"order": table["order"]} if table["order"] != "id" else {}) | {"page": page})


# ---- one rollout ------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def load_decoder(folder: str) -> Callable[[list[int]], str] | None:
    """The run's tokenizer as a decode function, read from an HF folder's tokenizer.json with the
    ``tokenizers`` library (no transformers import); None where there is none."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def run_decoder(run: Path, meta: dict[str, Any]) -> Callable[[list[int]], str] | None:
    """The finished run's checkpoint, else the configured model folder."""
    model_path = ((meta.get("config") or {}).get("model") or {}).get("path")
    for folder in [run / "checkpoint"] + ([Path(model_path)] if model_path else []):
        decoder = load_decoder(str(folder.resolve()))
        if decoder is not None:
            return decoder
    return None


def token_texts(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Each token's text. A character whose UTF-8 bytes span tokens (byte-level BPE) is shown on the
    token that completes it; the tokens before it show nothing."""
    texts, start = [], 0
    for i in range(len(ids)):
        text = decode(ids[start:i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids) and i - start < 3:
            texts.append("")
            continue
        texts.append(text)
        start = i + 1
    return texts


def token_spans(record: Any, decode: Callable[[list[int]], str] | None) -> list[dict[str, str]]:
    """A span per completion token: its text, its logprob class, its version class, and a tooltip."""
    texts = token_texts(decode, record.completion_ids) if decode else [f"[{t}]" for t in record.completion_ids]
    spans = []
    for text, token, model, logprob, version in zip(texts, record.completion_ids, record.mask, record.logprobs,
                                                    record.versions):
        text = text.replace("\n", "\u21b5\n")  # a visible newline mark, then the line break
        if not model:
            spans.append({"text": text, "lp": "env", "ver": "env", "title": f"environment token (no loss), id {token}"})
            continue
        spans.append({"text": text, "lp": f"lp{sum(logprob < t for t in LOGPROB_BUCKETS)}",
                      "ver": f"v{version % VERSION_COLOURS}",
                      "title": f"logprob {logprob:.4f} (p {math.exp(logprob):.3f}), "
                               f"policy version {version}, id {token}"})
    return spans


def pretty_arguments(arguments: Any) -> str:
    """A tool call's arguments, indented when they are JSON."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, indent=2, ensure_ascii=False)


def message_text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False)


# ---- the app ----------------------------------------------------------------------------------------

class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response


def create_app(runs_dir: Path) -> Starlette:
    runs_dir = Path(runs_dir)

    def run_folder(name: str) -> Path:
        run = find_runs(runs_dir).get(name)
        if run is None:
            raise HTTPException(404, f"no run '{name}' under {runs_dir}")
        return run

    def load_rollout(run: Path, rollout_id: int, reader: TraceReader) -> Any:
        try:
            return reader.rollout(rollout_id)
        except KeyError:
            raise HTTPException(404, f"no rollout {rollout_id} in run '{run.name}'") from None

    def runs_page(request: Request) -> Response:
        runs = [run_summary(name, run) for name, run in find_runs(runs_dir).items()]
        return render("runs.html", runs=runs, runs_dir=str(runs_dir))

    def run_page(request: Request) -> Response:
        name = request.path_params["name"]
        run = run_folder(name)
        with closing(TraceReader(run / TRACE_FILE)) as reader:
            table = rollout_page(reader, request.query_params)
            envs, meta, everything = reader.envs(), reader.metadata(), reader.count()
        pages = {"prev": page_query(table, table["page"] - 1) if table["page"] > 1 else None,
                 "next": page_query(table, table["page"] + 1) if table["page"] < table["pages"] else None}
        return render("run.html", name=name, table=table, envs=envs, everything=everything, pages=pages,
                      charts=reward_charts(run_metrics(run)), meta=meta, when=when,
                      finish_reasons=FINISH_REASONS, orders=ORDERS)

    def rollout_view(request: Request) -> Response:
        name, rollout_id = request.path_params["name"], request.path_params["id"]
        run = run_folder(name)
        with closing(TraceReader(run / TRACE_FILE)) as reader:
            record, meta = load_rollout(run, rollout_id, reader), reader.metadata()
        decode = run_decoder(run, meta)
        versions = sorted({v for v, m in zip(record.versions, record.mask) if m})
        return render("rollout.html", name=name, r=record, spans=token_spans(record, decode),
                      tokenizer=decode is not None, versions=[(v, f"v{v % VERSION_COLOURS}") for v in versions],
                      logprob_legend=LOGPROB_LEGEND, pretty_arguments=pretty_arguments, message_text=message_text,
                      when=when)

    def api_runs(request: Request) -> Response:
        return JSONResponse([run_summary(name, run) for name, run in find_runs(runs_dir).items()])

    def api_rollouts(request: Request) -> Response:
        with closing(TraceReader(run_folder(request.path_params["name"]) / TRACE_FILE)) as reader:
            return JSONResponse(rollout_page(reader, request.query_params))

    def api_rollout(request: Request) -> Response:
        run = run_folder(request.path_params["name"])
        with closing(TraceReader(run / TRACE_FILE)) as reader:
            return JSONResponse(asdict(load_rollout(run, request.path_params["id"], reader)))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return render("error.html", status_code=exc.status_code, status=exc.status_code, detail=exc.detail)

    return Starlette(
        routes=[
            Route("/", runs_page),
            Route("/run/{name}", run_page),
            Route("/run/{name}/rollout/{id:int}", rollout_view),
            Route("/api/runs", api_runs),
            Route("/api/run/{name}/rollouts", api_rollouts),
            Route("/api/run/{name}/rollout/{id:int}", api_rollout),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: http_error},
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(runs_dir: Path, host: str = "127.0.0.1", port: int = 8050) -> None:
    import uvicorn

    if not is_loopback(host):
        print(f"warning: serving on {host}, not loopback: anyone who can reach it reads every prompt, response "
              "and config of these runs (there is no authentication)", file=sys.stderr)
    print(f"gymrl traces: http://{host}:{port}/ (runs under {runs_dir})", file=sys.stderr)
    uvicorn.run(create_app(runs_dir), host=host, port=port, log_level="warning")
