"""The operator log: every replay and purge of dead letters, by whom, when, of what, how many.

One Redis stream (keys.OPLOG), written by the console (`fiscal-worker web`) and by
`fiscal-worker dlq replay / purge` alike, read by both (`dlq log`, the console's log page).
Each entry: at (RFC 3339), who (the console's user, or the CLI's OS user), via (`web` or
`cli`), action (`replay` or `purge`), selection (an id, or the filter the action matched),
count (entries acted on), refused (entries a replay could not send again) and the first ids
acted on. Trimmed to about keys.OPLOG_MAXLEN entries: it is the recent history an operator
looks at; a log pipeline keeps the `operator_action` log lines for longer.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from worker import keys
from worker.ingest_format import to_rfc3339
from worker.logs import kv

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

ACTIONS = ("replay", "purge")
VIAS = ("web", "cli")
IDS_KEPT = 20  # an entry names at most this many of the ids acted on
MAX_WHO_CHARS = 64


class OperatorLog:
    def __init__(self, redis_client: Redis) -> None:
        self.redis = redis_client

    def record(
        self,
        *,
        who: str,
        via: str,
        action: str,
        selection: dict[str, Any],
        count: int,
        refused: int = 0,
        ids: list[str] | None = None,
    ) -> str:
        """Write one entry; returns its stream id. Logged as `operator_action` first, so a
        Redis that refuses the entry (RedisError raised) leaves the log line."""
        if action not in ACTIONS:
            raise ValueError(f"unknown operator action {action!r}")
        if via not in VIAS:
            raise ValueError(f"unknown operator log source {via!r}")
        fields = {
            "at": to_rfc3339(),
            "who": _printable(who)[:MAX_WHO_CHARS] or "?",
            "via": via,
            "action": action,
            "selection": json.dumps(selection, ensure_ascii=True, sort_keys=True),
            "count": str(int(count)),
            "refused": str(int(refused)),
            "ids": " ".join((ids or [])[:IDS_KEPT]),
        }
        # the log line first: it is kept even when Redis refuses the entry (at maxmemory)
        log.info(
            kv(
                "operator_action",
                who=fields["who"],
                via=via,
                action=action,
                selection=fields["selection"],
                count=count,
                refused=refused,
            )
        )
        stream_id = self.redis.xadd(keys.OPLOG, fields, maxlen=keys.OPLOG_MAXLEN, approximate=True)
        return _text(stream_id)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` entries, newest first."""
        return [_entry(stream_id, fields) for stream_id, fields in
                self.redis.xrevrange(keys.OPLOG, count=max(1, limit))]  # fmt: skip


def _entry(stream_id: Any, raw: dict[Any, Any]) -> dict[str, Any]:
    fields = {_text(name): _text(value) for name, value in raw.items()}
    try:
        selection = json.loads(fields.get("selection", "{}"))
    except ValueError:
        selection = {}
    return {
        "id": _text(stream_id),
        "at": fields.get("at"),
        "who": fields.get("who"),
        "via": fields.get("via"),
        "action": fields.get("action"),
        "selection": selection if isinstance(selection, dict) else {},
        "count": _int(fields.get("count")),
        "refused": _int(fields.get("refused")),
        "ids": fields.get("ids", "").split(),
    }


def _printable(value: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(value))


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
