"""The HTTP surface: the OpenAI API shape (FastAPI + uvicorn) over the serving `Engine`.

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models
    POST /v1/knowledge   {"documents": [{"text", "title"?, "id"?}]} -> ids
    GET  /v1/knowledge   the live documents;   DELETE /v1/knowledge/{id}
    GET  /health, GET /metrics (Prometheus text format)

Extra request field `mode`: memory (default) | rag | none. Every choice carries `references`:
per chunk of 64 tokens (prompt chunks "prompt:i", generated chunks 0, 1, ...), the references
read (id, doc_id, title, score). Errors have OpenAI's body, {"error": {"message", "type",
"param", "code"}}, with 400 (bad request), 404 (unknown model or document), 429 (queue full,
with Retry-After), 503 (shutting down), 504 (timed out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from m3jax.decode import encode_conversation
from m3jax.serve.engine import ContextTooLong, Engine, EngineStopped, QueueFull, Request
from m3jax.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from m3jax.tokenizer import chat_question

log = logging.getLogger("m3jax.serve")


# ------------------------------------------------------------------------------ chat prompts
# ------------------------------------------------------------------------------ request bodies
class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    mode: Literal["memory", "rag", "none"] = "memory"
    ignore_eos: bool = False  # as vLLM's: generate max_tokens tokens (benchmarks)


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError(f"message content parts must be text, got type {p.get('type')!r}")
            parts.append(p["text"])
        return "".join(parts)


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Document(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1)
    title: str | None = None
    id: int | None = Field(None, ge=0)


class KnowledgeBody(BaseModel):
    documents: list[Document] = Field(min_length=1)


# ------------------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------------------ one choice
class _Choice:
    """The state of one choice while its request runs: tokens, text shown, references."""

    def __init__(self, index: int, req: Request, stops: list[str]):
        self.index, self.req, self.stops = index, req, stops
        self.tokens: list[int] = []
        self.text = ""  # decoded text, cut at a stop string
        self.shown = 0  # characters already streamed
        self.references: list[dict] = []
        self.finish_reason: str | None = None
        self.error: dict | None = None

    def add(self, tokenizer, end_ids: tuple[int, ...], payload: dict) -> None:
        toks = [t for t in payload["tokens"] if t not in end_ids or self.req.ignore_eos]
        self.tokens.extend(toks)
        self.references.append({"chunk": payload["chunk"], "references": payload["references"]})
        self.text = tokenizer.decode(self.tokens)
        hits = [self.text.find(s) for s in self.stops if s and s in self.text]
        if hits:  # a stop string: cut there, free the slot
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            self.req.cancel("stop")

    def delta(self) -> str:
        """New text safe to stream: all of it once finished, else all but what could be the start
        of a stop string."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.shown, len(self.text) - hold)
        out, self.shown = self.text[self.shown:end], end
        return out


# ------------------------------------------------------------------------------ the app
def create_app(engine: Engine, model_name: str, *, metrics: ServeMetrics | None = None,
               drain_s: float = 30.0) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_name` (it starts and stops the engine)."""
    metrics = metrics if metrics is not None else engine.metrics or ServeMetrics()
    engine.metrics = metrics
    tok, config, sc = engine.tokenizer, engine.config, engine.serve_config
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.alive:
            engine.start()
        log.info("serving", extra={"fields": {"model": model_name, "slots": sc.slots * sc.groups,
                                              "cache_len": sc.cache_len, "kb": getattr(engine.kb, "directory", None)}})
        yield
        await asyncio.to_thread(engine.stop, drain_s)
        log.info("stopped", extra={"fields": {"rounds": engine.rounds, "tokens": engine.tokens_out}})

    app = FastAPI(title="m3jax", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}",
                          code="invalid_json")
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {e.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    def _check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist (this server serves '{model_name}')",
                           param="model", code="model_not_found")

    def _encode(prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < config.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids {bad[:5]} are outside [0, {config.vocab_size})", param="prompt")
            if ids and ids[0] == config.bos_id:
                ids = ids[1:]
        if not ids:
            raise APIError(400, "empty prompt: give at least one token of text", param="prompt")
        return [config.bos_id] + ids

    def _submit(prompts: list[list[int]], body: _Common, max_tokens: int, queue: asyncio.Queue) -> list[_Choice]:
        loop = asyncio.get_running_loop()
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stops)}", param="stop")
        choices: list[_Choice] = []
        try:
            for p in prompts:
                for j in range(body.n):
                    i = len(choices)
                    hook = lambda kind, payload, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, kind, payload))  # noqa: E731
                    req = Request(p, mode=body.mode, max_tokens=max_tokens, temperature=body.temperature,
                                  top_p=body.top_p, seed=None if body.seed is None else body.seed + j,
                                  ignore_eos=body.ignore_eos, on_event=hook)
                    choices.append(_Choice(i, req, stops))
                    engine.submit(req)
        except (QueueFull, EngineStopped, ValueError) as e:
            for c in choices:
                c.req.cancel("refused")
            if isinstance(e, QueueFull):
                raise APIError(429, f"server busy: {e}; retry later", "rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(sc.retry_after_s)}) from None
            if isinstance(e, EngineStopped):
                raise APIError(503, str(e), "server_error", code="unavailable") from None
            if isinstance(e, ContextTooLong):
                raise APIError(400, str(e), param="messages" if isinstance(body, ChatBody) else "prompt",
                               code="context_length_exceeded") from None
            raise APIError(400, str(e), param="mode" if "mode" in str(e) else None) from None
        return choices

    async def _events(choices: list[_Choice], queue: asyncio.Queue, http: HTTPRequest | None):
        """Yield the index of each choice that changed, until all have finished (cancels all on exit)."""
        left = len(choices)
        deadline = time.monotonic() + sc.request_timeout_s + 60
        try:
            while left:
                try:
                    i, kind, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if http is not None and await http.is_disconnected():
                        return
                    if time.monotonic() > deadline:
                        raise APIError(504, "request timed out", "timeout", code="timeout") from None
                    continue
                c = choices[i]
                was_done = c.finish_reason is not None or c.error is not None
                if kind == "chunk" and not was_done:
                    c.add(tok, config.end_ids, payload)
                elif kind == "done" and c.error is None:
                    c.finish_reason = c.finish_reason or payload["finish_reason"]
                elif kind == "error" and c.finish_reason is None:
                    c.error = payload
                if kind in ("done", "error"):
                    left -= 1
                    _log_done(c)
                if not was_done:
                    yield i
        finally:
            for c in choices:
                c.req.cancel("client gone")

    def _log_done(c: _Choice) -> None:
        r = c.req
        log.info("request", extra={"fields": {
            "request": r.id, "mode": r.mode, "prompt_tokens": r.prompt_tokens, "completion_tokens": len(c.tokens),
            "finish_reason": c.finish_reason, "error": (c.error or {}).get("message"),
            "latency_s": round(time.monotonic() - r.t_submit, 4),
            "ttft_s": None if r.t_first is None else round(r.t_first - r.t_submit, 4)}})

    def _usage(choices: list[_Choice], n: int) -> dict:
        prompt = sum(c.req.prompt_tokens for c in choices[::n])  # n choices share one prompt
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _raise_choice_error(choices: list[_Choice]) -> None:
        for c in choices:
            if c.error is not None and c.finish_reason is None:
                t = c.error.get("type", "server_error")
                status = 504 if t == "timeout" else 503
                raise APIError(status, c.error.get("message", "failed"), t, code=t)

    async def _run(body: _Common, prompts: list[list[int]], max_tokens: int, chat: bool, http: HTTPRequest):
        queue: asyncio.Queue = asyncio.Queue()
        choices = _submit(prompts, body, max_tokens, queue)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        if not body.stream:
            async for _ in _events(choices, queue, http):
                pass
            _raise_choice_error(choices)
            out = []
            for c in choices:
                refs = c.req.prompt_references + c.references
                d = {"index": c.index, "finish_reason": c.finish_reason or "stop", "references": refs}
                if chat:
                    d["message"] = {"role": "assistant", "content": c.text}
                else:
                    d.update(text=c.text, logprobs=None)
                out.append(d)
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                 "choices": out, "usage": _usage(choices, body.n)})

        async def sse():
            def event(d: dict) -> str:
                return f"data: {json.dumps(d)}\n\n"

            base = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()),
                    "model": model_name}
            if chat:
                for c in choices:
                    yield event({**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None, "references": c.req.prompt_references}]})
            sent_refs = [0] * len(choices)
            try:
                async for i in _events(choices, queue, None):
                    c = choices[i]
                    if c.error is not None:
                        yield event({"error": {"message": c.error.get("message"), "type": c.error.get("type"),
                                               "param": None, "code": c.error.get("type")}})
                        continue
                    text = c.delta()
                    refs = c.references[sent_refs[i]:]
                    if not chat and sent_refs[i] == 0:  # its first event: the prompt's references too
                        refs = c.req.prompt_references + refs
                    sent_refs[i] = len(c.references)
                    ch = {"index": i, "finish_reason": c.finish_reason, "references": refs}
                    if chat:
                        ch["delta"] = {"content": text} if text else {}
                    else:
                        ch.update(text=text, logprobs=None)
                    yield event({**base, "choices": [ch]})
                if (body.stream_options or {}).get("include_usage"):
                    yield event({**base, "choices": [], "usage": _usage(choices, body.n)})
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield event({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _max_tokens(body: _Common, prompt_len: int, default: int | None) -> int:
        mt = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if mt is not None:
            return mt
        if default is not None:
            return default
        return max(1, min(sc.max_tokens_default, engine.context_len - prompt_len))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        _check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        ids = [_encode(x) for x in prompts]
        return await _run(body, ids, _max_tokens(body, max(map(len, ids)), 16), False, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        _check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = encode_conversation(tok, config.bos_id, messages)  # the model's template, in Jinja's sandbox
            if body.mode == "rag":  # the references go into the last user turn: there must be one
                chat_question(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return await _run(body, [ids], _max_tokens(body, len(ids), None), True, http)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "m3jax", "context_length": engine.context_len}]}

    # ---------------------------------------------------------------- knowledge
    def _need_kb() -> None:
        if engine.kb is None:
            raise APIError(400, "the server has no knowledge base (start it with --kb)", code="no_knowledge_base")

    @app.get("/v1/knowledge")
    async def knowledge_list():
        _need_kb()
        return {"object": "list", "data": [{"id": r.doc_id, "object": "knowledge.document", "title": r.title,
                                            "references": r.count} for r in engine.kb.documents()]}

    @app.post("/v1/knowledge")
    async def knowledge_add(body: KnowledgeBody):
        _need_kb()
        nxt = engine.next_doc_id()
        docs, given = [], set()
        for d in body.documents:
            if d.id is None:
                while nxt in given:
                    nxt += 1
                doc_id, nxt = nxt, nxt + 1
            else:
                doc_id = d.id
            if doc_id in given:
                raise APIError(400, f"documents: id {doc_id} given twice", param="documents")
            given.add(doc_id)
            docs.append((doc_id, d.text, d.title))
        try:
            recs = await asyncio.wrap_future(engine.add_documents(docs))
        except ValueError as e:  # KnowledgeBaseError: a live duplicate id, ...
            raise APIError(400, " ".join(str(e).split()), param="documents") from None
        metrics.knowledge.labels("add").inc(len(recs))
        log.info("knowledge add", extra={"fields": {"ids": [r.doc_id for r in recs],
                                                    "references": sum(r.count for r in recs)}})
        return {"object": "list", "data": [{"id": r.doc_id, "object": "knowledge.document", "title": r.title,
                                            "references": r.count} for r in recs]}

    @app.delete("/v1/knowledge/{doc_id}")
    async def knowledge_delete(doc_id: int):
        _need_kb()
        if doc_id not in {r.doc_id for r in engine.kb.documents()}:
            raise APIError(404, f"document {doc_id} is not in the knowledge base", param="id", code="not_found")
        try:
            n = await asyncio.wrap_future(engine.delete_documents([doc_id]))
        except ValueError as e:
            raise APIError(404, " ".join(str(e).split()), param="id", code="not_found") from None
        metrics.knowledge.labels("delete").inc()
        log.info("knowledge delete", extra={"fields": {"id": doc_id, "references": n}})
        return {"id": doc_id, "object": "knowledge.document", "deleted": True, "references": n}

    # ---------------------------------------------------------------- operations
    @app.get("/health")
    async def health():
        ok = engine.alive and engine._accepting
        body = {"status": "ok" if ok else "unavailable", "model": model_name,
                "slots": sc.slots * sc.groups, "busy": sum(g.active + len(g.joining) for g in engine.groups),
                "queue": len(engine.queue), "rounds": engine.rounds, "generated_tokens": engine.tokens_out,
                "knowledge_base": getattr(engine.kb, "directory", None)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engine), media_type=CONTENT_TYPE_LATEST)

    return app


def model_name_of(path: str) -> str:
    """The served model id: the model directory's name."""
    return os.path.basename(os.path.normpath(path)) or path
