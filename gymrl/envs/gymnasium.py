"""NeMo Gym's gymnasium protocol, as its ``gymnasium_agent`` speaks it to a ``GymnasiumServer`` (blackjack, the GRL
games): ``/reset`` with the task row gives the first observation and the episode's cookies; after each model turn,
``/step`` with the row and that turn's Responses-API response gives a reward, whether the episode ended
(terminated, truncated), the tools' outputs (``info.tool_outputs``) and the next observation. The episode's reward
is the sum of its steps' rewards; there is no ``/verify``.

Conformance replays recordings through these calls, and training episodes play through them, so both speak the
protocol the same way.
"""

from dataclasses import dataclass, field
from typing import Any

from gymrl.envs.client import Cookies, EnvClient, EnvServerError, function_call_output_item, responses_api_response

AGENT = "gymnasium_agent"  # the NeMo Gym agent that plays a GymnasiumServer
MODEL_ITEMS = ("message", "reasoning", "function_call")  # output item types a model turn is made of


@dataclass(frozen=True)
class Step:
    """One /step reply: the turn's reward and what the environment says back."""

    reward: float
    terminated: bool
    truncated: bool
    observation: str | None = None
    tool_outputs: list[dict[str, Any]] = field(default_factory=list)  # function_call_output items
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    def items(self) -> list[dict[str, Any]]:
        """What gymnasium_agent appends to the conversation after a step that did not end it: the tools' outputs,
        then the observation as a user message."""
        return self.tool_outputs + ([user_item(self.observation)] if self.observation else [])


def user_item(text: str) -> dict[str, Any]:
    """A user message as a Responses-API input item (gymnasium_agent's ``NeMoGymEasyInputMessage``)."""
    return {"type": "message", "role": "user", "content": text}


def reset(client: EnvClient, row: dict[str, Any]) -> tuple[str | None, Cookies]:
    """Start an episode: its first observation (None: the row's prompt is all the model sees) and its cookies."""
    reply, cookies = client.post_for_reply("/reset", row)
    observation = reply.get("observation") if isinstance(reply, dict) else None
    return (str(observation) if observation else None), cookies


def step(client: EnvClient, row: dict[str, Any], turn: list[dict[str, Any]] | dict[str, Any],
         cookies: Cookies) -> tuple[Step, Cookies]:
    """One model turn's output items (or its whole Responses-API response) through /step."""
    response = turn if isinstance(turn, dict) else responses_api_response(turn)
    reply, cookies = client.post_for_reply("/step", row | {"response": response}, cookies)
    if not isinstance(reply, dict) or isinstance(reply.get("reward", 0.0), bool) or \
            not isinstance(reply.get("reward", 0.0), (int, float)):
        raise EnvServerError(f"env '{client.name}': /step replied without a numeric reward: {str(reply)[:200]}")
    info = reply.get("info") if isinstance(reply.get("info"), dict) else {}
    outputs = [function_call_output_item(str(o["call_id"]), str(o["output"]))
               for o in info.get("tool_outputs") or [] if isinstance(o, dict) and "call_id" in o and "output" in o]
    return Step(float(reply.get("reward", 0.0)), bool(reply.get("terminated")), bool(reply.get("truncated")),
                reply.get("observation") or None, outputs, info), cookies


def model_turns(output: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A recorded episode's output split into its model turns: the runs of items the model produced (messages of
    the assistant, reasoning, function calls) between those gymnasium_agent added (function call outputs, user
    messages). Two turns with nothing added between them read as one."""
    turns: list[list[dict[str, Any]]] = []
    previous_was_model = False
    for item in output:
        is_model = isinstance(item, dict) and item.get("type", "message") in MODEL_ITEMS and \
            item.get("role", "assistant") == "assistant"
        if is_model:
            if not previous_was_model:
                turns.append([])
            turns[-1].append(item)
        previous_was_model = is_model
    return turns
