"""Hostile clients: what one client can and cannot do to the others of ``--mode serve``.

Each test starts the server as a user would, on 127.0.0.1, and talks to it the way an
attacker would (raw sockets, bodies that never end, images that cost more than they
weigh). Every load loop is bounded in count and time. docs/reliability.md's
"Reliability" table lists every test here too (tests/test_reliability.py keeps it in step).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import urllib.request

import pytest

from conftest import ServeProcess, bomb_png, shape_image, start_cli


@pytest.fixture(scope="module")
def guarded(tiny_model):
    """A server with small limits on the tiny model: ``(url, process)``."""
    work = tiny_model.parent.parent
    args = ["--mode", "serve", "--port", "0", "--max_connections", "4", "--request_timeout", "2", "--max_body_mb", "1"]
    running = ServeProcess(start_cli(*args, "--model_file_path", tiny_model.resolve(), cwd=work))
    yield running.url, running
    if running.proc.poll() is None:
        running.proc.kill()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _healthz(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing ``sock``, or None if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _png_bytes(size: int = 32) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    shape_image("circle", np.random.default_rng(0), size=size).save(buf, format="PNG")
    return buf.getvalue()


def test_request_heads_that_never_finish_are_closed_and_others_are_served(guarded):
    """As many connections as the server takes, each sending a request line and one header and
    never the blank line (or nothing at all): each is closed after --request_timeout, and a
    client that comes next is answered."""
    url, _ = guarded
    stalled = []
    for i in range(4):
        sock = socket.create_connection(_address(url), timeout=10)
        if i % 2 == 0:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")
        stalled.append(sock)
    closed = [_closed_within(sock, 8) for sock in stalled]
    for sock in stalled:
        sock.close()
    assert all(c is not None for c in closed), "a connection without a whole head stayed open"
    assert b"408" in closed[0] and b"--request_timeout" in closed[0]  # it is told why
    assert _healthz(url) == 200


def _send_until_closed(sock: socket.socket, pieces) -> None:
    try:
        for piece in pieces:
            sock.sendall(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed by the server, as it should be


def test_a_request_head_over_the_bound_gets_431_and_is_closed(guarded):
    """A URL of megabytes, or header lines that never end: 431 once the head passes 16 KB,
    the connection closed, the server's memory flat."""
    url, running = guarded
    before = _rss_kb(running.proc.pid)
    long_url = [b"GET /", *([b"a" * 65536] * 64)]  # 4 MB of URL
    endless_headers = [b"GET / HTTP/1.1\r\n", *([b"X-Filler: " + b"b" * 1000 + b"\r\n"] * 4000)]  # 4 MB of headers
    for pieces in (long_url, endless_headers):
        sock = socket.create_connection(_address(url), timeout=10)
        _send_until_closed(sock, pieces)
        answer = _closed_within(sock, 10)
        sock.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 431"), answer
    assert _rss_kb(running.proc.pid) - before < 30_000  # KiB
    assert _healthz(url) == 200


def _chunks(total: int, piece: int = 65536):
    sent = 0
    while sent < total:
        yield b"\0" * min(piece, total - sent)
        sent += piece


def test_a_chunked_body_over_the_limit_gets_413_whatever_its_encoding(guarded):
    """No Content-Length: a multipart file part or a raw body of 20 MB, sent chunked, is refused
    with 413 once --max_body_mb (1) is passed, and the server's memory stays flat."""
    url, running = guarded
    before = _rss_kb(running.proc.pid)
    boundary = "xyz"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'.encode()

    def multipart():
        yield head
        yield from _chunks(20 << 20)
        yield f"\r\n--{boundary}--\r\n".encode()

    for body, content_type in ((multipart(), f"multipart/form-data; boundary={boundary}"), (_chunks(20 << 20), "image/png")):
        connection = http.client.HTTPConnection(*_address(url), timeout=30)
        try:
            connection.request("POST", "/classify", body=body, headers={"Content-Type": content_type}, encode_chunked=True)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the client was still sending
        response = connection.getresponse()
        assert response.status == 413, response.read()
        assert "--max_body_mb" in json.loads(response.read())["error"]
        connection.close()
    assert _rss_kb(running.proc.pid) - before < 30_000  # KiB: never read whole into memory
    assert _healthz(url) == 200


NOT_HTTP = {
    "an unknown method": b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/2's preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "a TLS handshake": bytes.fromhex("16030100c4010000c00303") + bytes(64),
    "a malformed chunk": b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n",
    "two Content-Lengths": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
}


def test_what_is_not_http_gets_a_json_400_and_an_upgrade_is_served_as_plain_http(guarded):
    """Bytes the parser cannot read as HTTP/1.1 get a 400 JSON error (uvicorn's own is plain text) and the connection
    is closed; a WebSocket or h2c upgrade is answered as the plain request it also is, never handed to a protocol
    the server does not serve."""
    url, _ = guarded
    for what, request in NOT_HTTP.items():
        sock = socket.create_connection(_address(url), timeout=10)
        sock.sendall(request)
        answer = _closed_within(sock, 10)
        sock.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 400 "), (what, answer)
        assert b"application/json" in answer and "HTTP/1.1" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"], what
    websocket = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
    h2c = "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"
    for upgrade in (f"Connection: Upgrade\r\n{websocket}", f"Connection: Upgrade, HTTP2-Settings\r\n{h2c}"):
        sock = socket.create_connection(_address(url), timeout=10)
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{upgrade}\r\nConnection: close\r\n\r\n".encode())
        answer = _closed_within(sock, 10)
        sock.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 200 "), (upgrade, answer)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "ok"
    assert _healthz(url) == 200


def test_a_request_over_max_connections_gets_a_json_503_and_the_next_is_served(guarded):
    """While --max_connections (4) connections are held open, one more request gets 503 as JSON at once, with
    Retry-After; once they are closed, requests are answered again."""
    url, _ = guarded
    held = [socket.create_connection(_address(url), timeout=10) for _ in range(4)]
    try:
        sock = socket.create_connection(_address(url), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _closed_within(sock, 10)
        sock.close()
    finally:
        for s in held:
            s.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 503 "), answer
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"retry-after: 1" in head.lower() and "--max_connections" in json.loads(body)["error"]
    deadline = time.monotonic() + 10
    while _healthz(url) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _healthz(url) == 200


def test_the_decoding_work_of_one_request_is_bounded(guarded):
    """A small PNG that declares 10,000 x 9,999 pixels, or many that add up: 413 from their
    headers, before any is decoded; an ordinary photo is answered as before."""
    url, _ = guarded
    one = urllib.request.Request(url + "/classify", data=bomb_png(10_000, 9_999), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(one, timeout=30)
    assert refused.value.code == 413 and "--max_megapixels" in json.loads(refused.value.read())["error"]

    many = {"instances": [{"b64": base64.b64encode(bomb_png(4_000, 4_000)).decode()} for _ in range(24)]}
    started = time.monotonic()
    request = urllib.request.Request(url + "/v1/models/cnn_model:predict", data=json.dumps(many).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413 and "--max_request_megapixels" in json.loads(refused.value.read())["error"]
    assert time.monotonic() - started < 5  # refused from the headers, not after decoding 384 megapixels

    ordinary = urllib.request.Request(url + "/classify", data=_png_bytes(), method="POST")
    with urllib.request.urlopen(ordinary, timeout=30) as response:
        assert response.status == 200


def test_deeply_nested_json_is_a_400_not_a_500(guarded):
    url, running = guarded
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = urllib.request.Request(url + "/v1/models/cnn_model:predict", data=deep, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and "JSON" in json.loads(refused.value.read())["error"]
    assert _healthz(url) == 200


def test_the_classify_answer_names_the_model_not_where_it_lies(guarded, tiny_model):
    url, _ = guarded
    with urllib.request.urlopen(urllib.request.Request(url + "/classify", data=_png_bytes(), method="POST"), timeout=30) as r:
        answer = json.loads(r.read())
    assert answer["model_file_path"] == tiny_model.name
    assert str(tiny_model.parent) not in json.dumps(answer)
