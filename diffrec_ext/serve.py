"""`diffrec serve`: the HTTP JSON endpoint over the inference engine, on FastAPI and uvicorn (the
optional extra: `pip install 'diffrec-ext[serve]'`).

    POST /recommend  {"history": [item, ...], "k": 10, "exclude_seen": true}
        -> 200 {"items": [...], "scores": [...], "k": 10, "exclude_seen": true, "algorithm": "alg3",
                "num_samples": 10, ...}
    POST /recommend  {"histories": [[item, ...], ...], "k": 10}
        -> 200 {"results": [{"items": [...], "scores": [...]}, ...], "k": 10, ...}
    GET  /health     -> 200 {"status": "ok", "model": {...}, "options": {...}, "limits": {...}}
    GET  /metrics    Prometheus text: requests by route and status, latency histograms, histories and
                     requests per engine batch, engine seconds per batch, queued requests, 408s
    GET  /openapi.json, /docs   the schema and its pages, from FastAPI

Item ids are the dataset's own ids (JSON integers or strings), oldest first; `k` and `exclude_seen`
are optional (defaults from the server's options). Scores are the seed-averaged probabilities of
Alg. 3 (or Alg. 2): random draws, so a repeated request may differ slightly; a request served
alone is reproducible (each engine batch draws from seed 0).

Every error the application answers is JSON {"error": message}:
    400 malformed JSON, wrong types or fields; 404 unknown path; 405 wrong method;
    408 the request not received in full in time; 411 a POST without a body length;
    413 a body over the size limit; 415 not application/json; 422 well-formed but invalid (an
    empty history, a history over the length limit, unknown item ids, k out of range or above
    what is left after exclusion, too many histories); 431 request line and headers too large;
    503 overloaded (the queue limit, or no result within the request timeout); 500 unexpected.
uvicorn itself answers an unparsable request (400) and a connection over the limit (503) in
plain text.

Who enforces what. uvicorn: HTTP parsing, the connection limit (`limit_concurrency`), the idle
time between requests (`timeout_keep_alive`), the listen backlog. FastAPI and pydantic: JSON
decoding, field types, unknown fields, lengths and ranges, the body size (the route's
`max_body_size`), the OpenAPI schema. Written here, for want of a setting: a small ASGI guard that
answers at once a POST without a body length, with a declared body over the limit (Starlette would
answer that in plain text and leave the unread body on the connection) or not in JSON; the
whole-request receive deadline and the header size limit (uvicorn's httptools protocol has
neither: its only timer is the idle one, which every received byte restarts, so a client sending a
byte every few seconds would hold a connection forever); the checks that need the model (unknown
item ids, k against what is left after exclusion); and the micro-batcher: requests wait on
asyncio futures while one engine thread runs every request waiting at that moment as one batch
(the engine is not re-entrant, and one batch of 64 users costs far less than 64 batches of one).

A history longer than the model's window (T - 1 items) is rejected with the limit in the
message, unless the server is started with a larger `max_history`: then the model reads the most
recent T - 1 items, every item is still excluded, and the response says so ("history_used").
"""

import argparse
import asyncio
import gc
import json
import logging
import queue
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Annotated

import torch

from ._version import __version__
from .engine import InferenceEngine
from .errors import CheckpointError, ConfigError, ItemsLeftError, UnknownItemsError
from .inference import check_room

logger = logging.getLogger("diffrec_ext.serve")

ROUTES = ("/recommend", "/health", "/metrics", "/openapi.json", "/docs")
# pydantic error types that mean "well-formed but out of bounds" (422); every other one is a 400
CONSTRAINT_ERRORS = {"too_short", "too_long", "greater_than_equal", "less_than_equal", "greater_than", "less_than"}
SERVE_EXTRA = "pip install 'diffrec-ext[serve]'"


@dataclass
class ServeLimits:
    max_body_bytes: int = 256 * 1024
    max_header_bytes: int = 64 * 1024  # request line and headers
    max_users_per_request: int = 256
    max_history: int | None = None  # None: the model's window, T - 1
    max_k: int = 100
    receive_timeout_s: float = 10.0  # a whole request, from its first byte (a new connection: from its opening)
    keep_alive_s: float = 5.0  # idle time between requests on one connection (uvicorn)
    request_timeout_s: float = 30.0  # queue + compute, per request
    max_connections: int = 64
    max_queued_requests: int = 1024
    batch_users: int = 256  # users per engine batch
    batch_wait_s: float = 0.0  # extra wait for more requests before a batch (0: take what is queued)


@dataclass
class ServeOptions:
    k: int = 10
    exclude_seen: bool = True
    num_samples: int | None = None  # S; None: the checkpoint's
    algorithm: str | None = None  # None: the checkpoint's
    stride: int = 1


class RequestError(Exception):
    """An invalid request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ServerBusy(Exception):
    """The queue is full or the result did not come in time: answered 503 with Retry-After."""


def require_serve_extra() -> None:
    """An ImportError naming the extra to install when FastAPI, uvicorn or prometheus-client is missing."""
    missing = []
    for module in ("fastapi", "uvicorn", "httptools", "prometheus_client", "pydantic"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"diffrec serve needs {', '.join(missing)}: {SERVE_EXTRA}")


def check_port(port) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535] (0: a free one), got {port!r}")
    return port


# ------------------------------------------------------------------------------------- validation
def _short(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _location(loc) -> str:
    """("histories", 1, 3) -> histories[1][3]"""
    return "".join(f"[{part}]" if isinstance(part, int) else (f".{part}" if index else str(part))
                   for index, part in enumerate(loc))


def validation_answer(errors, fields) -> tuple[int, str]:
    """(status, message) for pydantic's errors of a request body: 422 when every error is a
    bound (length or range), else 400; the message names each place and what was sent."""
    status = 422 if errors and all(error["type"] in CONSTRAINT_ERRORS for error in errors) else 400
    parts = []
    for error in errors[:5]:
        kind, where = error["type"], _location(error["loc"])
        if kind == "json_invalid":
            parts.append(f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}; the fields are {fields}")
        else:
            shown = "" if kind in CONSTRAINT_ERRORS or kind == "one_of" else f", got {_short(error.get('input'))}"
            parts.append(f"{where + ': ' if where else ''}{error['msg']}{shown}")
    more = f" (and {len(errors) - 5} more errors)" if len(errors) > 5 else ""
    return status, "; ".join(parts) + more


def request_models(engine, limits: ServeLimits, options: ServeOptions) -> dict:
    """The pydantic models of /recommend for this engine and these limits (the limits appear in
    the OpenAPI schema)."""
    from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictInt, model_validator
    from pydantic_core import PydanticCustomError

    def item_id(value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise PydanticCustomError("item_id_type", "must be an item id (an integer or a string)")
        return value

    ItemId = Annotated[int | str, PlainValidator(item_id, json_schema_input_type=int | str)]
    window = engine.max_history
    max_history = limits.max_history or window
    k_limit = min(limits.max_k, engine.num_items)
    history_help = (f"item ids (the dataset's own, integers or strings), oldest first, 1 to {max_history}; the "
                    f"model reads the most recent {window}")
    History = Annotated[list[ItemId], Field(min_length=1, max_length=max_history, description=history_help)]

    class RecommendRequest(BaseModel):
        """One history ("history") or several ("histories"): exactly one of the two."""

        model_config = ConfigDict(extra="forbid")
        history: History | None = None
        histories: list[History] | None = Field(None, min_length=1, max_length=limits.max_users_per_request,
                                                description="several histories, answered in order")
        k: StrictInt = Field(options.k, ge=1, le=k_limit, description="items per answer")
        exclude_seen: StrictBool = Field(options.exclude_seen, description="never recommend an item of the history")

        @model_validator(mode="after")
        def one_of(self):
            if (self.history is None) == (self.histories is None):
                raise PydanticCustomError(
                    "one_of", 'give exactly one of "history" (a list of item ids) or "histories" (a list of lists)')
            return self

    class Recommendation(BaseModel):
        items: list[int | str] = Field(description="recommended item ids, best first")
        scores: list[float] = Field(description="their seed-averaged probabilities")
        history_used: int | None = Field(None, description="present when the history was longer than the model's "
                                                           "window: the number of most recent items it read")

    class Answer(BaseModel):
        k: int
        exclude_seen: bool
        algorithm: str
        num_samples: int = Field(description="S, the noise draws averaged per history")
        seeds: int = Field(description="deprecated: the old name of num_samples, same value")

    class OneAnswer(Recommendation, Answer):
        pass

    class ManyAnswers(Answer):
        results: list[Recommendation]

    class ErrorBody(BaseModel):
        error: str = Field(description="what is wrong, naming the field")

    return {"request": RecommendRequest, "one": OneAnswer, "many": ManyAnswers, "error": ErrorBody,
            "fields": list(RecommendRequest.model_fields)}


# ------------------------------------------------------------------------------------- metrics
class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may share a
    process, as in the tests)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        seconds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        self.requests = Counter("diffrec_http_requests", "HTTP requests answered by the application, by route and "
                                "status", ["route", "status"], registry=self.registry)
        self.latency = Histogram("diffrec_http_request_seconds", "time from a request's headers to the end of its "
                                 "answer, by route", ["route"], buckets=seconds, registry=self.registry)
        self.batch_users = Histogram("diffrec_engine_batch_histories", "histories per engine batch", buckets=sizes,
                                     registry=self.registry)
        self.batch_requests = Histogram("diffrec_engine_batch_requests", "requests per engine batch", buckets=sizes,
                                        registry=self.registry)
        self.batch_seconds = Histogram("diffrec_engine_batch_seconds", "engine time per batch", buckets=seconds,
                                       registry=self.registry)
        self.queued = Gauge("diffrec_queued_requests", "requests waiting for the engine", registry=self.registry)
        self.receive_timeouts = Counter("diffrec_receive_timeouts", "connections answered 408 and closed: a request "
                                        "not received in full within the receive timeout", registry=self.registry)
        self.header_refusals = Counter("diffrec_header_refusals", "requests answered 431: request line and headers "
                                       "over the limit", registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------------- batching
@dataclass
class _Job:
    histories: list[list[int]]  # dense ids
    k: int
    exclude_seen: bool
    future: asyncio.Future  # of the event loop, resolved there


_STOP = object()


class MicroBatcher:
    """Requests wait on asyncio futures; one engine thread takes them from a thread-safe queue.
    Each time the engine is free it takes every queued request (up to `batch_users` histories,
    after an optional wait for more), runs those that share (k, exclude_seen) as one engine call,
    and hands the answers back to the event loop in one call_soon_threadsafe. The engine thread
    collects the batch itself so that starting the next batch never waits for the event loop
    thread to be scheduled (measured on this 2-core machine with 8 clients: 3.6 requests per batch
    when the event loop collected them and passed each batch to an executor, 4.4 this way)."""

    def __init__(self, engine, options: ServeOptions, limits: ServeLimits, metrics: Metrics):
        self.engine, self.options, self.limits, self.metrics = engine, options, limits, metrics
        self.queue: queue.Queue = queue.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.batches = 0

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._loop, name="diffrec-engine", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(_STOP)
            await self.loop.run_in_executor(None, self.thread.join)

    async def recommend(self, histories: list[list[int]], k: int, exclude_seen: bool):
        """(original ids [B][k], scores [B][k]) for dense histories; ServerBusy when the queue is
        full or the answer does not come within the request timeout."""
        if self.queue.qsize() >= self.limits.max_queued_requests:
            raise ServerBusy(f"{self.limits.max_queued_requests} requests already queued")
        future = self.loop.create_future()
        self.queue.put_nowait(_Job(histories, k, exclude_seen, future))
        self.metrics.queued.set(self.queue.qsize())
        # a timer on the future itself (asyncio.wait_for wraps it in another future and task)
        timer = self.loop.call_later(self.limits.request_timeout_s, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future) -> None:
        if not future.done():  # the engine thread skips a job whose future is done
            future.set_exception(ServerBusy(f"no result within {self.limits.request_timeout_s} s"))

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, users, stop = [first], len(first.histories), False
        deadline = time.monotonic() + self.limits.batch_wait_s
        while users < self.limits.batch_users:
            wait = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                stop = True
                break
            jobs.append(job)
            users += len(job.histories)
        self.metrics.queued.set(self.queue.qsize())
        return [job for job in jobs if not job.future.done()], stop  # drop those that timed out while queued

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is _STOP:
                return
            jobs, stop = self._collect(first)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.k, job.exclude_seen), []).append(job)
            for (k, exclude_seen), group in groups.items():
                self._run(group, k, exclude_seen)
            if stop:
                return

    def _run(self, group: list[_Job], k: int, exclude_seen: bool) -> None:
        histories = [history for job in group for history in job.histories]
        started = time.perf_counter()
        try:
            ids, scores = self.engine.recommend_dense(
                histories, k=k, exclude_seen=exclude_seen, num_samples=self.options.num_samples,
                algorithm=self.options.algorithm, stride=self.options.stride, seed=0)
            answers = (self.engine.original_ids(ids), scores.tolist())
        except Exception as error:  # reported to every waiting request as a 500
            logger.exception("engine batch of %d histories failed", len(histories))
            answers = error
        else:
            self.batches += 1
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_users.observe(len(histories))
            self.metrics.batch_requests.observe(len(group))
        self.loop.call_soon_threadsafe(self._deliver, group, answers)

    @staticmethod
    def _deliver(group: list[_Job], answers) -> None:
        """In the event loop: each request's rows of the batch (or the batch's error)."""
        start = 0
        for job in group:
            stop = start + len(job.histories)
            if not job.future.done():
                if isinstance(answers, Exception):
                    job.future.set_exception(answers)
                else:
                    job.future.set_result((answers[0][start:stop], answers[1][start:stop]))
            start = stop


# ------------------------------------------------------------------------------------- the application
async def _send_json(send, status: int, payload: dict, headers=()) -> None:
    body = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """ASGI middleware: counts every answer in the metrics, and answers a POST /recommend at once,
    without reading its body, when it gives no body length (411), declares a body over the limit
    (413 and the connection closed; Starlette's own limit would answer in plain text and leave the
    unread body on the connection) or is not JSON (415; a missing type too, which FastAPI would
    not decode). The route's `max_body_size` (FastAPI) counts the bytes of a chunked body."""

    def __init__(self, app, limits: ServeLimits, metrics: Metrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope) if scope["method"] == "POST" and scope["path"] == "/recommend" else None
            if refusal is not None:
                await _send_json(counted_send, refusal[0], {"error": refusal[1]}, [(b"connection", b"close")])
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _refusal(self, scope) -> tuple[int, str] | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            return 411, "Content-Length is required (or a chunked body)"
        if length is not None and int(length) > self.limits.max_body_bytes:  # the parser has checked the number
            return 413, f"body of {int(length)} bytes exceeds the limit of {self.limits.max_body_bytes} bytes"
        content_type = headers.get(b"content-type", b"")
        if content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            shown = repr(content_type[:60].decode("latin-1")) if content_type else "none"
            return 415, f"Content-Type must be application/json, got {shown}"
        return None


def _request_route_class():
    """A FastAPI route whose endpoint takes the Request and returns a Response itself: FastAPI
    still documents it (OpenAPI), applies its body limit and the exception handlers, but skips the
    dependency solving, which has nothing to solve here (measured: 13% of the event loop's CPU per
    request)."""
    from fastapi.routing import APIRoute

    class RequestRoute(APIRoute):
        def get_route_handler(self):
            return self.endpoint

    return RequestRoute


def create_app(engine, limits: ServeLimits | None = None, options: ServeOptions | None = None):
    """The FastAPI application over `engine`; `app.state` holds the batcher and the metrics. Run
    it with RecommendServer, which adds the receive deadline and the header limit (under another
    ASGI server, configure those there)."""
    require_serve_extra()
    from fastapi import APIRouter, FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    limits, options = limits or ServeLimits(), options or ServeOptions()
    check_settings(engine, limits, options)
    num_samples, algorithm = engine.check_options(options.num_samples, options.algorithm, options.stride)
    models = request_models(engine, limits, options)
    RecommendRequest, OneAnswer, ManyAnswers = models["request"], models["one"], models["many"]
    metrics = Metrics()
    batcher = MicroBatcher(engine, options, limits, metrics)
    window = engine.max_history
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="diffrec-ext recommendations", version=__version__, lifespan=lifespan,
                  description="Top-k next items from a DiffRec (or SASRec) checkpoint. Errors are JSON "
                              "{\"error\": message}.")
    app.state.batcher, app.state.metrics, app.state.engine = batcher, metrics, engine
    errors = {status: {"model": models["error"], "description": text} for status, text in ERROR_ANSWERS}
    _add_error_handlers(app)

    # The body is read and validated here, with pydantic's JSON parser (`model_validate_json`), rather
    # than declared as a parameter: FastAPI's path (json.loads, then validation of the Python
    # objects, then its dependency machinery) measured 25% more CPU per request through the app.
    # The schema is declared for OpenAPI; the answer models document the answers. The route class
    # hands the endpoint the Request directly (see _request_route_class).
    request_body = {"required": True, "content": {"application/json": {"schema": RecommendRequest.model_json_schema()}}}
    router = APIRouter(route_class=_request_route_class())
    read_request = _request_reader(RecommendRequest, models["fields"], limits)

    # the route's body limit sits inside _Guard, which answers a declared oversize body first
    @router.post("/recommend", response_model=OneAnswer | ManyAnswers, responses=errors,
                 summary="top-k items for one history or several", max_body_size=limits.max_body_bytes,
                 openapi_extra={"requestBody": request_body})
    async def recommend(request: Request):
        body = await read_request(request)
        if isinstance(body, JSONResponse):
            return body
        single = body.history is not None
        histories = [body.history] if single else body.histories
        dense = _dense_histories(engine, histories, single, body.k, body.exclude_seen)
        items, scores = await batcher.recommend(dense, body.k, body.exclude_seen)
        results = [{"items": row_items, "scores": row_scores} for row_items, row_scores in zip(items, scores)]
        for result, history in zip(results, histories):
            if len(history) > window:
                result["history_used"] = window
        meta = {"k": body.k, "exclude_seen": body.exclude_seen, "algorithm": algorithm, "num_samples": num_samples,
                "seeds": num_samples}
        return JSONResponse({**results[0], **meta} if single else {"results": results, **meta})

    app.include_router(router)

    @app.get("/health", summary="liveness, the model and the settings")
    async def health():
        return {"status": "ok", "uptime_s": round(time.time() - started, 3), "model": engine.describe(),
                "options": asdict(options), "limits": {**asdict(limits), "max_history": limits.max_history or window}}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    app.add_middleware(_Guard, limits=limits, metrics=metrics)
    return app


ERROR_ANSWERS = (  # (status, when), for the OpenAPI schema
    (400, "malformed JSON, wrong types or fields"), (408, "the request did not arrive in full in time"),
    (411, "no body length"), (413, "body over the size limit"), (415, "not application/json"),
    (422, "well-formed but invalid: empty or too long histories, unknown item ids, k out of range"),
    (503, "overloaded: retry after the Retry-After seconds"))


def _add_error_handlers(app) -> None:
    """Every error answer as JSON {"error": message}: the framework's (404 and 405 naming the
    routes), the request's, the batcher's 503 and, for anything else, a 500 that is logged."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        if error.status_code == 404:
            message = f"no route {request.url.path}; routes: POST /recommend, GET /health, GET /metrics, GET /docs"
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}; use {allowed}"
        else:
            message = str(error.detail)
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestError)
    async def request_error(request, error):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(ServerBusy)
    async def busy(request, error):
        return JSONResponse({"error": f"server busy: {error}; retry later"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def failure(request, error):
        logger.error("request failed", exc_info=error)
        return JSONResponse({"error": "internal error while ranking; see the server log"}, status_code=500)


def _request_reader(request_model, fields, limits: ServeLimits):
    """`read(request)`: the validated request body, or the JSONResponse that refuses it (413, 400
    or 422). Made once per app, so that a request does not repeat the imports."""
    from fastapi.responses import JSONResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    async def read(request):
        try:
            raw = await request.body()
        except HTTPException as error:  # the route's count of a chunked body over the limit
            if error.status_code != 413:
                raise
            return JSONResponse({"error": f"body exceeds the limit of {limits.max_body_bytes} bytes"},
                                status_code=413, headers={"Connection": "close"})
        if not raw:
            return JSONResponse({"error": f"the body is empty: send a JSON object with the fields {fields}"},
                                status_code=400)
        try:
            return request_model.model_validate_json(raw)
        except ValidationError as error:
            status, message = validation_answer(error.errors(include_url=False), fields)
            return JSONResponse({"error": message}, status_code=status)

    return read


def _dense_histories(engine, histories, single: bool, k: int, exclude_seen: bool) -> list[list[int]]:
    """The request's histories in dense ids; a 422 RequestError for unknown ids, or for too few
    items left to rank when the history is excluded."""
    try:
        dense = engine.to_dense(histories)
    except UnknownItemsError as error:
        name = "history" if single else f"histories[{error.row}]"
        shown = ", ".join(_short(item) for item in error.unknown[:10]) + (", ..." if len(error.unknown) > 10 else "")
        raise RequestError(422, f"{name} has {len(error.unknown)} item id(s) the model does not know: {shown}")
    if exclude_seen:
        try:
            names = ["history"] if single else [f"histories[{row}]" for row in range(len(dense))]
            check_room(k, engine.num_items, dense, names)
        except ItemsLeftError as error:
            raise RequestError(422, str(error)) from None
    return dense


def check_settings(engine, limits: ServeLimits, options: ServeOptions) -> None:
    positive = {"max_body_bytes": limits.max_body_bytes, "max_header_bytes": limits.max_header_bytes,
                "max_users_per_request": limits.max_users_per_request, "max_k": limits.max_k,
                "max_connections": limits.max_connections, "max_queued_requests": limits.max_queued_requests,
                "batch_users": limits.batch_users}
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("receive_timeout_s", "keep_alive_s", "request_timeout_s"):
        if not getattr(limits, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(limits, name)!r}")
    if not limits.batch_wait_s >= 0:
        raise ValueError(f"batch_wait_s must be >= 0, got {limits.batch_wait_s!r}")
    if limits.max_history is not None and limits.max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {limits.max_history!r}")
    if not 1 <= options.k <= min(limits.max_k, engine.num_items):
        raise ValueError(f"default k = {options.k} must be in [1, {min(limits.max_k, engine.num_items)}]")
    # the engine validates num_samples, algorithm and stride the same way for every batch: check them once now
    engine.check_options(options.num_samples, options.algorithm, options.stride)


# ------------------------------------------------------------------------------------- the HTTP protocol
def _raw_json_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode("utf-8")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode("ascii") + body


class _HeadersTooLarge(Exception):
    pass


def protocol_class(limits: ServeLimits, metrics: Metrics):
    """uvicorn's httptools protocol plus the two limits it lacks (see the module docstring):

    - receive deadline: a request (request line, headers and body) must arrive in full within
      `receive_timeout_s` of its first byte, and a new connection must deliver its first request
      within that time of opening. Else: 408 and the connection closed (closed without an answer
      when an earlier request on it is still being answered).
    - header limit: request line and headers over `max_header_bytes`: 431, connection closed."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._deadline = None
            self._header_bytes = 0
            self._refusal: bytes | None = None
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self):
            super().on_message_begin()
            self._header_bytes = 0
            if self._deadline is None:
                self._arm()

        def on_url(self, url):
            self._count(url)
            super().on_url(url)

        def on_header(self, name, value):
            self._count(name, value)
            super().on_header(name, value)

        def on_message_complete(self):
            self._disarm()
            super().on_message_complete()

        def send_400_response(self, msg):
            # a callback that raised (_count) stops the parser, which uvicorn answers with this
            if self._refusal is not None:
                self.transport.write(self._refusal)
                self.transport.close()
            else:
                super().send_400_response(msg)

        def _count(self, *parts):
            self._header_bytes += sum(len(part) for part in parts)
            if self._header_bytes > limits.max_header_bytes:
                metrics.header_refusals.inc()
                self._refusal = _raw_json_response(431, "Request Header Fields Too Large",
                                                   f"request line and headers exceed {limits.max_header_bytes} bytes")
                raise _HeadersTooLarge

        def _arm(self):
            self._deadline = self.loop.call_later(limits.receive_timeout_s, self._expired)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self):
            self._deadline = None
            if self.transport.is_closing():
                return
            metrics.receive_timeouts.inc()
            cycle = self.cycle
            answering = bool(self.pipeline) or (cycle is not None and not cycle.response_complete
                                                and (cycle.response_started or not cycle.more_body))
            if not answering:  # nothing else is being written on this connection
                self.transport.write(_raw_json_response(
                    408, "Request Timeout", f"request not received in full within {limits.receive_timeout_s} s"))
            self.transport.close()

    return LimitedHttpToolsProtocol


# ------------------------------------------------------------------------------------- the server
def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio's loop sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it each answer (headers and body, two writes) waited for the client's delayed ACK:
    # measured 49 ms per request on loopback instead of 7 (uvloop sets it either way)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)  # connections wait in the backlog until the event loop accepts them
    except OSError:
        sock.close()
        raise
    return sock


class RecommendServer:
    """The endpoint on uvicorn: one process, one event loop, one engine thread.
    `RecommendServer((host, port), engine)` binds at once (port 0 picks a free port: see `url`);
    `serve_forever()` serves in this thread (SIGINT/SIGTERM stop it gracefully), `start()` in a
    background thread; `shutdown()` stops."""

    def __init__(self, address, engine, limits: ServeLimits | None = None, options: ServeOptions | None = None,
                 *, access_log: bool = False, log_level: str = "warning", backlog: int = 2048):
        require_serve_extra()
        import uvicorn

        host, port = address
        check_port(port)
        self.limits = limits or ServeLimits()
        self.app = create_app(engine, self.limits, options)
        metrics = self.app.state.metrics
        self.batcher = self.app.state.batcher
        config = uvicorn.Config(
            self.app, http=protocol_class(self.limits, metrics), lifespan="on", log_config=None, log_level=log_level,
            access_log=access_log, backlog=backlog, timeout_keep_alive=self.limits.keep_alive_s,
            # uvicorn answers 503 once the open connections (this one included) reach the limit
            limit_concurrency=self.limits.max_connections + 1)
        self.server = uvicorn.Server(config)
        self.socket = _bind(host, port, backlog)
        self.thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        # Everything loaded so far (torch, the model, FastAPI: ~250,000 objects) lives as long as
        # the server: out of the collector's way, a full collection no longer walks it (measured
        # here: 355 ms per full collection before, the latency spikes of a busy server).
        gc.freeze()
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 60.0) -> "RecommendServer":
        self.thread = threading.Thread(target=self.serve_forever, name="diffrec-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log)")
            time.sleep(0.01)
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.socket.close()


# ------------------------------------------------------------------------------------- command line
def _port(text: str) -> int:
    """argparse type of --port (argparse names the flag in the error)."""
    try:
        return check_port(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535] (0: a free one), got {text!r}") from None


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on a `diffrec` subparsers object."""
    parser = subparsers.add_parser(
        "serve", help="serve top-k recommendations over HTTP (JSON; FastAPI + uvicorn)",
        description="Serve a checkpoint over HTTP on FastAPI + uvicorn (pip install 'diffrec-ext[serve]'): "
                    "POST /recommend {\"history\": [item ids, oldest first], \"k\": 10, \"exclude_seen\": true} "
                    "-> {\"items\": [...], \"scores\": [...]}; GET /health, GET /metrics (Prometheus), "
                    "GET /docs and /openapi.json. Bad requests get a 4xx and {\"error\": message}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = ServeLimits()
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=_port, default=8080, help="port (0: a free one, printed at start)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    parser.add_argument("-k", "--k", type=int, default=10, help="default number of items per answer")
    parser.add_argument("--include-seen", action="store_true",
                        help="allow items of the history unless a request says \"exclude_seen\": true")
    parser.add_argument("--num-samples", "--seeds", dest="num_samples", type=int, default=None,
                        help="S, the noise draws averaged per history (default: the checkpoint's; --seeds: the "
                             "old name)")
    parser.add_argument("--algorithm", "--method", dest="algorithm", choices=["alg3", "alg2"], default=None,
                        help="alg3: one pass per draw; alg2: the reverse process (default: the checkpoint's; "
                             "--method: the old name)")
    parser.add_argument("--stride", type=int, default=1, help="alg2: visit every stride-th step")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_users, help="users per engine batch")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="wait this long for more requests before a batch (0: batch what is queued)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="413 above")
    parser.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes,
                        help="request line and headers; 431 above")
    parser.add_argument("--max-users", type=int, default=defaults.max_users_per_request, help="histories per request")
    parser.add_argument("--max-history", type=int, default=None,
                        help="items per history (default: the model's window T - 1; larger: the model reads the "
                             "most recent T - 1 and the answer says so)")
    parser.add_argument("--max-k", type=int, default=defaults.max_k, help="largest k a request may ask")
    parser.add_argument("--receive-timeout", type=float, default=defaults.receive_timeout_s,
                        help="seconds to receive a whole request, from its first byte (408 after)")
    parser.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_s,
                        help="seconds an idle connection stays open between requests")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help="seconds a request may wait for its result (503 after)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="connections served at once (503 beyond)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    parser.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        require_serve_extra()
    except ImportError as error:
        print(f"diffrec serve: error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
                         max_users_per_request=args.max_users, max_history=args.max_history, max_k=args.max_k,
                         receive_timeout_s=args.receive_timeout, keep_alive_s=args.keep_alive_timeout,
                         request_timeout_s=args.request_timeout, max_connections=args.max_connections,
                         batch_users=args.batch_size, batch_wait_s=args.batch_wait_ms / 1000.0)
    options = ServeOptions(k=args.k, exclude_seen=not args.include_seen, num_samples=args.num_samples,
                           algorithm=args.algorithm, stride=args.stride)
    try:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size)
        server = RecommendServer((args.host, args.port), engine, limits, options, access_log=not args.quiet,
                                 log_level="warning" if args.quiet else "info")
    except (CheckpointError, ConfigError, ValueError, OSError) as error:
        print(f"diffrec serve: error: {error}", file=sys.stderr)
        return 2
    print(f"serving {args.checkpoint} ({engine.num_items} items, {engine.device}) on {server.url} "
          f"(POST /recommend, GET /health, GET /metrics, GET /docs)", flush=True)
    try:
        server.serve_forever()  # returns after SIGINT or SIGTERM, once the open requests are answered
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it handled again once it has stopped
        pass
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrec_ext.serve")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
