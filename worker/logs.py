"""Structured one-line logs (`event=... brand=... receipt_id=...`) that never carry a secret.

Secrets are kept out by construction (tokens and client secrets are never passed to a log
call); as a second line of defence every handler installed here masks any value registered
with `register_secret()` (client secrets, access tokens) wherever it would appear.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque

MASK = "***"
_MAX_SECRETS = 512  # tokens rotate; keep the recent ones, bounded

_lock = threading.Lock()
_secrets: deque[str] = deque(maxlen=_MAX_SECRETS)


def _new_lock_after_fork() -> None:
    # A prefork child is forked while a service thread may hold the lock: it gets a fresh one.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def register_secret(value: str | None) -> None:
    """Mask `value` in every log line from now on (ignored if too short to be a secret)."""
    if not value or len(value) < 6:
        return
    with _lock:
        if value not in _secrets:
            _secrets.append(value)


def redact(text: str) -> str:
    with _lock:
        secrets = list(_secrets)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Renders the message once, masks registered secrets, and freezes the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields: object) -> str:
    """`event=NAME key=value ...`, None values left out, values quoted where needed."""
    parts = [f"event={event}"]
    parts += [f"{key}={_quote(value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


def describe(exc: BaseException) -> str:
    """`Class: message` on one line, short enough for a log line or a dead letter."""
    text = " ".join(f"{exc.__class__.__name__}: {exc}".split())
    return text[:300]


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Attach the redacting filter to every handler of `logger` (root by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def configure_logging(level: str = "INFO") -> None:
    """Plain-process logging (CLI, demo): one line per record, redacted."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    quiet_libraries()
    install_redaction(root)


def quiet_libraries() -> None:
    # httpx logs every request at INFO; our own call log says more, with brand and receipt.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
