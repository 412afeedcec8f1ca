"""Settings: every environment variable of docs/interface.md (Settings), read once.

Read once per process with `get_settings()`. A bad value raises `SettingsError`, whose
message is one line naming the variable; entry points print it and exit (no traceback).
Clopos credentials are needed only by what calls the API, so they are checked by
`Settings.clopos_credentials()`, not at load time: `fiscal-worker dlq list` runs without them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import breaker, dlq, health, idempotency, ingest, ratelimit, retry, store
from worker.clopos import wire
from worker.ingest_format import BRAND_PATTERN
from worker.logs import register_secret

ENV_PREFIX = "FISCAL_"
DAY = 86_400


class SettingsError(Exception):
    """A setting is missing or malformed; str() is one line that names the variable."""


class BrandCredentials(BaseModel):
    client_id: str = Field(min_length=1)
    client_secret: SecretStr

    @field_validator("client_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("client_id is blank")
        return value

    @field_validator("client_secret")
    @classmethod
    def _secret_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("client_secret is empty")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- the interface's own (docs/interface.md) --------------------------------------
    # A default that is a policy's number is that policy's constant: one source for each.
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")  # may carry a password
    clopos_base_url: str = "https://integrations.clopos.com/open-api"
    clopos_integrator_id: str | None = None
    clopos_credentials_file: Path | None = None
    rate_limit_requests: int = Field(ratelimit.LIMIT, ge=1)
    rate_limit_window_seconds: float = Field(ratelimit.WINDOW_SECONDS, gt=0)
    not_ready_retry_window_seconds: float = Field(retry.NOT_READY_WINDOW_SECONDS, ge=0)
    transient_retry_window_seconds: float = Field(retry.TRANSIENT_WINDOW_SECONDS, ge=0)
    ingest_stream: str = Field("fiscal:results", min_length=1)

    # --- the project's own ---------------------------------------------------------
    # Every result is finished (fiscalised or dead-lettered `retries_exhausted`) at most this
    # long after it was first seen, whatever it waits for (budget, 429s, an open circuit, a
    # busy receipt). Unset: the longer of the two retry windows.
    result_deadline_seconds: float | None = Field(None, gt=0)
    # HTTP read timeout: above the API's 8 s upstream limit so its 504 reaches us first.
    http_timeout_seconds: float = Field(wire.READ_TIMEOUT_SECONDS, gt=0)
    http_connect_timeout_seconds: float = Field(wire.CONNECT_TIMEOUT_SECONDS, gt=0)
    # The receipt record (worker/audit.py): kept the audit window after its last write, a
    # fiscalised one at least the marker's lifetime (duplicates absorbed without a call).
    # Years of audit live outside Redis: the audit events (worker/audit_events.py).
    fiscalised_marker_ttl_seconds: int = Field(7 * DAY, ge=60)
    audit_ttl_seconds: int = Field(7 * DAY, ge=60)
    audit_max_attempts: int = Field(20, ge=1)
    # Also append each audit event to this file, one JSON line ({date}: the UTC day).
    audit_events_file: str | None = None
    # Dead-letter store: never trimmed; past either bound it warns (log, stats, metric).
    dlq_warn_entries: int = Field(dlq.WARN_ENTRIES, ge=1)
    dlq_warn_bytes: int = Field(dlq.WARN_BYTES, ge=1024)
    # Retry policy (worker/retry.py explains each number).
    retry_base_seconds: float = Field(retry.BASE_SECONDS, gt=0)
    retry_max_delay_seconds: float = Field(retry.TRANSIENT_CAP_SECONDS, gt=0)
    not_ready_max_delay_seconds: float = Field(retry.NOT_READY_CAP_SECONDS, gt=0)
    # Results published to the Celery queue at most at once; the rest wait, due, in the
    # schedule. Keeps queued messages few, so none outlives its lease while queued.
    max_queued: int = Field(500, ge=1)
    # Leases of worker/store.py: a result whose worker died is re-driven when its lease
    # lapses. run: longer than one API call with its timeouts; queue: than a short queue.
    run_lease_seconds: float = Field(store.RUN_LEASE_SECONDS, gt=0)
    queue_lease_seconds: float = Field(store.QUEUE_LEASE_SECONDS, gt=0)
    # A worker renews the leases of the results it holds (received, prefetched or running)
    # every heartbeat; those of a worker that died lapse `worker_lease` after its last one.
    worker_heartbeat_seconds: float = Field(10.0, gt=0)
    worker_lease_seconds: float = Field(store.HELD_LEASE_SECONDS, gt=0)
    # Written by the worker's main process every heartbeat; read by the liveness and
    # readiness probes (`python -m worker.health live|ready`, worker/health.py).
    health_file: str = health.DEFAULT_FILE
    # Per-receipt lock (worker/idempotency.py): longer than a GET + auth + PATCH can take.
    receipt_lock_seconds: float = Field(idempotency.LOCK_SECONDS, gt=0)
    # Rate budget and circuit breaker (worker/ratelimit.py, worker/breaker.py).
    rate_limit_margin: float = Field(ratelimit.MARGIN, ge=0, lt=1)
    breaker_failure_threshold: int = Field(breaker.THRESHOLD, ge=1)
    breaker_cooldown_seconds: float = Field(breaker.COOLDOWN_SECONDS, gt=0)
    breaker_max_cooldown_seconds: float = Field(breaker.MAX_COOLDOWN_SECONDS, gt=0)
    auth_calls_per_minute: int = Field(ratelimit.AUTH_PER_MINUTE, ge=1, le=60)
    failed_calls_per_minute: int = Field(breaker.FAILED_CALLS_PER_MINUTE, ge=1)
    # A stream entry read by a consumer that died is claimed by another after this idle time.
    claim_idle_seconds: float = Field(ingest.CLAIM_IDLE_SECONDS, gt=0)
    # An evicting maxmemory-policy deletes results, markers and leases: the worker refuses
    # to start on one unless this says the operator accepts it (loud warning, metric).
    allow_evicting_redis: bool = False
    log_level: str = "INFO"
    # The operator's console (`fiscal-worker web`, worker/web/): its users (a JSON file of
    # hashed passwords and roles, made with `fiscal-worker web-user`), or one password for a
    # single operator `admin`; how long an unused session lives; the proxies whose
    # X-Forwarded-Proto / -For it trusts (so cookies are Secure behind a TLS ingress).
    web_users_file: Path | None = None
    web_password: SecretStr | None = None
    web_session_seconds: float = Field(8 * 3600, ge=60)
    web_forwarded_allow_ips: str = "127.0.0.1"

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("clopos_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("clopos_integrator_id")
    @classmethod
    def _integrator(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @model_validator(mode="after")
    def _beats_within_the_lease(self) -> Settings:
        if self.worker_heartbeat_seconds * 2 > self.worker_lease_seconds:
            raise ValueError(
                f"{ENV_PREFIX}WORKER_HEARTBEAT_SECONDS: must be at most half of "
                f"{ENV_PREFIX}WORKER_LEASE_SECONDS"
            )
        return self

    # --- derived ---------------------------------------------------------------------
    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL with any password masked, fit for logs and CLI output."""
        return redact_url(self.redis_url.get_secret_value())

    def clopos_credentials(self) -> dict[str, BrandCredentials]:
        """Credentials per brand, validated; raises SettingsError naming the variable."""
        if not self.clopos_integrator_id:
            raise SettingsError(f"{ENV_PREFIX}CLOPOS_INTEGRATOR_ID: not set")
        return load_credentials_file(self.clopos_credentials_file)


def load_credentials_file(path: Path | None) -> dict[str, BrandCredentials]:
    var = f"{ENV_PREFIX}CLOPOS_CREDENTIALS_FILE"
    if path is None:
        raise SettingsError(f"{var}: not set")
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{var}: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{var}: cannot read {path}: {exc.__class__.__name__}") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{var}: {path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(raw, dict) or not raw:
        raise SettingsError(f"{var}: {path} must be a non-empty JSON object keyed by brand")
    credentials: dict[str, BrandCredentials] = {}
    for brand, entry in raw.items():
        if not BRAND_PATTERN.fullmatch(brand):
            raise SettingsError(f"{var}: brand {brand[:70]!r} is not 1-64 chars of A-Za-z0-9_.-")
        try:
            credentials[brand] = BrandCredentials.model_validate(entry)
            register_secret(credentials[brand].client_secret.get_secret_value())
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "entry"
            raise SettingsError(f"{var}: brand {brand!r}: {field}: {first['msg']}") from None
    return credentials


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def load_settings() -> Settings:
    """Build Settings from the environment; one-line SettingsError on a bad value."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a check across settings: its message names the variables
            raise SettingsError(message) from None
        name = f"{ENV_PREFIX}{str(first['loc'][0]).upper()}"
        raise SettingsError(f"{name}: {message}") from None


@cache
def get_settings() -> Settings:
    return load_settings()
