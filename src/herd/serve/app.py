"""OpenAI-compatible HTTP API over one model: /v1/chat/completions, /v1/completions, /v1/models, /health.

Requests share the model through the continuous-batching engine (``runtime/engine.py``); each has its own
sampler and text stream. Errors use OpenAI's body shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import HerdError
from ..runtime.engine import Engine
from ..runtime.generate import TextStream
from ..runtime.sampling import Sampler, SamplingParams
from ..tokenizer.chat import parse_tool_calls
from .schemas import ChatCompletionRequest, CompletionRequest, Message
from .tools import messages_with_tools


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def _error_body(status: int, message: str, param=None, code=None, kind=None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}}
    )


class _LoopSink:
    """Hands engine events (from its thread) to an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def create_app(llm, model_name: str = "herd", api_key: str | None = None, parallel: int = 4, ctx: int | None = None) -> FastAPI:
    ctx = ctx or min(llm.config.max_position_embeddings, 8192)
    engine = Engine(llm.model, max_batch=parallel, ctx=ctx)
    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="herd", version="1", description="OpenAI-compatible API for Llama 4 models", lifespan=lifespan)
    app.state.engine = engine
    app.state.llm = llm
    tokenizer = llm.tokenizer
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return _error_body(400, f"request body is not valid JSON: {msg}", code="invalid_json")
        return _error_body(400, f"{loc or 'body'}: {msg}", param=loc or None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_body(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error_body(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return _error_body(500, f"internal error: {type(exc).__name__}")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error_body(401, "invalid or missing API key", code="invalid_api_key", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "active": engine.active_count, "waiting": engine.waiting_count}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "herd"}]}

    def _params(body, max_tokens: int | None) -> SamplingParams:
        overrides = {
            k: getattr(body, k)
            for k in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty")
            if getattr(body, k) is not None
        }
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            params = llm.sampling_params(**overrides, stop=stop, max_tokens=max_tokens or 256)
            params.validate()
        except HerdError as exc:
            raise APIError(400, str(exc)) from None
        return params

    def _submit(prompt_ids: list[int], params: SamplingParams, sink) -> Any:
        if len(prompt_ids) + params.max_tokens > ctx:
            raise APIError(
                400,
                f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_tokens} exceeds the context of {ctx} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        sampler = Sampler(params, llm.config.vocab_size)
        return engine.submit(prompt_ids, sampler, params.max_tokens, tokenizer.stop_ids, events=sink)

    async def _run(req, params: SamplingParams, request: Request) -> AsyncIterator[tuple[str, str | None]]:
        """Yield (text, finish_reason or None) as tokens arrive; cancels the request if the client goes away."""
        stream = TextStream(tokenizer, params.stop)
        sink = req.events
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(sink.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "token":
                    if value in tokenizer.stop_ids:
                        continue
                    text, stopped = stream.push(value)
                    if text:
                        yield text, None
                    if stopped:
                        yield "", "stop"
                        return
                elif kind == "done":
                    tail = stream.flush()
                    if tail:
                        yield tail, None
                    yield "", "length" if value == "length" else "stop"
                    return
                else:
                    raise APIError(500, f"generation failed: {value}")
        finally:
            req.cancel()  # frees the slot at once if we stopped early (stop string, disconnect)

    def _chat_prompt(body: ChatCompletionRequest) -> list[int]:
        messages = [_message_dict(m) for m in body.messages]
        if body.tools and body.tool_choice != "none":
            messages = messages_with_tools(messages, [t.function.model_dump() for t in body.tools], body.tool_choice)
        try:
            return llm.format_chat(messages, add_generation_prompt=True)
        except HerdError as exc:
            raise APIError(400, str(exc), param="messages") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prompt = _chat_prompt(body)
        params = _params(body, body.max_completion_tokens or body.max_tokens)
        sink = _LoopSink(asyncio.get_running_loop())
        req = _submit(prompt, params, sink)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        use_tools = bool(body.tools) and body.tool_choice != "none"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _chat_stream(req, params, request, rid, use_tools, include_usage, len(prompt)),
                media_type="text/event-stream",
            )
        text, finish = await _collect(req, params, request)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if use_tools:
            content, calls = parse_tool_calls(text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls"
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": _usage(len(prompt), len(req.generated)),
        }

    async def _collect(req, params, request) -> tuple[str, str]:
        parts, finish = [], "stop"
        async for text, reason in _run(req, params, request):
            parts.append(text)
            if reason:
                finish = reason
        return "".join(parts), finish

    async def _chat_stream(req, params, request, rid, use_tools, include_usage, n_prompt):
        created_at = int(time.time())

        def chunk(delta: dict, finish=None, usage=None) -> str:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created_at,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if usage is not None:
                body["choices"] = []
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        held: list[str] = []  # with tools, the text may be a call: decide at the end
        finish = "stop"
        try:
            async for text, reason in _run(req, params, request):
                if reason:
                    finish = reason
                if not text:
                    continue
                if use_tools:
                    held.append(text)
                else:
                    yield chunk({"content": text})
        except APIError as exc:
            yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
            yield "data: [DONE]\n\n"
            return
        if use_tools:
            content, calls = parse_tool_calls("".join(held))
            if calls:
                finish = "tool_calls"
                deltas = [{"index": i, **call} for i, call in enumerate(calls)]
                yield chunk({"content": content, "tool_calls": deltas} if content else {"tool_calls": deltas})
            elif content:
                yield chunk({"content": content})
        yield chunk({}, finish)
        if include_usage:
            yield chunk({}, usage=_usage(n_prompt, len(req.generated)))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            prompt = tokenizer.encode(body.prompt, bos=True)
        else:
            if any(t < 0 or t >= llm.config.vocab_size for t in body.prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {llm.config.vocab_size})", param="prompt")
            prompt = list(body.prompt)
        params = _params(body, body.max_tokens)
        sink = _LoopSink(asyncio.get_running_loop())
        req = _submit(prompt, params, sink)
        rid = f"cmpl-{secrets.token_hex(12)}"
        echo = body.prompt if (body.echo and isinstance(body.prompt, str)) else ""
        if body.stream:
            return StreamingResponse(_completion_stream(req, params, request, rid, echo), media_type="text/event-stream")
        text, finish = await _collect(req, params, request)
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "text": echo + text, "finish_reason": finish, "logprobs": None}],
            "usage": _usage(len(prompt), len(req.generated)),
        }

    async def _completion_stream(req, params, request, rid, echo):
        created_at = int(time.time())

        def chunk(text: str, finish=None) -> str:
            body = {
                "id": rid,
                "object": "text_completion",
                "created": created_at,
                "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if echo:
            yield chunk(echo)
        finish = "stop"
        async for text, reason in _run(req, params, request):
            if reason:
                finish = reason
            if text:
                yield chunk(text)
        yield chunk("", finish)
        yield "data: [DONE]\n\n"

    return app


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message_dict(m: Message) -> dict:
    """Pydantic message -> the plain OpenAI-style dict the chat formatter takes."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if isinstance(m.content, list):
        out["content"] = [part.model_dump() for part in m.content]
    else:
        out["content"] = m.content
    if m.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out
