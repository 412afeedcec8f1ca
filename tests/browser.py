"""A real browser for the tests: headless chromium driven over the DevTools protocol.

Standard library only. `chromium --remote-debugging-pipe` reads protocol commands (JSON, each
ended by a NUL byte) from its fd 3 and writes answers and events to its fd 4; the process is
started with os.posix_spawn so those two descriptors are placed without a preexec hook.
One page, one session:

    binary = find_chromium()        # None where no chromium is installed
    with Browser(binary, tmp_path / "chromium") as page:
        page.goto("http://user:password@127.0.0.1:5555/tasks")   # basic auth, as a person types it
        rows = page.wait_js("document.querySelectorAll('tr').length > 1", what="rows")
        png = page.screenshot()

`check_png` tells a real screenshot from an empty or blank one without an imaging library.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from worker.testing import wait_for

NAMES = ("chromium", "chromium-browser")  # Debian's package installs /usr/bin/chromium
COMMAND_TIMEOUT = 20.0
CLOSE_TIMEOUT = 10.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BrowserError(RuntimeError):
    """The browser exited, timed out, or answered a command with an error."""


def find_chromium() -> str | None:
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """Headless chromium with one page of `width` x `height` CSS pixels; its profile, crash
    dumps and log live in `directory`."""

    def __init__(self, binary: str, directory: Path, width: int = 1600, height: int = 900):
        self.binary = binary
        self.directory = directory
        self.width = width
        self.height = height
        self.pid: int | None = None
        self._to_browser = -1
        self._from_browser = -1
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    # --- the process -----------------------------------------------------------------------
    def start(self) -> Browser:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--headless",
            "--no-sandbox",  # containers and CI run as root, where chromium's sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={self.directory / 'profile'}",
            f"--window-size={self.width},{self.height}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        commands_read, commands_write = map(_above_stdio, os.pipe())
        answers_read, answers_write = map(_above_stdio, os.pipe())
        log = os.open(self.directory / "chromium.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            self.pid = os.posix_spawn(
                self.binary,
                args,
                dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, log, 1),
                    (os.POSIX_SPAWN_DUP2, log, 2),
                    (os.POSIX_SPAWN_DUP2, commands_read, 3),
                    (os.POSIX_SPAWN_DUP2, answers_write, 4),
                ],
                setsid=True,  # its own process group: its helpers are stopped with it
            )
        finally:
            for fd in (commands_read, answers_write, log, devnull):
                os.close(fd)
        self._to_browser, self._from_browser = commands_write, answers_read
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.send("Page.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def close(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(BrowserError, OSError):
            self.call("Browser.close", timeout=CLOSE_TIMEOUT)
        exited = self._exited_within(CLOSE_TIMEOUT)
        # Its process group: helpers left behind by a clean exit, everything after a hang.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if not exited:
            self._exited_within(CLOSE_TIMEOUT)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pid = None

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _exited_within(self, seconds: float) -> bool:
        assert self.pid is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid:
                return True
            time.sleep(0.05)
        return False

    # --- the protocol ----------------------------------------------------------------------
    def call(self, method: str, timeout: float = COMMAND_TIMEOUT, **params: Any) -> dict[str, Any]:
        """A browser-level command; its result."""
        return self._command(method, params, None, timeout)

    def send(self, method: str, timeout: float = COMMAND_TIMEOUT, **params: Any) -> dict[str, Any]:
        """A command to the page; its result."""
        return self._command(method, params, self._session, timeout)

    def _command(
        self, method: str, params: dict[str, Any], session: str | None, timeout: float
    ) -> dict[str, Any]:
        self._next_id += 1
        ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data) :]
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline, method)
            if answer.get("id") != ident:
                continue  # an event, or the answer to a command given up on: not needed here
            if "error" in answer:
                raise BrowserError(f"{method}: {answer['error']}")
            return answer.get("result", {})

    def _read(self, deadline: float, method: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer from chromium in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError(f"{method}: chromium exited (see {self.directory})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    # --- the page --------------------------------------------------------------------------
    def goto(self, url: str, timeout: float = 20.0) -> None:
        """Navigate and wait until the document (not its later XHRs) has loaded."""
        answer = self.send("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"navigation failed: {answer['errorText']}")
        self.wait_js("document.readyState === 'complete'", timeout=timeout, what="page loaded")

    def js(self, expression: str) -> Any:
        """Evaluate `expression` in the page; its value (JSON-able), awaiting a promise."""
        answer = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"javascript error: {text}")
        return answer["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 10.0, what: str = "") -> Any:
        """Poll `expression` until it is truthy; its value."""
        return wait_for(lambda: self.js(expression), timeout=timeout, interval=0.1, what=what)

    def screenshot(self) -> bytes:
        """The viewport as PNG."""
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])


def _above_stdio(fd: int) -> int:
    """The same pipe end on a descriptor >= 10, so placing the pipes on 3 and 4 in the child
    never overwrites one with the other; close-on-exec, as os.pipe() makes it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def check_png(data: bytes, width: int, height: int) -> dict[str, int]:
    """Assert `data` is a whole 8-bit RGB(A) PNG of width x height that shows something:
    its pixel data decompresses to exactly the size the header promises, and holds many
    distinct byte values and many distinct rows (an empty or one-colour page has a handful
    of each). Returns those figures."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    chunks: dict[bytes, list[bytes]] = {}
    at = 8
    while at < len(data):
        assert at + 12 <= len(data), "truncated PNG"
        (length,) = struct.unpack(">I", data[at : at + 4])
        assert at + 12 + length <= len(data), "truncated PNG"
        kind = data[at + 4 : at + 8]
        body = data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.setdefault(kind, []).append(body)
        at += 12 + length
    assert b"IEND" in chunks, "truncated PNG"
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][0][:10])
    assert (w, h) == (width, height), f"PNG is {w}x{h}, not {width}x{height}"
    assert depth == 8 and colour in (2, 6), f"unexpected PNG format (depth {depth}, {colour})"
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = 1 + w * channels  # a filter byte, then the row
    assert len(raw) == h * stride, "pixel data does not match the header"
    rows = {raw[i * stride : (i + 1) * stride] for i in range(h)}
    figures = {"bytes": len(data), "distinct_values": len(set(raw)), "distinct_rows": len(rows)}
    assert figures["distinct_values"] > 64 and figures["distinct_rows"] > h // 10, (
        f"the screenshot looks blank: {figures}"
    )
    return figures
