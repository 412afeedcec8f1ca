"""The one way to get a Redis client: `redis_client(settings)`.

Clients are cached per (URL, process id), so a forked process (a Celery prefork child)
builds its own connection pool instead of sharing its parent's sockets.
"""

from __future__ import annotations

import os
import threading

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from worker.logs import register_secret
from worker.settings import ENV_PREFIX, Settings, SettingsError, get_settings

SOCKET_TIMEOUT_SECONDS = 5.0  # a command that takes longer is a failure, not a hang
CONNECT_TIMEOUT_SECONDS = 3.0  # an unreachable Redis is reported within seconds
HEALTH_CHECK_INTERVAL_SECONDS = 30  # ping idle pooled connections before reusing them
CONNECT_RETRIES = 3  # reconnect attempts on a dropped connection, with jittered backoff
RETRY_BACKOFF_CAP_SECONDS = 1.0
RETRY_BACKOFF_BASE_SECONDS = 0.1

_clients: dict[tuple[str, int, bool], redis.Redis] = {}
_clients_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A prefork child is forked while a service thread may hold the lock: it gets a fresh one.
    global _clients_lock
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


class RedisUnavailable(Exception):
    """Redis cannot be reached or refused us; str() is one line with the password masked."""

    @classmethod
    def from_error(cls, exc: redis.exceptions.RedisError, settings: Settings) -> RedisUnavailable:
        return cls(describe_redis_error(exc, settings))


def redis_client(settings: Settings | None = None, *, decode_responses: bool = True) -> redis.Redis:
    """The process's client for `settings.redis_url` (decode_responses=True unless asked).

    Raises SettingsError if the URL cannot be parsed. Connecting is lazy: an unreachable
    Redis shows up as redis.exceptions.ConnectionError on the first command.
    """
    settings = settings or get_settings()
    url = settings.redis_url.get_secret_value()
    key = (url, os.getpid(), decode_responses)
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            try:
                client = redis.Redis.from_url(
                    url,
                    decode_responses=decode_responses,
                    socket_timeout=SOCKET_TIMEOUT_SECONDS,
                    socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
                    retry=Retry(
                        ExponentialWithJitterBackoff(
                            cap=RETRY_BACKOFF_CAP_SECONDS, base=RETRY_BACKOFF_BASE_SECONDS
                        ),
                        CONNECT_RETRIES,
                    ),
                )
            except ValueError:
                # redis-py's message may quote the URL, and with it the password.
                raise SettingsError(f"{ENV_PREFIX}REDIS_URL: not a valid Redis URL") from None
            register_secret(_password(settings))  # masked in every log line from now on
            _clients[key] = client
    return client


def describe_redis_error(exc: BaseException, settings: Settings) -> str:
    """One line for an operator: what went wrong with which Redis, password masked."""
    try:
        where = settings.redis_url_redacted
    except ValueError:
        where = "the configured Redis"
    kind = exc.__class__.__name__
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return f"Redis refused our credentials at {where} ({kind})"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"Redis unreachable at {where} ({kind})"
    detail = " ".join(str(exc).split())[:200]
    password = _password(settings)
    if password:
        detail = detail.replace(password, "***")
    return f"Redis error at {where} ({kind}: {detail})" if detail else f"Redis error at {where}"


def _password(settings: Settings) -> str | None:
    try:
        return redis.connection.parse_url(settings.redis_url.get_secret_value()).get("password")
    except ValueError:
        return None


def reset_clients() -> None:
    """Forget cached clients (tests; after changing FISCAL_REDIS_URL in-process)."""
    with _clients_lock:
        _clients.clear()


def maxmemory_policy(redis_client: redis.Redis) -> str | None:
    """Redis' maxmemory-policy, or None where it cannot be read (fakeredis; a managed Redis
    that answers neither CONFIG GET nor INFO memory with it)."""
    try:
        reply = redis_client.config_get("maxmemory-policy")
        value = reply.get("maxmemory-policy") if isinstance(reply, dict) else None
    except redis.ResponseError:  # CONFIG disabled or renamed (managed Redis)
        value = None
    if not value:
        try:
            value = redis_client.info("memory").get("maxmemory_policy")
        except redis.ResponseError:
            value = None
    if isinstance(value, bytes):
        value = value.decode()
    return str(value) if value else None


def is_evicting(policy: str | None) -> bool:
    """Whether Redis may delete keys on its own at maxmemory (allkeys-*, volatile-*): it would
    delete result records, fiscalised markers, locks and leases. Only noeviction is safe."""
    return policy is not None and policy != "noeviction"


def check_policy(redis_client: redis.Redis, *, allow_evicting: bool) -> str | None:
    """At a worker's start: raise EvictingRedis (one line) under an evicting policy unless
    the operator opted out with FISCAL_ALLOW_EVICTING_REDIS; returns the policy."""
    policy = maxmemory_policy(redis_client)
    if is_evicting(policy) and not allow_evicting:
        raise EvictingRedis(
            f"Redis maxmemory-policy is {policy}: it evicts result records, markers and leases "
            "at maxmemory; set it to noeviction (or FISCAL_ALLOW_EVICTING_REDIS=true to run "
            "anyway)"
        )
    return policy


class EvictingRedis(Exception):
    """Redis runs with an evicting maxmemory-policy; str() is one line for the operator."""
