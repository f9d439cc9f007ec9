"""Request bodies of the OpenAI-compatible API (pydantic validates them) and OpenAI-style errors."""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """Answered as {"error": {...}} with `status`, as OpenAI's API does."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


class InlineAdapter(BaseModel):
    """An adapter sent with the request: its config (fields of AdapterConfig; defaults where left out) and v."""
    model_config = ConfigDict(extra="forbid")
    config: dict = Field(default_factory=dict)
    v: list[list[float]] | list[float]


class Sampled(BaseModel):
    """The sampling fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do;
    known ones tinylora does not implement are refused (see UNSUPPORTED) rather than silently ignored."""
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)  # null means the default, as in OpenAI's API
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-2 ** 63, lt=2 ** 64)
    stream: bool | None = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes
    adapter: InlineAdapter | None = None

    def model_post_init(self, context) -> None:
        self.temperature = 1.0 if self.temperature is None else self.temperature
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.n = self.n or 1
        self.stream = bool(self.stream)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
        return stops

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED.items():
            if name in extra and extra[name] not in neutral:
                raise APIError(400, f"{name}={extra[name]!r} is not supported by tinylora serve", param=name)


UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"})}


class CompletionRequest(Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, "messages: only text content parts are supported", param="messages")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str | None = None
    adapter: InlineAdapter | None = None


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
