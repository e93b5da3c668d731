"""The OpenAI-compatible HTTP API over one or more engines, as a plain FastAPI app.

`build_app({"gpt-oss-120b": engine, ...})` serves /v1/chat/completions,
/v1/responses (and, with a response store, GET/DELETE /v1/responses/{id}, its
input_items and, for a background response, POST .../cancel and, for a
background stream, GET .../{id}?stream=true to resume it: all in
deployments.responses_routes, with POST /v1/responses/input_tokens),
/v1/conversations (deployments.conversations), stored chat completions (GET
/v1/chat/completions and /v1/chat/completions/{id}...: deployments.stored_chats), /v1/completions,
/v1/models, /tokenize and /detokenize (deployments.tokenize_routes), /health and /ready; with the Batch
API on, /v1/files and /v1/batches (deployments.batch_routes) and /v1/webhook_endpoints
(deployments.webhook_routes); the Responses WebSocket at /v1/responses (deployments.responses_ws). An engine is
anything with the `EngineClient` shape (engine.async_engine): an in-process
`AsyncEngine`, or a client of a remote one (the Ray Serve layer wraps this app
and supplies such clients; nothing here knows about Ray).

Guarantees: every error is OpenAI error JSON with the right status (never a
stack trace); a request the engine refuses fails before any byte of a stream is
sent, so it gets a real status code; a stream that fails later ends with an
error event and `data: [DONE]`, never a hang; a client that goes away aborts its
engine request; each model admits at most `max_pending` requests at once (429
beyond; flex requests an eighth fewer, priority ones an eighth more).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from typing import AsyncIterator, Awaitable, Callable, Mapping, Optional, Sequence, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import EngineClient
from engine.request import SERVICE_TIERS, GenerateRequest, RequestOutput, tier_name

from .api_common import PRINCIPAL_HEADER, APIError, BearerAuth, cap_tier, check_unicode, describe_errors, who
from .prompts import PromptTemplates
from .chat_api import ChatHandler
from .completions_api import CompletionHandler
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompactedResponse, CompactRequest,
                       CompletionRequest, CompletionResponse, ErrorResponse, ModelCard, ModelList, ResponseObject,
                       ResponsesRequest)
from .background import BackgroundResponses, detached
from .compaction import Compaction, compaction_request
from .conversations import router as conversations_router
from .responses_api import ResponseBuilder
from .responses_ws import OpenSockets
from .responses_routes import router as responses_router
from .sealed_reasoning import ReasoningSeal
from .sse_response import SSEResponse, nothing
from .stored_chats import StoredChats, router as stored_chats_router
from .stored_responses import StoredResponses
from .tokenize_routes import router as tokenize_router

log = logging.getLogger(__name__)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 429, 503)}


class _ClientGone(Exception):
    pass


def _maybe_schedule(result) -> None:
    """Engine clients may be sync or async; never wait on cleanup calls."""
    if inspect.isawaitable(result):
        asyncio.ensure_future(result)


def _engine_error(e: BaseException, param: str, schema_param: Optional[str] = None) -> APIError:
    """Typed refusals (EngineError and look-alikes with .status/.code) keep their status."""
    status, code = getattr(e, "status", None), getattr(e, "code", None)
    # A remote engine's error may wrap the original (Ray's RayTaskError.cause), whose
    # own text carries a remote traceback: report the cause's message only.
    cause = getattr(e, "cause", None)
    own = cause if isinstance(cause, BaseException) else e
    text = str(own).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    if isinstance(status, int) and isinstance(code, str):
        # a 400 names its field, or else is about the prompt (empty, too long, ids outside the vocabulary)
        field = getattr(own, "param", None)
        if not isinstance(field, str):
            field = param if status == 400 else None
        err = APIError(status, msg, param=field, code=code)
        err.limit = getattr(own, "limit", None)  # a context length: what truncation="auto" fits into
        return err
    if isinstance(e, ValueError):  # e.g. a JSON schema the grammar compiler rejects
        return APIError(400, msg, param=schema_param, code="invalid_value")
    log.error("engine refused to start a request: %s: %s", type(e).__name__, e)
    return APIError(503, "the engine is unavailable", code="engine_unavailable")


class _Slot:
    def __init__(self, counts: dict, model: str, held: bool = True):
        self._counts, self._model, self._held = counts, model, held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._counts[self._model] -= 1

    def again(self) -> "_Slot":
        """The slot of a request admitted already, once more (its first try was refused and released it)."""
        self._counts[self._model] += 1
        return _Slot(self._counts, self._model)

    def shared(self) -> "_Slot":
        """The slot for a run a request makes before its own (a compaction): it counts once, so this one
        gives nothing back, and a retry of that run takes nothing."""
        s = _Slot(self._counts, self._model, held=False)
        s.again = lambda: s
        return s


class _Run:
    """The engine requests of one API request: started together, merged into one
    (request index, output) iterator, and always cleaned up by `close`."""

    def __init__(self, engine: EngineClient, requests: list[GenerateRequest], slot: _Slot):
        self.engine, self.requests, self.slot = engine, requests, slot
        self._iters: list = []
        self._left = [r.params.n for r in requests]  # unfinished choices per request
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._queue: Optional[asyncio.Queue] = None
        self._pumps: list[asyncio.Task] = []
        self._closed = False

    async def start(self, param: str, schema_param: Optional[str] = None) -> None:
        """Returns once every request has produced its first output; raises APIError otherwise."""
        self._iters = [None] * len(self.requests)

        async def first(i: int, r: GenerateRequest):
            it = self.engine.generate(r)
            if inspect.isawaitable(it):
                it = await it
            self._iters[i] = it
            try:
                return i, await it.__anext__()
            except StopAsyncIteration:
                return i, None
            except Exception:
                self._left[i] = 0  # refused: nothing of it runs in the engine
                raise

        tasks = [asyncio.ensure_future(first(i, r)) for i, r in enumerate(self.requests)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException as e:
            for t in tasks:  # a sibling that failed must not leave the others running
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()
            if isinstance(e, Exception):
                raise _engine_error(e, param, schema_param) from None
            raise
        self._buffer = [(i, out) for i, out in results if out is not None]
        if len(self.requests) > 1:
            self._queue = asyncio.Queue()
            self._pumps = [asyncio.ensure_future(self._pump(i, it)) for i, it in enumerate(self._iters)]

    async def _pump(self, i: int, it) -> None:
        try:
            async for out in it:
                await self._queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await self._queue.put((i, e))
        finally:
            await self._queue.put((i, None))

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while True:
            if not any(self._left):
                raise StopAsyncIteration
            if self._buffer:
                i, out = self._buffer.pop(0)
            elif self._queue is None:
                i, out = 0, await self._iters[0].__anext__()
            else:
                i, out = await self._queue.get()
                if isinstance(out, Exception):
                    raise out
                if out is None:
                    if self._left[i]:
                        raise StopAsyncIteration  # ended early: the handler reports it
                    continue
            if out.finished:
                self._left[i] -= 1
                if out.error and out.finish_reason != "error":
                    # malformed model output: the parser stopped cleanly, the client gets what parsed
                    log.warning("request %s: %s", out.request_id, out.error)
            return i, out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for t in self._pumps:
                t.cancel()
            for t in self._pumps:
                try:
                    await t
                except BaseException:  # noqa: BLE001
                    pass
            for it in self._iters:
                if it is None:
                    continue
                try:
                    await it.aclose()
                except BaseException:  # noqa: BLE001 - cleanup must go on
                    pass
        for r, left in zip(self.requests, self._left):
            if left:
                log.info("aborting %s (%d choices unfinished)", r.request_id, left)
                try:
                    _maybe_schedule(self.engine.abort(r.request_id))
                except Exception:  # noqa: BLE001
                    log.exception("abort of %s failed", r.request_id)
        self.slot.release()


async def _unless_disconnected(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it and raise _ClientGone."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # servers block here; guard against one that does not

    task, watcher = asyncio.ensure_future(coro), asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001
                pass
            watcher.cancel()
            raise _ClientGone()
        watcher.cancel()
    return task.result()


def build_app(engines: Mapping[str, EngineClient], *, max_pending: Union[int, Mapping[str, int]] = 256,
              ready: Optional[Callable[[], Union[bool, Awaitable[bool]]]] = None,
              system_fingerprint: Optional[str] = None, owned_by: str = "gptoss-serve",
              title: str = "gpt-oss OpenAI-compatible API", metrics=None,
              api_keys: Optional[Union[frozenset, Mapping[str, str]]] = None, response_store=None,
              reasoning_key: Optional[str] = None, prompts: Sequence = (), batches=None,
              batch_store=None, websockets=None, webhooks=None) -> FastAPI:
    """The API over `engines` (model name -> engine client; read on every request,
    so a caller may fill it after building the app).

    max_pending: in-flight requests admitted per model (an int for all, or per
        model name); one more gets 429.
    ready: what /ready reports (sync or async); default: at least one engine.
    metrics: an observability.metrics.MetricsRecorder for request metrics (None: off).
    api_keys: when non-empty, /v1/* requires `Authorization: Bearer <key>` (401 otherwise); a mapping gives
        each key the highest service tier its requests run on (api_common.parse_api_keys).
    response_store: where Responses are stored to be continued and read (a
        deployments.response_store.MemoryResponseStore or RemoteResponseStore); None: nowhere.
    reasoning_key: the Fernet key that seals reasoning for `include: ["reasoning.encrypted_content"]`
        (deployments.sealed_reasoning); None: one made here, good for this app only.
    prompts: the stored prompts Responses may name (cluster.config.PromptTemplate; deployments.prompts).
    batches: the Files and Batch APIs' limits (cluster.config.BatchConfig; default: its defaults; max_mb 0: off).
    websockets: Responses over a WebSocket (cluster.config.WebSocketConfig; default: its defaults; max_minutes
        0: off).
    webhooks: how batch and background-response events are delivered to the webhook endpoints
        (/v1/webhook_endpoints, kept in the batch store: only with the Batch API on; cluster.config.WebhookConfig).
    batch_store: where files and batches are kept (a deployments.batch_store.BatchStoreClient); None: a store
        in this process.
    """
    from cluster.config import BatchConfig, WebhookConfig, WebSocketConfig
    batches = BatchConfig() if batches is None else batches
    webhooks = WebhookConfig() if webhooks is None else webhooks
    websockets = WebSocketConfig() if websockets is None else websockets
    internal_keys = {tier: secrets.token_urlsafe(32) for tier in SERVICE_TIERS}  # a batch's lines, run here
    stored = StoredResponses(response_store)
    seal = ReasoningSeal(reasoning_key)
    templates = PromptTemplates(prompts)
    background = BackgroundResponses(stored)
    chats = StoredChats(stored)
    sockets = OpenSockets(metrics)

    runner = None

    @contextlib.asynccontextmanager
    async def lifespan(_):
        if runner is not None:
            runner.start()
        publishing = asyncio.ensure_future(sockets.publish()) if metrics is not None else None
        yield
        if publishing is not None:
            publishing.cancel()
        if runner is not None:
            await runner.stop()  # another replica takes its batch on from where it was
        await background.shutdown()  # runs still going are stored as cancelled, not left in_progress
        if background.hooks is not None:
            await background.hooks.shutdown()

    app = FastAPI(title=title, version="1.0", lifespan=lifespan)
    if api_keys:
        keys = dict(api_keys) if isinstance(api_keys, Mapping) else dict.fromkeys(api_keys, "priority")
        app.add_middleware(BearerAuth, keys={**keys, **{k: tier for tier, k in internal_keys.items()}},
                           internal=frozenset(internal_keys.values()))
    if metrics is not None:
        from observability.tracking import RequestCounter
        app.add_middleware(RequestCounter, recorder=metrics)
    app.state.background = background
    pending: dict[str, int] = {}
    app.state.pending = pending  # model -> admitted, unfinished requests (for metrics)
    created = int(time.time())

    def limit(model: str) -> int:
        return max_pending if isinstance(max_pending, int) else max_pending.get(model, 256)

    def engine_for(model: str) -> EngineClient:
        eng = engines.get(model)
        if eng is None:
            raise APIError(404, f"The model '{model}' does not exist (served: {', '.join(engines) or 'none'})",
                           param="model", code="model_not_found")
        return eng

    def admit(model: str, priority: int = 0) -> _Slot:
        """A tier's share of the model's limit: flex leaves the top eighth (at least one slot) to the others,
        and priority may go that far past it, so a flood of flex work never turns priority work away."""
        n, cap = pending.get(model, 0), limit(model)
        headroom = max(1, cap // 8)
        cap = cap - headroom if priority > 0 else cap + headroom if priority < 0 else cap
        if n >= cap:
            raise APIError(429, f"too many pending requests for model '{model}' ({n}, {tier_name(priority)} "
                                f"tier); retry later", code="rate_limit_exceeded")
        pending[model] = n + 1
        return _Slot(pending, model)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = list(e.errors())
        if any(x.get("type") == "json_invalid" for x in errors):
            e2 = APIError(400, "the request body is not valid JSON", code="invalid_json")
            return JSONResponse(e2.body(), status_code=400)
        param, msg = describe_errors(errors)
        if param is None and any(x.get("type") == "missing" for x in errors):
            msg = "a JSON request body is required"
        elif param is None and not any(x.get("type") == "value_error" for x in errors):
            # the body is not an object: a JSON array or string, or not JSON at all (a model's own check
            # of the whole body, as "exactly one of", keeps its words)
            ctype = request.headers.get("content-type", "")
            msg = "the request body must be a JSON object" + (
                "" if "json" in ctype else f" sent as application/json (its Content-Type is {ctype or 'missing'!r})")
        return JSONResponse(APIError(400, f"{param}: {msg}" if param else msg, param=param,
                                     code="invalid_value").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 400 and e.detail == "There was an error parsing the body":  # FastAPI's own words
            try:  # its json.loads failed on other than a syntax error: bytes that are not UTF-8, or depth
                (await request.body()).decode("utf-8")
                why = "is nested too deeply to parse"
            except UnicodeDecodeError as u:
                why = f"is not UTF-8 (byte {u.start})"
            e2 = APIError(400, f"the request body {why}", code="invalid_json")
            return JSONResponse(e2.body(), status_code=400)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)

    # ------------------------------------------------------------ generation
    async def serve(request: Request, model: str, make_handler, prepare=None, detach: bool = False):
        """prepare: an async step before the handler is built (its result is make_handler's argument);
        detach: a background Response, answered once the engine has started it."""
        check_unicode(await request.body())  # the body is read already: this is its cached bytes
        engine = engine_for(model)
        request.state.model = model
        if metrics is not None:
            from observability.tracking import TrackedEngine
            engine = TrackedEngine(engine, metrics, model)
        # Rendering a long prompt is CPU work: keep it off the event loop.
        args = () if prepare is None else (await prepare(),)
        handler = await run_in_threadpool(make_handler, *args)
        tier_cap = getattr(request.state, "tier_cap", None)
        if tier_cap is not None:
            cap_tier(handler.body, handler.requests, tier_cap)
        run = _Run(engine, handler.requests, admit(model, min((r.priority for r in handler.requests), default=0)))

        async def started(h, r: _Run) -> _Run:
            """r (h's requests), started; a prompt over the context length that h can shorten (Responses'
            truncation="auto") starts once more, shortened."""
            try:
                await r.start(h.prompt_param, h.schema_param)
            except APIError as e:
                fit, limit = getattr(h, "fit", None), getattr(e, "limit", None)
                if e.code != "context_length_exceeded" or fit is None or limit is None \
                        or not await run_in_threadpool(fit, limit):
                    raise
                r = _Run(engine, h.requests, r.slot.again())  # the refused run gave its slot back
                await r.start(h.prompt_param, h.schema_param)
            return r

        async def compact(slot: _Slot) -> None:
            """Responses' context_management: the conversation compacted first (in the request's admission
            slot), the answer then written from the compaction."""
            comp = await run_in_threadpool(handler.compactor)
            pre = await started(comp, _Run(engine, comp.requests, slot.shared()))
            try:
                done = await comp.collect(pre)
            finally:
                await pre.close()
            await run_in_threadpool(handler.rebase, done)

        async def start() -> _Run:
            nonlocal run
            wants = getattr(handler, "wants_compaction", None)
            if wants is not None and wants():
                await compact(run.slot)
                run = _Run(engine, handler.requests, run.slot)
            try:
                run = await started(handler, run)
            except APIError as e:
                if e.code != "context_length_exceeded" or wants is None or not wants(refused=True):
                    raise
                run = _Run(engine, handler.requests, run.slot.again())  # the refused run gave its slot back
                await compact(run.slot)
                run = await started(handler, _Run(engine, handler.requests, run.slot))
            return run

        try:
            if detach:
                # The engine call is made outside the request, so it outlives it. Refusals (400, 429) come at
                # once; a request still waiting for the engine after queued_after_s is answered `queued`.
                starting = detached(start())
                try:
                    await _unless_disconnected(request, asyncio.wait({starting}, timeout=background.queued_after_s))
                except _ClientGone:
                    starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
                    raise
                if starting.done():
                    starting.result()  # a refusal: the client's error, as in the foreground
                body = await background.start(handler, starting)
                if handler.stream_requested:  # a client that goes away stops its stream, not the run
                    return SSEResponse(await background.follow(handler.id, handler.owner, None), on_close=nothing)
                return JSONResponse(body)
            if handler.stream_requested:
                await _unless_disconnected(request, start())

                async def events() -> AsyncIterator[str]:
                    try:
                        async for chunk in handler.stream(run):
                            yield chunk
                    except APIError as e:
                        log.warning("stream %s failed: %s", handler.id, e.message)
                        for chunk in handler.error_events(e):
                            yield chunk
                    except Exception:  # noqa: BLE001
                        log.exception("stream %s failed", handler.id)
                        for chunk in handler.error_events(APIError(503, "the engine failed", code="engine_error")):
                            yield chunk

                return SSEResponse(events(), on_close=run.close)

            async def complete():
                await start()
                try:
                    return await handler.collect(run)
                except APIError:
                    raise
                except Exception:
                    log.exception("request %s failed", handler.id)
                    raise APIError(503, "the engine failed", code="engine_error") from None

            body = await _unless_disconnected(request, complete())
            await run.close()
            return JSONResponse(body)
        except _ClientGone:
            log.info("client went away before %s finished", handler.id)
            await run.close()
            return Response(status_code=499)
        except BaseException:
            await run.close()
            raise

    # ------------------------------------------------------------------ routes
    @app.post("/v1/chat/completions", response_model=None, responses={
        200: {"model": ChatCompletionResponse,
              "description": "chat.completion, or with stream=true an SSE stream of chat.completion.chunk"},
        **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        save = chats.saver(body, who(request))
        return await serve(request, body.model, lambda: ChatHandler(body, system_fingerprint, save))

    @app.post("/v1/completions", response_model=None, responses={
        200: {"model": CompletionResponse, "description": "text_completion, or an SSE stream of them"}, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        return await serve(request, body.model, lambda: CompletionHandler(body, system_fingerprint))

    @app.post("/v1/responses", response_model=None, responses={
        200: {"model": ResponseObject, "description": "a Response, or with stream=true its SSE events"},
        **_ERRORS})
    async def responses(body: ResponsesRequest, request: Request):
        body, prompt_messages = templates.apply(body)
        owner = who(request)

        async def before_input() -> list[dict]:  # the stored prompt's messages, then the stored history
            return prompt_messages + await stored.history(body, owner)
        return await serve(request, body.model,
                           lambda history: ResponseBuilder(body, system_fingerprint, history, stored.saver(body),
                                                           stored.appender(body, owner), seal,
                                                           pinned=len(prompt_messages), owner=owner),
                           prepare=before_input, detach=bool(body.background))

    @app.post("/v1/responses/compact", response_model=CompactedResponse, responses=_ERRORS)
    async def compact(body: CompactRequest, request: Request):
        """The conversation's user messages, then a compaction item holding a summary of the rest
        (deployments.compaction); sent back as input, it continues the conversation in fewer tokens."""
        req, owner = compaction_request(body), who(request)

        async def before_input() -> list[dict]:
            return await stored.history(req, owner)
        return await serve(request, req.model, lambda history: Compaction(req, system_fingerprint, history, seal=seal),
                           prepare=before_input)

    app.include_router(responses_router(stored, background, seal, engine_for, templates))
    app.include_router(conversations_router(stored.conversations))
    app.include_router(stored_chats_router(chats))
    if websockets.max_minutes > 0:
        from .responses_ws import router as websocket_router
        app.include_router(websocket_router(app, websockets, sockets))
    app.include_router(tokenize_router(engine_for))
    if batches.max_mb > 0:
        from .batch_routes import router as batch_router
        from .batch_runner import BatchRunner
        from .batch_store import BatchStoreClient, MemoryBatchStore
        bstore = batch_store or BatchStoreClient(MemoryBatchStore(int(batches.max_mb * (1 << 20))))

        def loopback_headers(tier_cap: Optional[str], who: Optional[str]) -> dict:
            if not api_keys:
                return {}
            return {"Authorization": f"Bearer {internal_keys[tier_cap or 'priority']}", PRINCIPAL_HEADER: who or ""}
        from .webhook_routes import router as webhook_router
        from .webhooks import Webhooks
        hooks = Webhooks(lambda *a: bstore.call("webhook", *a), webhooks, metrics)
        background.hooks = hooks
        app.include_router(webhook_router(hooks))
        runner = BatchRunner(bstore, app, loopback_headers, batches.concurrency, batches.max_batches, hooks=hooks)
        app.include_router(batch_router(bstore, runner, lambda: list(engines), int(batches.max_file_mb * (1 << 20)),
                                        batches.max_requests, int(batches.file_expiry_days * 86400) or None))

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return {"object": "list", "data": [ModelCard(id=m, created=created, owned_by=owned_by).model_dump()
                                           for m in engines]}

    @app.get("/v1/models/{model}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model_card(model: str):
        engine_for(model)
        return ModelCard(id=model, created=created, owned_by=owned_by)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def is_ready():
        ok = ready() if ready is not None else bool(engines)
        if inspect.isawaitable(ok):
            ok = await ok
        if not ok:
            return JSONResponse(APIError(503, "the engines are not loaded yet", code="not_ready").body(),
                                status_code=503)
        return {"status": "ready", "models": list(engines)}

    return app
