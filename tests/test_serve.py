"""The HTTP endpoint (diffrec_ext.serve, FastAPI on uvicorn) on loopback: answers, every class of
bad request, limits, the whole-request receive deadline against trickling clients, OpenAPI,
Prometheus metrics, a bounded load test with a memory check, a short locust run, and the command
line."""

import argparse
import http.client
import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install 'diffrec-ext[serve]'")

from diffrec_ext import checkpoint as ckpt  # noqa: E402
from diffrec_ext.engine import InferenceEngine  # noqa: E402
from diffrec_ext.serve import RecommendServer, ServeLimits, ServeOptions, add_cli  # noqa: E402
from diffrec_ext.train import TrainConfig, build_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_ITEMS = 60
ITEM_IDS = [1000 + i for i in range(NUM_ITEMS - 5)] + [f"sku-{i}" for i in range(5)]  # ints and strings
WINDOW = 8  # max_len 9: the model reads the 8 most recent items
FIELDS = "['history', 'histories', 'k', 'exclude_seen']"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    config = TrainConfig(dim=16, layers=2, heads=2, max_len=WINDOW + 1, num_steps=20, dropout=0.0, num_samples=4)
    torch.manual_seed(0)
    model = build_model(config, NUM_ITEMS)
    return ckpt.save_model(tmp_path_factory.mktemp("serve-ckpt"), model, config.to_dict(), ITEM_IDS)


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return InferenceEngine.from_checkpoint(checkpoint_dir, device="cpu", batch_size=64)


def start(engine, **limits):
    return RecommendServer(("127.0.0.1", 0), engine, ServeLimits(**limits), ServeOptions(k=5)).start()


@pytest.fixture(scope="module")
def server(engine):
    server = start(engine)
    yield server
    server.shutdown()


def request(server, method, path, body=None, headers=None, connection=None):
    """(status, decoded JSON, headers) of one request; `body` may be bytes or a JSON-able object."""
    own = connection is None
    connection = connection or http.client.HTTPConnection(*server.server_address, timeout=30)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    payload = json.loads(response.read())
    if own:
        connection.close()
    return response.status, payload, response.headers


def raw_exchange(server, data: bytes) -> bytes:
    """Everything the server sends back to `data` until it closes the connection."""
    with socket.create_connection(server.server_address, timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def split_reply(reply: bytes) -> tuple[bytes, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.lower(), body


# ------------------------------------------------------------------------------------------ answers
def test_recommend_one_history(server, engine):
    history = [1000, 1003, "sku-2", 1010]
    status, payload, _ = request(server, "POST", "/recommend", {"history": history, "k": 7})
    assert status == 200, payload
    assert len(payload["items"]) == 7 and len(payload["scores"]) == 7
    assert not set(payload["items"]) & set(history)
    assert payload["scores"] == sorted(payload["scores"], reverse=True)
    assert payload["k"] == 7 and payload["num_samples"] == payload["seeds"] == 4 and payload["algorithm"] == "alg3"
    assert "history_used" not in payload
    direct = engine.recommend([history], k=7, seed=0)  # a lone request is one engine batch drawn from seed 0
    assert payload["items"] == direct.items[0]
    np.testing.assert_allclose(payload["scores"], direct.scores[0].numpy(), rtol=1e-6)


def test_recommend_many_histories_and_defaults(server):
    body = {"histories": [[1000], ["sku-0", "sku-1"], [1001, 1002, 1003]], "exclude_seen": False}
    status, payload, _ = request(server, "POST", "/recommend", body)
    assert status == 200, payload
    assert len(payload["results"]) == 3 and all(len(r["items"]) == 5 for r in payload["results"])  # server k = 5
    assert payload["exclude_seen"] is False


def test_a_chunked_body_is_read(server):
    body = b'{"history": [1000, 1001], "k": 3}'
    reply = raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
                                 b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    head, payload = split_reply(reply)
    assert head.startswith(b"http/1.1 200") and len(json.loads(payload)["items"]) == 3


def test_histories_longer_than_the_window(engine):
    server = start(engine, max_history=20)
    try:
        status, payload, _ = request(server, "POST", "/recommend", {"history": ITEM_IDS[:12], "k": 3})
        assert status == 200 and payload["history_used"] == WINDOW
        assert not set(payload["items"]) & set(ITEM_IDS[:12])  # every item excluded, not only the window
    finally:
        server.shutdown()


def test_the_listening_socket_says_tcp_so_every_loop_sets_nodelay(server):
    """asyncio's own loop (no uvloop) sets TCP_NODELAY only on sockets whose proto is TCP; on a
    socket opened with proto 0 each answer waited for the client's delayed ACK (49 ms a request)."""
    assert server.socket.proto == socket.IPPROTO_TCP


def test_health(server):
    status, payload, _ = request(server, "GET", "/health")
    assert status == 200 and payload["status"] == "ok"
    assert payload["model"]["num_items"] == NUM_ITEMS and payload["limits"]["max_history"] == WINDOW


def test_openapi_lists_the_endpoint_and_docs_are_served(server):
    status, schema, _ = request(server, "GET", "/openapi.json")
    assert status == 200
    assert {"/recommend", "/health", "/metrics"} <= set(schema["paths"])
    operation = schema["paths"]["/recommend"]["post"]
    request_schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(request_schema["properties"]) == {"history", "histories", "k", "exclude_seen"}
    assert request_schema["properties"]["k"]["maximum"] == NUM_ITEMS  # the server's limits are in the schema
    assert {"200", "400", "422", "503"} <= set(operation["responses"])
    connection = http.client.HTTPConnection(*server.server_address, timeout=30)
    connection.request("GET", "/docs")
    response = connection.getresponse()
    assert response.status == 200 and b"swagger" in response.read().lower()
    connection.close()


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON: key must be a string at line 1 column 2"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[" * 50000 + b"]" * 50000, 400, "malformed JSON: recursion limit exceeded"),
    (b"[1, 2]", 400, "Input should be an object, got [1, 2]"),
    (b"", 400, "the body is empty: send a JSON object with the fields " + FIELDS),
    ({}, 400, 'give exactly one of "history" (a list of item ids) or "histories" (a list of lists)'),
    ({"history": [1000], "histories": [[1000]]}, 400, "give exactly one of"),
    ({"history": [1000], "user": 3}, 400, f"unknown field 'user'; the fields are {FIELDS}"),
    ({"history": "1000"}, 400, 'history: Input should be a valid array, got "1000"'),
    ({"history": [1000, 1.5]}, 400, "history[1]: must be an item id (an integer or a string), got 1.5"),
    ({"history": [True]}, 400, "history[0]: must be an item id (an integer or a string), got true"),
    ({"history": [[1000]]}, 400, "history[0]: must be an item id (an integer or a string), got [1000]"),
    ({"history": [1000], "k": "5"}, 400, 'k: Input should be a valid integer, got "5"'),
    ({"history": [1000], "exclude_seen": "yes"}, 400, 'exclude_seen: Input should be a valid boolean, got "yes"'),
    ({"histories": "x"}, 400, 'histories: Input should be a valid array, got "x"'),
    ({"histories": [[1000], 5]}, 400, "histories[1]: Input should be a valid array, got 5"),
    ({"history": []}, 422, "history: List should have at least 1 item"),
    ({"histories": []}, 422, "histories: List should have at least 1 item"),
    ({"histories": [[1000], []]}, 422, "histories[1]: List should have at least 1 item"),
    ({"history": [1000, 99999, "nope"]}, 422, 'history has 2 item id(s) the model does not know: 99999, "nope"'),
    ({"history": list(range(1000, 1000 + WINDOW + 1))}, 422, f"history: List should have at most {WINDOW} items"),
    ({"history": [1000], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"history": [1000], "k": 61}, 422, "k: Input should be less than or equal to 60"),
    ({"histories": [[1000]] * 257}, 422, "histories: List should have at most 256 items"),
])
def test_malformed_requests_get_a_4xx_and_a_message(server, body, status, message):
    got, payload, _ = request(server, "POST", "/recommend", body)
    assert got == status, payload
    assert message in payload["error"]


def test_k_larger_than_what_is_left_after_exclusion(engine):
    server = start(engine, max_k=100)
    try:
        history = ITEM_IDS[:WINDOW]
        status, payload, _ = request(server, "POST", "/recommend", {"history": history, "k": 55})
        assert status == 422 and "k = 55 exceeds the 52 items left" in payload["error"]
        status, payload, _ = request(server, "POST", "/recommend", {"history": history, "k": 55, "exclude_seen": False})
        assert status == 200 and len(payload["items"]) == 55
    finally:
        server.shutdown()


def test_a_request_without_a_result_in_time_gets_503_and_the_server_goes_on(engine):
    """The request timeout: an engine batch slower than request_timeout_s answers 503 with
    Retry-After; the late result is dropped, and the next request is answered normally."""
    class SlowEngine:
        def __init__(self, inner, delay):
            self.inner, self.delay = inner, delay

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def recommend_dense(self, *args, **kwargs):
            time.sleep(self.delay)
            return self.inner.recommend_dense(*args, **kwargs)

    server = start(engine, request_timeout_s=0.2)
    try:
        server.batcher.engine = SlowEngine(engine, delay=0.6)
        status, payload, headers = request(server, "POST", "/recommend", {"history": [1000, 1003, 1010]})
        assert status == 503 and "no result within 0.2 s" in payload["error"] and headers["Retry-After"] == "1"
        server.batcher.engine = engine
        time.sleep(0.6)  # the slow batch finishes and its answer finds the request already answered
        status, payload, _ = request(server, "POST", "/recommend", {"history": [1000, 1003, 1010]})
        assert status == 200 and len(payload["items"]) == 5
    finally:
        server.shutdown()


def test_routes_methods_and_content_type(server):
    status, payload, _ = request(server, "GET", "/nowhere")
    assert status == 404 and "no route /nowhere" in payload["error"]
    status, payload, headers = request(server, "GET", "/recommend")
    assert status == 405 and "use POST" in payload["error"] and headers["Allow"] == "POST"
    status, payload, _ = request(server, "DELETE", "/recommend")
    assert status == 405 and "method DELETE is not allowed" in payload["error"]
    status, payload, _ = request(server, "POST", "/health", {})
    assert status == 405 and "use GET" in payload["error"]
    status, payload, _ = request(server, "POST", "/recommend", b'{"history": [1000]}', {"Content-Type": "text/plain"})
    assert status == 415 and "must be application/json, got 'text/plain'" in payload["error"]
    reply = raw_exchange(server, b'POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 19\r\n\r\n{"history": [1000]}')
    head, body = split_reply(reply)
    assert head.startswith(b"http/1.1 415") and "got none" in json.loads(body)["error"]


def test_body_over_the_limit_is_refused_unread(server):
    # only the headers are sent: the 413 must come back, and the connection close, without the body
    head, body = split_reply(raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                                  b"application/json\r\nContent-Length: 10000000\r\n\r\n"))
    assert head.startswith(b"http/1.1 413") and b"connection: close" in head
    assert "body of 10000000 bytes exceeds the limit of 262144 bytes" in json.loads(body)["error"]
    # a chunked body is counted as it arrives: one byte over the limit, and nothing after it, so that the
    # server has read all that was sent when it closes (unread bytes would turn its close into a reset)
    over = b"1" * (262144 + 1)
    head, body = split_reply(raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                                                  b"json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                  + b"%x\r\n" % (2 * len(over)) + over))
    assert head.startswith(b"http/1.1 413") and b"connection: close" in head
    assert "body exceeds the limit of 262144 bytes" in json.loads(body)["error"]


def test_missing_or_bad_content_length_and_unparsable_requests(server):
    head, body = split_reply(raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                                  b"application/json\r\n\r\n"))
    assert head.startswith(b"http/1.1 411") and "Content-Length is required" in json.loads(body)["error"]
    # answered by uvicorn's parser, in plain text
    for request_bytes in (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n", b"NONSENSE\r\n\r\n"):
        head, body = split_reply(raw_exchange(server, request_bytes))
        assert head.startswith(b"http/1.1 400") and body == b"Invalid HTTP request received."


def test_request_line_and_headers_over_the_limit(engine):
    server = start(engine, max_header_bytes=4096)
    try:
        head, body = split_reply(raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000
                                              + b"\r\n\r\n"))
        assert head.startswith(b"http/1.1 431") and "exceed 4096 bytes" in json.loads(body)["error"]
        head, body = split_reply(raw_exchange(server, b"GET /health?" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n"))
        assert head.startswith(b"http/1.1 431")
        assert request(server, "GET", "/health", headers={"X-Small": "a" * 3000})[0] == 200
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ time limits
def trickle(server, data: bytes, pause: float) -> tuple[int, bytes]:
    """Sends `data` one byte every `pause` seconds, reading whatever the server answers; returns
    (bytes sent, everything received) once the server closes the connection or all is sent and
    answered."""
    received, sent = [], 0
    with socket.create_connection(server.server_address, timeout=30) as sock:
        while True:
            readable, _, _ = select.select([sock], [], [], 0 if sent < len(data) else 30)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    return sent, b"".join(received)
                received.append(chunk)
                continue
            if sent == len(data):
                return sent, b"".join(received)
            try:
                sock.sendall(data[sent:sent + 1])
            except OSError:  # closed by the server while we were still sending
                return sent, b"".join(received) + sock.recv(65536)
            sent += 1
            time.sleep(pause)


def test_a_trickling_client_is_answered_408_and_dropped(engine):
    """The deadline bounds the whole request, not each read: a client sending one byte every
    0.1 s (so no single read ever waits long) is cut off once the request has taken 1 s."""
    server = start(engine, receive_timeout_s=1.0)
    body = json.dumps({"history": [1000, 1001, 1002], "k": 3}).encode()
    slow_body = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body)) + body
    slow_headers = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    try:
        for data in (slow_body, slow_headers):
            sent, reply = trickle(server, data, pause=0.1)
            head, payload = split_reply(reply)
            assert sent < len(data), "the whole request went through"
            assert head.startswith(b"http/1.1 408") and b"connection: close" in head
            assert "request not received in full within 1.0 s" in json.loads(payload)["error"]
        # a request that arrives in pieces 0.2 s apart, 0.4 s in all, is served
        with socket.create_connection(server.server_address, timeout=30) as sock:
            for piece in (slow_body[:40], slow_body[40:80], slow_body[80:]):
                sock.sendall(piece)
                time.sleep(0.2)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        server.shutdown()


def test_idle_connections_are_dropped_and_the_connection_limit_answers_503(engine):
    server = start(engine, receive_timeout_s=0.5, max_connections=2)
    try:
        # two connections that never send a byte hold both places: a third is answered 503 at once
        idle = [socket.create_connection(server.server_address, timeout=30) for _ in range(2)]
        time.sleep(0.1)
        head, body = split_reply(raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert head.startswith(b"http/1.1 503") and body == b"Service Unavailable"
        for sock in idle:  # dropped after the receive deadline (with a 408), freeing the places
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            assert split_reply(reply)[0].startswith(b"http/1.1 408")
            sock.close()
        time.sleep(0.1)
        assert request(server, "GET", "/health")[0] == 200
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ metrics
def metric_values(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_prometheus_metrics(engine):
    server = start(engine, receive_timeout_s=0.5)
    try:
        for _ in range(3):
            assert request(server, "POST", "/recommend", {"history": [1000, 1001]})[0] == 200
        assert request(server, "POST", "/recommend", {"history": []})[0] == 422
        raw_exchange(server, b"GET /hea")  # never completed: 408
        connection = http.client.HTTPConnection(*server.server_address, timeout=30)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        values = metric_values(response.read().decode())
        connection.close()
        assert values['diffrec_http_requests_total{route="/recommend",status="200"}'] == 3
        assert values['diffrec_http_requests_total{route="/recommend",status="422"}'] == 1
        assert values['diffrec_http_request_seconds_count{route="/recommend"}'] == 4
        assert values["diffrec_engine_batch_histories_count"] == 3  # one engine batch per lone request
        assert values["diffrec_engine_batch_histories_sum"] == 3
        assert values["diffrec_receive_timeouts_total"] == 1
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ load
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_load_on_loopback_no_errors_and_no_memory_growth(server):
    """A few thousand valid requests from four keep-alive clients: every answer 200, and the
    resident set does not grow between a warm-up round and the end."""
    clients, per_client = 4, 600
    errors = []

    def client(seed: int, count: int):
        rng = np.random.default_rng(seed)
        connection = http.client.HTTPConnection(*server.server_address, timeout=30)
        try:
            for _ in range(count):
                length = int(rng.integers(1, WINDOW + 1))
                history = [ITEM_IDS[i] for i in rng.integers(0, NUM_ITEMS, length)]
                status, payload, _ = request(server, "POST", "/recommend", {"history": history, "k": 10},
                                             connection=connection)
                if status != 200 or len(payload["items"]) != 10:
                    errors.append((status, payload))
        except Exception as error:  # noqa: BLE001 (reported by the assertion below)
            errors.append(repr(error))
        finally:
            connection.close()

    def round_of(count: int, seed: int):
        threads = [threading.Thread(target=client, args=(seed + i, count)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)

    round_of(150, 0)  # warm-up: allocator pools, thread stacks, engine plans
    before = rss_bytes()
    started = time.perf_counter()
    round_of(per_client, 100)
    elapsed = time.perf_counter() - started
    growth = rss_bytes() - before
    assert not errors, errors[:3]
    assert growth < 8 * 2**20, f"resident set grew by {growth / 2**20:.1f} MiB over {clients * per_client} requests"
    print(f"\n{clients * per_client} requests in {elapsed:.2f} s ({clients * per_client / elapsed:.0f}/s), "
          f"{server.batcher.batches} engine batches so far, RSS growth {growth / 2**20:.2f} MiB")


def test_short_locust_load_test_has_no_failures(tmp_path):
    """The load-test benchmark, bounded (4 users for 3 s, loopback), on the FastAPI server."""
    if importlib.util.find_spec("locust") is None:  # not imported here: locust monkey-patches the process (gevent)
        pytest.skip("the load test needs locust (the test extra)")
    report_path, log_path = tmp_path / "load.json", tmp_path / "load.log"
    with open(log_path, "w") as log:  # a file, not a pipe: nothing can block on it
        result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_serve_load.py"), "--servers",
                                 "fastapi", "--users", "4", "--duration", "3", "--json", str(report_path)],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=False,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, log_path.read_text()[-4000:]
    (run,) = json.loads(report_path.read_text())["runs"]
    assert run["server"] == "fastapi" and run["users"] == 4
    assert run["requests"] > 0 and run["failures"] == 0, run["failure_kinds"]


# ------------------------------------------------------------------------------------------ command line
def test_cli_help():
    parser = argparse.ArgumentParser(prog="diffrec")
    add_cli(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["serve", "--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_an_argument_error(checkpoint_dir, port):
    result = subprocess.run([sys.executable, "-m", "diffrec_ext", "serve", "--checkpoint", str(checkpoint_dir),
                             "--port", port], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert f"argument --port: must be a port number in [0, 65535] (0: a free one), got '{port}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_command_on_loopback(checkpoint_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffrec_ext.serve", "--checkpoint", str(checkpoint_dir), "--port", "0",
         "--device", "cpu", "--threads", "1", "--quiet"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert " on http://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() is not None else "")
        host, port = line.split("http://", 1)[1].split(" ", 1)[0].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("POST", "/recommend", body=json.dumps({"history": [1000, 1001], "k": 3}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read())
        assert response.status == 200 and len(payload["items"]) == 3
        connection.request("POST", "/recommend", body=b"{", headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 400 and "malformed JSON" in json.loads(response.read())["error"]
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        stderr = process.stderr.read()
    # uvicorn stops gracefully, then raises the signal it handled again (exit by SIGTERM)
    assert code in (0, -signal.SIGTERM) and "Traceback" not in stderr, stderr


def test_serve_command_bad_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "diffrec_ext.serve", "--checkpoint", str(tmp_path / "none"),
                             "--port", "0"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr
