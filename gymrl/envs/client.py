"""HTTP client for NeMo Gym resources servers: pooled connections, timeouts, bounded retries.

NeMo Gym keys an episode's state (a tool's database, a game board) by a session cookie that
``/seed_session`` sets and every later tool call and ``/verify`` sends back. Many episodes share one
pooled client here, so the client itself keeps no cookies: each episode carries its own.
"""

import time
import uuid
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from http.cookies import SimpleCookie
from typing import Any

import httpx

Cookies = dict[str, str]


class EnvServerError(RuntimeError):
    """An environment server that cannot be reached or keeps failing; the message names it."""


class EpisodeLost(EnvServerError):
    """The server restarted during an episode: the session state its tools built is gone."""


def message_item(text: str) -> dict[str, Any]:
    """An assistant message as a Responses-API output item."""
    return {
        "id": f"msg_{uuid.uuid4().hex[:12]}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def reasoning_item(text: str) -> dict[str, Any]:
    """A turn's reasoning as a Responses-API reasoning item (what NeMo Gym's vLLM model server makes of the
    ``reasoning`` that ``vllm serve --reasoning-parser`` returns)."""
    return {"id": f"rs_{uuid.uuid4().hex[:12]}", "type": "reasoning",
            "summary": [{"type": "summary_text", "text": text}]}


def function_call_item(name: str, arguments: str, call_id: str) -> dict[str, Any]:
    return {"id": f"fc_{uuid.uuid4().hex[:12]}", "type": "function_call", "name": name, "arguments": arguments,
            "call_id": call_id, "status": "completed"}


def function_call_output_item(call_id: str, output: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


@dataclass(frozen=True)
class Usage:
    """An episode's tokens as NeMo Gym's simple_agent sums them over its model calls: each call's prompt (input)
    and the tokens it generated (output). A server may read them (mrcr's metrics)."""

    input_tokens: int = 0
    output_tokens: int = 0

    def add_call(self, prompt_tokens: int, generated_tokens: int) -> "Usage":
        return Usage(self.input_tokens + prompt_tokens, self.output_tokens + generated_tokens)

    def as_response_usage(self) -> dict[str, Any]:
        """The Responses-API ``usage`` object; simple_agent sets the details it does not count to 0."""
        return {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens}


def responses_api_response(output: str | list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
    """The model's turns as an OpenAI Responses-API response object, the shape /verify expects: one
    text becomes one message item; a multi-turn episode passes its items (messages, function calls
    and their outputs) in order. ``usage``: the episode's token counts, where the caller knows them."""
    return ({"usage": usage.as_response_usage()} if usage is not None else {}) | {
        "id": f"resp_{uuid.uuid4().hex[:12]}",
        "created_at": int(time.time()),
        "model": "gymrl-policy",
        "object": "response",
        "output": [message_item(output)] if isinstance(output, str) else output,
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
    }


def _cookie_header(cookies: Cookies | None) -> dict[str, str]:
    return {"cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}


def _set_cookies(reply: httpx.Response, cookies: Cookies | None) -> Cookies:
    """The episode's cookies after ``reply``: the old ones updated by its Set-Cookie headers."""
    updated = dict(cookies or {})
    for header in reply.headers.get_list("set-cookie"):
        jar = SimpleCookie()
        jar.load(header)
        updated |= {name: morsel.value for name, morsel in jar.items()}
    return updated


class EnvClient:
    def __init__(self, name: str, base_url: str, timeout_s: float = 30.0, retries: int = 3, pool_size: int = 16,
                 supervisor=None):
        """``supervisor``: the :class:`~gymrl.envs.launcher.ServerSupervisor` of a server gymrl started; a refused
        connection then has it restart a dead server before the call is tried again."""
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.supervisor = supervisor
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),  # stores nothing: see module doc
        )

    def _fail(self, route: str, tries: int, last: Exception | None) -> EnvServerError:
        return EnvServerError(f"env '{self.name}' at {self.base_url}{route} failed after {tries} "
                              f"tries: {type(last).__name__}: {last}")

    def post_for_reply(self, route: str, payload: dict[str, Any], cookies: Cookies | None = None) -> tuple[dict[str, Any], Cookies]:
        """POST with retries on connection errors, timeouts and 5xx (backoff 0.2 s, 0.4 s, ...); returns
        the JSON reply and the episode's cookies after it."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                reply = self._http.post(route, json=payload, headers=_cookie_header(cookies))
                if reply.status_code < 500:
                    reply.raise_for_status()
                    return reply.json(), _set_cookies(reply, cookies)
                last = EnvServerError(f"HTTP {reply.status_code}: {reply.text[:200]}")
            except (httpx.TransportError, ValueError) as err:  # ValueError: a reply that is not JSON
                last = err
                self._recover(err)
            except httpx.HTTPStatusError as err:  # 4xx: our request is wrong; retrying will not help
                raise EnvServerError(f"env '{self.name}' at {self.base_url}{route}: {err.response.status_code} "
                                     f"{err.response.text[:300]}") from None
            if attempt < self.retries:
                time.sleep(0.2 * 2**attempt)
        raise self._fail(route, self.retries + 1, last)

    def _recover(self, err: Exception) -> None:
        """After a refused connection, have the supervisor start the server again if it died (it raises, naming
        the server's log, once its restarts are used up)."""
        if isinstance(err, httpx.ConnectError) and self.supervisor is not None:
            self.supervisor.recover()

    @property
    def generation(self) -> int:
        """How many times the server behind this client was restarted."""
        return self.supervisor.generation if self.supervisor is not None else 0

    def post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self.post_for_reply(route, payload)[0]

    def seed_session(self, row: dict[str, Any]) -> Cookies:
        """Start an episode on the server (NeMo Gym's /seed_session gets the whole task row, as its agents send it;
        every field, gymrl's plugins' ``id`` too); its cookies."""
        return self.post_for_reply("/seed_session", row)[1]

    def call_tool(self, name: str, arguments: dict[str, Any], cookies: Cookies) -> tuple[str, Cookies]:
        """POST /<name> with the model's arguments; the reply body is the tool's output, errors included
        (a 4xx or 5xx is the tool telling the model its call was wrong, as in NeMo Gym's agents).

        Only a request that never reached the server is retried: a tool call may change state, so
        sending it twice is not safe. A server that stays unreachable is an :class:`EnvServerError`.
        """
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                reply = self._http.post(f"/{name}", json=arguments, headers=_cookie_header(cookies))
                return reply.text, _set_cookies(reply, cookies)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                last = err
                self._recover(err)
            except httpx.TransportError as err:  # sent, but no answer: the call may have run
                raise self._fail(f"/{name}", attempt + 1, err) from None
            if attempt < self.retries:
                time.sleep(0.2 * 2**attempt)
        raise self._fail(f"/{name}", self.retries + 1, last)

    def routes(self) -> set[str]:
        """The server's POST routes, from the OpenAPI schema a FastAPI server (every NeMo Gym server) serves."""
        try:
            reply = self._http.get("/openapi.json", timeout=self._http.timeout)
            reply.raise_for_status()
            paths = reply.json().get("paths") or {}
        except (httpx.HTTPError, ValueError, AttributeError) as err:
            raise EnvServerError(f"env '{self.name}' at {self.base_url}/openapi.json: no route list ({err})") from None
        return {p.lstrip("/") for p, methods in paths.items() if isinstance(methods, dict) and "post" in methods}

    def healthy(self) -> bool:
        try:
            return self._http.get("/", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def verify(self, row: dict[str, Any], output: str | list[dict[str, Any]] | dict[str, Any],
               cookies: Cookies | None = None) -> dict[str, Any]:
        """/verify of the row with the episode's output: a text, its output items, or a whole Responses-API
        response (a recorded one, say)."""
        response = output if isinstance(output, dict) else responses_api_response(output)
        payload = row | {"response": response}
        return self.post_for_reply("/verify", payload, cookies)[0]

    def close(self) -> None:
        self._http.close()
