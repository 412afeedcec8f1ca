"""The ingest format (docs/interface.md, Ingest): FiscalResult rules, parse_entry, submit."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.ingest_format import (
    MAX_ENTRY_BYTES,
    FiscalResult,
    InvalidMessage,
    parse_entry,
    parse_rfc3339,
    submit,
    to_rfc3339,
)
from worker.settings import get_settings

VALID = {"receipt_id": 1, "brand": "openapitest", "fiscal_id": "Twrewr89fnscvj22"}


def entry(**changes: object) -> str:
    return json.dumps({**VALID, **changes})


def reason_for(data: str | bytes) -> str:
    with pytest.raises(InvalidMessage) as caught:
        parse_entry(data)
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# --- valid entries ---------------------------------------------------------------------


def test_contract_example_parses() -> None:
    result = parse_entry(
        '{"receipt_id": 1, "brand": "openapitest", "fiscal_id": "Twrewr89fnscvj22",'
        ' "device_id": "printer-7"}'
    )
    assert result.receipt_id == 1
    assert result.brand == "openapitest"
    assert result.fiscal_id == "Twrewr89fnscvj22"
    assert result.device_id == "printer-7"
    assert result.venue_id is None and result.printed_at is None and result.result_id is None


def test_all_optional_fields_parse() -> None:
    result = parse_entry(
        entry(
            venue_id=3,
            device_id="d" * 128,
            printed_at="2024-05-01T12:30:00+04:00",
            result_id="r" * 128,
        )
    )
    assert result.venue_id == 3
    assert result.device_id == "d" * 128
    assert result.printed_at == "2024-05-01T12:30:00+04:00"  # the original string is kept
    assert result.result_id == "r" * 128


def test_bytes_are_accepted() -> None:
    assert parse_entry(entry().encode()).receipt_id == 1


def test_extra_fields_are_kept() -> None:
    result = parse_entry(entry(table="7", guests=[1, 2], note={"a": None}))
    assert result.extras() == {"table": "7", "guests": [1, 2], "note": {"a": None}}
    assert "table" not in FiscalResult.model_fields


def test_extras_named_like_model_attributes_are_harmless() -> None:
    result = parse_entry(entry(extras=1, model_config="x", _private=2))
    assert result.extras() == {"extras": 1, "model_config": "x", "_private": 2}


def test_null_optional_fields_are_accepted() -> None:
    result = parse_entry(entry(venue_id=None, device_id=None, printed_at=None, result_id=None))
    assert result.venue_id is None


@pytest.mark.parametrize("brand", ["a", "A" * 64, "open_api.test-1"])
def test_brand_edges_accepted(brand: str) -> None:
    assert parse_entry(entry(brand=brand)).brand == brand


@pytest.mark.parametrize("fiscal_id", ["x", "x" * 128, "a b", "ƏşÜ-12"])
def test_fiscal_id_edges_accepted(fiscal_id: str) -> None:
    assert parse_entry(entry(fiscal_id=fiscal_id)).fiscal_id == fiscal_id


@pytest.mark.parametrize(
    "printed_at",
    [
        "2024-05-01T12:30:00Z",
        "2024-05-01t12:30:00z",
        "2024-05-01T12:30:00.123456789-03:30",
        "2024-05-01 12:30:00+00:00",
        "2016-12-31T23:59:60Z",  # a leap second is valid RFC 3339
    ],
)
def test_printed_at_rfc3339_accepted(printed_at: str) -> None:
    assert parse_entry(entry(printed_at=printed_at)).printed_at == printed_at


# --- rule violations -------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False, 0, -1, 1.0, 1.5, "1", None, [1], {"a": 1}])
def test_receipt_id_must_be_a_positive_integer(value: object) -> None:
    assert reason_for(entry(receipt_id=value)) == "receipt_id: must be an integer >= 1"


def test_missing_required_fields_are_named() -> None:
    message = reason_for(json.dumps({"brand": "b"}))
    assert "receipt_id: required" in message
    assert "fiscal_id: required" in message


@pytest.mark.parametrize("brand", ["a:b", "A" * 65, "", "sp ace", "abc\n", "ünï", 7, None])
def test_brand_rule(brand: object) -> None:
    assert reason_for(entry(brand=brand)).startswith("brand: must be 1-64 characters")


@pytest.mark.parametrize(
    "fiscal_id", [" lead", "trail ", "x" * 129, "", "a\x00b", "tab\there", "new\nline", 5, None]
)
def test_fiscal_id_rule(fiscal_id: object) -> None:
    assert reason_for(entry(fiscal_id=fiscal_id)).startswith("fiscal_id: must be 1-128 printable")


@pytest.mark.parametrize("venue_id", [True, 0, -3, 2.0, "2"])
def test_venue_id_rule(venue_id: object) -> None:
    assert reason_for(entry(venue_id=venue_id)) == "venue_id: must be an integer >= 1"


@pytest.mark.parametrize("field", ["device_id", "result_id"])
@pytest.mark.parametrize("value", ["x" * 129, 12, ["x"]])
def test_device_and_result_id_rule(field: str, value: object) -> None:
    assert reason_for(entry(**{field: value})).startswith(f"{field}: must be a string")


def test_lone_surrogate_in_device_id_is_rejected() -> None:
    assert reason_for('{"receipt_id": 1, "brand": "b", "fiscal_id": "f", "device_id": "\\ud800"}')


@pytest.mark.parametrize(
    "printed_at",
    [
        "2024-05-01T12:30:00",  # no timezone
        "2024-05-01",
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-05-01T25:00:00Z",
        "2024-05-01T12:30:00+24:00",
        "yesterday",
        "\uff12\uff10\uff12\uff14-05-01T12:30:00Z",  # non-ASCII digits
        "2024-05-01T12:30:00Z\n",
        1714566600,
    ],
)
def test_printed_at_rule(printed_at: object) -> None:
    assert reason_for(entry(printed_at=printed_at)).startswith("printed_at: must be an RFC 3339")


# --- malformed entries -----------------------------------------------------------------


def test_not_json() -> None:
    assert reason_for("{not json").startswith("not valid JSON: ")


@pytest.mark.parametrize("data", ["[]", "1", '"s"', "null", "true"])
def test_not_an_object(data: str) -> None:
    assert reason_for(data).startswith("not a JSON object")


def test_empty_entry() -> None:
    assert reason_for("") == "entry is empty"
    assert reason_for(b"  ") == "entry is empty"


def test_invalid_utf8_bytes() -> None:
    assert reason_for(b'{"a": "\xff"}') == "not valid UTF-8 (byte 0xff at offset 7)"


@pytest.mark.parametrize("data", ['{"a": NaN}', '{"a": -Infinity}', '{"a": 1e999}'])
def test_non_finite_numbers_rejected(data: str) -> None:
    assert reason_for(data).startswith("not valid JSON")


def test_deep_nesting_rejected() -> None:
    assert "nested" in reason_for('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    assert "nested" in reason_for('{"a": ' + "[" * 100 + "]" * 100 + "}")


def test_entry_at_the_size_limit_parses() -> None:
    base = entry(pad="")
    data = entry(pad="x" * (MAX_ENTRY_BYTES - len(base)))
    assert len(data.encode()) == MAX_ENTRY_BYTES
    assert parse_entry(data).extras()["pad"]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_entry_over_the_size_limit_is_not_parsed(as_bytes: bool) -> None:
    base = entry(pad="")
    data = entry(pad="x" * (MAX_ENTRY_BYTES + 1 - len(base)))
    message = reason_for(data.encode() if as_bytes else data)
    assert message == f"entry is {MAX_ENTRY_BYTES + 1} bytes, over the 65536-byte limit"


def test_size_is_counted_in_utf8_bytes() -> None:
    data = json.dumps({**VALID, "pad": "é" * 33_000}, ensure_ascii=False)
    assert len(data) <= MAX_ENTRY_BYTES < len(data.encode())
    assert "over the 65536-byte limit" in reason_for(data)


def test_non_text_input() -> None:
    assert reason_for(12) == "entry data is a int, not text"  # type: ignore[arg-type]


# --- never anything but InvalidMessage -------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
field_values = st.one_of(
    json_values,
    st.integers(min_value=-2, max_value=2**70),
    st.from_regex(r"[A-Za-z0-9_.:-]{0,70}", fullmatch=True),
    st.sampled_from(["2024-05-01T12:30:00Z", "2024-05-01T12:30:00", "2024-05-01T99:30:00Z"]),
)
entries = st.dictionaries(
    st.sampled_from(
        ["receipt_id", "brand", "fiscal_id", "venue_id", "device_id", "printed_at", "result_id"]
    )
    | st.text(max_size=10),
    field_values,
    max_size=9,
)


def _parses_or_invalid(data: str | bytes) -> None:
    try:
        result = parse_entry(data)
    except InvalidMessage as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(result, FiscalResult)
        json.loads(result.to_data())  # what is accepted can be re-encoded


@settings(max_examples=300)
@given(st.text())
def test_arbitrary_text_never_raises_anything_else(data: str) -> None:
    _parses_or_invalid(data)


@settings(max_examples=300)
@given(st.binary())
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    _parses_or_invalid(data)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_values_never_raise_anything_else(value: object) -> None:
    _parses_or_invalid(json.dumps(value))


@settings(max_examples=500)
@given(entries)
def test_arbitrary_entries_never_raise_anything_else(value: dict) -> None:
    _parses_or_invalid(json.dumps(value))


@given(
    st.integers(min_value=1, max_value=2**63),
    st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True),
    st.text(min_size=1, max_size=128).filter(lambda s: s.isprintable() and s == s.strip()),
)
def test_every_valid_entry_parses(receipt_id: int, brand: str, fiscal_id: str) -> None:
    data = json.dumps({"receipt_id": receipt_id, "brand": brand, "fiscal_id": fiscal_id})
    result = parse_entry(data)
    assert (result.receipt_id, result.brand, result.fiscal_id) == (receipt_id, brand, fiscal_id)


# --- time helpers ----------------------------------------------------------------------


def test_to_rfc3339_is_utc_with_millis() -> None:
    moment = datetime(2024, 5, 1, 16, 30, 0, 123456, tzinfo=timezone(timedelta(hours=4)))
    assert to_rfc3339(moment) == "2024-05-01T12:30:00.123Z"
    assert to_rfc3339("2024-05-01T16:30:00+04:00") == "2024-05-01T12:30:00.000Z"
    assert to_rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert to_rfc3339(datetime(2024, 1, 1)) == "2024-01-01T00:00:00.000Z"  # naive = UTC
    assert parse_rfc3339(to_rfc3339()).tzinfo is not None


def test_parse_rfc3339() -> None:
    assert parse_rfc3339("2024-05-01T12:30:00.5Z") == datetime(2024, 5, 1, 12, 30, 0, 500000, UTC)
    with pytest.raises(ValueError):
        parse_rfc3339("2024-05-01T12:30:00")


# --- submit ----------------------------------------------------------------------------


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


def test_submit_writes_one_stream_entry(redis: fakeredis.FakeRedis) -> None:
    entry_id = submit(
        redis,
        brand="openapitest",
        receipt_id=5,
        fiscal_id="F-1",
        venue_id=2,
        device_id="printer-7",
        printed_at="2024-05-01T12:30:00Z",
        result_id="r-1",
        stream="s",
    )
    [(stream_id, fields)] = redis.xrange("s")
    assert stream_id == entry_id
    assert list(fields) == ["data"]
    result = parse_entry(fields["data"])
    assert result.model_dump() == {
        "receipt_id": 5,
        "brand": "openapitest",
        "fiscal_id": "F-1",
        "venue_id": 2,
        "device_id": "printer-7",
        "printed_at": "2024-05-01T12:30:00Z",
        "result_id": "r-1",
    }


def test_submit_leaves_out_unset_fields(redis: fakeredis.FakeRedis) -> None:
    submit(redis, brand="b", receipt_id=1, fiscal_id="f", stream="s")
    [(_, fields)] = redis.xrange("s")
    assert json.loads(fields["data"]) == {"receipt_id": 1, "brand": "b", "fiscal_id": "f"}


def test_submit_default_stream_comes_from_settings(
    redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISCAL_INGEST_STREAM", "custom:stream")
    get_settings.cache_clear()
    try:
        submit(redis, brand="b", receipt_id=1, fiscal_id="f")
    finally:
        get_settings.cache_clear()
    assert redis.xlen("custom:stream") == 1


def test_submit_accepts_an_aware_datetime(redis: fakeredis.FakeRedis) -> None:
    submit(
        redis,
        brand="b",
        receipt_id=1,
        fiscal_id="f",
        stream="s",
        printed_at=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    )
    [(_, fields)] = redis.xrange("s")
    assert parse_entry(fields["data"]).printed_at == "2024-05-01T12:30:00+00:00"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"receipt_id": 0}, "receipt_id"),
        ({"receipt_id": True}, "receipt_id"),
        ({"brand": "a:b"}, "brand"),
        ({"fiscal_id": " f"}, "fiscal_id"),
        ({"venue_id": 0}, "venue_id"),
        ({"printed_at": "soon"}, "printed_at"),
        ({"printed_at": datetime(2024, 1, 1)}, "printed_at"),  # naive
    ],
)
def test_submit_rejects_bad_fields_and_writes_nothing(
    redis: fakeredis.FakeRedis, changes: dict, field: str
) -> None:
    fields = {"brand": "b", "receipt_id": 1, "fiscal_id": "f", **changes}
    with pytest.raises(InvalidMessage, match=f"^{field}: ") as caught:
        submit(redis, stream="s", **fields)
    assert isinstance(caught.value, ValueError)
    assert redis.exists("s") == 0
