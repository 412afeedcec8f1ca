"""The Lua scripts live in worker/scripts/ only: each has a header naming its KEYS and ARGV,
loads (its includes expanded) and compiles; and the key layout keeps each brand in one slot."""

from __future__ import annotations

import re
from pathlib import Path

import fakeredis
import pytest
from redis.crc import key_slot

from worker import keys, scripts

WORKER = Path(__file__).resolve().parents[2] / "worker"
NAMES = scripts.names()
# Compiles a chunk without running it: Redis' own Lua 5.1 (lupa under fakeredis).
COMPILE = "local f, err = loadstring(ARGV[1]) if f then return 'ok' end return err"


def header(name: str) -> list[str]:
    """The script's leading comment lines."""
    lines = []
    for line in scripts.source(name).splitlines():
        if not line.startswith("--") or line.startswith("-- #include"):
            break
        lines.append(line)
    return lines


def test_the_package_holds_every_script():
    assert len(NAMES) >= 25
    assert {"store_admit", "ratelimit_reserve", "dlq_add", "tokens_unlock"} <= set(NAMES)
    assert all(
        re.fullmatch(
            r"(breaker|dlq|gate|idempotency|ingest|ratelimit|receipt|store|tokens|web)_\w+", n
        )
        for n in NAMES
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_script_has_a_header_naming_its_keys_and_argv(name):
    lines = header(name)
    assert lines and lines[0].startswith(f"-- {name}: "), "the header starts with the name"
    assert any(line.startswith("-- KEYS: ") for line in lines), "the header names its KEYS"
    assert any(line.startswith("-- ARGV: ") for line in lines), "the header names its ARGV"
    if not name.endswith("_fn"):
        assert any(line.startswith("-- Returns ") for line in lines), "and what it returns"


@pytest.mark.parametrize("name", NAMES)
def test_every_script_loads_and_compiles(name):
    text = scripts.load(name)
    assert "#include" not in text.replace("included above", "")
    assert scripts.load(name) is text  # read once
    r = fakeredis.FakeRedis()
    sha = r.script_load(text)
    assert r.script_exists(sha) == [True]
    assert r.eval(COMPILE, 0, text) == b"ok"


def test_an_include_is_expanded_once_and_in_place():
    replay = scripts.load("dlq_replay")
    assert replay.count("local function add_bytes") == 1  # via dlq_remove_fn
    assert replay.index("local function add_bytes") < replay.index("local function remove_entry")
    assert replay.index("local function remove_entry") < replay.rindex("remove_entry(K, ARGV")
    admit = scripts.load("store_admit")
    assert admit.count("local function reserve(") == 1
    assert admit.index("local function reserve(") < admit.rindex("reserve(k, n, now")


def test_a_bad_name_is_refused():
    with pytest.raises(ValueError):
        scripts.load("../keys")


def test_no_python_module_holds_inline_lua():
    inline = [
        str(path.relative_to(WORKER))
        for path in WORKER.rglob("*.py")
        if "redis.call(" in path.read_text(encoding="utf-8")
    ]
    assert inline == []


def test_the_breaker_scripts_use_the_hash_layout_of_keys():
    record, allow = scripts.load("breaker_record"), scripts.load("breaker_allow")
    for field in keys.BREAKER_FIELDS:
        assert f"'{field}'" in record
    for value in (keys.BREAKER_OPEN, keys.BREAKER_CLOSED):
        assert f"'{value}'" in record
    assert f"'{keys.BREAKER_STATE}'" in allow and f"'{keys.BREAKER_UNTIL}'" in allow
    assert f"'{keys.BREAKER_OPEN}'" in allow


def test_every_key_of_a_brand_is_in_one_slot():
    brand, receipt = "acme.eu-1", 42
    per_brand = [
        keys.token(brand),
        keys.token_refresh_lock(brand),
        keys.token_auth_failure(brand),
        keys.rate_tat(brand),
        keys.rate_front(brand),
        keys.rate_pause(brand),
        keys.rate_calls(brand),
        keys.rate_others(brand),
        keys.breaker(brand),
        keys.breaker_probe(brand),
        keys.receipt_lock(brand, receipt),
        keys.receipt(brand, receipt),
        keys.legacy_fiscalised(brand, receipt),
        keys.legacy_audit(brand, receipt),
        keys.legacy_audit_attempts(brand, receipt),
    ]
    assert len(set(per_brand)) == len(per_brand)
    assert {key_slot(key.encode()) for key in per_brand} == {key_slot(b"b:acme.eu-1")}
    assert all(keys.brand_of(key) == brand for key in per_brand)
    assert "token" in keys.token(brand)
    assert keys.brand_of(keys.SCHEDULE) is None and keys.brand_of(keys.result("r")) is None


def test_brands_are_found_by_their_key_patterns():
    r = fakeredis.FakeRedis(decode_responses=True)
    r.set(keys.rate_tat("a"), 1)
    r.hset(keys.breaker("b.c"), keys.BREAKER_STATE, keys.BREAKER_OPEN)
    r.set(keys.breaker_probe("d"), 1)
    r.set(keys.rate_pause("e"), 1)
    found = {
        keys.brand_of(k) for p in (keys.rate_tat("*"), keys.breaker("*")) for k in r.scan_iter(p)
    }
    assert found == {"a", "b.c"}
