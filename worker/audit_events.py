"""One audit event per finished result: the long-term audit, kept outside Redis.

Redis keeps a receipt's record for the audit window (days: worker/audit.py); a tax audit
asks about years. So every result that finishes - fiscalised (PATCHed, found fiscalised
already, absorbed as a duplicate) or dead-lettered - is told once, as one JSON object, on
its own logger `fiscal_worker.audit` at INFO, in the worker's log output:

    ... fiscal_worker.audit audit_event {"v":1,"outcome":"fiscalised","brand":"acme",...}

and, if FISCAL_AUDIT_EVENTS_FILE is set, as one JSON line appended to that file (`{date}`
in its path is the UTC day: `/var/log/fiscal/audit-{date}.jsonl` is a file per day). The
fields (docs/interface.md, "Audit events"): v (schema version), outcome, reason, brand,
receipt_id, fiscal_id, device_id, printed_at, venue_id, result_id, rid, dlq_id, attempts,
first_seen, finished_at, error. Absent values are null; extra fields of the adapter's
entry are not carried (they are the adapter's, of unknown size and meaning).

Once per result: the event is emitted by the run whose transaction recorded the outcome,
right after that transaction committed; a run that was fenced out commits nothing and
emits nothing; of two consumers dead-lettering one bad entry, only the one whose add
created the entry tells it. A process killed between the commit and the line loses that
one line (Redis still has the outcome: the receipt's record for the window, a dead
letter's entry until it is replayed or purged). No secret: the event
carries the result's own fields and the worker's error text, which never holds a token or
a client secret (and every line passes the log redaction, the file's too).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.ingest_format import to_rfc3339
from worker.logs import kv, redact

LOGGER = "fiscal_worker.audit"
EVENT = "audit_event"
VERSION = 1
OUTCOMES = ("fiscalised", "already_done", "duplicate", "dead_lettered")
MAX_ERROR_CHARS = 300
RESULT_FIELDS = ("fiscal_id", "device_id", "printed_at", "venue_id", "result_id")

log = logging.getLogger(LOGGER)
_file_lock = threading.Lock()


class AuditEvents:
    """Emits the events: to the logger always, to `path` (with `{date}`) if given."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(path) if path else None

    def finished(
        self,
        outcome: str,
        *,
        rid: str | None,
        result: dict[str, Any] | None = None,
        attempts: int | None = None,
        first_seen: float | None = None,
        reason: str | None = None,
        dlq_id: str | None = None,
        error: str | None = None,
        finished_at: datetime | None = None,
    ) -> dict[str, Any]:
        """Emit one result's event (after its outcome committed); returns the event."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; one of {', '.join(OUTCOMES)}")
        result = result or {}
        moment = finished_at or datetime.now(UTC)
        event: dict[str, Any] = {
            "v": VERSION,
            "outcome": outcome,
            "reason": reason,
            "brand": result.get("brand"),
            "receipt_id": result.get("receipt_id"),
            **{name: result.get(name) for name in RESULT_FIELDS},
            "rid": rid,
            "dlq_id": dlq_id,
            "attempts": attempts,
            "first_seen": to_rfc3339(first_seen) if first_seen is not None else None,
            "finished_at": to_rfc3339(moment),
            "error": error[:MAX_ERROR_CHARS] if error else None,
        }
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        log.info("%s %s", EVENT, line)  # the log handlers redact it (worker/logs.py)
        if self.path:
            self._append(redact(line), moment)
        return event

    def _append(self, line: str, moment: datetime) -> None:
        """One write of one line with O_APPEND: whole, whichever process writes next."""
        path = self.path.replace("{date}", moment.astimezone(UTC).strftime("%Y-%m-%d"))
        data = (line + "\n").encode("utf-8")
        try:
            with _file_lock:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except OSError as exc:  # the logger's line still has it
            logging.getLogger(__name__).error(
                kv("audit_events_file_failed", path=path, error=exc.__class__.__name__)
            )


def parse(line: str) -> dict[str, Any] | None:
    """The event in a log line (or a line of the events file), or None if it holds none."""
    start = line.find(EVENT + " {")
    text = line[start + len(EVENT) + 1 :] if start >= 0 else line
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) and event.get("v") == VERSION else None
