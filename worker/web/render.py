"""Untrusted text made fit for a page: payloads and other strings from adapters.

Jinja2 escapes HTML (`<script>` shows as text); this escapes what HTML escaping leaves
active: control and format characters (a bidi override can make text read backwards),
surrogates, and sheer length. A payload that is JSON is pretty-printed; any other is shown
as its escaped text.
"""

from __future__ import annotations

import json
from typing import Any

SHOWN_PAYLOAD_CHARS = 64 * 1024  # a page shows this much of a payload; the rest downloads


def printable(value: Any) -> str:
    """`value` as text with every unprintable character as an escape (`\\x1b`, `\\u202e`)."""
    if value is None:
        return "-"
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def payload_view(entry: dict[str, Any]) -> dict[str, Any]:
    """{"kind": "json"|"text", "text", "cut": chars not shown, "size": bytes, "truncated"}."""
    payload = entry.get("payload")
    raw = payload if isinstance(payload, str) else json.dumps(payload)
    kind, text = "text", raw
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read: as text
        pass
    else:
        if isinstance(parsed, dict | list):
            kind = "json"
            text = printable(json.dumps(parsed, indent=2, ensure_ascii=False))
    shown = text[:SHOWN_PAYLOAD_CHARS]
    return {
        "kind": kind,
        "text": printable(shown) if kind == "text" else shown,
        "cut": max(0, len(text) - len(shown)),
        "size": entry.get("payload_bytes") or len(raw.encode("utf-8", "replace")),
        "truncated": bool(entry.get("payload_truncated")),
    }
