"""Tool calls (and reasoning) read from model output by vLLM's own parsers.

The parser is the one ``vllm serve --tool-call-parser NAME [--reasoning-parser R]`` composes
(``ParserManager.get_parser``), called as its chat-completion handler calls it, so a rollout here reads a
model's reasoning, content and tool calls exactly as a deployed endpoint returns them to an agent:
``qwen3_coder`` for Nemotron-3's XML style
(``<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>``) and
``hermes`` for JSON inside ``<tool_call>`` tags. With a reasoning parser, tool calls are read from the
content only, where that parser puts the end of the reasoning (vLLM 0.32's ``nemotron_v3`` and ``qwen3``
end it at a ``<tool_call>``, so a call written inside ``<think>`` is served as a call; ``deepseek_r1``
keeps it in the reasoning, where it is not run).
"""

import json
import logging
import uuid
from collections.abc import Sequence
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
    content: str  # the turn's text outside its reasoning and its tool calls
    tool_calls: list[ToolCall]
    reasoning: str | None = None  # the reasoning parser's share of the text (None: no reasoning parser, or none)


def parser_class(name: str) -> type:
    """vLLM's tool parser class registered as ``name``; a clear error naming the choices if none is."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise ValueError(f"rollout.tool_call_parser: unknown parser '{name}'; vLLM has: "
                         f"{', '.join(ToolParserManager.list_registered())}") from None


class ToolCallParser:
    """``parse(text, tools)``: a completion's text split into reasoning, content and tool calls.
    ``reasoning_parser``: the name vLLM registers (a plugin that registers it must be imported first:
    ``vllm_checks.reasoning_parser_class``)."""

    def __init__(self, name: str, tokenizer, reasoning_parser: str | None = None):
        from vllm.parser.parser_manager import ParserManager

        tool_cls = parser_class(name)
        self.name, self.reasoning_parser = name, reasoning_parser
        self._tokenizer = tokenizer
        self._cls = ParserManager.get_parser(tool_parser_name=name, reasoning_parser_name=reasoning_parser,
                                             enable_auto_tools=True, tokenizer=tokenizer)
        # Malformed tool calls are ordinary model output during RL (they score low); vLLM's parsers log a
        # traceback for each one, which would bury the run's own output.
        logging.getLogger(tool_cls.__module__).setLevel(logging.CRITICAL)

    def parse(self, text: str, tools: list[dict[str, Any]] | None, prompt_ids: Sequence[int] = (),
              token_ids: Sequence[int] = ()) -> ParsedTurn:
        """``prompt_ids``: the sequence before this turn, ``token_ids``: the turn's own tokens (reasoning parsers that
        read tokens use them, as the server gives them). Without ``tools`` no tool call is read."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        # The request carries the tool schemas: qwen3_coder uses them to type parameter values.
        request = ChatCompletionRequest(model="policy", messages=[{"role": "user", "content": ""}],
                                        tools=chat_tools(tools) if tools else None,
                                        tool_choice="auto" if tools else "none")
        parser = self._cls(self._tokenizer, request.tools)
        if prompt_ids:
            parser.set_prompt_token_ids(list(prompt_ids))
        reasoning, content, found = parser.parse(text, request, enable_auto_tools=True,
                                                 model_output_token_ids=list(token_ids))
        calls = []
        for call in found or []:
            raw = call.arguments or "{}"
            try:
                arguments = json.loads(raw)
            except json.JSONDecodeError:
                arguments = None
            calls.append(ToolCall(call.name, arguments if isinstance(arguments, dict) else None, raw,
                                  getattr(call, "id", None) or f"call_{uuid.uuid4().hex[:12]}"))
        if self.reasoning_parser is None and not calls:
            content = text  # nothing taken out: the text as the model wrote it
        return ParsedTurn(content or "", calls, reasoning if self.reasoning_parser is not None else None)
