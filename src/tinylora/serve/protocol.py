"""Request bodies of the OpenAI-compatible API (pydantic validates them) and OpenAI-style errors."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; evaluation harnesses send their task's plus the EOS)
MAX_LOGPROBS = 5  # alternatives per position with `logprobs` (as OpenAI's legacy completions)


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


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                                  "rate_limit_error or server_error")
    param: str | None = Field(default=None, description="the request field at fault, if one is")
    code: str | None = Field(default=None, description="e.g. model_not_found, context_length_exceeded, "
                                                       "queue_full, invalid_api_key")


class ErrorResponse(BaseModel):
    """Every error the server answers (any status but 200), as OpenAI's API does."""
    error: ErrorDetail


class InlineAdapter(BaseModel):
    """An adapter sent with the request: its config (fields of AdapterConfig; defaults where left out) and v."""
    model_config = ConfigDict(extra="forbid")
    config: dict = Field(default_factory=dict)
    v: list[list[float]] | list[float]


NonEmpty = Annotated[str, Field(min_length=1)]


class Sampled(BaseModel):
    """The sampling fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do;
    known ones tinylora does not implement are refused (see UNSUPPORTED) rather than silently ignored.
    Limits set when the server starts (--max-tokens, --max-n, --max-prompt-tokens) are checked after these."""
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="the base model's served name, or an adapter's name")
    max_tokens: int | None = Field(default=None, ge=1, description="at most the server's --max-tokens (1024 by "
                                   "default) and what the context leaves after the prompt")
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0,  # null means the default, as in OpenAI's API
                                      description="0: greedy; null: 1")
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0, description="null: 1")
    n: int | None = Field(default=1, ge=1, description="choices per prompt: at most the server's --max-n (16 by "
                          "default)")
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=MAX_STOPS)] | None = None
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
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOPS} non-empty strings", param="stop")
        return stops

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED.items():
            if name in extra and extra[name] not in neutral:
                raise APIError(400, f"{name}={extra[name]!r} is not supported by tinylora serve", param=name)


# (completions declare logprobs and echo as fields: these entries refuse them on chat completions)
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"})}


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(Sampled):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(
        min_length=1)] = Field(description="text, token ids (below the vocabulary size), or a list of either")
    max_tokens: int | None = Field(default=16, ge=0, description="OpenAI's default for completions, 16; 0 only "
                                   "with echo (the prompt's log-probabilities alone); at most the server's "
                                   "--max-tokens and what the context leaves")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description=(
        "return each token's log-probability under the model (with the request's adapter) at temperature 1, "
        "whatever temperature/top_p sampled it, and the `logprobs` most likely tokens at each position"))
    echo: bool | None = Field(default=False, description="prepend the prompt to the text (and, with logprobs, its "
                              "tokens' log-probabilities, the first token's null)")
    add_special_tokens: bool = Field(default=True, description=(
        "vLLM's extension: let the tokenizer add its special tokens (BOS) to a text prompt; never to one that "
        "already starts with the BOS token (a chat-templated prompt)"))

    def model_post_init(self, context) -> None:
        super().model_post_init(context)
        self.echo = bool(self.echo)


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
    lora_name: str = Field(min_length=1)
