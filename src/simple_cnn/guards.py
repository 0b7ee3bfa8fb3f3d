"""What one client can and cannot do to the others: the server's defences, below the app.

- :class:`GuardedHttpTools` (uvicorn's httptools protocol, which is what runs) closes a
  connection whose request head has not arrived within the request timeout, counted from
  the connection's start or the request's first byte, and answers a head larger than
  :data:`MAX_HEAD_BYTES` (the URL and the headers) with 431 and closes it. uvicorn itself
  bounds neither: its keep-alive timer starts only after a response, and its header
  limit applies to the h11 parser only. What the parser cannot read as HTTP/1.1 gets a
  400 JSON error too (uvicorn's own answer is plain text), and an ``Upgrade`` header is
  ignored: the server has no WebSocket endpoint, so ``serve`` runs uvicorn without a
  WebSocket protocol, and the request is answered as the plain HTTP request it also is.
- A request that comes while the server holds ``--max_connections`` connections gets
  uvicorn's 503, with a JSON body and ``Retry-After`` here.
- :class:`BodyGuard` (ASGI middleware), the one home of the body limit, refuses a body
  whose Content-Length is over ``--max_body_mb`` before reading any of it, counts the
  bytes of every other body as they arrive, whatever the encoding (chunked, a multipart
  form), and answers 413 the moment they pass it, or 408 when the body takes longer than
  ``--request_timeout``; both close the connection.
- :class:`RequestLog` writes one line per request (method, path, status, milliseconds),
  never the body.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import printable

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # a request line and headers; browsers and clients send far less


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a connection that was answered and closed."""


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound on every request head."""

    def __init__(self, *args, head_timeout: float, max_head_bytes: int = MAX_HEAD_BYTES, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout, self.max_head_bytes = head_timeout, max_head_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes, self._refused = 0, False

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_head_timer()  # a client that connects and sends nothing is closed too

    def connection_lost(self, exc):
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            super().data_received(data)
        except _HeadRefused:
            pass

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refuses (not HTTP/1.1, a malformed head or chunk), as JSON;
        uvicorn has logged its warning already."""
        self._refuse(400, "the request is not valid HTTP/1.1")

    def _start_asgi_task(self, cycle, app) -> None:
        if app is service_unavailable:  # over --max_connections: uvicorn's 503, whose body is plain text
            app = functools.partial(_over_capacity, limit=self.limit_concurrency)
        super()._start_asgi_task(cycle, app)

    def _unsupported_upgrade_warning(self) -> None:
        """An ``Upgrade`` header (WebSocket, h2c) is ignored and the request served as HTTP/1.1; uvicorn's own
        warning would tell the server's operator to install a WebSocket library, which this server has no use for."""

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, f"the request head is larger than {self.max_head_bytes:,} bytes")
            raise _HeadRefused

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info(f"closed a connection whose request head did not arrive within {self.head_timeout:g} s")
            self._refuse(408, f"the request head did not arrive within {self.head_timeout:g} s (--request_timeout)")

    def _refuse(self, status: int, message: str) -> None:
        """Answer with a JSON error and close, before any request reaches the app."""
        self._refused = True
        body = json.dumps({"error": message}).encode()
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        if not self.transport.is_closing():
            self.transport.write(head % (status, reason, len(body)) + body)
            self.transport.close()


async def _over_capacity(scope, receive, send, limit: int) -> None:
    """The 503 a request gets while the server holds ``limit`` connections (--max_connections), as JSON."""
    body = json.dumps({"error": f"the server is at its limit of {limit} connections (--max_connections): try again shortly"})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": [*headers, (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body.encode()})


class BodyGuard:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, one slower than ``timeout`` seconds 408.

    Raised where the app reads the body (as Starlette's HTTPException), so the app's own
    error handler answers it as JSON; ``connection: close`` goes with it, so a client
    cannot keep sending what nobody reads.
    """

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        deadline, received = time.monotonic() + self.timeout, 0
        too_large = HTTPException(
            413, f"the body is larger than {self.max_bytes:,} bytes (--max_body_mb)", {"connection": "close"}
        )
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")

        async def guarded_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large  # declared too large: refused before a byte of it is read
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(
                    408, f"the body did not arrive within {self.timeout:g} s (--request_timeout)", {"connection": "close"}
                ) from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, guarded_receive, send)


class RequestLog:
    """ASGI middleware: one line per request (method, path, status, milliseconds), never the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:  # noqa: BLE001 (already answered 500 by Starlette's handler, and logged in one line)
            pass  # re-raised by Starlette so that servers may log it: uvicorn would print a traceback
        finally:
            path = printable(scope.get("path", ""))[:200]
            log.info(f"{scope['method']} {path} {status} {1000 * (time.perf_counter() - start):.1f} ms")
