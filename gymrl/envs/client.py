"""HTTP client for NeMo Gym resources servers: pooled connections, timeouts, bounded retries."""

import time
import uuid
from typing import Any

import httpx


class EnvServerError(RuntimeError):
    """An environment server that cannot be reached or keeps failing; the message names it."""


def responses_api_response(text: str) -> dict[str, Any]:
    """The model's text as an OpenAI Responses-API response object, the shape /verify expects."""
    return {
        "id": f"resp_{uuid.uuid4().hex[:12]}",
        "created_at": int(time.time()),
        "model": "gymrl-policy",
        "object": "response",
        "output": [
            {
                "id": f"msg_{uuid.uuid4().hex[:12]}",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
    }


class EnvClient:
    def __init__(self, name: str, base_url: str, timeout_s: float = 30.0, retries: int = 3, pool_size: int = 16):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
        )

    def post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on connection errors, timeouts and 5xx (backoff 0.2 s, 0.4 s, ...)."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                reply = self._http.post(route, json=payload)
                if reply.status_code < 500:
                    reply.raise_for_status()
                    return reply.json()
                last = EnvServerError(f"HTTP {reply.status_code}: {reply.text[:200]}")
            except (httpx.TransportError, ValueError) as err:  # ValueError: a reply that is not JSON
                last = err
            except httpx.HTTPStatusError as err:  # 4xx: our request is wrong; retrying will not help
                raise EnvServerError(f"env '{self.name}' at {self.base_url}{route}: {err.response.status_code} "
                                     f"{err.response.text[:300]}") from None
            if attempt < self.retries:
                time.sleep(0.2 * 2**attempt)
        raise EnvServerError(f"env '{self.name}' at {self.base_url}{route} failed after {self.retries + 1} "
                             f"tries: {type(last).__name__}: {last}")

    def healthy(self) -> bool:
        try:
            return self._http.get("/", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def verify(self, row: dict[str, Any], text: str) -> dict[str, Any]:
        payload = {k: v for k, v in row.items() if k != "id"}
        payload["response"] = responses_api_response(text)
        return self.post("/verify", payload)

    def close(self) -> None:
        self._http.close()
