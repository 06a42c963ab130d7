"""gymrl eval against real servers on loopback: vLLM's OpenAI server and llama.cpp's (llama-cpp-python) serving
the GGUF export of the same tiny model, and gymrl's own engine; plus endpoints that fail (fakes beside them).

One server of each kind for the module. llama.cpp's server runs from ``.venv-llama`` (``make test`` builds it).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gymrl.cli import app
from gymrl.config import EndpointConfig, RolloutConfig, SamplingConfig
from gymrl.eval.endpoint import ChatEndpoint, EndpointError
from gymrl.eval.episodes import EndpointRunner
from gymrl.eval.report import pass_at_k
from gymrl.eval.run import EngineBackend
from gymrl.traces.store import TRACE_FILE, TraceReader

pytestmark = pytest.mark.slow  # starts llama.cpp's server and evaluates through it

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"
GREEDY = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=24)
N_TASKS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s} s: {log.read_text()[-2000:]}")


def start_server(cmd: list[str], port: int, log: Path, env: dict[str, str], timeout_s: float = 300):
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ | env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, timeout_s)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def vllm_url(demo_model, tmp_path_factory):
    """``vllm serve`` of the demo's tiny model on CPU, set up as gymrl's engines are (rollout/engine.py)."""
    port = free_port()
    proc, url = start_server(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(demo_model),
         "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "128",
         "--gpu-memory-utilization", "0.2", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)],
        port, tmp_path_factory.mktemp("vllm") / "server.log",
        {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"})
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def gguf_file(demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    result = CliRunner().invoke(app, ["export", str(demo_model), str(out), "--gguf"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def llama_url(gguf_file, tmp_path_factory):
    """llama.cpp's server (llama-cpp-python's) on the GGUF export, one thread as the machine has few cores."""
    assert LLAMA_PYTHON.is_file(), f"{LLAMA_PYTHON} missing: `make test` builds .venv-llama"
    port = free_port()
    proc, url = start_server(
        [str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf_file), "--model_alias", "tiny",
         "--n_ctx", "128", "--n_threads", "1", "--n_batch", "128", "--host", "127.0.0.1", "--port", str(port)],
        port, tmp_path_factory.mktemp("llama") / "server.log", {}, timeout_s=120)
    yield url
    stop(proc)


LLAMA_CFG = EndpointConfig(extra_body={"repeat_penalty": 1.0})  # its default 1.1 would change greedy answers


def tokenize_texts(tokenizer) -> list[str]:
    """Chat prompts as the template renders them, and text that exercises digits, spaces and bytes."""
    messages = [{"role": "user", "content": "What is 7+5? Answer in <answer></answer>."}]
    return [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False),
        "<think>3+5 = 8</think><answer>8</answer><|im_end|>",
        "  12345 apples,\tand\n\n  x-1=-2  ", "naïve café 日本 🙂", "<tool_call>{\"a\": 10}</tool_call>",
    ]


def test_gguf_tokenizes_as_hf(llama_url, demo_model):
    """llama.cpp reads the exported tokenizer as transformers does: same ids, and the same text back with the
    control tokens left out (llama.cpp's detokenize, transformers' skip_special_tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    for text in tokenize_texts(tokenizer):
        hf = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = httpx.post(llama_url + "/extras/tokenize", json={"input": text}, timeout=30).json()["tokens"]
        assert got == hf, text
        back = httpx.post(llama_url + "/extras/detokenize", json={"tokens": hf}, timeout=30).json()["text"]
        assert back == tokenizer.decode(hf, skip_special_tokens=True), text  # as vLLM decodes outputs


def endpoint_rollouts(url: str, cfg: EndpointConfig, session, tasks, tokenizer=None):
    endpoint = ChatEndpoint(url, cfg)
    try:
        return EndpointRunner(endpoint, session.envs, RolloutConfig(), tokenizer).run(tasks, 1, GREEDY)
    finally:
        endpoint.close()


@pytest.mark.engine
def test_greedy_scores_agree(fresh_session, vllm_url, llama_url, tmp_path):
    """The same held-out tasks, greedy: gymrl's engine, vllm serve and llama.cpp give the same answers and rewards."""
    session = fresh_session
    tasks = session.envs["arithmetic"].tasks("eval")[:N_TASKS]
    own = EngineBackend(session.runner, 8).run(tasks, 1, GREEDY, lambda: None)
    served = endpoint_rollouts(vllm_url, EndpointConfig(), session, tasks, session.tokenizer)
    llama = endpoint_rollouts(llama_url, LLAMA_CFG, session, tasks)
    assert [r.text for r in served] == [r.text for r in own]
    assert [r.text for r in llama] == [r.text for r in own]
    assert [r.reward for r in served] == [r.reward for r in own] == [r.reward for r in llama]
    # Re-tokenised locally, vllm serve's answers are the token ids gymrl's engine sampled.
    assert [r.completion_ids for r in served] == [r.completion_ids for r in own]
    # The demo's model answers greedily off by one (its warm-up is 70% wrong), so every reward is 0 here: the
    # answers are the comparison that can fail, and they differ from task to task.
    assert len({r.text for r in own}) > N_TASKS // 2


def test_eval_cli_on_endpoint_writes_report_and_traces(vllm_url, tmp_path):
    run_dir = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--endpoint", vllm_url, "--env", "arithmetic", "--n", "4", "--samples",
                                      "3", "--temperature", "1.0", "--max-tokens", "24", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    (arith,) = report["envs"]
    assert (arith["env"], arith["tasks"], arith["samples"]) == ("arithmetic", 4, 3)
    assert arith["pass_at_1_ci"][0] <= arith["pass_at_1"] <= arith["pass_at_1_ci"][1]
    assert arith["pass_at_1"] <= arith["pass_at_k"]
    reader = TraceReader(run_dir / TRACE_FILE)
    rows = reader.page(limit=100)
    assert len(rows) == 12 and {r["split"] for r in rows} == {"eval"}
    assert sum(r["reward"] for r in rows) / 12 == pytest.approx(arith["mean_reward"])
    assert reader.metadata()["eval"]["samples"] == 3
    stats = CliRunner().invoke(app, ["traces", "stats", str(run_dir)], env={"COLUMNS": "400"})
    assert stats.exit_code == 0 and "arithmetic" in stats.output, stats.output


def test_pass_at_k():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)


class FakeEndpoint(BaseHTTPRequestHandler):
    """An endpoint that lists a model and then answers chat requests wrongly (``mode``): not a chat completion,
    not JSON, or too slowly."""

    mode = "malformed"

    def _send(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the slow mode's client gave up first, as it should
            pass

    def do_GET(self):
        self._send(json.dumps({"data": [{"id": "fake"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        if self.mode == "slow":
            time.sleep(5)
        self._send(b"<html>oops</html>" if self.mode == "html" else json.dumps({"result": "hello"}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_endpoint():
    servers = []

    def start(mode: str) -> str:
        handler = type("Handler", (FakeEndpoint,), {"mode": mode})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("mode,message", [("malformed", "not a chat completion"), ("html", "not JSON")])
def test_malformed_endpoint_is_one_clear_error(fake_endpoint, mode, message):
    endpoint = ChatEndpoint(fake_endpoint(mode), EndpointConfig(retries=0))
    with pytest.raises(EndpointError, match=message):
        endpoint.chat([{"role": "user", "content": "hi"}], None, GREEDY)


def test_slow_endpoint_is_bounded_by_the_timeout(fake_endpoint):
    endpoint = ChatEndpoint(fake_endpoint("slow"), EndpointConfig(timeout_s=0.5, retries=1))
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"failed after 2 tries: TimeoutError: no reply within 0.5 s"):
        endpoint.chat([{"role": "user", "content": "hi"}], None, GREEDY)
    assert time.monotonic() - started < 4  # two 0.5 s tries and a 0.2 s backoff, not the server's 5 s each


def test_unreachable_endpoint_cli_error(tmp_path):
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(app, ["eval", "--endpoint", f"http://127.0.0.1:{port}", "--env", "arithmetic",
                                      "--out", str(tmp_path / "e"), "--set", "endpoint.retries=1"])
    assert result.exit_code == 2
    assert f"endpoint http://127.0.0.1:{port}/v1/models failed after 2 tries: ConnectError" in result.output
    bad = CliRunner().invoke(app, ["eval", "--endpoint", "localhost:8000", "--env", "arithmetic"])
    assert bad.exit_code == 2 and "--endpoint must be an http(s) URL" in bad.output


def test_eval_on_an_unchanged_nemo_gym_environment(vllm_url, tmp_path):
    """`gymrl eval --endpoint` on configs/reasoning_gym.yaml: NeMo Gym's reasoning_gym server scores the answers."""
    run_dir = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "configs/reasoning_gym.yaml", "--endpoint", vllm_url, "--n", "4",
                                      "--max-tokens", "24", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    (env,) = json.loads((run_dir / "report.json").read_text())["envs"]
    assert (env["env"], env["tasks"], env["samples"]) == ("reasoning_gym", 4, 1)
    rows = TraceReader(run_dir / TRACE_FILE).page(limit=10)
    assert len(rows) == 4 and {r["env"] for r in rows} == {"reasoning_gym"}
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)  # reasoning_gym's score, not a transport error's 0
