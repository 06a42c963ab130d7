"""Gym-venv side: a NeMo Gym resources server base for environments that score the answer text.

This module runs inside the NeMo Gym venv (Python >= 3.12, ``nemo-gym``), never in the harness. An
author subclasses :class:`TextVerifyServer` and writes one method, ``score(row, text)``; the row is
the task's JSONL row (its ground-truth fields arrive with the /verify request, as NeMo Gym sends
them), the text is the model's final answer text. Everything else is NeMo Gym's own server.
"""

import asyncio
from abc import abstractmethod
from typing import Any, ClassVar

from nemo_gym.base_resources_server import (
    BaseResourcesServerConfig,
    BaseVerifyRequest,
    BaseVerifyResponse,
    SimpleResourcesServer,
)
from pydantic import ConfigDict

from gymrl.utf8 import clean, clean_text
from rewards.types import RewardResult


class RowVerifyRequest(BaseVerifyRequest):
    """A verify request that keeps the task row's extra fields (the ground truth)."""

    model_config = ConfigDict(extra="allow")


class TextVerifyResponse(BaseVerifyResponse):
    model_config = ConfigDict(extra="allow")
    reason: str
    breakdown: dict[str, float] = {}


def response_text(body: BaseVerifyRequest) -> str:
    """The assistant's text across the response's message items (tool calls are not text)."""
    parts = []
    for item in body.response.output:
        if getattr(item, "type", None) == "message":
            parts.extend(c.text for c in item.content if getattr(c, "type", None) == "output_text")
    return "".join(parts)


def final_message_text(body: BaseVerifyRequest) -> str | None:
    """The text of the episode's last item when it is an assistant message (its answer), else None."""
    output = body.response.output
    if not output or getattr(output[-1], "type", None) != "message":
        return None
    return "".join(c.text for c in output[-1].content if getattr(c, "type", None) == "output_text")


class TextVerifyServer(SimpleResourcesServer):
    config: BaseResourcesServerConfig
    # True: ``score`` runs in a worker thread, so the server answers other requests while it waits (for a
    # sandboxed run, say). False: it runs on the event loop's thread, the main thread, where math-verify's
    # SIGALRM timeouts work; a slow ``score`` then holds every other request of the server.
    score_in_thread: ClassVar[bool] = False

    @abstractmethod
    def score(self, row: dict[str, Any], text: str) -> RewardResult:
        """The reward for ``text`` (the model's answer) on the task ``row``."""

    async def verify(self, body: RowVerifyRequest) -> TextVerifyResponse:
        row = body.model_extra or {}
        try:  # lone surrogates (JSON \udcff escapes) become U+FFFD: the reply must encode as UTF-8
            text = clean_text(response_text(body))
            result = await asyncio.to_thread(self.score, row, text) if self.score_in_thread else self.score(row, text)
        except Exception as err:  # a verifier bug must not take the server down; it scores 0 with the reason
            result = RewardResult(0.0, f"verifier error: {type(err).__name__}: {err}")
        return TextVerifyResponse(**clean(body.model_dump()), reward=result.reward, reason=clean_text(result.reason),
                                  breakdown=result.breakdown)
