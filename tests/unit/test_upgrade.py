"""Moving a Redis of the old key layout to today's (worker/upgrade.py, `upgrade-keys`)."""

from __future__ import annotations

import json
import os
import time

import pytest
from click.testing import CliRunner

from worker import keys, redis_conn
from worker.cli import cli
from worker.settings import get_settings
from worker.testing import clean_env
from worker.upgrade import migrate_keys, new_name

# Every kind of per-brand key the old layout wrote, with what it held.
OLD = {
    "fw:token:b1": ("string", '{"token": "t", "expires_at": 1, "lifetime": 1}'),
    "fw:token:b1:refresh-lock": ("string", "owner"),
    "fw:token:b1:auth-failure": ("string", "rejected"),
    "fw:rate:b1:tat": ("string", "1700000000.5"),
    "fw:rate:b1:front": ("string", "1700000000.0"),
    "fw:rate:b1:pause": ("string", "1700000100.0"),
    "fw:rate:b1:others": ("string", "3"),
    "fw:rate:b1:calls": ("zset", {"c1": 1700000000.0}),
    "fw:breaker:b1": ("hash", {"state": "open", "until": "1700000300"}),
    "fw:breaker:b1:probe": ("string", "p"),
    "fw:lock:b1:7": ("string", "rid:1"),
    "fw:fiscalised:b1:7": ("string", "F-7"),
    "fw:audit:b1:7": ("hash", {"state": "fiscalised", "fiscal_id": "F-7"}),
    "fw:audit:b1:7:attempts": ("list", ['{"call": "GET"}', '{"call": "PATCH"}']),
}
NEW = {
    "fw:token:b1": keys.token("b1"),
    "fw:token:b1:refresh-lock": keys.token_refresh_lock("b1"),
    "fw:token:b1:auth-failure": keys.token_auth_failure("b1"),
    "fw:rate:b1:tat": keys.rate_tat("b1"),
    "fw:rate:b1:front": keys.rate_front("b1"),
    "fw:rate:b1:pause": keys.rate_pause("b1"),
    "fw:rate:b1:others": keys.rate_others("b1"),
    "fw:rate:b1:calls": keys.rate_calls("b1"),
    "fw:breaker:b1": keys.breaker("b1"),
    "fw:breaker:b1:probe": keys.breaker_probe("b1"),
    "fw:lock:b1:7": keys.receipt_lock("b1", 7),
    "fw:fiscalised:b1:7": keys.legacy_fiscalised("b1", 7),
    "fw:audit:b1:7": keys.legacy_audit("b1", 7),
    "fw:audit:b1:7:attempts": keys.legacy_audit_attempts("b1", 7),
}


def seed(r) -> None:
    for key, (kind, value) in OLD.items():
        if kind == "string":
            r.set(key, value)
        elif kind == "hash":
            r.hset(key, mapping=value)
        elif kind == "zset":
            r.zadd(key, value)
        else:
            r.rpush(key, *value)
        r.expire(key, 3600)
    r.persist("fw:breaker:b1")  # an open circuit has no TTL


def dump(r, key: str):
    kind = r.type(key)
    return {
        "string": r.get,
        "hash": r.hgetall,
        "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
        "list": lambda k: r.lrange(k, 0, -1),
    }[kind](key)


def test_every_old_key_kind_has_a_new_name():
    assert {old: new_name(old) for old in OLD} == NEW
    for not_old in ("fw:schedule", "fw:result:1-0", "fw:dlq:index", keys.token("b1"),
                    "fw:lock:b1:x", "fw:audit:b1:7:other", "other:token:b1"):  # fmt: skip
        assert new_name(not_old) is None


def test_migration_renames_every_key_keeps_values_and_ttls_and_is_idempotent(r):
    seed(r)
    before = {old: dump(r, old) for old in OLD}

    done = migrate_keys(r)

    assert done.count() == len(OLD) and done.kept == [] and done.unknown == []
    for old, new in NEW.items():
        assert not r.exists(old)
        assert dump(r, new) == before[old]
    assert 0 < r.ttl(keys.legacy_fiscalised("b1", 7)) <= 3600
    assert r.ttl(keys.breaker("b1")) == -1
    assert migrate_keys(r).count() == 0  # a second run finds nothing


def test_a_key_whose_new_name_exists_is_kept_not_overwritten(r):
    seed(r)
    r.set(keys.legacy_fiscalised("b1", 7), "F-7")  # a new worker wrote it already
    r.hset(keys.legacy_audit("b1", 7), "state", "pending")

    done = migrate_keys(r)

    assert sorted(done.kept) == ["fw:audit:b1:7", "fw:fiscalised:b1:7"]
    assert r.hgetall(keys.legacy_audit("b1", 7)) == {"state": "pending"}
    assert r.hgetall("fw:audit:b1:7")["state"] == "fiscalised"  # left for the operator


def test_a_dry_run_changes_nothing(r):
    seed(r)
    done = migrate_keys(r, dry_run=True)
    assert done.count() == len(OLD)
    assert all(r.exists(old) for old in OLD) and not any(r.exists(n) for n in NEW.values())


@pytest.fixture
def cli_redis(r, monkeypatch):
    monkeypatch.setattr(redis_conn, "redis_client", lambda *args, **kwargs: r)
    for name in set(os.environ) - set(clean_env()):  # no FISCAL_* of the shell
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield r
    get_settings.cache_clear()


def test_upgrade_keys_refuses_while_a_worker_runs_then_migrates(cli_redis):
    seed(cli_redis)
    cli_redis.zadd(keys.WORKERS, {"host:1": time.time()})
    refused = CliRunner().invoke(cli, ["upgrade-keys"])
    assert refused.exit_code == 1 and "stop every worker first" in refused.output
    assert all(cli_redis.exists(old) for old in OLD)

    cli_redis.delete(keys.WORKERS)
    done = CliRunner().invoke(cli, ["upgrade-keys", "--json"])
    assert done.exit_code == 0
    report = json.loads(done.output)
    assert sum(report["renamed"].values()) == len(OLD) and report["kept"] == []
    assert report["folded"] == 1  # then its three keys went into one record
    assert not cli_redis.exists(keys.legacy_fiscalised("b1", 7))
    assert cli_redis.hmget(keys.receipt("b1", 7), "s", "f") == ["f", "F-7"]
