"""The server process's lifecycle: LOADING -> WARMING -> READY -> DRAINING, or DEAD.

uvicorn listens from the first second, so probes can tell a loading server from a dead one: until the model is
loaded and warmed, `Swap` serves `starting_app` (/health 200 "loading", /ready 503, every other route 503 with
Retry-After); then it hands every request to the real app. /ready is 200 only in READY. DEAD (the model failed to
load, or the engine's loop stopped on a fatal error) turns /health 503, and the watchdog ends the process with a
non-zero status a moment later, so that the supervisor (Docker, Kubernetes) restarts it.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time

log = logging.getLogger("diffuserve.server")


class Stage(enum.Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class Lifecycle:
    def __init__(self):
        self.stage = Stage.LOADING
        self.engine = None  # set once built; the watchdog watches it
        self.error: str | None = None
        self.since = time.monotonic()
        self.closed = False  # the process is shutting down on purpose: the engine stopping then is no death

    def to(self, stage: Stage, error: str | None = None) -> None:
        if self.stage is Stage.DEAD:  # nothing comes back from the dead
            return
        log.info("server stage: %s -> %s", self.stage.value, stage.value)
        self.stage, self.error = stage, error or self.error

    def ready(self) -> str:
        """The /ready status: "ready", or what the server is doing instead."""
        return self.stage.value

    def watch(self, stop, grace_s: float = 2.0, every_s: float = 0.25,
              stall_s: float | None = None) -> threading.Thread:
        """Start the watchdog: once the engine is dead, or stalled (work waiting, no step finished for `stall_s`),
        or loading failed, wait `grace_s` (probes see /health 503) and call stop()."""

        def run():
            while not self.closed:
                eng = self.engine
                if eng is not None and not eng.alive and self.stage is not Stage.DEAD:
                    self.to(Stage.DEAD, f"engine stopped: {getattr(eng, 'fatal', None)}")
                stalled = eng.stalled_for() if eng is not None and stall_s is not None else 0.0
                if stall_s is not None and stalled > stall_s and self.stage is not Stage.DEAD:
                    self.to(Stage.DEAD, f"engine stalled: no step finished for {stalled:.0f}s")
                if self.stage is Stage.DEAD:
                    log.critical("server is dead (%s); exiting in %.1fs", self.error, grace_s)
                    time.sleep(grace_s)
                    stop()
                    return
                time.sleep(every_s)

        t = threading.Thread(target=run, name="diffuserve-watchdog", daemon=True)
        t.start()
        return t


class Swap:
    """An ASGI app that forwards to `app`, which the loader replaces once the real app exists."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def starting_app(life: Lifecycle, card: dict | None = None):
    """What answers while the model loads (or after loading failed): the probes, and /v1/models from `card`."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        dead = life.stage is Stage.DEAD
        path = scope["path"]
        if path == "/health":
            status, body = (503, {"status": "dead", "error": life.error}) if dead else (200, {"status": "loading"})
        elif path == "/ready":
            status, body = 503, {"status": life.ready()}
        elif card is not None and not dead and path == "/v1/models" and scope["method"] == "GET":
            status, body = 200, {"object": "list", "data": [card]}
        elif card is not None and not dead and path == f"/v1/models/{card['id']}" and scope["method"] == "GET":
            status, body = 200, card
        else:
            status = 503
            body = {"error": {"message": f"the server is {life.ready()}; retry later", "type": "server_error",
                              "param": None, "code": "not_ready"}}
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + ([(b"retry-after", b"5")] if status == 503 else [])})
        await send({"type": "http.response.body", "body": data})

    return app
