"""Running the fake Clopos API with uvicorn: in a thread of this process (`FakeClopos.start()`
on a free port, for tests, the demo and the benchmarks) or in the foreground (`serve()`,
behind `fiscal-worker fake-clopos`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from worker.fake_clopos.app import build_app
from worker.fake_clopos.model import CloposModel, default_seed

START_TIMEOUT = 10.0  # seconds start() waits for uvicorn to accept connections
STOP_TIMEOUT = 5.0  # seconds stop() waits for the server thread
GRACEFUL_SHUTDOWN = 2.0  # seconds in-flight requests get on stop before being cancelled


class _Server(uvicorn.Server):
    """uvicorn's server, checking `should_exit` every 10 ms instead of 100 ms: quick stop()."""

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            await asyncio.sleep(0.01)


class FakeClopos(CloposModel):
    """The fake API (`CloposModel`), served over HTTP by uvicorn in a thread once started."""

    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    base_url: str | None = None  # the API root while running

    @functools.cached_property
    def app(self) -> Starlette:
        return build_app(self)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on `host`:`port` (0: a free port) from a daemon thread; returns the base URL."""
        if self._server is not None:
            raise RuntimeError("fake Clopos is already running")
        sock = _bind(host, port)
        bound_port = sock.getsockname()[1]
        server = _Server(_uvicorn_config(self.app, host, bound_port))
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-clopos", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError("fake Clopos server did not start")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        self.base_url = _url(host, bound_port)
        return self.base_url

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT)
        self._server = self._thread = None
        self.base_url = None


def serve(
    host: str,
    port: int,
    seed_path: str | None,
    *,
    token_lifetime: float = 3600.0,
    rate_limit: int = 300,
    rate_window: float = 60.0,
    latency: float = 0.0,
) -> None:
    """Serve the fake in the foreground until SIGINT/SIGTERM (the `fake-clopos` command)."""
    seed = json.loads(Path(seed_path).read_text()) if seed_path else default_seed()
    fake = CloposModel(
        token_lifetime=token_lifetime,
        rate_limit=rate_limit,
        rate_window=rate_window,
        latency=latency,
    )
    fake.load_seed(seed)
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    server = _Server(_uvicorn_config(build_app(fake), host, bound_port))
    url = _url(host, bound_port)
    print(f"fake Clopos API on {url} (brands: {', '.join(fake.brands())})", flush=True)
    in_main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises SIGTERM after its graceful shutdown; a no-op handler lets us return.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if in_main else None
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _uvicorn_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only then (else ~40 ms per response).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
