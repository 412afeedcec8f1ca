"""Upgrading from the three-key receipt layout, end to end: a real redis-server holding
receipts as the version before wrote them, real worker processes of this version, the fake
Clopos API, and `fiscal-worker upgrade-keys` as an operator runs it."""

from __future__ import annotations

import json

from support import closed, patches, run_cli, wait_finished, xadd

from worker import keys

B = "openapitest"
DAY = 86400


def seed_legacy(r, receipt_id: int, fiscal_id: str) -> None:
    """A receipt fiscalised by the version before: its audit hash, attempts and marker."""
    r.hset(
        keys.legacy_audit(B, receipt_id),
        mapping={"state": "fiscalised", "fiscal_id": fiscal_id, "device_id": "old-printer",
                 "updated_at": "2026-11-30T10:00:00.000Z"},
    )  # fmt: skip
    r.rpush(
        keys.legacy_audit_attempts(B, receipt_id),
        json.dumps({"at": "2026-11-30T10:00:00.000Z", "call": "PATCH", "http_status": 200,
                    "outcome": "fiscalised"}),
    )  # fmt: skip
    r.set(keys.legacy_fiscalised(B, receipt_id), fiscal_id, ex=20 * DAY)
    r.expire(keys.legacy_audit(B, receipt_id), 80 * DAY)
    r.expire(keys.legacy_audit_attempts(B, receipt_id), 80 * DAY)


def test_receipts_of_the_layout_before_keep_their_meaning_then_fold_into_one_key(
    r, fake, env, start_worker
):
    # Receipt 1 was fiscalised by the old version (in Clopos too); receipt 2 is new.
    fake.add_receipt(B, closed(1, fiscal_id="F-1", lock=True))
    fake.add_receipt(B, closed(2))
    seed_legacy(r, 1, "F-1")
    worker = start_worker()
    xadd(r, {"receipt_id": 1, "brand": B, "fiscal_id": "F-1"})  # a late duplicate
    xadd(r, {"receipt_id": 1, "brand": B, "fiscal_id": "OTHER"})  # and a conflicting one
    xadd(r, {"receipt_id": 2, "brand": B, "fiscal_id": "F-2"})
    wait_finished(r)
    stats = fake.stats()["receipts"]
    assert stats.get(f"{B}:1", {}).get("get", 0) == 0  # the legacy marker answered: no call
    assert patches(fake, B, 1) == [] and patches(fake, B, 2) == [{"fiscal_id": "F-2",
                                                                 "lock": True}]  # fmt: skip
    shown = json.loads(run_cli(env, "receipt", B, "1", "--json").stdout)
    assert (shown["state"], shown["fiscal_id"], shown["device_id"]) == (
        "fiscalised", "F-1", "old-printer",
    )  # fmt: skip
    assert shown["attempts"][0]["outcome"] == "fiscalised"
    conflicts = [e for e in map(json.loads, r.mget(r.keys(keys.dlq_entry("*")))) if e]
    assert [e["reason"] for e in conflicts] == ["fiscal_id_conflict"]

    worker.stop()
    r.delete(keys.WORKERS)  # its heartbeat, so upgrade-keys does not wait out the lease
    upgraded = run_cli(env, "upgrade-keys", "--json")
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["folded"] == 1
    assert not r.keys(keys.legacy_audit("*", "*")) and not r.keys(f"fw:{{b:{B}}}:fiscalised:*")
    after = json.loads(run_cli(env, "receipt", B, "1", "--json").stdout)
    assert {k: after[k] for k in ("state", "fiscal_id", "device_id")} == {
        "state": "fiscalised", "fiscal_id": "F-1", "device_id": "old-printer",
    }  # fmt: skip
    assert after["attempts"][0]["outcome"] == "fiscalised"
    assert r.ttl(keys.receipt(B, 1)) > 70 * DAY  # the longest lifetime of the old keys

    start_worker("w2")
    xadd(r, {"receipt_id": 1, "brand": B, "fiscal_id": "F-1"})  # absorbed by the record now
    wait_finished(r)
    assert fake.stats()["receipts"].get(f"{B}:1", {}).get("get", 0) == 0
