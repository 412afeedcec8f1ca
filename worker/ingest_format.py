"""The ingest format (docs/interface.md, Ingest): one stream entry, its validation, and `submit()`.

An adapter appends `XADD fiscal:results * data <json object>`. `parse_entry()` turns the
`data` field into a `FiscalResult` or raises `InvalidMessage` with one human-readable line
(the ingest consumer dead-letters it as `invalid_message`). It never raises anything else,
whatever the bytes. `submit()` is the documented way for Python adapters to write an entry.

RFC 3339 helpers live here too: the interface's one time format, used by the dead-letter
store and the audit trail.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

if TYPE_CHECKING:
    from redis import Redis

# What a brand may be: it selects credentials and a rate budget, and is part of Redis keys.
BRAND_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_ENTRY_BYTES = 64 * 1024  # larger entries are not parsed; the consumer dead-letters them
MAX_NESTING = 64  # deepest JSON nesting accepted in extra fields (keeps re-encoding safe)
MAX_REASON_CHARS = 300  # an InvalidMessage line is cut here

# The rule each field breaks, as told to the adapter's author.
_RULES = {
    "receipt_id": "must be an integer >= 1",
    "brand": "must be 1-64 characters of A-Za-z0-9_.-",
    "fiscal_id": "must be 1-128 printable characters without leading or trailing whitespace",
    "venue_id": "must be an integer >= 1",
    "device_id": "must be a string of at most 128 characters",
    "printed_at": "must be an RFC 3339 date-time with a timezone, e.g. 2024-05-01T12:30:00Z",
    "result_id": "must be a string of at most 128 characters",
}

_RFC3339 = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]"
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<frac>[0-9]+))?"
    r"(?P<tz>[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


class InvalidMessage(ValueError):
    """A stream entry (or a submit() call) breaks the ingest format; str() is one line."""


# --- time ------------------------------------------------------------------------------


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 date-time with a timezone; ValueError if it is not one.

    A leap second (:60) is accepted and read as :59, which datetime can represent.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time: {text[:40]!r}")
    second = int(match["second"])
    second = 59 if second == 60 else second
    micro = int((match["frac"] or "0")[:6].ljust(6, "0"))
    tz_text = match["tz"]
    if tz_text in ("Z", "z"):
        tz: timezone = UTC
    else:
        hours, minutes = int(tz_text[1:3]), int(tz_text[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError(f"bad timezone offset: {tz_text}")
        offset = timedelta(hours=hours, minutes=minutes)
        tz = timezone(-offset if tz_text[0] == "-" else offset)
    day = date.fromisoformat(match["date"])
    clock = time(int(match["hour"]), int(match["minute"]), second, micro, tzinfo=tz)
    return datetime.combine(day, clock)


def to_rfc3339(value: datetime | str | float | None = None) -> str:
    """An RFC 3339 UTC string with milliseconds (`2024-05-01T12:30:00.123Z`).

    Takes a datetime (naive means UTC), an RFC 3339 string, unix seconds, or None for now.
    """
    if value is None:
        moment = datetime.now(UTC)
    elif isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    elif isinstance(value, str):
        moment = parse_rfc3339(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value, UTC)
    else:
        raise TypeError(f"not a time: {type(value).__name__}")
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# --- the model -------------------------------------------------------------------------


class FiscalResult(BaseModel):
    """One fiscal-device result, as an adapter hands it over (docs/interface.md, Ingest).

    Unknown extra fields are kept (`extras()`); they travel to the audit record.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    receipt_id: StrictInt = Field(ge=1)
    brand: StrictStr
    fiscal_id: StrictStr
    venue_id: StrictInt | None = Field(default=None, ge=1)
    device_id: StrictStr | None = Field(default=None, max_length=128)
    printed_at: StrictStr | None = None
    result_id: StrictStr | None = Field(default=None, max_length=128)

    @field_validator("brand")
    @classmethod
    def _brand(cls, value: str) -> str:
        if not BRAND_PATTERN.fullmatch(value):
            raise ValueError(_RULES["brand"])
        return value

    @field_validator("fiscal_id")
    @classmethod
    def _fiscal_id(cls, value: str) -> str:
        if not 1 <= len(value) <= 128 or not value.isprintable() or value != value.strip():
            raise ValueError(_RULES["fiscal_id"])
        return value

    @field_validator("device_id", "result_id")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        # A lone surrogate (JSON "\ud800") could not be written to Redis later.
        if value is not None and not _is_utf8_encodable(value):
            raise ValueError("must be valid Unicode text (no lone surrogates)")
        return value

    @field_validator("printed_at")
    @classmethod
    def _printed_at(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_rfc3339(value)
            except ValueError:
                raise ValueError(_RULES["printed_at"]) from None
        return value

    def extras(self) -> dict[str, Any]:
        """The entry's unknown fields, as the adapter sent them."""
        return dict(self.model_extra or {})

    def to_data(self) -> str:
        """The entry's `data` field: compact JSON of the fields that are set, extras included."""
        return json.dumps(self.model_dump(exclude_none=True), separators=(",", ":"))


def _is_utf8_encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- parsing ---------------------------------------------------------------------------


def parse_entry(data: str | bytes) -> FiscalResult:
    """The `data` field of a stream entry → FiscalResult, or InvalidMessage (one line).

    Never raises anything else, whatever `data` holds.
    """
    try:
        return _parse(data)
    except InvalidMessage:
        raise
    except Exception as exc:  # a bug here must still not lose the entry: it is dead-lettered
        raise InvalidMessage(_one_line(f"cannot parse entry ({exc.__class__.__name__})")) from None


def _parse(data: str | bytes) -> FiscalResult:
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        _check_size(len(raw))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidMessage(
                f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
            ) from None
    elif isinstance(data, str):
        if len(data) > MAX_ENTRY_BYTES:  # every character is at least one byte
            _check_size(len(data.encode("utf-8", "surrogatepass")))
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidMessage("not valid UTF-8 (contains lone surrogates)") from None
        _check_size(size)
        text = data
    else:
        raise InvalidMessage(f"entry data is a {type(data).__name__}, not text")

    if not text.strip():
        raise InvalidMessage("entry is empty")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(
            _one_line(f"not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})")
        ) from None
    except RecursionError:
        raise InvalidMessage("not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise InvalidMessage(_one_line(f"not valid JSON: {exc}")) from None
    if not isinstance(value, dict):
        raise InvalidMessage(f"not a JSON object (got {_json_kind(value)})")
    if _depth(value) > MAX_NESTING:
        raise InvalidMessage(f"JSON nested deeper than {MAX_NESTING} levels")
    return validate(value)


def validate(fields: dict[str, Any]) -> FiscalResult:
    """Validate already-decoded fields; InvalidMessage names every field that breaks a rule."""
    try:
        return FiscalResult.model_validate(fields)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "entry"
            if error["type"] == "missing":
                problem = f"{field}: required"
            elif error["type"] == "value_error":
                problem = f"{field}: {error['msg'].removeprefix('Value error, ')}"
            else:
                problem = f"{field}: {_RULES.get(field, error['msg'])}"
            if problem not in problems:
                problems.append(problem)
        raise InvalidMessage(_one_line("; ".join(problems))) from None


def _check_size(size: int) -> None:
    if size > MAX_ENTRY_BYTES:
        raise InvalidMessage(f"entry is {size} bytes, over the {MAX_ENTRY_BYTES}-byte limit")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text[:30]} is out of range")
    return number


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_NESTING:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_REASON_CHARS else flat[: MAX_REASON_CHARS - 3] + "..."


# --- submitting ------------------------------------------------------------------------


def submit(
    redis: Redis,
    *,
    brand: str,
    receipt_id: int,
    fiscal_id: str,
    venue_id: int | None = None,
    device_id: str | None = None,
    printed_at: str | datetime | None = None,
    result_id: str | None = None,
    stream: str | None = None,
) -> str:
    """Hand one fiscal result to the worker; returns the stream entry id.

    This is the supported way for a Python adapter to submit a result: it validates the
    fields with the same rules the worker applies (docs/interface.md, Ingest), then appends
    one entry `XADD <stream> * data <json>` to the ingest stream. The worker then sets the
    receipt's fiscal_id and locks it, exactly once in effect: submitting the same result
    again is harmless.

    Args:
        redis: a redis-py client for the worker's Redis (`FISCAL_REDIS_URL`).
        brand: the Clopos brand, 1-64 chars of `A-Za-z0-9_.-`.
        receipt_id: the Clopos receipt id, an int >= 1.
        fiscal_id: the fiscal id the device printed, 1-128 printable chars, no
            leading/trailing whitespace.
        venue_id: the receipt's venue (int >= 1), when it is not the brand's default.
        device_id: the fiscal device, for the audit trail (<= 128 chars).
        printed_at: when the device printed: an RFC 3339 string, or an aware datetime.
        result_id: the adapter's own unique id for this result (<= 128 chars).
        stream: the ingest stream; default `FISCAL_INGEST_STREAM` (`fiscal:results`).

    Raises:
        InvalidMessage: a field breaks a rule (a ValueError; str() is one line naming it).
        redis.exceptions.RedisError: Redis is unreachable or refused the write.

    Example:
        >>> import redis
        >>> from worker.ingest_format import submit
        >>> r = redis.Redis.from_url("redis://localhost:6379/0")
        >>> submit(r, brand="openapitest", receipt_id=1, fiscal_id="Twrewr89fnscvj22",
        ...        device_id="printer-7")
        '1714566600000-0'
    """
    if isinstance(printed_at, datetime):
        if printed_at.tzinfo is None:
            raise InvalidMessage("printed_at: a datetime must carry a timezone")
        printed_at = printed_at.isoformat()
    fields: dict[str, Any] = {"brand": brand, "receipt_id": receipt_id, "fiscal_id": fiscal_id}
    optional = {
        "venue_id": venue_id,
        "device_id": device_id,
        "printed_at": printed_at,
        "result_id": result_id,
    }
    fields.update({name: value for name, value in optional.items() if value is not None})
    result = validate(fields)
    if stream is None:
        from worker.settings import get_settings  # settings import this module's brand rule

        stream = get_settings().ingest_stream
    entry_id = redis.xadd(stream, {"data": result.to_data()})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
