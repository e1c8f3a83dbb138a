"""`qdora serve`: an OpenAI-compatible HTTP server (FastAPI, uvicorn, server-sent events) for one base and
any number of adapters unmerged over it.

Routes: `GET /v1/models`; `POST /v1/chat/completions` and `/v1/completions`, streamed or not, `model`
naming an adapter or the base; `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's
names and bodies: `lora_name`, `lora_path`) while it runs; `GET /health`. Every error is OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for the client's mistakes;
with an API key set, every route wants `Authorization: Bearer KEY`.

Requests go to one `Engine`, which decodes all of them together (rows of different adapters in one
batch). A client that disconnects cancels its request; SIGTERM stops accepting, finishes what runs,
and exits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from qdora.serve.engine import Engine, Event, Request, Sampling


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServeOptions:
    base_name: str                 # the id of the base in /v1/models and `model`
    api_key: str | None = None
    default_max_tokens: int = 512  # for requests that do not say


def _int(body: dict, key: str, default, low: int = 1) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"{key}={value!r} must be an integer >= {low}", param=key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (value > low if open_low else value >= low) and value <= high):
        raise APIError(400, f"{key}={value!r} must be a number in {'(' if open_low else '['}{low:g}, {high:g}]",
                       param=key)
    return float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, f"stop={stop!r} must be a non-empty string or a list of at most 4", param="stop")
    return tuple(stop)


def _text_of(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (`{"type": "text", "text": ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where}.content must be a string or a list of text parts", param="messages")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must have a role of system, developer, user or assistant",
                           param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_of(m.get("content"), f"messages[{i}]")})
    return out


class App:
    """The server's state: the engine, its bank and the options; `asgi` is the FastAPI application."""

    def __init__(self, engine: Engine, options: ServeOptions):
        self.engine, self.bank, self.tokenizer = engine, engine.bank, engine.tokenizer
        self.options = options
        self.created = int(time.time())
        self.asgi = self._build()

    # ---- requests into engine requests --------------------------------------------------------
    def _adapter(self, body: dict) -> str | None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model is required: the base's id or an adapter's name (GET /v1/models)",
                           param="model")
        if model == self.options.base_name:
            return None
        if model not in self.bank.adapters:
            raise APIError(404, f"The model `{model}` does not exist (served: {', '.join(self._ids())})",
                           param="model", code="model_not_found")
        return model

    def _ids(self) -> list[str]:
        return [self.options.base_name] + sorted(self.bank.adapters)

    def _sampling(self, body: dict, prompt_tokens: int) -> Sampling:
        n = _int(body, "n", 1)
        if n != 1:
            raise APIError(400, f"n={n} is not supported: ask once per answer", param="n")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = _int(body, key, None)
        context = self.engine.context
        if context is not None and prompt_tokens >= context:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; this model's context is {context}",
                           param="messages", code="context_length_exceeded")
        if asked is not None and context is not None and prompt_tokens + asked > context:
            raise APIError(400, f"{key}={asked} with a {prompt_tokens}-token prompt passes this model's context of "
                                f"{context} tokens: ask for at most {context - prompt_tokens}", param=key,
                           code="context_length_exceeded")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"seed={seed!r} must be an integer", param="seed")
        max_new = asked if asked is not None else self.options.default_max_tokens
        if context is not None:
            max_new = min(max_new, context - prompt_tokens)
        min_tokens = _int(body, "min_tokens", 0, low=0)  # vLLM's extension: no end of sequence before this many
        if min_tokens > max_new:
            raise APIError(400, f"min_tokens={min_tokens} is more than the {max_new} new tokens this request may have",
                           param="min_tokens")
        return Sampling(max_new_tokens=max_new, temperature=temperature, top_p=top_p, seed=seed, stop=_stop(body),
                        min_tokens=min_tokens)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def completion_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = len(self.tokenizer)
            if not all(0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string (or one string in a list, or token ids)",
                           param="prompt")
        return self.tokenizer(prompt).input_ids

    # ---- the application ----------------------------------------------------------------------
    def _build(self):
        app = FastAPI(title="qdora serve", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(APIError)
        async def api_error(_, exc: APIError):
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(HTTPException)
        async def http_error(_, exc: HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(),
                                status_code=exc.status_code)

        @app.exception_handler(RequestValidationError)
        async def validation_error(_, exc: RequestValidationError):
            return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

        @app.middleware("http")
        async def authorize(request: HTTPRequest, call_next):
            key = self.options.api_key
            if key is not None and request.headers.get("authorization", "") != f"Bearer {key}":
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
            return await call_next(request)

        async def read_json(request: HTTPRequest) -> dict:
            raw = await request.body()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise APIError(400, f"the request body is not UTF-8 (byte {err.start})") from None
            try:
                body = json.loads(text)
            except json.JSONDecodeError as err:
                raise APIError(400, f"the request body is not valid JSON: {err}") from None
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            return body

        @app.get("/health")
        async def health():
            return {"status": "ok", "running": self.engine.running}

        @app.get("/v1/models")
        async def models():
            data = [{"id": self.options.base_name, "object": "model", "created": self.created, "owned_by": "qdora",
                     "root": self.options.base_name, "parent": None}]
            for name in sorted(self.bank.adapters):
                data.append({"id": name, "object": "model", "created": self.created, "owned_by": "qdora",
                             "root": str(self.bank.adapters[name].path), "parent": self.options.base_name})
            return {"object": "list", "data": data}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: HTTPRequest):
            body = await read_json(request)
            adapter = self._adapter(body)
            ids = self.chat_ids(_messages(body))
            return await self._answer(request, body, adapter, ids, chat=True)

        @app.post("/v1/completions")
        async def completions(request: HTTPRequest):
            body = await read_json(request)
            adapter = self._adapter(body)
            ids = self.completion_ids(body)
            return await self._answer(request, body, adapter, ids, chat=False)

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: HTTPRequest):
            body = await read_json(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
                raise APIError(400, "give lora_name and lora_path (strings)")
            if name == self.options.base_name or name in self.bank.adapters:
                raise APIError(400, f"an adapter (or the base) is already named {name!r}: unload it first or pick "
                                    "another name", param="lora_name")
            if not Path(path).is_dir():
                raise APIError(400, f"adapter folder not found: {path}", param="lora_path")

            def load():
                with self.engine.lock:
                    return self.bank.add(name, path)
            try:
                info = await asyncio.to_thread(load)
            except (ValueError, OSError, KeyError) as err:
                raise APIError(400, f"adapter {name!r} cannot be loaded: {' '.join(str(err).split())}",
                               param="lora_path") from None
            return {"object": "adapter", "id": name, "method": info.method, "r": info.r, "layers": info.layers}

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: HTTPRequest):
            body = await read_json(request)
            name = body.get("lora_name")
            if name not in self.bank.adapters:
                raise APIError(404, f"no adapter named {name!r} is loaded", param="lora_name", code="model_not_found")
            busy = self.engine.users(name)
            if busy:
                raise APIError(409, f"adapter {name!r} is answering {busy} request(s); unload it when they are done",
                               param="lora_name")

            def unload():
                with self.engine.lock:
                    self.bank.remove(name)
            await asyncio.to_thread(unload)
            return {"object": "adapter", "id": name, "deleted": True}

        return app

    async def _answer(self, request, body: dict, adapter: str | None, ids: list[int], chat: bool):
        sampling = self._sampling(body, len(ids))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, f"stream={stream!r} must be true or false", param="stream")
        options = body.get("stream_options") or {}
        usage_chunk = isinstance(options, dict) and options.get("include_usage") is True
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        req = Request(ids, adapter=adapter, sampling=sampling,
                      on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            self.engine.submit(req)
        except (ValueError, KeyError) as err:
            raise APIError(400, str(err).strip("'\"")) from None
        except RuntimeError as err:
            raise APIError(503, str(err), type="server_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        model = body["model"]
        created = int(time.time())

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(req.tokens),
                    "total_tokens": len(ids) + len(req.tokens)}

        if not stream:
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), 0.5)
                    except TimeoutError:
                        if await request.is_disconnected():
                            raise APIError(499, "the client closed the connection") from None
                        continue
                    if event.finish is not None:
                        break
            finally:
                if not req.done.is_set():  # the client went away: free its row
                    req.cancel()
            if event.finish == "error":
                raise APIError(500, f"generation failed: {event.error}", type="server_error")
            finish = "length" if event.finish == "length" else "stop"
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": req.text}, "logprobs": None,
                          "finish_reason": finish}
                return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                        "choices": [choice], "usage": usage()}
            choice = {"index": 0, "text": req.text, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [choice], "usage": usage()}

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            data = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
            if usage_chunk:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk(role=True)
                while True:
                    event = await events.get()
                    if event.text:
                        yield chunk(event.text)
                    if event.finish is None:
                        continue
                    if event.finish == "error":
                        error = APIError(500, f"generation failed: {event.error}", type="server_error")
                        yield f"data: {json.dumps(error.body())}\n\n"
                    elif event.finish != "cancelled":
                        yield chunk(finish="length" if event.finish == "length" else "stop")
                        if usage_chunk:
                            data = {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                                    "usage": usage()}
                            yield f"data: {json.dumps(data)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                if not req.done.is_set():  # the client went away mid-stream: free its row
                    req.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
