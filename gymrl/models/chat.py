"""Conversations as token ids, through the model's own chat template.

A multi-turn rollout is one token sequence: the prompt, then the model's turns (its sampled tokens,
trained on) and between them the environment's turns (tool results, masked out of the loss). The
environment's tokens are whatever the chat template puts between the end of one assistant turn and
the start of the next, found by rendering the conversation with and without the tool messages. The
rollout runner and the tiny model's warm-up both build sequences here, so the warm-up text is
token-for-token what the policy later sees.
"""

from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses-API tool definitions (NeMo Gym rows) in the chat-completions shape chat templates take."""
    if not tools:
        return None
    converted = []
    for tool in tools:
        if "function" in tool:  # already chat-completions shaped
            converted.append(tool)
            continue
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        converted.append({"type": "function", "function": function})
    return converted


def render_prompt(tokenizer, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                  template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Prompt ids: ``messages`` (and the tools, if any) through the chat template, assistant turn opened.
    ``template_kwargs`` are the template's own variables (Nemotron-3: ``enable_thinking``, ``low_effort``)."""
    return list(tokenizer.apply_chat_template(messages, tools=chat_tools(tools), add_generation_prompt=True,
                                              tokenize=True, return_dict=False, **(template_kwargs or {})))


def _render_text(tokenizer, messages: list[Message], tools, generation_prompt: bool,
                 template_kwargs: dict[str, Any] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=chat_tools(tools), add_generation_prompt=generation_prompt,
                                         tokenize=False, **(template_kwargs or {}))


class TemplateError(ValueError):
    """A chat template that cannot be extended turn by turn (rendering is not prefix-stable)."""


def environment_turn_ids(tokenizer, history: list[Message], tool_messages: list[Message],
                         tools: list[dict[str, Any]] | None = None,
                         template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids the environment adds after the last assistant turn of ``history`` (which ends with the
    model's end-of-turn token): the template's text from there, through ``tool_messages``, to the
    opening of the next assistant turn."""
    before = _render_text(tokenizer, history, tools, False, template_kwargs)
    after = _render_text(tokenizer, history + tool_messages, tools, True, template_kwargs)
    if not after.startswith(before):
        raise TemplateError("the chat template renders earlier turns differently once tool messages follow; "
                            "multi-turn rollouts need a prefix-stable template")
    eos = tokenizer.eos_token
    end = before.rfind(eos)
    if end < 0:
        raise TemplateError(f"the chat template does not close the assistant turn with {eos!r}")
    text = before[end + len(eos):] + after[len(before):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def as_turns(response: str | list[Message]) -> list[Message]:
    """A response text as one assistant turn; an episode's turns as they are."""
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


@dataclass
class TokenizedConversation:
    """A whole conversation as ids: ``prompt_ids``, then ``completion_ids`` with ``completion_mask``
    1 on the model's tokens and 0 on the environment's."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]


def tokenize_transcript(tokenizer, messages: list[Message], transcript: str | list[Message],
                        tools: list[dict[str, Any]] | None = None) -> TokenizedConversation:
    """A prompt and the turns that follow it (one response string, or alternating assistant and tool
    messages), each assistant turn closed by the end-of-turn token: the warm-up's training sequences."""
    turns = as_turns(transcript)
    prompt = render_prompt(tokenizer, messages, tools)
    ids: list[int] = []
    mask: list[int] = []
    history = list(messages)
    i = 0
    while i < len(turns):
        turn = turns[i]
        if turn["role"] != "assistant":
            raise ValueError(f"transcript turn {i} should be the assistant's, got {turn['role']!r}")
        own = tokenizer(turn["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids += own
        mask += [1] * len(own)
        history.append(turn)
        i += 1
        tool_messages = []
        while i < len(turns) and turns[i]["role"] == "tool":
            tool_messages.append(turns[i])
            i += 1
        if tool_messages:
            env_ids = environment_turn_ids(tokenizer, history, tool_messages, tools)
            ids += env_ids
            mask += [0] * len(env_ids)
            history += tool_messages
    return TokenizedConversation(prompt, ids, mask)
