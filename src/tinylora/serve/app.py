"""`tinylora serve`: an OpenAI-compatible HTTP server for one base model and any number of adapters.

Every request names the base model or an adapter (`model`), or carries an adapter inline (`adapter`:
its config and v). All of them decode together in one batch on the Engine: a row's adapter is just its
own r×r matrices, so 1,000 distinct adapters cost what one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinylora.config import AdapterConfig
from tinylora.generation.engine import Engine
from tinylora.generation.scoring import Scores, token_logprobs
from tinylora.generation.sequence import Sampling
from tinylora.serve.limits import Limits
from tinylora.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    LoadAdapterRequest,
    Sampled,
    UnloadAdapterRequest,
    error_response,
)
from tinylora.serve.responses import Prompt, Run, decode_offsets
from tinylora.serve.worker import Job, QueueFull, Worker

MODELS_PAGE = 1000  # /v1/models lists at most this many adapters per call (a pack may hold millions)

# What each status means, as every route that can answer it declares it (body: ErrorResponse).
ERRORS = {
    400: "invalid request: bad JSON, a field out of its range, or past a limit of this server or the context",
    401: "a wrong or missing API key (only when the server has one)",
    403: "loading and unloading adapters at runtime is off (--allow-runtime-adapters)",
    404: "no model or adapter of that name",
    411: "no Content-Length header",
    413: "request body over --max-request-bytes",
    429: "the queue is full (--max-queue): retry later",
    500: "internal error, or generation failed (non-finite logits, out of memory)",
    503: "the engine thread is not running",
}
GENERATES = (400, 401, 404, 411, 413, 429, 500)  # the codes of each route, as the code above and below answers
ROUTE_ERRORS = {"/health": (401, 500, 503), "/v1/models": (400, 401, 500),
                "/v1/completions": GENERATES, "/v1/chat/completions": GENERATES,
                "/v1/load_lora_adapter": (400, 401, 403, 411, 413, 500),
                "/v1/unload_lora_adapter": (400, 401, 403, 404, 411, 413, 500)}


def _responses(path: str, **ok) -> dict:
    out = {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in ROUTE_ERRORS[path]}
    if ok:
        out[200] = ok
    return out


class Server:
    """The state behind the routes: model name, tokenizer, adapter bank, engine thread, limits."""

    def __init__(self, model, tokenizer, bank, *, name: str, api_key: str | None = None,
                 allow_runtime_adapters: bool = False, limits: Limits | None = None, weights: str = "auto",
                 graphs: bool = False):
        self.name, self.model, self.tokenizer, self.bank = name, model, tokenizer, bank
        self.api_key, self.allow_runtime_adapters = api_key, allow_runtime_adapters
        self.limits = limits or Limits()
        self.engine = Engine(model, tokenizer, bank=bank, weights=weights, max_batch=self.limits.max_batch,
                             prefill_chunk=self.limits.prefill_chunk or None, graphs=graphs)
        if self.engine.captures_graphs:  # record the decode steps' CUDA graphs now, not inside the first requests
            self.engine.warm_up()
        self.worker = Worker(self.engine, self.limits.max_queue, admit_wait=self.limits.admit_wait_ms / 1000)
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.vocab = model.config.vocab_size
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}  # token id -> its text alone (logprobs' tokens), as asked

    # ---- requests -> jobs ----------------------------------------------------------------------
    def adapter_R(self, req: Sampled):
        """The R stack a request runs with (None: the base), or a 4xx."""
        if req.adapter is not None:
            if req.model != self.name:
                raise APIError(400, f"an inline adapter runs over the base model: set model to {self.name!r}",
                               param="model")
            try:
                return self.bank.R_of(*inline_adapter(req.adapter), source="inline adapter")
            except (TypeError, ValueError) as e:
                raise APIError(400, str(e), param="adapter") from e
        if req.model == self.name:
            return None
        try:
            R = self.bank.get(req.model)
        except ValueError as e:  # a damaged pack entry: refused by name, the others still serve
            raise APIError(500, str(e), type="server_error") from e
        if R is None:
            raise APIError(404, f"The model `{req.model}` does not exist", param="model", code="model_not_found")
        return R

    def sampling(self, req: Sampled, max_tokens: int | None, prompt_len: int) -> Sampling:
        lim = self.limits
        if req.n > lim.max_n:
            raise APIError(400, f"n={req.n} is over this server's limit of {lim.max_n}", param="n")
        room = self.context - prompt_len
        max_prompt = lim.max_prompt_tokens or self.context - 1
        if prompt_len > max_prompt or room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server accepts at most {max_prompt}",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(lim.max_tokens, room)
        if max_tokens > lim.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {lim.max_tokens}",
                           param="max_tokens")
        if prompt_len + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                                f"{prompt_len} and max_tokens is {max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        return Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                        ignore_eos=req.ignore_eos)

    def completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(p[0], int):
            p = [p]
        prompts = []
        for x in p:
            prompt = self.encode(x, req.add_special_tokens, req.echo) if isinstance(x, str) else Prompt(list(x))
            if not prompt.ids:
                raise APIError(400, "prompt is empty", param="prompt")
            if any(not 0 <= t < self.vocab for t in prompt.ids):
                raise APIError(400, f"prompt token ids must lie in [0, {self.vocab})", param="prompt")
            if req.echo and not isinstance(x, str):  # token ids echo as their text, special tokens included
                prompt.offsets, prompt.text = decode_offsets(self.tokenizer, prompt.ids, skip_special_tokens=False)
            prompts.append(prompt)
        return prompts

    def encode(self, text: str, add_special_tokens: bool = True, echo: bool = False) -> Prompt:
        """A text prompt's tokens: the tokenizer's special tokens added (vLLM's default for completions) unless
        the text already starts with the BOS token (a chat template's output: no second BOS). With `echo`, the
        text and where each token starts in it (special tokens the tokenizer added: at 0)."""
        bos = self.tokenizer.bos_token
        special = add_special_tokens and not (bos and text.startswith(bos))
        if not echo:
            return Prompt(self.tokenizer(text, add_special_tokens=special).input_ids)
        try:
            enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
            return Prompt(enc.input_ids, text, [start for start, _ in enc.offset_mapping])
        except NotImplementedError:  # a slow (Python) tokenizer has no offsets: where its decoding puts them
            ids = self.tokenizer(text, add_special_tokens=special).input_ids
            offsets, _ = decode_offsets(self.tokenizer, ids, skip_special_tokens=True)
            return Prompt(ids, text, [min(o, len(text)) for o in offsets])

    async def score(self, prompt: list[int], tokens: list[int], R, *, echo: bool, top: int,
                    admit: bool = False) -> Scores:
        """The log-probabilities of `tokens` after `prompt` (with `echo`, of the prompt's tokens too, from the
        second) under the model with adapter R, at temperature 1, and the `top` most likely tokens at each
        position: one forward on the engine thread, between two decode steps."""
        ids = prompt + tokens
        fn = lambda: token_logprobs(self.model, ids, bank=self.bank, R=R, start=1 if echo else len(prompt),  # noqa: E731
                                    top=top)
        return await self.worker.call(fn, asyncio.get_running_loop(), admit=admit)

    def token_texts(self, ids: list[int]) -> dict[int, str]:
        """{id: the token's text alone} (special tokens by name) for `logprobs`' tokens."""
        new = sorted({t for t in ids if t not in self._token_text})
        if new:
            self._token_text.update(zip(new, self.tokenizer.batch_decode([[t] for t in new])))
        return {t: self._token_text[t] for t in ids}

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        if not self.tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that refuses this conversation (roles out of order, ...)
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from e
        return self.tokenizer(text, add_special_tokens=False).input_ids

    async def generate(self, req: Sampled, prompts: list[Prompt], max_tokens: int | None, kind: str):
        R = await run_in_threadpool(self.adapter_R, req)  # an inline adapter's R is built off the event loop
        stops = req.stops()
        req.refuse_unsupported()
        echo, logprobs = getattr(req, "echo", False), getattr(req, "logprobs", None)  # completions only
        if req.stream and logprobs is not None:
            raise APIError(400, "logprobs with stream=true is not supported by tinylora serve (ask without "
                                "stream)", param="logprobs")
        if max_tokens == 0 and not echo:
            raise APIError(400, "max_tokens=0 needs echo=true (the prompt and its logprobs alone); otherwise "
                                "max_tokens >= 1", param="max_tokens")
        samplings = [self.sampling(req, max_tokens, len(p.ids)) for p in prompts]
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(p.ids, s, R, req.n, events, loop, base=i * req.n)
                for i, (p, s) in enumerate(zip(prompts, samplings)) if s.max_new_tokens > 0]
        try:
            for job in jobs:
                self.worker.submit(job)
        except QueueFull as e:
            for job in jobs:
                self.worker.cancel(job)
            raise APIError(429, f"server busy: {e}", type="rate_limit_error", code="queue_full") from e
        run = Run(self, jobs, stops, kind, req.model, prompts, n=req.n, echo=echo, logprobs=logprobs, R=R,
                  include_usage=bool((req.stream_options or {}).get("include_usage")))
        if req.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream")
        try:
            return JSONResponse(await run.collect())
        finally:
            run.cancel_open()


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        yield
        await run_in_threadpool(server.worker.stop)  # uvicorn has let in-flight requests finish

    app = FastAPI(title="tinylora serve", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if server.api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                return error_response(401, "Invalid or missing API key (send 'Authorization: Bearer KEY')",
                                      type="authentication_error", code="invalid_api_key")
        if request.method == "POST":
            size = request.headers.get("content-length")
            if size is None:
                return error_response(411, "a Content-Length header is required")
            if int(size) > server.limits.max_request_bytes:
                return error_response(413, f"request body of {size} bytes is over the limit of "
                                           f"{server.limits.max_request_bytes}")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        field = errors[0].get("loc", ())[:2]  # a union's members each fail: say why the closest one did
        same = [x for x in errors if x.get("loc", ())[:2] == field]
        err = next((x for x in same if not str(x.get("type", "")).endswith("_type")), errors[0])
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _union_member(x))
        param = where or None
        message = f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), type="invalid_request_error")

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    @app.get("/health", responses=_responses("/health"))
    async def health():
        if not server.worker.alive:
            return error_response(503, "the engine thread is not running", type="server_error")
        return {"status": "ok", "rows": server.worker.rows}

    @app.get("/v1/models", responses=_responses("/v1/models"))
    async def models(after: str = "", limit: int = Query(MODELS_PAGE, ge=1, le=MODELS_PAGE)):
        """The base and the adapters, a page at a time over a pack (`after`: the last id of the previous page)."""
        card = lambda name, parent: {"id": name, "object": "model", "created": server.created,  # noqa: E731
                                     "owned_by": "tinylora", "root": server.name, "parent": parent}
        names = await run_in_threadpool(server.bank.page, after, limit)
        base = [] if after else [card(server.name, None)]
        more = server.bank.pack is not None and len(names) > 0 and bool(server.bank.pack.names(names[-1], 1))
        return {"object": "list", "data": base + [card(n, server.name) for n in names], "total": len(server.bank) + 1,
                "has_more": more}

    @app.post("/v1/completions", responses=_responses(
        "/v1/completions", description="a text_completion object; with stream: server-sent events",
        content={"text/event-stream": {}}))
    async def completions(req: CompletionRequest):
        return await server.generate(req, server.completion_prompts(req), req.max_tokens, "text")

    @app.post("/v1/chat/completions", responses=_responses(
        "/v1/chat/completions", description="a chat.completion object; with stream: server-sent events",
        content={"text/event-stream": {}}))
    async def chat(req: ChatRequest):
        return await server.generate(req, [Prompt(server.chat_prompt(req))],
                                     req.max_completion_tokens or req.max_tokens, "chat")

    loading = asyncio.Lock()  # one load at a time: two loads of one name cannot both pass the name check

    @app.post("/v1/load_lora_adapter", responses=_responses("/v1/load_lora_adapter"))
    async def load_adapter(req: LoadAdapterRequest):
        _runtime_allowed(server)
        async with loading:
            return await _load(req)

    async def _load(req: LoadAdapterRequest):
        if req.lora_name == server.name or req.lora_name in server.bank:
            raise APIError(400, f"an adapter or model named {req.lora_name!r} is already served", param="lora_name")
        if (req.lora_path is None) == (req.adapter is None):
            raise APIError(400, "give exactly one of lora_path (a file on the server) and adapter (inline)")
        try:
            if req.lora_path is not None:
                await run_in_threadpool(server.bank.load, req.lora_path, req.lora_name)
            else:
                config, v = inline_adapter(req.adapter)
                await run_in_threadpool(server.bank.add, req.lora_name, config, v, source="inline adapter")
        except (TypeError, ValueError, FileNotFoundError) as e:
            raise APIError(400, str(e), param="lora_path" if req.lora_path else "adapter") from e
        return {"object": "model", "id": req.lora_name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter", responses=_responses("/v1/unload_lora_adapter"))
    async def unload_adapter(req: UnloadAdapterRequest):
        _runtime_allowed(server)
        if req.lora_name not in server.bank:
            raise APIError(404, f"no adapter named {req.lora_name!r} is loaded", param="lora_name",
                           code="model_not_found")
        await run_in_threadpool(server.bank.remove, req.lora_name)  # running requests keep their copy of its R
        return {"object": "model", "id": req.lora_name, "status": "unloaded"}

    def openapi() -> dict:
        """FastAPI's schema, less the 422 it adds to routes that validate: this server answers 400 instead."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def inline_adapter(adapter) -> tuple[AdapterConfig, list]:
    """(config, v [n_groups][k]) of an adapter given in a request body; a flat v is cut into groups of k."""
    config = AdapterConfig(**adapter.config)
    v = adapter.v
    if v and not isinstance(v[0], list):
        k = config.numbers_per_group
        v = [v[i:i + k] for i in range(0, len(v), k)]
    return config, v


def _union_member(loc) -> bool:
    """A step of a validation error's location that names which type of a union failed (str, list[int], ...)."""
    return isinstance(loc, str) and (loc in {"str", "int", "float", "bool", "dict", "list", "none"} or "[" in loc)


def _runtime_allowed(server: Server) -> None:
    if not server.allow_runtime_adapters:
        raise APIError(403, "loading and unloading adapters at runtime is off: start the server with "
                            "--allow-runtime-adapters", type="permission_error")
