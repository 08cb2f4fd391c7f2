"""The OpenAI-compatible HTTP API over an AsyncEngine: parse, validate, tokenize, stream; no model work."""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager

from . import require_serve_extras

require_serve_extras()

import jinja2  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from pydantic import BaseModel, ValidationError  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from ..engine.sampling import SamplingParams  # noqa: E402
from .async_engine import AsyncEngine, EngineDead, QueueFull  # noqa: E402
from .protocol import APIError, ChatCompletionRequest, CompletionRequest  # noqa: E402
from .tools import TOOL_CALLS, parse_tool_calls, template_messages  # noqa: E402

MAX_BODY_BYTES = 4 << 20


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class _Choice:
    """What one choice has produced so far."""

    def __init__(self):
        self.ids: list[int] = []
        self.text = ""
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.tool_mode = False  # past a [TOOL_CALLS] token: the rest is the calls, not content
        self.message: dict | None = None  # a chat choice's final message


def create_app(engine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app; it starts `engine` on startup (unless started) and stops it once the last request is
    answered."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="maestrale", lifespan=lifespan)
    vocab = tokenizer.get_vocab()
    tool_token = vocab.get(TOOL_CALLS)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(APIError(500, f"the server failed: {e}").body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>' with the "
                                "server's --api-key", code="invalid_api_key")

    async def parse(request: Request, schema: type[BaseModel]):
        authorize(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"the request body has {length} bytes, more than the {max_body_bytes} this server "
                                "takes", code="request_too_large")
        body = await request.body()
        if len(body) > max_body_bytes:
            raise APIError(413, f"the request body has {len(body)} bytes, more than the {max_body_bytes} this "
                                "server takes", code="request_too_large")
        try:
            req = schema.model_validate_json(body)
        except ValidationError as e:
            error = e.errors()[0]
            param = ".".join(map(str, error["loc"])) or None
            raise APIError(400, f"{param}: {error['msg']}" if param else error["msg"], param=param) from None
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return req

    def sampling(req, prompts: list[list[int]], max_tokens: int | None, top_logprobs: int | None):
        if max_tokens is None:  # as long as the context allows
            max_tokens = max(engine.max_model_len - max(map(len, prompts)), 1)
        try:
            params = req.sampling_params(max_tokens, top_logprobs)
            engine.check(prompts, params)
        except ValueError as e:  # SamplingParams' messages start with the field at fault
            field = str(e).split()[0]
            raise APIError(400, str(e), param=field if field in SamplingParams.__dataclass_fields__ else None) from None
        except QueueFull as e:
            raise APIError(503, str(e), code="server_overloaded", headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise APIError(503, str(e), code="engine_dead") from None
        return params

    def token_logprobs(sampled) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            token = tokenizer.decode([token_id])
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        return {**entry(sampled.token_id, sampled.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in sampled.top_logprobs or []]}

    def usage(prompts, choices) -> dict:
        prompt = sum(map(len, prompts))
        completion = sum(len(c.ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def run(req, prompts, params, on_output, finish, chunk_object: str):
        """Drive the engine for `prompts`: a streaming response of chunks (`chunk_object`), each carrying the choice
        `on_output` makes of a step's output, or the body `finish` makes of the choices once all are done."""
        choices = [_Choice() for _ in range(len(prompts) * params.n)]
        head = {"id": uuid.uuid4().hex, "object": chunk_object, "created": int(time.time()), "model": model_name}

        def record(i, out):
            choice = choices[i * params.n + out.index]
            choice.ids += out.token_ids
            choice.logprobs += out.logprobs
            choice.finish_reason = out.finish_reason
            return i * params.n + out.index, choice

        if not req.stream:
            async def collect():
                async for batch in engine.generate(prompts, params):
                    for i, out in batch:
                        index, choice = record(i, out)
                        on_output(index, choice, out)
                return {**head, **finish(choices)}
            return collect()

        def event(i, out) -> str:
            index, choice = record(i, out)
            chunk = {**head, "choices": [on_output(index, choice, out)]}
            if req.include_usage:
                chunk["usage"] = None
            return _sse(chunk)

        async def events():
            async for batch in engine.generate(prompts, params):
                yield "".join(event(i, out) for i, out in batch)  # one write for all that arrived
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(prompts, choices)})
            yield _sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.counters, engine.in_flight),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "maestrale"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            prompts = [tokenizer(text)["input_ids"] for text in texts]
        else:
            prompts = [prompt] if prompt and isinstance(prompt[0], int) else prompt
        if not prompts or any(not p or any(not 0 <= t < len(vocab) for t in p) for p in prompts):
            raise APIError(400, f"prompt: each prompt must be non-empty text or token ids in [0, {len(vocab)})",
                           param="prompt")
        params = sampling(req, prompts, 16 if req.max_tokens is None else req.max_tokens, req.logprobs)

        def legacy_logprobs(entries: list) -> dict | None:
            if req.logprobs is None:
                return None
            tokens = [tokenizer.decode([s.token_id]) for s in entries]
            return {"tokens": tokens, "token_logprobs": [s.logprob for s in entries],
                    "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in s.top_logprobs or []} for s in entries]}

        def on_output(index, choice, out):
            choice.text += out.text
            return {"index": index, "text": out.text, "logprobs": legacy_logprobs(out.logprobs),
                    "finish_reason": out.finish_reason}

        def text_completion(choices):
            return {"choices": [{"index": i, "text": c.text, "logprobs": legacy_logprobs(c.logprobs),
                                 "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                    "usage": usage(prompts, choices)}

        out = run(req, prompts, params, on_output, text_completion, "text_completion")
        return out if req.stream else await out

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        tools = req.tools if req.tool_choice != "none" else None
        forced = tools is not None and (req.tool_choice == "required" or isinstance(req.tool_choice, dict))
        if forced and tool_token is None:
            raise APIError(400, f"tool_choice={req.tool_choice!r} needs a model whose tokenizer has {TOOL_CALLS}",
                           param="tool_choice")
        messages = template_messages([m.for_template() for m in req.messages])
        try:
            prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        if forced:  # the reply starts with the calls
            prompt = prompt + [tool_token]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling(req, [prompt], max_tokens, req.top_logprobs if req.logprobs else None)
        parses_tools = tools is not None and tool_token is not None

        def finish_message(choice) -> None:
            """The finished choice's message: its content, or its tool calls (finish reason "tool_calls")."""
            choice.message = {"content": choice.text}
            if choice.tool_mode:
                start = choice.ids.index(tool_token) + 1 if tool_token in choice.ids else 0
                rest = [t for t in choice.ids[start:] if t not in engine.eos_token_ids]
                calls = parse_tool_calls(tokenizer.decode(rest))
                if calls:
                    choice.message = {"content": choice.text or None, "tool_calls": calls}
                    choice.finish_reason = "tool_calls"
                else:  # not calls after all: the text is the content
                    choice.message = {"content": choice.text + tokenizer.decode(rest, skip_special_tokens=True)}

        def on_output(index, choice, out):
            first = len(choice.ids) == len(out.token_ids)
            if parses_tools and (first and forced or tool_token in out.token_ids):
                choice.tool_mode = True
            delta = {} if choice.tool_mode else {"content": out.text}
            choice.text += delta.get("content", "")
            if out.finish_reason is not None:
                finish_message(choice)
                if "tool_calls" in choice.message:
                    delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(choice.message["tool_calls"])]
                elif choice.tool_mode:
                    delta["content"] = choice.message["content"]
            if first:
                delta = {"role": "assistant", **delta}
            logprobs = {"content": [token_logprobs(s) for s in out.logprobs]} if params.logprobs else None
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": choice.finish_reason}

        def chat_completion(choices):
            out = []
            for i, choice in enumerate(choices):
                logprobs = {"content": [token_logprobs(s) for s in choice.logprobs]} if params.logprobs else None
                out.append({"index": i, "message": {"role": "assistant", **choice.message}, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
            return {"object": "chat.completion", "choices": out, "usage": usage([prompt], choices)}

        out = run(req, [prompt], params, on_output, chat_completion, "chat.completion.chunk")
        return out if req.stream else await out

    return app
