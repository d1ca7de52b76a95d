"""The HTTP endpoint (diffrec_ext.serve) on loopback: answers, request validation, limits,
timeouts, a bounded load test with a memory check, and the command line."""

import argparse
import http.client
import json
import os
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

from diffrec_ext import checkpoint as ckpt
from diffrec_ext.engine import InferenceEngine
from diffrec_ext.serve import RecommendServer, ServeLimits, ServeOptions, add_cli
from diffrec_ext.train import TrainConfig, build_model

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_ITEMS = 60
ITEM_IDS = [1000 + i for i in range(NUM_ITEMS - 5)] + [f"sku-{i}" for i in range(5)]  # ints and strings
WINDOW = 8  # max_len 9: the model reads the 8 most recent items


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    config = TrainConfig(dim=16, layers=2, heads=2, max_len=WINDOW + 1, num_steps=20, dropout=0.0, seeds=4)
    torch.manual_seed(0)
    model = build_model(config, NUM_ITEMS)
    return ckpt.save_model(tmp_path_factory.mktemp("serve-ckpt"), model, config.to_dict(), ITEM_IDS)


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return InferenceEngine.from_checkpoint(checkpoint_dir, device="cpu", batch_size=64)


def start(engine, **limits):
    server = RecommendServer(("127.0.0.1", 0), engine, ServeLimits(**limits), ServeOptions(k=5))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def server(engine):
    server = start(engine)
    yield server
    server.shutdown()
    server.close()


def request(server, method, path, body=None, headers=None, connection=None):
    """(status, decoded JSON) of one request; `body` may be bytes or a JSON-able object."""
    own = connection is None
    connection = connection or http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    payload = json.loads(response.read())
    if own:
        connection.close()
    return response.status, payload


def raw_exchange(server, data: bytes, wait: float = 0.0) -> bytes:
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        if wait:
            time.sleep(wait)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


# ------------------------------------------------------------------------------------------ answers
def test_recommend_one_history(server, engine):
    history = [1000, 1003, "sku-2", 1010]
    status, payload = request(server, "POST", "/recommend", {"history": history, "k": 7})
    assert status == 200, payload
    assert len(payload["items"]) == 7 and len(payload["scores"]) == 7
    assert not set(payload["items"]) & set(history)
    assert payload["scores"] == sorted(payload["scores"], reverse=True)
    assert payload["k"] == 7 and payload["seeds"] == 4 and payload["algorithm"] == "alg3"
    direct = engine.recommend([history], k=7, seed=0)  # a lone request is one engine batch drawn from seed 0
    assert payload["items"] == direct.items[0]
    np.testing.assert_allclose(payload["scores"], direct.scores[0].numpy(), rtol=1e-6)


def test_recommend_many_histories_and_defaults(server):
    body = {"histories": [[1000], ["sku-0", "sku-1"], [1001, 1002, 1003]], "exclude_seen": False}
    status, payload = request(server, "POST", "/recommend", body)
    assert status == 200, payload
    assert len(payload["results"]) == 3 and all(len(r["items"]) == 5 for r in payload["results"])  # server k = 5
    assert payload["exclude_seen"] is False


def test_health(server):
    status, payload = request(server, "GET", "/health")
    assert status == 200 and payload["status"] == "ok"
    assert payload["model"]["num_items"] == NUM_ITEMS and payload["limits"]["max_history"] == WINDOW


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "not UTF-8"),
    (b"[" * 50000 + b"]" * 50000, 400, "malformed JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({}, 400, "exactly one of"),
    ({"history": [1000], "histories": [[1000]]}, 400, "exactly one of"),
    ({"history": [1000], "user": 3}, 400, "unknown field(s) ['user']"),
    ({"history": "1000"}, 400, '"history" must be a list'),
    ({"history": [1000, 1.5]}, 400, "history[1] must be an item id"),
    ({"history": [True]}, 400, "history[0] must be an item id"),
    ({"history": [[1000]]}, 400, "history[0] must be an item id"),
    ({"history": [1000], "k": "5"}, 400, '"k" must be an integer'),
    ({"history": [1000], "exclude_seen": "yes"}, 400, '"exclude_seen" must be true or false'),
    ({"histories": "x"}, 400, '"histories" must be a list'),
    ({"histories": [[1000], 5]}, 400, '"histories[1]" must be a list'),
    ({"history": []}, 422, '"history" is empty'),
    ({"histories": []}, 422, '"histories" is empty'),
    ({"histories": [[1000], []]}, 422, '"histories[1]" is empty'),
    ({"history": [1000, 99999, "nope"]}, 422, "2 item id(s) the model does not know: 99999, \"nope\""),
    ({"history": list(range(1000, 1000 + WINDOW + 1))}, 422, f"has {WINDOW + 1} items; the limit is {WINDOW}"),
    ({"history": [1000], "k": 0}, 422, '"k" must be in [1, 60]'),
    ({"history": [1000], "k": 61}, 422, '"k" must be in [1, 60]'),
    ({"histories": [[1000]] * 257}, 422, "257 histories in one request; the limit is 256"),
])
def test_malformed_requests_get_a_4xx_and_a_message(server, body, status, message):
    got, payload = request(server, "POST", "/recommend", body)
    assert got == status, payload
    assert message in payload["error"]


def test_k_larger_than_what_is_left_after_exclusion(engine):
    server = start(engine, max_k=100)
    try:
        history = ITEM_IDS[:WINDOW]
        status, payload = request(server, "POST", "/recommend", {"history": history, "k": 55})
        assert status == 422 and "exceeds the 52 items left" in payload["error"]
        status, payload = request(server, "POST", "/recommend", {"history": history, "k": 55, "exclude_seen": False})
        assert status == 200 and len(payload["items"]) == 55
    finally:
        server.shutdown()
        server.close()


def test_routes_methods_and_content_type(server):
    assert request(server, "GET", "/nowhere")[0] == 404
    status, payload = request(server, "GET", "/recommend")
    assert status == 405 and "POST" in payload["error"]
    assert request(server, "DELETE", "/recommend")[0] == 405
    status, payload = request(server, "POST", "/recommend", b'{"history": [1000]}', {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in payload["error"]


def test_body_over_the_limit_is_refused_unread(server):
    # only the headers are sent: the 413 must come back without the server waiting for the body
    reply = raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 10000000\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
    assert "exceeds the limit of 262144 bytes" in json.loads(body)["error"]


def test_missing_or_bad_content_length(server):
    reply = raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length is required" in reply
    reply = raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"invalid Content-Length" in reply
    reply = raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411")
    reply = raw_exchange(server, b"NONSENSE\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b'"error"' in reply


def test_socket_timeouts_and_connection_limit(engine):
    server = start(engine, socket_timeout_s=0.5, max_connections=2)
    try:
        # a body that never completes: 408 after the socket timeout
        reply = raw_exchange(server, b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"hi")
        assert reply.startswith(b"HTTP/1.1 408")
        # silent connections are closed by the server (recv returns b"" instead of hanging)
        assert raw_exchange(server, b"POST /recom") == b""
        # two idle connections hold both slots: a third is answered 503 at once
        idle = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(2)]
        time.sleep(0.1)
        reply = raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503") and b"connections open" in reply
        for sock in idle:
            assert sock.recv(10) == b""  # dropped after the socket timeout, freeing the slots
            sock.close()
        time.sleep(0.1)
        assert request(server, "GET", "/health")[0] == 200
    finally:
        server.shutdown()
        server.close()


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
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        try:
            for _ in range(count):
                length = int(rng.integers(1, WINDOW + 1))
                history = [ITEM_IDS[i] for i in rng.integers(0, NUM_ITEMS, length)]
                status, payload = request(server, "POST", "/recommend", {"history": history, "k": 10},
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
            thread.join(60)

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


# ------------------------------------------------------------------------------------------ command line
def test_cli_help():
    parser = argparse.ArgumentParser(prog="diffrec")
    add_cli(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["serve", "--help"])
    assert exit_info.value.code == 0


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
        code = process.wait(timeout=30)
    assert code == 0


def test_serve_command_bad_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "diffrec_ext.serve", "--checkpoint", str(tmp_path / "none"),
                             "--port", "0"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr
