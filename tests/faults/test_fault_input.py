"""Hostile input: ~2,000 generated entries, each invalid by a rule of the ingest format
(docs/interface.md) by construction, XADDed raw and interleaved with valid results. Every
invalid one is dead-lettered `invalid_message` with its raw payload; the consumer never
stops."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from typing import Any

from faults.harness import alive, wide_budget
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import closed, dlq_entries

A = "openapitest"
HOSTILE = 2_000
VALID_EVERY = 40  # a valid result after every 40th hostile entry
BRAND = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # docs/interface.md, Ingest
KEEP_WHOLE = 1024 * 1024  # the dead-letter store keeps payloads whole up to here
KEPT_PREFIX = 64 * 1024  # and the first 64 KiB of larger ones
INJECTION = [
    "openapitest\r\nFLUSHALL",
    "openapitest:*",
    "../../etc/passwd",
    "x'; DROP TABLE receipts; --",
    "$(touch /tmp/fiscal-pwned)",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "%s%s%n",
    "redis.call('FLUSHALL')",
    "fw:{b:openapitest}:token",  # a key name of ours
    "\x1b[31mred\x1b[0m",
    "openapitest\x00",
]

# --- fields that break a rule of the ingest format, each by construction ------------------------
bad_receipt_id = st.one_of(
    st.integers(max_value=0),
    st.sampled_from(["12", "", None, True, False, [1], {"id": 1}, "1e3", " 1"]),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.text(max_size=6),
)
bad_brand = st.one_of(
    st.sampled_from(["", *INJECTION]),
    st.text(min_size=65, max_size=90, alphabet="abcXYZ019_.-"),
    st.text(max_size=30).filter(lambda s: not BRAND.fullmatch(s)),
    st.integers(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
bad_fiscal_id = st.one_of(
    st.sampled_from(["", " ", " F-1", "F-1 ", "F\n1", "F\x00", "\ud800", "F\udfff1", "\u2028"]),
    st.text(min_size=129, max_size=300, alphabet=st.characters(categories=["L", "N"])),
    st.text(max_size=20).map(lambda s: s + "\t"),
    st.text(max_size=20).map(lambda s: "\x07" + s),
    st.integers(),
    st.none(),
    st.booleans(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
extras = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k not in {"receipt_id", "brand", "fiscal_id"}),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids),
        max_leaves=6,
    ),
    max_size=3,
)


@st.composite
def bad_object(draw: Any) -> dict[str, Any]:
    """A JSON object with at least one required field missing or broken, maybe extras."""
    doc: dict[str, Any] = {"receipt_id": 7, "brand": A, "fiscal_id": "F-7"}
    broken = draw(st.sets(st.sampled_from(sorted(doc)), min_size=1))
    for name in sorted(broken):
        if draw(st.booleans()):
            del doc[name]  # missing
        else:
            doc[name] = draw(
                {"receipt_id": bad_receipt_id, "brand": bad_brand, "fiscal_id": bad_fiscal_id}[name]
            )
    doc.update(draw(extras))
    return doc


def encoded(doc: Any, ascii_only: bool) -> bytes:
    # Unescaped lone surrogates become raw (invalid UTF-8) bytes, as a broken adapter sends.
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def not_an_entry(data: bytes) -> bool:
    """True unless `data` could be a valid entry (keeps generated garbage invalid)."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return True
    return not isinstance(value, dict) or not {"receipt_id", "brand", "fiscal_id"} <= set(value)


json_scalar_or_array = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4),
    max_leaves=8,
)
deep = st.integers(65, 30_000).flatmap(
    lambda n: st.sampled_from(
        [
            b"[" * n + b"]" * n,  # an array, not an object
            b"{" * n,  # never closed
            b'{"receipt_id": ' + b"[" * n + b"1" + b"]" * n + b', "brand": "b", "fiscal_id": "F"}',
        ]
    )
)
numbers = st.sampled_from(
    [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"1.5", b"0", b"-1", b"1e-400"]
).map(lambda n: b'{"receipt_id": ' + n + b', "brand": "openapitest", "fiscal_id": "F-1"}')
broken_json = st.builds(
    lambda doc, cut: encoded(doc, True)[: max(1, cut)],
    st.fixed_dictionaries(
        {"receipt_id": st.integers(1, 9), "brand": st.just(A), "fiscal_id": st.just("F-1")}
    ),
    st.integers(1, 60),
).filter(not_an_entry)
other_fields = st.dictionaries(
    st.binary(min_size=1, max_size=12).filter(lambda k: k != b"data"),
    st.binary(max_size=40),
    max_size=3,
)
DATA_KINDS: dict[str, st.SearchStrategy[bytes]] = {
    "bad_fields": st.tuples(bad_object(), st.booleans()).map(lambda t: encoded(*t)),
    "not_an_object": json_scalar_or_array.map(lambda v: encoded(v, False)),
    "binary": st.binary(max_size=300).filter(not_an_entry),
    "unicode_text": st.text(max_size=200)
    .map(lambda s: s.encode("utf-8", "surrogatepass"))
    .filter(not_an_entry),
    "empty_ish": st.sampled_from(
        [b"", b" ", b"\n", b"null", b"{}", b"[]", b'""', b"\xef\xbb\xbf{}"]
    ),
    "deep_nesting": deep,
    "bad_numbers": numbers,
    "broken_json": broken_json,
    "injection": st.sampled_from([s.encode("utf-8", "surrogatepass") for s in INJECTION]),
}
kinds = [
    *(st.tuples(st.just(kind), data, other_fields) for kind, data in DATA_KINDS.items()),
    st.tuples(st.just("no_data_field"), st.none(), other_fields.filter(bool)),
]
hostile_entry = st.sampled_from(kinds).flatmap(lambda kind: kind)


def as_fields(kind: str, data: bytes | None, more: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return more if data is None else {**more, b"data": data}


oversized = st.builds(  # > 1 MiB: truncated in the dead-letter store
    lambda n, ch: {b"data": b'{"receipt_id": 1, "brand": "b", "fiscal_id": "' + ch * n + b'"}'},
    st.integers(KEEP_WHOLE + 1, KEEP_WHOLE + 400_000),
    st.sampled_from([b"A", b"\xc3\xa9", b"\xff", b"\xe2\x82\xac"]),
)
large = st.builds(  # 64 KiB .. 1 MiB: not parsed, kept whole
    lambda n, ch: {b"data": b'{"receipt_id": 1, "brand": "' + ch * n + b'", "fiscal_id": "F"}'},
    st.integers(KEPT_PREFIX + 1, 300_000),
    st.sampled_from([b"x", b"\xd0\x96", b"\xed\xa0\x80"]),
)


def examples(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """`n` examples of `strategy`: hypothesis' own generation, derandomized (the same list
    on every run), no shrinking, no database: fast and deterministic."""
    drawn: list[Any] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn[:n]


def raw_payload(fields: dict[bytes, bytes]) -> bytes:
    """What the dead-letter store must keep: `data`, or every field of an entry without it."""
    if b"data" in fields:
        return fields[b"data"]
    return b"\n".join(name + b"=" + value for name, value in fields.items())


def payload_problem(fields: dict[bytes, bytes], entry: dict[str, Any]) -> str | None:
    raw = raw_payload(fields)
    utf8 = entry.get("payload_encoding") == "utf-8"
    if entry.get("payload_bytes") != len(raw):
        return f"payload_bytes {entry.get('payload_bytes')} != {len(raw)}"
    if len(raw) > KEEP_WHOLE:
        prefix = raw[:KEPT_PREFIX]
        kept = prefix.decode("utf-8", "ignore" if utf8 else "backslashreplace")
        if not entry.get("payload_truncated"):
            return "over 1 MiB but not marked truncated"
        if entry.get("payload_sha256") != hashlib.sha256(raw).hexdigest():
            return "sha256 differs"
        return None if entry["payload"] == kept else "kept prefix differs"
    if entry.get("payload_truncated"):
        return "truncated although <= 1 MiB"
    if utf8:
        return None if entry["payload"].encode("utf-8") == raw else "payload differs"
    expected = raw.decode("utf-8", "backslashreplace")
    return None if entry["payload"] == expected else "payload (backslashreplace) differs"


def test_fault_07_hostile_input_is_dead_lettered_intact(r, fake, start_worker, ledger):
    generated = time.monotonic()
    small = examples(hostile_entry, HOSTILE - 60)
    big = examples(large, 40) + examples(oversized, 20)
    hostile: list[dict[bytes, bytes]] = []
    for i, drawn in enumerate(small):
        hostile.append(as_fields(*drawn))
        if i % 33 == 16 and big:  # the large ones spread through the run
            hostile.append(big.pop())
    hostile.extend(big)
    ledger.figure("generate_s", time.monotonic() - generated)
    ledger.figure("hostile", len(hostile))
    ledger.figure("kinds", dict(sorted(Counter(kind for kind, *_ in small).items())))
    ledger.figure(
        "64KiB_to_1MiB", sum(1 for f in hostile if KEPT_PREFIX < len(raw_payload(f)) <= KEEP_WHOLE)
    )
    ledger.figure("over_1MiB", sum(1 for f in hostile if len(raw_payload(f)) > KEEP_WHOLE))
    assert len(hostile) >= HOSTILE * 0.95

    valid = range(1, len(hostile) // VALID_EVERY + 2)
    for rid in valid:
        fake.add_receipt(A, closed(rid))
    worker = start_worker("w1", concurrency=4, **wide_budget(fake))
    started = time.monotonic()
    rids = iter(valid)
    for chunk in range(0, len(hostile), VALID_EVERY):
        pipe = r.pipeline(transaction=False)
        batch = hostile[chunk : chunk + VALID_EVERY]
        for fields in batch:
            pipe.xadd("fiscal:results", fields)
        rid = next(rids)
        data = json.dumps({"receipt_id": rid, "brand": A, "fiscal_id": f"F-{rid}"})
        pipe.xadd("fiscal:results", {"data": data})
        *ids, valid_id = pipe.execute()
        for entry_id, fields in zip(ids, batch, strict=True):
            ledger.add_raw(str(entry_id), fields, "invalid_message")
        ledger.add_result(str(valid_id), A, rid, f"F-{rid}")
    last = next(rids)  # sent last: the consumer is still consuming
    ledger.send(r, A, last, f"F-{last}")

    settled = ledger.settle(timeout=120)
    ledger.figure("ingest_and_land_s", time.monotonic() - started)
    ledger.check(settled)
    by_entry = {e["result_id"]: e for e in dlq_entries(r) if e["reason"] == "invalid_message"}
    problems = {}
    for key, sent in ledger.sent.items():
        if sent.expect == "invalid_message":
            problem = payload_problem(sent.data, by_entry[sent.entry_ids[0]])
            if problem:
                problems[key] = problem
    ledger.figure("payload_mismatches", len(problems))
    assert not problems, dict(list(problems.items())[:5])
    assert (fake.receipt(A, last) or {}).get("fiscal_id") == f"F-{last}"
    assert alive(worker), "the consumer died"
    assert "event=loop_error" not in worker.log()
