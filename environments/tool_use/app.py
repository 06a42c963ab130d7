"""NeMo Gym resources server for tool_use: the tools, per-episode key-value stores, and /verify."""

from typing import Any

from fastapi import FastAPI, Request
from nemo_gym.base_resources_server import BaseSeedSessionRequest, BaseSeedSessionResponse, SimpleResourcesServer
from nemo_gym.server_utils import SESSION_ID_KEY
from pydantic import BaseModel, ConfigDict, Field

from environments.tool_use.tools import calculate
from gymrl.envs.nemo_server import RowVerifyRequest, TextVerifyResponse, final_message_text
from gymrl.utf8 import clean, clean_text
from rewards.arithmetic import score_arithmetic
from rewards.tool_use import score_kv_copy, score_lookup
from rewards.types import RewardResult


class SeedRequest(BaseSeedSessionRequest):
    model_config = ConfigDict(extra="allow")
    initial_store: dict[str, str] = Field(default_factory=dict)


class CalculatorRequest(BaseModel):
    expression: str


class KeyRequest(BaseModel):
    key: str


class KeyValueRequest(BaseModel):
    key: str
    value: str


class ToolUseServer(SimpleResourcesServer):
    stores: dict[str, dict[str, str]] = Field(default_factory=dict)  # session id -> that episode's store
    reads: dict[str, set[str]] = Field(default_factory=dict)  # session id -> the keys its episode read

    def setup_webserver(self) -> FastAPI:
        app = super().setup_webserver()
        app.post("/calculator")(self.calculator)
        app.post("/kv_get")(self.kv_get)
        app.post("/kv_set")(self.kv_set)
        return app

    async def seed_session(self, request: Request, body: SeedRequest) -> BaseSeedSessionResponse:
        self.stores[request.session[SESSION_ID_KEY]] = dict(body.initial_store)
        return BaseSeedSessionResponse()

    async def calculator(self, body: CalculatorRequest) -> dict[str, Any]:
        try:
            return {"result": calculate(body.expression)}
        except ValueError as err:
            return {"error": str(err)}

    async def kv_get(self, request: Request, body: KeyRequest) -> dict[str, Any]:
        store = self.stores.get(request.session[SESSION_ID_KEY], {})
        self.reads.setdefault(request.session[SESSION_ID_KEY], set()).add(body.key)
        return {"value": store[body.key]} if body.key in store else {"error": f"no key {body.key!r}"}

    async def kv_set(self, request: Request, body: KeyValueRequest) -> dict[str, Any]:
        store = self.stores.setdefault(request.session[SESSION_ID_KEY], {})
        if len(store) >= 64 or len(body.value) > 256:
            return {"error": "store full or value too long"}
        store[body.key] = body.value
        return {"ok": True}

    async def verify(self, request: Request, body: RowVerifyRequest) -> TextVerifyResponse:
        row = body.model_extra or {}
        final_store = self.stores.pop(request.session[SESSION_ID_KEY], None)  # the episode is over: free it
        read = self.reads.pop(request.session[SESSION_ID_KEY], set())
        text = final_message_text(body)
        if text is None:
            result = RewardResult(0.0, "the episode ended without a final answer (a tool call was last)")
        elif row.get("kind") == "calc":
            result = score_arithmetic(clean_text(text), int(row["expected"]))
        elif row.get("kind") == "lookup":
            result = score_lookup(clean_text(text), row["initial_store"], row["source"], read)
        elif final_store is None:
            result = RewardResult(0.0, "no seeded session for this episode")
        else:
            result = score_kv_copy(row["initial_store"], final_store, row["source"], row["target"])
        return TextVerifyResponse(**clean(body.model_dump()), reward=result.reward, reason=clean_text(result.reason))
