"""Tool calls read from model output by vLLM's own tool-call parsers.

The same parser classes serve ``vllm serve --tool-call-parser NAME``, so a rollout here reads a
model's tool calls exactly as a deployed endpoint would: ``qwen3_coder`` for Nemotron-3's XML style
(``<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>``) and
``hermes`` for JSON inside ``<tool_call>`` tags.
"""

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from gymrl.models.chat import chat_tools


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | None  # None when the model's arguments are not a JSON object
    raw_arguments: str
    call_id: str


@dataclass(frozen=True)
class ParsedTurn:
    content: str  # the turn's text outside its tool calls
    tool_calls: list[ToolCall]


def parser_class(name: str) -> type:
    """vLLM's tool parser class registered as ``name``; a clear error naming the choices if none is."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise ValueError(f"rollout.tool_call_parser: unknown parser '{name}'; vLLM has: "
                         f"{', '.join(ToolParserManager.list_registered())}") from None


class ToolCallParser:
    """``parse(text, tools)``: a completion's text split into content and tool calls."""

    def __init__(self, name: str, tokenizer):
        self._cls = parser_class(name)
        self.name = name
        self._tokenizer = tokenizer
        # Malformed tool calls are ordinary model output during RL (they score low); vLLM's parsers log a
        # traceback for each one, which would bury the run's own output.
        logging.getLogger(self._cls.__module__).setLevel(logging.CRITICAL)

    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> ParsedTurn:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        # The request carries the tool schemas: qwen3_coder uses them to type parameter values.
        request = ChatCompletionRequest(model="policy", messages=[{"role": "user", "content": ""}], tools=chat_tools(tools))
        found = self._cls(self._tokenizer).extract_tool_calls(text, request)
        if not found.tools_called:
            return ParsedTurn(text, [])
        calls = []
        for call in found.tool_calls:
            raw = call.function.arguments or "{}"
            try:
                arguments = json.loads(raw)
            except json.JSONDecodeError:
                arguments = None
            calls.append(ToolCall(call.function.name, arguments if isinstance(arguments, dict) else None, raw,
                                  call.id or f"call_{uuid.uuid4().hex[:12]}"))
        return ParsedTurn(found.content or "", calls)
