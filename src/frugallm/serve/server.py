"""An OpenAI-compatible HTTP server over ``Engine`` (FastAPI + uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true`` as server-sent
events ending in ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk with the usage),
GET /health, GET /metrics (Prometheus text).

One worker thread owns the engine and loops on ``engine.step()``; request handlers (asyncio) submit to it and
receive each step's output through an ``asyncio.Queue`` fed with ``call_soon_threadsafe``. A client that goes
away mid-stream cancels its handler, which aborts its sequences: their blocks are back at the next step.

Usage carries, besides OpenAI's token counts, DeepSeek's ``prompt_cache_hit_tokens`` and
``prompt_cache_miss_tokens`` (also as OpenAI's ``prompt_tokens_details.cached_tokens``), the request's share of
engine compute time and its cost: ``compute_seconds * price_per_hour / 3600``.

Errors are OpenAI's JSON, ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON and
invalid parameters (including a prompt longer than the context), 404 for an unknown model or route, 503 when
the request queue is full, 500 for anything unexpected; the server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from frugallm.serve.auth import APIKeyAuth
from frugallm.serve.engine import Engine, StepOutput, Usage
from frugallm.serve.loading import ROLES
from frugallm.serve.openai_format import (
    TokenIds,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    echoed_logprobs,
    requested_logprobs,
)
from frugallm.serve.sampling import QueueFullError, RequestError, SamplingParams, TokenLogprob

log = logging.getLogger("frugallm.serve")

# Placeholder device price when none is given: an on-demand cloud VM with a few vCPUs is of the order of
# $0.10 per hour (pass --price-per-hour for the machine you actually run on).
# no device price is known unless the user gives one (--price-per-hour or --gpu): cost is then counted as 0
DEFAULT_PRICE_PER_HOUR = 0.0
MAX_N = 8


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


# ----- the engine thread ----------------------------------------------------------------------------------
class EngineWorker:
    """Owns the engine: steps it while there is work, hands each output to its request's listener."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.listeners: dict[str, Callable[[StepOutput], None]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="frugallm-engine", daemon=True)
        self.step_errors = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self.thread.join(timeout=10)

    def submit(self, prompt: list[int], params: SamplingParams, listener: Callable[[StepOutput], None],
               adapter: int = 0) -> str:
        rid = uuid.uuid4().hex
        self.listeners[rid] = listener  # before submit: the first output may come at once
        try:
            self.engine.submit(prompt, params, request_id=rid, adapter=adapter)
        except Exception:
            self.listeners.pop(rid, None)
            raise
        self._wake.set()
        return rid

    def abort(self, rid: str) -> None:
        self.engine.abort(rid)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a bug must not take the server down: fail the batch, keep serving
                log.exception("engine step failed; failing the running requests")
                self.step_errors += 1
                outputs = self.engine.abort_all("error")
            for out in outputs:
                listener = self.listeners.get(out.request_id)
                if listener is not None:
                    try:
                        listener(out)
                    except Exception:  # e.g. the request's event loop is gone; the engine goes on
                        log.exception("could not deliver output of request %s", out.request_id)
                        self.engine.abort(out.request_id)
                if out.finished:
                    self.listeners.pop(out.request_id, None)
        self.engine.abort_all("abort")


# ----- request parsing --------------------------------------------------------------------------------------
def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        allowed = " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"{name} must be {allowed}, got {type(v).__name__}", param=name)
    return v


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


def sampling_params(body: dict[str, Any], default_max_tokens: int | None, extra_stops: tuple[str, ...] = (),
                    chat: bool = False) -> SamplingParams:
    max_tokens = _field(body, "max_completion_tokens", (int,), None)
    max_tokens = _field(body, "max_tokens", (int,), max_tokens)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _field(body, name, (int, float), 0)
        if not -2 <= v <= 2:
            raise APIError(400, f"{name} must be in [-2, 2], got {v}", param=name)
        if v != 0:
            raise APIError(400, f"{name} is not supported by this server (use 0)", param=name)
    logprobs = requested_logprobs(body, chat, _bad)
    echo = not chat and bool(_field(body, "echo", (bool,), False))
    stop_ids = _field(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids):
        raise APIError(400, "stop_token_ids must be a list of token ids", param="stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temperature=_field(body, "temperature", (int, float), 1.0),
            top_p=_field(body, "top_p", (int, float), 1.0),
            top_k=_field(body, "top_k", (int,), -1),
            stop=tuple(stop) + tuple(s for s in extra_stops if s not in stop),
            seed=_field(body, "seed", (int,), None),
            ignore_eos=bool(_field(body, "ignore_eos", (bool,), False)),
            logprobs=logprobs, prompt_logprobs=(logprobs or 0) if echo else None, stop_token_ids=tuple(stop_ids))
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None


def chat_prompt(body: dict[str, Any], codec: Any) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with a role in {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        clean.append({**m, "content": content})
    try:
        text = codec.render_chat(clean)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    return codec.encode(text, add_special_tokens=False)


def completion_prompts(body: dict[str, Any], codec: Any) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "prompt is required", param="prompt")
    if isinstance(prompt, str):
        return [codec.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [codec.encode(p) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of them",
                   param="prompt")


# ----- the app -----------------------------------------------------------------------------------------------
class StatusCounter:
    """Counts responses by path and status. Pure ASGI (not BaseHTTPMiddleware), so a streaming response's
    cancellation on client disconnect reaches the handler unchanged."""

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.counter[(scope["path"], status)] += 1


class ServerState:
    def __init__(self, engine: Engine, model_name: str, price_per_hour: float, max_n: int = MAX_N) -> None:
        self.engine, self.model_name, self.price_per_hour = engine, model_name, price_per_hour
        self.max_n = max_n
        # the names a request's model may be: the base, then each adapter (serve.adapters), by index
        self.model_names = [model_name] + (list(engine.adapters.names) if engine.adapters is not None else [])
        self.token_text = TokenText(engine.codec.tokenizer)
        self.worker = EngineWorker(engine)
        self.http = Counter()  # (endpoint, status) -> count
        self.compute_seconds = 0.0
        self.created = int(time.time())

    def usage_json(self, usages: list[Usage]) -> dict[str, Any]:
        prompt = sum(u.prompt_tokens for u in usages)
        out = sum(u.completion_tokens for u in usages)
        hit = sum(u.prompt_cache_hit_tokens for u in usages)
        seconds = sum(u.compute_seconds for u in usages)
        drafted = sum(u.draft_tokens for u in usages)
        accepted = sum(u.accepted_draft_tokens for u in usages)
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
                "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt - hit,
                "prompt_tokens_details": {"cached_tokens": hit},
                "compute_seconds": round(seconds, 6),
                "cost_usd": seconds * self.price_per_hour / 3600,
                "speculative_acceptance_rate": accepted / drafted if drafted else None}


def create_app(engine: Engine, model_name: str = "frugallm", price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
               api_keys: list[str] | None = None, max_n: int = MAX_N) -> FastAPI:
    """The FastAPI app; the engine worker starts and stops with the app's lifespan. With ``api_keys`` every
    /v1 route wants one of them as a bearer token (``serve.auth``)."""
    if engine.codec is None:
        raise RequestError("the server needs a tokenizer (engine.codec)")
    state = ServerState(engine, model_name, price_per_hour, max_n)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        yield
        state.worker.stop()

    app = FastAPI(title="frugallm", lifespan=lifespan)
    app.state.frugallm = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "invalid_request_error", code="not_found"
                              if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    app.add_middleware(APIKeyAuth, keys=list(api_keys or ()))
    app.add_middleware(StatusCounter, counter=state.http)  # outermost: the 401s are counted too

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = state.worker.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "frugallm",
             "max_model_len": engine.max_model_len, "root": model_name, "parent": None if i == 0 else model_name}
            for i, name in enumerate(state.model_names)]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(state), media_type="text/plain; version=0.0.4")

    async def body_of(request: Request, need_model: bool = True) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        name = body.get("model")
        if not need_model and name is None:
            return body
        if not isinstance(name, str):
            raise APIError(400, "model is required (a string)", param="model")
        if name not in state.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{', '.join(repr(n) for n in state.model_names)}", param="model", code="model_not_found")
        return body

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await body_of(request)
        if body.get("suffix") is not None:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.get("echo") and body.get("stream"):
            raise APIError(400, "echo cannot be used with stream", param="echo")
        prompts = completion_prompts(body, engine.codec)
        params = sampling_params(body, default_max_tokens=16)
        texts = body["prompt"] if isinstance(body["prompt"], list) and isinstance(body["prompt"][0], str) \
            else [body["prompt"]] if isinstance(body["prompt"], str) else None
        return await run_request(request, state, body, prompts, params, chat=False, prompt_texts=texts)

    # ----- the tokenizer, as vLLM serves it (lm-evaluation-harness and others probe these) ------------------
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        codec = engine.codec
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": codec.eos_token,
                "bos_token": codec.bos_token, "eos_token_ids": sorted(codec.eos_ids),
                "chat_template": codec.chat_template, "model_max_length": engine.max_model_len,
                "vocab_size": codec.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await body_of(request, need_model=False)
        add_special = bool(_field(body, "add_special_tokens", (bool,), True))
        if "messages" in body:
            ids = chat_prompt(body, engine.codec)
        else:
            text = _field(body, "prompt", (str,), None)
            if text is None:
                raise APIError(400, "prompt (a string) or messages is required", param="prompt")
            ids = engine.codec.encode(text, add_special_tokens=add_special)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if _field(body, "return_token_strs", (bool,), False):
            out["token_strs"] = [state.token_text.text(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await body_of(request, need_model=False)
        ids = body.get("tokens")
        vocab = engine.model.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise APIError(400, f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
        return {"prompt": engine.codec.decode(ids)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await body_of(request)
        prompt = chat_prompt(body, engine.codec)
        params = sampling_params(body, default_max_tokens=None, extra_stops=engine.codec.chat_stops, chat=True)
        return await run_request(request, state, body, [prompt], params, chat=True)

    return app


@dataclasses.dataclass
class Choice:
    """One choice being collected: the engine's outputs for one (prompt, sample) pair."""

    prompt: list[int]
    prompt_text: str | None  # the prompt as the client sent it, for echo; None: decode the ids
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    reason: str | None = None
    offset: int = 0  # characters of the choice's text already streamed (text_offset of the next token)


async def run_request(request: Request, state: ServerState, body: dict[str, Any], prompts: list[list[int]],
                      params: SamplingParams, chat: bool, prompt_texts: list[str] | None = None) -> Response:
    adapter = state.model_names.index(body["model"])  # 0: the base model
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= state.max_n:
        raise APIError(400, f"n must be in [1, {state.max_n}], got {n}", param="n")
    stream = bool(_field(body, "stream", (bool,), False))
    opts = _field(body, "stream_options", (dict,), {}) or {}
    include_usage = bool(opts.get("include_usage", False))
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
    rids: dict[int, str] = {}
    # choice index = prompt index * n + sample index, as OpenAI numbers a batched prompt's choices
    jobs = [(i * n + j, p) for i, p in enumerate(prompts) for j in range(n)]
    choices = {index: Choice(p, prompt_texts[index // n] if prompt_texts else None) for index, p in jobs}
    try:
        for index, prompt in jobs:
            def listener(out: StepOutput, index: int = index) -> None:
                loop.call_soon_threadsafe(outputs.put_nowait, (index, out))

            p = params if params.seed is None or index == 0 else _reseeded(params, params.seed + index)
            rids[index] = state.worker.submit(prompt, p, listener, adapter)
    except QueueFullError as e:
        for rid in rids.values():
            state.worker.abort(rid)
        raise APIError(503, str(e), "server_overloaded", code="queue_full") from None
    except RequestError as e:
        for rid in rids.values():
            state.worker.abort(rid)
        param = "messages" if chat and e.param == "prompt" else e.param
        raise APIError(400, str(e), param=param, code=e.code) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    meta = dict(id=rid, created=int(time.time()), model=body["model"])
    tt = TokenIds() if _field(body, "return_tokens_as_token_ids", (bool,), False) else state.token_text
    if stream:
        events = stream_events(state, meta, outputs, rids, choices, params, chat, include_usage, tt)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(request, state, meta, outputs, rids, choices, params, chat, tt)


def _reseeded(p: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(p, seed=seed)  # n > 1 with a seed: distinct but reproducible choices


def _reason(r: str | None) -> str:
    return r if r in ("stop", "length") else "stop"


async def collect(request: Request, state: ServerState, meta: dict[str, Any], outputs: asyncio.Queue,
                  rids: dict[int, str], choices: dict[int, Choice], params: SamplingParams, chat: bool,
                  tt: TokenText) -> JSONResponse:
    usages: list[Usage] = []
    left = len(rids)
    try:
        while left:
            try:
                index, out = await asyncio.wait_for(outputs.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return error_response(499, "client disconnected")
                continue
            c = choices[index]
            c.text.append(out.text)
            c.logprobs += out.logprobs
            if out.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
            if out.finished:
                c.reason = out.finish_reason or "stop"
                usages.append(out.usage or Usage())
                left -= 1
    finally:
        for index, rid in rids.items():
            if choices[index].reason is None:
                state.worker.abort(rid)
    if any(c.reason == "error" for c in choices.values()):
        raise APIError(500, "the engine failed while generating this request", "server_error")
    state.compute_seconds += sum(u.compute_seconds for u in usages)
    body_choices = []
    for index in sorted(rids):
        c = choices[index]
        text = "".join(c.text)
        if chat:
            lp = chat_logprobs(tt, c.logprobs) if params.logprobs is not None else None
            body_choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                 "finish_reason": _reason(c.reason), "logprobs": lp})
            continue
        lp = None
        if params.prompt_logprobs is not None:  # echo
            prompt_text = c.prompt_text if c.prompt_text is not None else state.engine.codec.decode(c.prompt)
            text = prompt_text + text
            if params.logprobs is not None:
                lp = echoed_logprobs(tt, c.prompt, c.prompt_logprobs or [None], c.logprobs)
        elif params.logprobs is not None:
            lp = completion_logprobs(tt, list(c.logprobs))
        body_choices.append({"index": index, "text": text, "finish_reason": _reason(c.reason), "logprobs": lp})
    obj = "chat.completion" if chat else "text_completion"
    return JSONResponse({**meta, "object": obj, "choices": body_choices, "usage": state.usage_json(usages)})


async def stream_events(state: ServerState, meta: dict[str, Any], outputs: asyncio.Queue, rids: dict[int, str],
                        choices: dict[int, Choice], params: SamplingParams, chat: bool, include_usage: bool,
                        tt: TokenText) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    done: set[int] = set()
    usages: list[Usage] = []

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {**meta, "object": obj, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def choice(index: int, out: StepOutput | None, reason: str | None, first: bool = False) -> dict[str, Any]:
        text = out.text if out is not None else ""
        lp = None
        if params.logprobs is not None and out is not None:
            c = choices[index]
            if chat:
                lp = chat_logprobs(tt, out.logprobs)
            else:
                lp = completion_logprobs(tt, list(out.logprobs), offset=c.offset)
            c.offset += len(text)
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": lp}
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": lp}

    try:
        if chat:
            yield event([choice(i, None, None, first=True) for i in sorted(rids)])
        while len(done) < len(rids):
            index, out = await outputs.get()
            if out.finished:
                done.add(index)
                usages.append(out.usage or Usage())
                if out.finish_reason == "error":
                    err = {"error": {"message": "the engine failed while generating this request",
                                     "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                yield event([choice(index, out, _reason(out.finish_reason))])
            elif out.text or out.token_ids:
                yield event([choice(index, out, None)])
        state.compute_seconds += sum(u.compute_seconds for u in usages)
        if include_usage:
            yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': state.usage_json(usages)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also on cancellation when the client went away: free its sequences and blocks
        for index, rid in rids.items():
            if index not in done:
                state.worker.abort(rid)


# ----- metrics ---------------------------------------------------------------------------------------------
def prometheus_text(state: ServerState) -> str:
    s = state.engine.stats()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float, labels: str = "") -> None:
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {value:.6g}" if isinstance(value, float) else f"{name}{labels} {value}")

    metric("frugallm_requests_total", "counter", "Generation requests received by the engine.", s["requests"])
    metric("frugallm_requests_finished_total", "counter", "Generation requests finished (any reason).",
           s["finished"])
    metric("frugallm_requests_aborted_total", "counter", "Requests aborted (client gone or error).", s["aborted"])
    for (path, status), count in sorted(state.http.items()):
        metric("frugallm_http_requests_total", "counter", "HTTP requests by path and status.", count,
               f'{{path="{path}",status="{status}"}}')
    metric("frugallm_prompt_tokens_total", "counter", "Prompt tokens (tokens in).", s["prompt_tokens"])
    metric("frugallm_completion_tokens_total", "counter", "Generated tokens (tokens out).", s["completion_tokens"])
    metric("frugallm_generation_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           float(s["tokens_per_second"]))
    metric("frugallm_prompt_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
           s["cache_hit_tokens"])
    metric("frugallm_prompt_cache_miss_tokens_total", "counter", "Prompt tokens computed.", s["cache_miss_tokens"])
    metric("frugallm_prompt_cache_hit_rate", "gauge", "Hit tokens / prompt tokens since start.",
           float(s["cache_hit_rate"]))
    metric("frugallm_speculative_draft_tokens_total", "counter", "MTP draft tokens verified.", s["draft_tokens"])
    metric("frugallm_speculative_accepted_tokens_total", "counter", "MTP draft tokens accepted.",
           s["accepted_draft_tokens"])
    metric("frugallm_speculative_acceptance_rate", "gauge", "Accepted / drafted since start.",
           float(s["acceptance_rate"]))
    metric("frugallm_speculative_pauses_total", "counter", "Times a sequence paused drafting (low acceptance).",
           s["draft_pauses"])
    metric("frugallm_queue_length", "gauge", "Requests waiting for admission.", s["queue_length"])
    metric("frugallm_running_sequences", "gauge", "Sequences being prefilled or decoded.", s["running"])
    metric("frugallm_cache_blocks", "gauge", "KV cache blocks by state.", s["cache_blocks_used"], '{state="used"}')
    metric("frugallm_cache_blocks", "gauge", "KV cache blocks by state.", s["cache_blocks_cached"],
           '{state="cached"}')
    metric("frugallm_cache_blocks", "gauge", "KV cache blocks by state.", s["cache_blocks_total"], '{state="total"}')
    metric("frugallm_cache_bytes_per_token", "gauge", "KV cache bytes per token of context.",
           s["cache_bytes_per_token"])
    metric("frugallm_engine_busy_seconds_total", "counter", "Seconds the engine spent stepping.",
           float(s["busy_seconds"]))
    metric("frugallm_cost_dollars_total", "counter", "Compute cost of answered requests at the device price.",
           state.compute_seconds * state.price_per_hour / 3600)
    metric("frugallm_engine_step_errors_total", "counter", "Engine steps that failed.", state.worker.step_errors)
    return "\n".join(lines) + "\n"


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          price_per_hour: float = DEFAULT_PRICE_PER_HOUR, engine_config: Any = None, dtype: Any = None,
          log_level: str = "info", api_keys: list[str] | None = None, max_n: int = MAX_N,
          adapters: list[tuple[str, str]] | None = None) -> None:
    """Load PATH (a run directory or an HF directory) and serve it until interrupted."""
    import os
    from pathlib import Path

    import torch
    import uvicorn

    from frugallm.serve.auth import open_warning
    from frugallm.serve.loading import load_for_serving

    warning = open_warning(host, list(api_keys or ()))
    if warning:
        log.warning(warning)

    model, codec = load_for_serving(path, dtype=dtype or torch.float32)
    if adapters:
        from frugallm.serve.adapters import attach_adapters

        attach_adapters(model, adapters)
    engine = Engine(model, codec, engine_config)
    name = model_name or Path(os.path.abspath(path)).name  # runs/latest serves as "latest", not its target
    app = create_app(engine, name, price_per_hour, api_keys=api_keys, max_n=max_n)
    log.info("serving %s as %r on http://%s:%d (cache %.1f MiB, %d bytes/token, %d API keys)", path, name, host,
             port, engine.pool.total_bytes / 2**20, engine.cache_bytes_per_token, len(api_keys or ()))
    uvicorn.run(app, host=host, port=port, log_level=log_level)
