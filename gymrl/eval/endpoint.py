"""A client for any OpenAI-compatible chat-completions endpoint: timeouts, bounded retries, one-line errors.

Retries follow the environment client's rule (``gymrl/envs/client.py``): a connection error, a timeout or a
5xx is tried again with backoff (0.2 s, 0.4 s, ...); a 4xx is our request's fault and is not; a reply that
is not a chat completion is the server's fault, named as such.
"""

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from gymrl.config import EndpointConfig, SamplingConfig
from gymrl.rollout.tool_calls import ParsedTurn, ToolCall


class EndpointError(RuntimeError):
    """An endpoint that cannot be reached, is too slow or answers something else; the message names it."""


@dataclass(frozen=True)
class ChatReply:
    text: str  # the assistant message's content
    finish_reason: str  # stop | length (a server's "tool_calls" counts as stop)
    parsed: ParsedTurn | None  # the server's own tool calls, when it parsed any


def api_base(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` as the ``/v1`` base."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint must be an http(s) URL, got '{url}'")
    return url if url.endswith("/v1") else url + "/v1"


def _tool_call(call: dict[str, Any], index: int) -> ToolCall:
    raw = call["function"].get("arguments") or "{}"
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError:
        arguments = None
    return ToolCall(call["function"]["name"], arguments if isinstance(arguments, dict) else None, raw,
                    call.get("id") or f"call_{index}")


def _reply(body: Any) -> ChatReply:
    """A chat completion's first choice; ValueError when the body is not one."""
    try:
        choice = body["choices"][0]
        message = choice["message"]
        text = message.get("content") or ""
        calls = [_tool_call(c, i) for i, c in enumerate(message.get("tool_calls") or [])]
        # vllm serve --reasoning-parser returns the reasoning apart ("reasoning"; "reasoning_content" before 0.16)
        reasoning = message.get("reasoning") or message.get("reasoning_content") or None
        finish = choice.get("finish_reason") or "stop"
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise ValueError(f"not a chat completion ({type(err).__name__}: {err}): {str(body)[:200]}") from None
    parsed = ParsedTurn(text, calls, reasoning) if calls or reasoning else None
    return ChatReply(text, "length" if finish == "length" else "stop", parsed)


class ChatEndpoint:
    def __init__(self, url: str, cfg: EndpointConfig):
        self.base = api_base(url)
        self.cfg = cfg
        self._http = httpx.Client(timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)),
                                  limits=httpx.Limits(max_connections=cfg.concurrency))
        self.model = cfg.model or self._first_model()

    def _send(self, method: str, route: str, payload: dict[str, Any] | None = None) -> Any:
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            try:
                reply = self._http.request(method, self.base + route, json=payload)
                if reply.status_code < 500:
                    if reply.status_code >= 400:
                        raise EndpointError(f"endpoint {self.base}{route}: HTTP {reply.status_code}: {reply.text[:300]}")
                    try:
                        return reply.json()
                    except ValueError:
                        raise EndpointError(f"endpoint {self.base}{route} answered with something that is not JSON: "
                                            f"{reply.text[:200]!r}") from None
                last = EndpointError(f"HTTP {reply.status_code}: {reply.text[:200]}")
            except httpx.TimeoutException as err:
                last = TimeoutError(f"no reply within {self.cfg.timeout_s:g} s (endpoint.timeout_s) [{type(err).__name__}]")
            except httpx.TransportError as err:
                last = err
            if attempt < self.cfg.retries:
                time.sleep(0.2 * 2**attempt)
        raise EndpointError(f"endpoint {self.base}{route} failed after {self.cfg.retries + 1} tries: "
                            f"{type(last).__name__}: {last}")

    def _first_model(self) -> str:
        body = self._send("GET", "/models")
        try:
            return body["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"endpoint {self.base}/models lists no model (is it an OpenAI-compatible server?): "
                                f"{str(body)[:200]}") from None

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, sampling: SamplingConfig,
             template_kwargs: dict[str, Any] | None = None) -> ChatReply:
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": sampling.temperature,
                                   "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "n": 1}
        if tools:
            payload |= {"tools": tools, "tool_choice": self.cfg.tool_choice}
        if template_kwargs:
            payload["chat_template_kwargs"] = template_kwargs
        body = self._send("POST", "/chat/completions", payload | self.cfg.extra_body)
        try:
            return _reply(body)
        except ValueError as err:
            raise EndpointError(f"endpoint {self.base}/chat/completions: {err}") from None

    def close(self) -> None:
        self._http.close()
