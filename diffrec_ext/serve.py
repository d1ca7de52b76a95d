"""`diffrec serve`: a small HTTP JSON endpoint over the inference engine, on the standard library's
`http.server.ThreadingHTTPServer` (no extra dependency).

    POST /recommend  {"history": [item, ...], "k": 10, "exclude_seen": true}
        -> 200 {"items": [...], "scores": [...], "k": 10, "algorithm": "alg3", "seeds": 10}
    POST /recommend  {"histories": [[item, ...], ...], "k": 10}
        -> 200 {"results": [{"items": [...], "scores": [...]}, ...], "k": 10, ...}
    GET  /health     -> 200 {"status": "ok", "model": {...}, "limits": {...}}

Item ids are the dataset's own ids (JSON integers or strings, as in the training data), oldest
first; `k` and `exclude_seen` are optional (defaults from the server's options). Scores are the
seed-averaged probabilities of Alg. 3 (or Alg. 2): random draws, so a repeated request may differ
slightly; a request served alone is reproducible (each engine batch draws from seed 0).

Every error is JSON {"error": message}:
    400 malformed JSON, wrong types or fields; 404 unknown path; 405 wrong method;
    408 body not received in time; 411 no Content-Length; 413 body over the size limit;
    415 not application/json; 422 well-formed but invalid (empty history, a history over the
    length limit, unknown item ids, k out of range, too many histories);
    503 overloaded (connection or queue limit, request timeout); 500 unexpected failure.

Reliability: bodies over `max_body_bytes` are refused before they are read; every connection has
a socket timeout, so slow or idle clients cannot hold a thread; at most `max_connections`
connections are served at once (the next get an immediate 503); requests are queued (bounded) for
one engine thread, which runs every request waiting at that moment as one batch (the engine is
not re-entrant, and one batch of 64 users costs far less than 64 batches of one).

A history longer than the model's window (T - 1 items) is rejected with the limit in the
message, unless the server is started with a larger `max_history`: then the model reads the most
recent T - 1 items, every item is still excluded, and the response says so ("history_used").
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import UnknownItemsError

logger = logging.getLogger("diffrec_ext.serve")

REQUEST_FIELDS = ("history", "histories", "k", "exclude_seen")


@dataclass
class ServeLimits:
    max_body_bytes: int = 256 * 1024
    max_users_per_request: int = 256
    max_history: int | None = None  # None: the model's window, T - 1
    max_k: int = 100
    socket_timeout_s: float = 10.0  # per blocking read or write on a connection
    request_timeout_s: float = 30.0  # queue + compute, per request
    max_connections: int = 64
    max_queued_requests: int = 1024
    batch_users: int = 256  # users per engine batch
    batch_wait_s: float = 0.0  # extra wait for more requests before a batch (0: take what is queued)


@dataclass
class ServeOptions:
    k: int = 10
    exclude_seen: bool = True
    seeds: int | None = None  # None: the checkpoint's
    algorithm: str | None = None  # None: the checkpoint's
    stride: int = 1


class RequestError(Exception):
    """An invalid request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ParsedRequest:
    histories: list[list[int]]  # dense ids
    lengths: list[int]  # items sent per history
    k: int
    exclude_seen: bool
    single: bool  # "history" (one object back) rather than "histories"


# ------------------------------------------------------------------------------------- validation
def _is_item_id(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def parse_request(body: bytes, engine, limits: ServeLimits, options: ServeOptions) -> ParsedRequest:
    """Validate a /recommend body; RequestError (400 or 422) says what is wrong."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RequestError(400, f"the body is not UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"malformed JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; the fields are {list(REQUEST_FIELDS)}")
    if ("history" in payload) == ("histories" in payload):
        raise RequestError(400, 'give exactly one of "history" (a list of item ids) or "histories" (a list of lists)')
    single = "history" in payload
    histories = [payload["history"]] if single else payload["histories"]
    if not single:
        if not isinstance(histories, list):
            raise RequestError(400, f'"histories" must be a list of lists of item ids, got {type(histories).__name__}')
        if not histories:
            raise RequestError(422, '"histories" is empty: send at least one history')
        if len(histories) > limits.max_users_per_request:
            raise RequestError(422, f'{len(histories)} histories in one request; the limit is '
                                    f'{limits.max_users_per_request}')
    max_history = limits.max_history or engine.max_history
    for row, history in enumerate(histories):
        name = "history" if single else f"histories[{row}]"
        if not isinstance(history, list):
            raise RequestError(400, f'"{name}" must be a list of item ids, got {type(history).__name__}')
        for position, item in enumerate(history):
            if not _is_item_id(item):
                raise RequestError(400, f'{name}[{position}] must be an item id (integer or string), '
                                        f'got {json.dumps(item)[:40]}')
        if not history:
            raise RequestError(422, f'"{name}" is empty: send at least one item id (oldest first)')
        if len(history) > max_history:
            raise RequestError(422, f'"{name}" has {len(history)} items; the limit is {max_history} (the model reads '
                                    f'the most recent {engine.max_history}): send the most recent {max_history}')
    k = payload.get("k", options.k)
    if not isinstance(k, int) or isinstance(k, bool):
        raise RequestError(400, f'"k" must be an integer, got {json.dumps(k)[:40]}')
    k_limit = min(limits.max_k, engine.num_items)
    if not 1 <= k <= k_limit:
        raise RequestError(422, f'"k" must be in [1, {k_limit}], got {k}')
    exclude_seen = payload.get("exclude_seen", options.exclude_seen)
    if not isinstance(exclude_seen, bool):
        raise RequestError(400, f'"exclude_seen" must be true or false, got {json.dumps(exclude_seen)[:40]}')
    try:
        dense = engine.to_dense(histories)
    except UnknownItemsError as error:
        name = "history" if single else f"histories[{error.row}]"
        shown = ", ".join(json.dumps(item) for item in error.unknown[:10]) + (", ..." if len(error.unknown) > 10 else "")
        raise RequestError(422, f'"{name}" has {len(error.unknown)} item id(s) the model does not know: {shown}') from None
    if exclude_seen:
        for row, items in enumerate(dense):
            left = engine.num_items - len(set(items))
            if left < k:
                raise RequestError(422, f'"k" = {k} exceeds the {left} items left after excluding history {row}')
    return ParsedRequest(dense, [len(h) for h in histories], k, exclude_seen, single)


# ------------------------------------------------------------------------------------- batching
class ServerBusy(Exception):
    pass


@dataclass
class _Job:
    request: ParsedRequest
    future: Future


_STOP = object()


class MicroBatcher:
    """One engine thread. Each round takes every queued request (up to `batch_users` users, after
    an optional wait for more) and runs the requests that share (k, exclude_seen) as one engine
    call."""

    def __init__(self, engine, options: ServeOptions, limits: ServeLimits):
        self.engine, self.options, self.limits = engine, options, limits
        self.queue: queue.Queue = queue.Queue(maxsize=limits.max_queued_requests)
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name="diffrec-engine", daemon=True)
        self.thread.start()

    def submit(self, request: ParsedRequest) -> Future:
        future: Future = Future()
        try:
            self.queue.put_nowait(_Job(request, future))
        except queue.Full:
            raise ServerBusy(f"{self.limits.max_queued_requests} requests already queued") from None
        return future

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, users, stop = [first], len(first.request.histories), False
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
            users += len(job.request.histories)
        return jobs, stop

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is _STOP:
                return
            jobs, stop = self._collect(first)
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # drop timed-out ones
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.request.k, job.request.exclude_seen), []).append(job)
            for (k, exclude_seen), group in groups.items():
                self._run(group, k, exclude_seen)
            if stop:
                return

    def _run(self, group: list[_Job], k: int, exclude_seen: bool) -> None:
        histories = [history for job in group for history in job.request.histories]
        try:
            ids, scores = self.engine.recommend_dense(
                histories, k=k, exclude_seen=exclude_seen, seeds=self.options.seeds,
                algorithm=self.options.algorithm, stride=self.options.stride, seed=0)
            items = self.engine.original_ids(ids)
            scores = scores.tolist()
        except Exception as error:  # reported to every waiting request as a 500
            logger.exception("engine batch of %d histories failed", len(histories))
            for job in group:
                job.future.set_exception(error)
            return
        self.batches += 1
        start = 0
        for job in group:
            stop = start + len(job.request.histories)
            job.future.set_result((items[start:stop], scores[start:stop]))
            start = stop


# ------------------------------------------------------------------------------------- HTTP
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client may send many requests on one connection
    # Headers and body leave in two writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK (measured: ~40 ms per request on loopback, 86 requests/s from 4 clients).
    disable_nagle_algorithm = True
    server_version = "diffrec-serve"
    sys_version = ""
    server: RecommendServer

    # --- responses
    def _send_json(self, status: int, payload: dict, close: bool = False, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (bad request line, headers too long, unknown method) as JSON."""
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.1"
        self._send_json(code, {"error": message or HTTPStatus(code).phrase}, close=True)

    def log_message(self, format, *args):  # the base class's signature
        logger.info("%s %s", self.address_string(), format % args)

    # --- routes
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, self.server.health())
        elif path == "/recommend":
            self._send_json(405, {"error": "use POST /recommend with a JSON body"}, headers={"Allow": "POST"})
        else:
            self._send_json(404, {"error": f"no route {path}; routes: POST /recommend, GET /health"})

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path != "/recommend":
            if path == "/health":
                self._send_json(405, {"error": "use GET /health"}, headers={"Allow": "GET"}, close=True)
            else:
                self._send_json(404, {"error": f"no route {path}; routes: POST /recommend, GET /health"}, close=True)
            return
        body = self._read_body()
        if body is None:
            return
        try:
            request = parse_request(body, self.server.engine, self.server.limits, self.server.options)
            items, scores = self.server.recommend(request)
        except RequestError as error:
            self._send_json(error.status, {"error": error.message})
            return
        except ServerBusy as error:
            self._send_json(503, {"error": f"server busy: {error}; retry later"}, headers={"Retry-After": "1"})
            return
        except FutureTimeout:
            self._send_json(503, {"error": f"no result within {self.server.limits.request_timeout_s} s; retry later"},
                            headers={"Retry-After": "1"})
            return
        except Exception:
            logger.exception("request failed")
            self._send_json(500, {"error": "internal error while ranking; see the server log"})
            return
        self._send_json(200, self.server.response(request, items, scores))

    def _method_not_allowed(self):
        allowed = "GET" if self.path.split("?", 1)[0] == "/health" else "POST"
        self._send_json(405, {"error": f"method {self.command} not allowed here"}, headers={"Allow": allowed},
                        close=True)

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _read_body(self) -> bytes | None:
        """The request body, or None after an error response."""
        limits = self.server.limits
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._send_json(411, {"error": "send a Content-Length (chunked bodies are not accepted)"}, close=True)
            return None
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self._send_json(411, {"error": "Content-Length is required"}, close=True)
            return None
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self._send_json(400, {"error": f"invalid Content-Length {length_header[:40]!r}"}, close=True)
            return None
        if length > limits.max_body_bytes:  # refused unread: the connection is closed after the answer
            self._send_json(413, {"error": f"body of {length} bytes exceeds the limit of {limits.max_body_bytes} bytes"},
                            close=True)
            return None
        content_type = self.headers.get("Content-Type")
        if content_type is not None and content_type.split(";", 1)[0].strip().lower() != "application/json":
            self._send_json(415, {"error": f"Content-Type must be application/json, got {content_type[:60]!r}"},
                            close=True)
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self._send_json(408, {"error": f"body not received within {limits.socket_timeout_s} s"}, close=True)
            return None
        if len(body) < length:
            self.close_connection = True  # the client closed its side early: nobody to answer
            return None
        return body


class RecommendServer(ThreadingHTTPServer):
    """The endpoint: `RecommendServer((host, port), engine)`, then `serve_forever()` (port 0 picks
    a free port: see `url`). `close()` stops serving and the engine thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, engine, limits: ServeLimits | None = None, options: ServeOptions | None = None):
        self.engine = engine
        self.limits = limits or ServeLimits()
        self.options = options or ServeOptions()
        _check_settings(engine, self.limits, self.options)
        self.seeds, self.algorithm = engine.check_options(self.options.seeds, self.options.algorithm,
                                                          self.options.stride)
        handler = type("RecommendHandler", (_Handler,), {"timeout": self.limits.socket_timeout_s})
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        super().__init__(address, handler)
        self.batcher = MicroBatcher(engine, self.options, self.limits)
        self.started = time.time()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # --- connection limit
    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            data = json.dumps({"error": f"server busy: {self.limits.max_connections} connections open; retry later"})
            try:
                request.sendall((f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{data}")
                                .encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    # --- work
    def recommend(self, request: ParsedRequest):
        future = self.batcher.submit(request)
        try:
            return future.result(timeout=self.limits.request_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise

    def response(self, request: ParsedRequest, items, scores) -> dict:
        window = self.engine.max_history
        results = []
        for row_items, row_scores, length in zip(items, scores, request.lengths):
            result = {"items": row_items, "scores": row_scores}
            if length > window:
                result["history_used"] = window  # the model read the most recent `window` items
            results.append(result)
        meta = {"k": request.k, "exclude_seen": request.exclude_seen,
                "algorithm": self.algorithm, "seeds": self.seeds}
        if request.single:
            return {**results[0], **meta}
        return {"results": results, **meta}

    def health(self) -> dict:
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 3), "model": self.engine.describe(),
                "options": asdict(self.options),
                "limits": {**asdict(self.limits), "max_history": self.limits.max_history or self.engine.max_history}}

    def close(self) -> None:
        self.server_close()
        self.batcher.close()


def _check_settings(engine, limits: ServeLimits, options: ServeOptions) -> None:
    positive = {"max_body_bytes": limits.max_body_bytes, "max_users_per_request": limits.max_users_per_request,
                "max_k": limits.max_k, "max_connections": limits.max_connections,
                "max_queued_requests": limits.max_queued_requests, "batch_users": limits.batch_users}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("socket_timeout_s", "request_timeout_s"):
        if not getattr(limits, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(limits, name)!r}")
    if limits.batch_wait_s < 0:
        raise ValueError(f"batch_wait_s must be >= 0, got {limits.batch_wait_s!r}")
    if limits.max_history is not None and limits.max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {limits.max_history!r}")
    if not 1 <= options.k <= min(limits.max_k, engine.num_items):
        raise ValueError(f"default k = {options.k} must be in [1, {min(limits.max_k, engine.num_items)}]")
    # the engine validates seeds, algorithm and stride the same way for every batch: check them once now
    engine.check_options(options.seeds, options.algorithm, options.stride)


# ------------------------------------------------------------------------------------- command line
def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on a `diffrec` subparsers object."""
    parser = subparsers.add_parser(
        "serve", help="serve top-k recommendations over HTTP (JSON)",
        description="Serve a checkpoint over HTTP: POST /recommend {\"history\": [item ids, oldest first], "
                    "\"k\": 10, \"exclude_seen\": true} -> {\"items\": [...], \"scores\": [...]}; "
                    "GET /health. Bad requests get a 4xx and {\"error\": message}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: a free one, printed at start)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    parser.add_argument("-k", "--k", type=int, default=10, help="default number of items per answer")
    parser.add_argument("--include-seen", action="store_true", help="allow items of the history unless a request says \"exclude_seen\": true")
    parser.add_argument("--seeds", type=int, default=None, help="seeds S (default: the checkpoint's)")
    parser.add_argument("--method", choices=["alg3", "alg2"], default=None,
                        help="alg3: one pass per seed; alg2: the reverse process (default: the checkpoint's)")
    parser.add_argument("--stride", type=int, default=1, help="alg2: visit every stride-th step")
    parser.add_argument("--batch-size", type=int, default=256, help="users per engine batch")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="wait this long for more requests before a batch (0: batch what is queued)")
    parser.add_argument("--max-body-bytes", type=int, default=ServeLimits.max_body_bytes, help="413 above")
    parser.add_argument("--max-users", type=int, default=ServeLimits.max_users_per_request,
                        help="histories per request")
    parser.add_argument("--max-history", type=int, default=None,
                        help="items per history (default: the model's window T - 1; larger: the model reads the "
                             "most recent T - 1 and the answer says so)")
    parser.add_argument("--max-k", type=int, default=ServeLimits.max_k, help="largest k a request may ask")
    parser.add_argument("--socket-timeout", type=float, default=ServeLimits.socket_timeout_s,
                        help="seconds a connection may stay silent")
    parser.add_argument("--request-timeout", type=float, default=ServeLimits.request_timeout_s,
                        help="seconds a request may wait for its result (503 after)")
    parser.add_argument("--max-connections", type=int, default=ServeLimits.max_connections,
                        help="connections served at once (503 beyond)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    parser.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args) -> int:
    import torch

    from .checkpoint import CheckpointError
    from .engine import InferenceEngine
    from .train import ConfigError

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_users_per_request=args.max_users,
                         max_history=args.max_history, max_k=args.max_k, socket_timeout_s=args.socket_timeout,
                         request_timeout_s=args.request_timeout, max_connections=args.max_connections,
                         batch_users=args.batch_size, batch_wait_s=args.batch_wait_ms / 1000.0)
    options = ServeOptions(k=args.k, exclude_seen=not args.include_seen, seeds=args.seeds, algorithm=args.method,
                           stride=args.stride)
    try:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size)
        server = RecommendServer((args.host, args.port), engine, limits, options)
    except (CheckpointError, ConfigError, ValueError, OSError) as error:
        print(f"diffrec serve: error: {error}", file=sys.stderr)
        return 2

    def stop(signum, frame):  # shutdown() waits for serve_forever: call it from another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {args.checkpoint} ({engine.num_items} items, {engine.device}) on {server.url} "
          f"(POST /recommend, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrec_ext.serve")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
