"""The OpenAI-compatible HTTP app: `create_app(config)` builds it, nothing global.

Routes: POST /v1/chat/completions, POST /v1/completions (SSE streaming or not), GET /v1/models,
GET /health, GET /metrics. Every error is answered with the OpenAI body
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (naming the
field), 401 for a missing or wrong API key, 404 for an unknown model or route, 429 when the
queue is full, 500 when the engine fails, 503 when the server is not running.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from specdec.data import DataError, chat_ids
from specdec.decode.detok import IncrementalDetokenizer
from specdec.decode.sampling import SamplingParams
from specdec.serve.config import ServeConfig, build_engine
from specdec.serve.metrics import ServerMetrics
from specdec.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    error_body,
    parse_body,
    validation_error,
)
from specdec.serve.worker import EngineWorker, Job, NotRunning, QueueFull

log = logging.getLogger("specdec.serve")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass
class ServerState:
    """What the routes share; one per app (``app.state.specdec``)."""

    config: ServeConfig
    engine: Any
    tokenizer: Any
    worker: EngineWorker
    metrics: ServerMetrics
    model_name: str
    context_len: int
    created: int

    @property
    def k(self) -> int:
        return 0 if getattr(self.engine, "draft", None) is None else int(self.engine.k_max)


def create_app(config: ServeConfig, engine=None, tokenizer=None) -> FastAPI:
    """The app for `config`; pass `engine` (and its `tokenizer`) to serve one already built.

    The engine worker thread starts with the app (ASGI lifespan) and stops with it.
    """
    if engine is None:
        engine, tokenizer = build_engine(config)
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the server needs a tokenizer: pass tokenizer= or build the engine "
                         "with one")
    # The engine thread decodes with its tokenizer while the event loop encodes prompts: a fast
    # tokenizer shared by two threads can fail with "RuntimeError: Already borrowed"
    # (huggingface/tokenizers#537), so the event loop gets a copy of its own.
    tokenizer = copy.deepcopy(tokenizer)
    context_len = int(getattr(engine, "max_positions", None) or 2**31)
    if config.max_model_len is not None:
        context_len = min(context_len, config.max_model_len)
    metrics = ServerMetrics()
    worker = EngineWorker(engine, config.max_batch, config.max_queue, metrics)
    state = ServerState(config=config, engine=engine, tokenizer=tokenizer, worker=worker,
                        metrics=metrics, model_name=config.model_name, context_len=context_len,
                        created=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    # no /docs, /redoc or /openapi.json: every route but /health is behind the API key
    app = FastAPI(title="specdec", description="OpenAI-compatible speculative decoding server",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.specdec = state
    _install_error_handlers(app)

    async def require_key(request: Request) -> None:
        key = config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(401, "invalid or missing API key: send the header "
                                "'Authorization: Bearer <key>' with the server's key",
                           "invalid_request_error", code="invalid_api_key")

    auth = [Depends(require_key)]

    @app.get("/health")
    async def health() -> JSONResponse:
        if not worker.alive:
            return JSONResponse(error_body("the engine worker is not running", "server_error"),
                                status_code=503)
        return JSONResponse({"status": "ok", "running": worker.num_running,
                             "waiting": worker.num_waiting})

    @app.get("/metrics", dependencies=auth)
    async def metrics_route() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "specdec", "root": config.target, "max_model_len": state.context_len,
            "spec_decode": {"draft": config.draft, "k": state.k},
        }]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await request.body())
        _check_model(state, req.model)
        messages = [m.as_dict() for m in req.messages]
        try:
            prompt_ids = chat_ids(tokenizer, messages)
        except DataError as exc:
            raise bad_request(str(exc), param="messages") from exc
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages
            raise bad_request(f"the chat template cannot render these messages: {exc}",
                              param="messages") from exc
        return await _generate(request, state, req, prompt_ids, "messages", chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        _check_model(state, req.model)
        if isinstance(req.prompt, str):
            prompt_ids = [int(t) for t in tokenizer.encode(req.prompt)]
            if not prompt_ids:
                raise bad_request("prompt: the prompt tokenizes to nothing", param="prompt")
        else:
            prompt_ids = req.prompt
            vocab = int(getattr(engine, "vocab_size", 0) or len(tokenizer))
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary "
                                  f"[0, {vocab})", param="prompt")
        return await _generate(request, state, req, prompt_ids, "prompt", chat=False)

    return app


# ---------------------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(detail, kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}",
                                       "server_error"), status_code=500)


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                            f"{state.model_name!r} (GET /v1/models)", "invalid_request_error",
                       param="model", code="model_not_found")


# ------------------------------------------------------------------------------ generation


def _sampling_params(state: ServerState, req, prompt_len: int, prompt_param: str
                     ) -> SamplingParams:
    ctx = state.context_len
    if prompt_len >= ctx:
        raise bad_request(f"{prompt_param}: the prompt has {prompt_len} tokens, the model's "
                          f"context is {ctx}; shorten the prompt", param=prompt_param,
                          code="context_length_exceeded")
    max_tokens = req.requested_max_tokens()
    max_param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if max_tokens is None:
        max_tokens = min(state.config.default_max_tokens, ctx - prompt_len)
    elif prompt_len + max_tokens > ctx:
        raise bad_request(f"{max_param}: {max_tokens} tokens after a {prompt_len}-token prompt "
                          f"go past the model's context of {ctx}; ask for at most "
                          f"{ctx - prompt_len}", param=max_param, code="context_length_exceeded")
    if req.stop and getattr(state.engine, "tokenizer", None) is None:
        raise bad_request("stop: this engine has no tokenizer for stop strings", param="stop")
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            max_tokens=max_tokens,
            stop=list(req.stop),
            stop_token_ids=list(req.stop_token_ids or []),
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=param if param.isidentifier() else None) from exc


def usage(result, prompt_tokens: int, k: int) -> dict[str, Any]:
    """OpenAI's usage plus this request's speculative decoding figures."""
    completion_tokens = len(result.token_ids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "spec_decode": {
            "k": k,
            "steps": result.steps,
            "drafted": result.drafted,
            "accepted": result.accepted,
            "recovered": result.recovered,
            "bonus": result.bonus,
            "acceptance_rate": round(result.acceptance_rate, 6),
            "mean_accepted_length": round(result.mean_accepted_length, 6),
            "accepted_per_position": list(result.accepted_per_position),
        },
    }


async def _wait_result(request: Request, job: Job) -> tuple[str, Any]:
    """The job's last event (tokens are skipped); ("gone", None) once the client has
    disconnected, checked every DISCONNECT_POLL_S whether or not tokens keep coming."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    while True:
        try:
            kind, payload = await asyncio.wait_for(
                job.events.get(), timeout=max(next_check - loop.time(), 0.0))
            if kind != "tokens":
                return kind, payload
        except TimeoutError:
            pass
        if loop.time() >= next_check:
            if await request.is_disconnected():
                return "gone", None
            next_check = loop.time() + DISCONNECT_POLL_S


def _final_text(state: ServerState, result) -> str:
    if result.text is not None:
        return result.text
    return state.tokenizer.decode(result.token_ids, skip_special_tokens=True)


async def _generate(request: Request, state: ServerState, req, prompt_ids: list[int],
                    prompt_param: str, chat: bool) -> Response:
    params = _sampling_params(state, req, len(prompt_ids), prompt_param)
    job = Job(prompt_ids=prompt_ids, params=params, loop=asyncio.get_running_loop())
    try:
        state.worker.submit(job)
    except QueueFull as exc:
        raise APIError(429, str(exc), "requests", code="rate_limit_exceeded") from exc
    except NotRunning as exc:
        raise APIError(503, f"{exc}; the server is starting or stopping, retry later",
                       "server_error", code="service_unavailable") from exc
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if req.stream:
        stream = _sse(state, req, job, rid, created, chat)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        kind, payload = await _wait_result(request, job)
    except asyncio.CancelledError:
        job.cancel()
        raise
    if kind == "gone":
        job.cancel()
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    if kind == "cancelled":
        raise APIError(503, "the request was cancelled: the server is shutting down",
                       "server_error", code="service_unavailable")
    if kind == "error":
        raise APIError(500, payload, "server_error", code="engine_error")
    result = payload
    text = _final_text(state, result)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": result.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None,
                  "finish_reason": result.finish_reason}
        obj = "text_completion"
    return JSONResponse({
        "id": rid, "object": obj, "created": created, "model": state.model_name,
        "choices": [choice], "usage": usage(result, len(job.prompt_ids), state.k),
        "system_fingerprint": None,
    })


class TextStream:
    """Incremental text of a streamed request, never sending text that a stop string may cut.

    With stop strings, the last (longest stop - 1) characters are held back until it is clear
    no stop string starts in them; the text is cut before the first stop string, the same text
    the engine returns as the final result.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = ""
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        if self.stopped:
            return ""
        for t in token_ids:
            self.detok.add(t)
        text = self.detok.text
        safe = len(text) - self.hold
        if self.stop:
            hits = [i for i in (text.find(s, len(self.sent)) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                safe = min(hits)
        return self._send_upto(text, safe)

    def finish(self, final_text: str) -> str:
        """The rest of the final text (the engine's, authoritative)."""
        if not final_text.startswith(self.sent):
            log.warning("streamed text diverged from the final text; sending the rest only")
        return self._send_upto(final_text, len(final_text))

    def _send_upto(self, text: str, end: int) -> str:
        if end <= len(self.sent):
            return ""
        delta = text[len(self.sent):end]
        self.sent += delta
        return delta


def _sse_event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(state: ServerState, req, job: Job, rid: str, created: int, chat: bool
               ) -> AsyncIterator[str]:
    """The SSE body: chunks as tokens commit, a final chunk with finish_reason, usage when
    asked (stream_options.include_usage), then ``data: [DONE]``."""
    model = state.model_name
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish_reason: str | None = None, role: bool = False):
        if chat:
            d: dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None,
                      "finish_reason": finish_reason}
        return _sse_event({"id": rid, "object": obj, "created": created, "model": model,
                           "choices": [choice]})

    text = TextStream(state.tokenizer, job.prompt_ids, job.params.stop)
    try:
        if chat:
            yield chunk("", role=True)
        while True:
            kind, payload = await job.events.get()
            if kind == "tokens":
                delta = text.push(payload)
                if delta:
                    yield chunk(delta)
                continue
            if kind == "done":
                result = payload
                rest = text.finish(_final_text(state, result))
                if rest:
                    yield chunk(rest)
                yield chunk(None if chat else "", finish_reason=result.finish_reason)
                if req.include_usage:
                    yield _sse_event({"id": rid, "object": obj, "created": created,
                                      "model": model, "choices": [],
                                      "usage": usage(result, len(job.prompt_ids), state.k)})
            elif kind == "cancelled":
                yield _sse_event(error_body("the request was cancelled: the server is shutting "
                                            "down", "server_error", code="service_unavailable"))
            else:
                yield _sse_event(error_body(payload, "server_error", code="engine_error"))
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel()  # a no-op once the job is done; frees it if the client went away
