"""The audit events: one JSON event per finished result, on its own logger and in a file
(worker/audit_events.py)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from burst import BRAND, Burst
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import audit_events, keys
from worker.audit_events import AuditEvents, parse
from worker.ingest import Entry
from worker.logs import MASK, register_secret


def entry(receipt_id: int, **fields: object) -> dict[str, object]:
    return {"receipt_id": receipt_id, "brand": BRAND, "fiscal_id": f"F-{receipt_id}", **fields}


def events_of(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    out = []
    for record in caplog.records:
        if record.name == audit_events.LOGGER:
            event = parse(record.getMessage())
            assert event is not None, record.getMessage()
            out.append(event)
    return out


def test_every_finished_result_is_told_once(caplog: pytest.LogCaptureFixture) -> None:
    bench = Burst()
    for receipt_id in range(1, 6):
        bench.add_receipt(receipt_id)
    sent = [bench.xadd(entry(n, device_id=f"printer-{n}")) for n in range(1, 6)]
    sent.append(bench.xadd(entry(2)))  # the adapter sends one again: a duplicate
    sent.append(bench.xadd("{not json"))
    sent.append(bench.xadd(entry(9, brand="nobody-has-credentials")))
    with caplog.at_level(logging.INFO, logger=audit_events.LOGGER):
        bench.run()
    events = events_of(caplog)
    assert Counter(e["rid"] for e in events) == Counter(sent)  # each result once
    outcomes = Counter((e["outcome"], e["reason"]) for e in events)
    assert outcomes == {
        ("fiscalised", None): 5,
        ("duplicate", None): 1,
        ("dead_lettered", "invalid_message"): 1,
        ("dead_lettered", "unknown_brand"): 1,
    }
    first = next(e for e in events if e["rid"] == sent[0])
    assert (first["brand"], first["receipt_id"], first["fiscal_id"]) == (BRAND, 1, "F-1")
    assert first["device_id"] == "printer-1" and first["attempts"] == 1
    assert str(first["finished_at"]).endswith("Z") and str(first["first_seen"]).endswith("Z")
    dead = next(e for e in events if e["reason"] == "invalid_message")
    assert dead["dlq_id"] and dead["error"] and dead["brand"] is None
    everything = json.dumps(events)
    assert "secret-0001" not in everything  # the brand's client secret (tests/burst.py)
    assert "token" not in everything


def test_a_run_that_was_fenced_out_tells_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A result published twice: the stale delivery finishes nothing and emits nothing."""
    bench = Burst()
    bench.add_receipt(7)
    rid = bench.send(7, "F-7")
    with caplog.at_level(logging.INFO, logger=audit_events.LOGGER):
        bench.run()
        assert [e["rid"] for e in events_of(caplog)] == [rid]
        caplog.clear()
        bench.fiscaliser.run(rid, 1)  # an old copy of its task turns up later
    assert events_of(caplog) == []


def test_a_run_fenced_out_during_its_patch_tells_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A newer dispatch takes the result while this run's PATCH is in flight: this run's
    finish fails its fence and emits no event; the newer run finishes it, and tells it."""
    bench = Burst()
    bench.add_receipt(7)
    rid = bench.send(7, "F-7")
    taken: list[int] = []

    def newer_dispatch(api: object, request: httpx.Request, receipt_id: int) -> None:
        if request.method == "PATCH" and not taken:
            taken.append(int(bench.r.hincrby(keys.result(rid), "dispatch", 1)))
        return None

    bench.api.hooks.append(newer_dispatch)
    with caplog.at_level(logging.INFO, logger=audit_events.LOGGER):
        bench.dispatcher.run_once()
        stale_rid, dispatch = bench.queue.popleft()
        outcome = bench.fiscaliser.run(stale_rid, dispatch)
        assert taken and outcome.kind.value != "fiscalised"  # its fence failed
        assert events_of(caplog) == []
        bench.fiscaliser.run(rid, taken[0])  # the newer dispatch: already done at the API
    [event] = events_of(caplog)
    assert (event["rid"], event["outcome"]) == (rid, "already_done")


def test_an_entry_dead_lettered_by_two_consumers_is_told_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two consumers settle the same re-claimed bad entry: the store keeps one entry, and
    only the consumer whose add created it tells the event."""
    bench = Burst()
    entry_id = bench.xadd("{not json")
    with caplog.at_level(logging.INFO, logger=audit_events.LOGGER):
        bench.run()
        entry = Entry(entry_id, {b"data": b"{not json"})
        bench.ingest._dead_letter(entry, "not JSON")  # the second consumer, later
    assert [e["rid"] for e in events_of(caplog)] == [entry_id]
    assert len(bench.dead_letters()) == 1


def test_the_events_file_gets_one_json_line_per_event_per_utc_day(tmp_path: Path) -> None:
    events = AuditEvents(tmp_path / "audit-{date}.jsonl")
    days = [datetime(2026, 12, 3, 23, 59, tzinfo=UTC), datetime(2026, 12, 4, 0, 0, tzinfo=UTC)]
    for n, day in enumerate(days):
        events.finished(
            "fiscalised", rid=f"{n}-0", result={"brand": "acme", "receipt_id": n + 1,
                                                "fiscal_id": f"F-{n}"}, finished_at=day,
        )  # fmt: skip
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit-2026-12-03.jsonl", "audit-2026-12-04.jsonl"]
    [line] = (tmp_path / files[1]).read_text().splitlines()
    assert json.loads(line)["receipt_id"] == 2
    assert json.loads(line)["finished_at"] == "2026-12-04T00:00:00.000Z"


def test_an_events_file_that_cannot_be_written_is_logged_and_the_event_still_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = AuditEvents(tmp_path / "missing-directory" / "audit.jsonl")
    with caplog.at_level(logging.INFO):
        events.finished("fiscalised", rid="1-0", result={"brand": "acme", "receipt_id": 1})
    assert len(events_of(caplog)) == 1
    assert any("audit_events_file_failed" in r.getMessage() for r in caplog.records)


def test_a_registered_secret_never_reaches_an_event(tmp_path: Path) -> None:
    register_secret("s3cr3t-value-in-an-error")
    events = AuditEvents(tmp_path / "audit.jsonl")
    told = events.finished(
        "dead_lettered", rid="1-0", reason="auth_failed", error="rejected s3cr3t-value-in-an-error"
    )
    assert told["error"] == "rejected s3cr3t-value-in-an-error"  # the object, in memory
    text = (tmp_path / "audit.jsonl").read_text()
    assert "s3cr3t" not in text and MASK in text


def test_an_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown outcome"):
        AuditEvents().finished("done", rid="1-0")


def test_an_event_is_found_in_a_celery_log_line() -> None:
    line = (
        '[2026-12-03 10:00:00,000: INFO/ForkPoolWorker-1] audit_event {"v":1,"outcome":'
        '"fiscalised","brand":"acme"}'
    )
    assert parse(line) == {"v": 1, "outcome": "fiscalised", "brand": "acme"}
    assert parse("event=result_fiscalised rid=1-0") is None
    assert parse('audit_event {"v": 2}') is None  # another schema version


@settings(max_examples=200, deadline=None)
@given(
    fiscal_id=st.text(max_size=200),
    device_id=st.one_of(st.none(), st.text(max_size=200)),
    error=st.one_of(st.none(), st.text(max_size=1000)),
)
def test_any_text_in_a_result_comes_back_whole_from_its_line(
    fiscal_id: str, device_id: str | None, error: str | None
) -> None:
    """Hostile strings (newlines, quotes, control characters, lone surrogates aside) keep the
    event one line of valid JSON that reads back as sent."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger(audit_events.LOGGER)
    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        AuditEvents().finished(
            "dead_lettered", rid="1-0",
            result={"brand": "acme", "receipt_id": 1, "fiscal_id": fiscal_id,
                    "device_id": device_id},
            error=error,
        )  # fmt: skip
    finally:
        logger.removeHandler(handler)
    [line] = records
    assert "\n" not in line
    event = parse(line)
    assert event is not None
    assert (event["fiscal_id"], event["device_id"]) == (fiscal_id, device_id)
    assert event["error"] == (error[: audit_events.MAX_ERROR_CHARS] if error else None)
