"""Fault-injection fixtures: runs of the shared demo session with a changed config, and a proxy that puts a
slow or garbage-answering server in front of a real NeMo Gym server."""

import contextlib
import sqlite3
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from gymrl.envs.client import EnvClient
from gymrl.traces.store import TRACE_FILE


@pytest.fixture
def trained_per_step():
    """``trained_per_step(run_dir)``: the number of rollouts in the trace store's train split, by step."""
    def count(run_dir) -> Counter:
        with contextlib.closing(sqlite3.connect(run_dir / TRACE_FILE)) as db:
            return Counter(dict(db.execute("SELECT step, count(*) FROM rollouts WHERE split = 'train' GROUP BY step")))

    return count


@pytest.fixture
def run_config():
    """``with run_config(session, run_dir, steps, **train_keys):`` the shared session configured for one run."""
    return _run_config


@contextlib.contextmanager
def _run_config(session, run_dir, steps: int, rollout: dict | None = None, **train):
    """The shared session with ``run_dir``, ``steps``, other train keys and ``rollout`` keys changed, for the
    length of a run."""
    cfg = session.cfg
    session.cfg = cfg.model_copy(update={
        "run_dir": run_dir,
        "rollout": cfg.rollout.model_copy(update=rollout or {}),
        "train": cfg.train.model_copy(update={"steps": steps, "checkpoint_every": 0} | train),
        "eval": cfg.eval.model_copy(update={"every": steps})})
    try:
        yield session.cfg
    finally:
        session.cfg = cfg


class FaultProxy:
    """An HTTP server in front of ``upstream`` that forwards every request, or answers the verify routes (``/verify``,
    and ``/verify_batch``, which the runner uses for groups without tools) with a fault:
    ``slow`` (waits ``delay_s`` first), ``garbage`` (200 with bytes that are not JSON) or ``error`` (HTTP 500);
    with ``window_s``, only the /verify calls in the ``window_s`` seconds from the first faulted one."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.mode, self.window_s, self.delay_s = "pass", None, 0.0
        self._until: float | None = None
        self.faults = 0  # requests answered with a fault
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward("GET", None)

            def do_POST(self):
                self._forward("POST", self.rfile.read(int(self.headers.get("content-length", 0))))

            def _forward(self, method, body):
                fault = proxy._take_fault(self.path)
                if fault == "slow":
                    time.sleep(proxy.delay_s)
                elif fault in ("garbage", "error"):
                    payload = b"\x00\xff<html>not json" if fault == "garbage" else b"internal error"
                    self.send_response(200 if fault == "garbage" else 500)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "cookie")}
                try:
                    reply = httpx.request(method, proxy.upstream + self.path, content=body, headers=headers, timeout=60)
                except httpx.TransportError:
                    return  # the client sees a dropped connection
                self.send_response(reply.status_code)
                for k, v in reply.headers.multi_items():
                    if k.lower() in ("content-type", "set-cookie"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fault(self, mode: str, window_s: float | None = None, delay_s: float = 0.0) -> None:
        with self._lock:
            self.mode, self.window_s, self.delay_s, self._until = mode, window_s, delay_s, None

    def _take_fault(self, path: str) -> str:
        with self._lock:
            if self.mode == "pass" or path not in ("/verify", "/verify_batch"):
                return "pass"
            now = time.monotonic()
            if self.window_s is not None:
                self._until = self._until or now + self.window_s
                if now >= self._until:
                    return "pass"
            self.faults += 1
            return self.mode

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxied_env(reset_session):
    """The shared session with its arithmetic environment reached through a :class:`FaultProxy` (a 4 s timeout
    and one retry, so a fault shows quickly); the real client goes back afterwards."""
    session = reset_session()
    env = session.envs["arithmetic"]
    real = env.client
    proxy = FaultProxy(real.base_url)
    env.attach(EnvClient("arithmetic", proxy.url, timeout_s=4.0, retries=1, pool_size=256))
    try:
        yield session, proxy
    finally:
        env.client.close()
        env.attach(real)
        proxy.close()
