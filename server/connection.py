"""The HTTP connection: uvicorn's h11 protocol with a deadline on each request head (slow-loris).

uvicorn bounds a head's size (`h11_max_incomplete_event_size`) and idle keep-alive time, but not how long a client
may take to send a head: one byte a second would hold a connection, and its buffers, forever. Each connection here
must complete a request head within `head_timeout` seconds of connecting (or of its previous response); if not, the
connection is closed. The body's own deadline is the Guard middleware's (server/errors.py).

`with_request_ids` gives every response an `x-request-id` header: the client's own, if it sent a plausible one (as
vLLM echoes it), else a new one, so that a client and the server's logs can name the same request.
"""

from __future__ import annotations

import uuid

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_REQUEST_ID = 128


def with_request_ids(app):
    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        rid = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        if not 0 < len(rid) <= MAX_REQUEST_ID or any(c <= 32 or c >= 127 for c in rid):  # printable ASCII only
            rid = uuid.uuid4().hex.encode()

        async def send_with_id(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid)]}
            await send(msg)

        return await app(scope, receive, send_with_id)

    return wrapped


def deadline_protocol(head_timeout: float) -> type:
    class DeadlineH11(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:  # a head arrived: its request runs
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head on this keep-alive connection has a deadline too

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(head_timeout, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11
