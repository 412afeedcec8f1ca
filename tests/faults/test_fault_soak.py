"""A compressed production day: four brands fed continuously (one above its budget for a
while), receipts that appear late or close late, conflicts, unknown brands, 5xx and 429
bursts, a worker SIGKILL, a SIGTERM, a Redis restart and duplicates resent by the adapter.

    FISCAL_SOAK_SECONDS=600 .venv/bin/python -m pytest tests/faults -m soak   # a longer day
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
import redis
from faults.harness import DEADLINE_VARIABLE, alive, budget, env_seconds, percentile, until
from faults.ledger import FISCALISED
from integration.conftest import BRANDS
from support import closed, write_credentials

pytestmark = pytest.mark.soak

A, C, B3, B4 = "openapitest", "brand2", "brand3", "brand4"
MORE_BRANDS = {
    B3: ("client-brand3", "secret-brand3-0003"),
    B4: ("client-brand4", "secret-brand4-0004"),
}
GHOST = "ghost-brand"  # no credentials: unknown_brand
LIMIT, WINDOW = 20, 5.0  # the per-brand budget, fake and workers alike


def feed_times(segments: list[tuple[float, float, float]]) -> list[float]:
    """Send times for (start, end, results per second) segments."""
    times = []
    for start, end, rate in segments:
        n = int((end - start) * rate)
        times += [start + i / rate for i in range(n)]
    return sorted(times)


def test_fault_12_compressed_production_day(
    r, redis_server, fake, env, start_worker, ledger, tmp_path
):
    day = env_seconds("FISCAL_SOAK_SECONDS", 90.0)
    feed_end = 0.8 * day
    for brand, (cid, secret) in MORE_BRANDS.items():
        fake.add_brand(brand, cid, secret)
    creds = write_credentials(tmp_path / "creds-4.json", {**BRANDS, **MORE_BRANDS})
    env["FISCAL_CLOPOS_CREDENTIALS_FILE"] = str(creds)  # workers and CLI of this case
    env.pop(DEADLINE_VARIABLE)  # the deadline follows this case's retry windows
    window = str(max(90.0, day / 2))  # tens of seconds: every backlog drains within them
    settings = {
        **budget(fake, LIMIT, WINDOW),
        "FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS": window,
        "FISCAL_NOT_READY_RETRY_WINDOW_SECONDS": window,
        "FISCAL_BREAKER_MAX_COOLDOWN_SECONDS": "10",
    }
    workers = {"w1": start_worker("w1", concurrency=3, **settings)}
    workers["w2"] = start_worker("w2", concurrency=3, **settings)

    # --- the day's plan: every send, resend and fault at its time ---------------------------
    plan: list[tuple[float, str, Callable[[], None]]] = []
    sequence: dict[str, int] = defaultdict(int)
    sent_ready: set[str] = set()  # results whose receipt was ready when sent

    def result(brand: str, at: float) -> None:
        sequence[brand] += 1
        n = sequence[brand]
        rid = 1000 * (1 + len(sequence)) + n if brand == GHOST else n
        fiscal_id = f"{brand[:2].upper()}-{rid}"
        expect, prepare = FISCALISED, None
        if brand == GHOST:
            expect = "unknown_brand"
        elif n % 23 == 11:
            fake.add_receipt(brand, closed(rid, fiscal_id=f"OTHER-{rid}", lock=True))
            expect = "fiscal_id_conflict"
        else:
            fake.add_receipt(brand, closed(rid))
            if n % 17 == 5:
                delay = 4.0 + (n % 3) * 3

                def prepare(brand=brand, rid=rid, delay=delay) -> None:
                    fake.appear_after(brand, rid, delay)  # 404 at first
            elif n % 19 == 7:
                delay = 3.0 + (n % 3) * 3

                def prepare(brand=brand, rid=rid, delay=delay) -> None:
                    fake.close_after(brand, rid, delay)  # still open at first

        def send(brand=brand, rid=rid, fiscal_id=fiscal_id, expect=expect, prepare=prepare):
            if prepare is not None:
                prepare()
            else:
                sent_ready.add(f"{brand}:{rid}")
            retrying(lambda: ledger.send(r, brand, rid, fiscal_id, expect))

        plan.append((at, f"send {brand}:{rid}", send))
        if n % 13 == 3 and expect == FISCALISED:  # the adapter sends it again
            key = f"{brand}:{rid}"
            plan.append(
                (at + 3 + n % 6, f"resend {key}", lambda: retrying(lambda: ledger.resend(r, key)))
            )

    for at in feed_times([(0, 0.35 * day, 2.6), (0.35 * day, feed_end, 0.5)]):
        result(A, at)  # above its budget (1.9 results/s) for the first third
    for at in feed_times(
        [(0, 0.5 * day, 0.6), (0.5 * day, 0.6 * day, 2.5), (0.6 * day, feed_end, 0.6)]
    ):
        result(C, at)
    for brand in (B3, B4):
        for at in feed_times([(0, feed_end, 0.5)]):
            result(brand, at)
    for at in (0.1 * day, 0.4 * day, 0.75 * day):
        result(GHOST, at)

    events: dict[str, float] = {}

    def kill_w1() -> None:
        events["sigkill"] = time.time()
        workers["w1"].kill()
        ledger.kill(events["sigkill"])
        workers["w3"] = start_worker("w3", concurrency=3, **settings)

    def term_w2() -> None:
        events["sigterm"] = time.monotonic()
        assert workers["w2"].process is not None
        workers["w2"].process.send_signal(signal.SIGTERM)
        workers["w4"] = start_worker("w4", concurrency=3, **settings)

    def restart_redis() -> None:
        started = time.monotonic()
        redis_server.restart()
        events["redis_restart_s"] = time.monotonic() - started

    faults = [
        (0.20, "503 burst brand2", lambda: fake.fail_brand(C, 503, duration=4)),
        (0.25, "429 burst", lambda: fake.fail_brand(A, 429, count=3)),
        (0.30, "SIGKILL w1", kill_w1),
        (0.45, "500 burst brand3", lambda: fake.fail_brand(B3, 500, count=6)),
        (0.50, "SIGTERM w2", term_w2),
        (0.60, "others use brand4", lambda: fake.set_external_usage(B4, 10)),
        (0.65, "429 burst", lambda: fake.fail_brand(A, 429, count=3)),
        (0.70, "Redis restart", restart_redis),
        (0.72, "others stop", lambda: fake.set_external_usage(B4, 0)),
    ]
    plan += [(share * day, name, action) for share, name, action in faults]
    plan.sort(key=lambda item: item[0])

    # --- run it ----------------------------------------------------------------------------
    started = time.monotonic()
    for at, _name, action in plan:
        until(started + at)
        action()
        if "sigterm" in events and "sigterm_exit_s" not in events and not alive(workers["w2"]):
            events["sigterm_exit_s"] = time.monotonic() - events["sigterm"]
    fed = time.monotonic() - started
    settled = ledger.settle(timeout=max(90.0, 0.6 * day))
    drained = time.monotonic() - started
    if "sigterm_exit_s" not in events and not alive(workers["w2"]):
        events["sigterm_exit_s"] = float("nan")  # exited, moment not seen

    # --- figures -------------------------------------------------------------------------
    stats = fake.stats()
    latency: dict[str, list[float]] = defaultdict(list)
    ready_latency: dict[str, list[float]] = defaultdict(list)
    fiscalised: dict[str, int] = defaultdict(int)
    for key, sent in ledger.sent.items():
        times = stats["receipts"].get(key, {}).get("patched_at", [])
        if sent.expect == FISCALISED and times:
            fiscalised[sent.brand] += 1
            latency[sent.brand].append(times[0] - sent.sent_at[0])
            if key in sent_ready:
                ready_latency[sent.brand].append(times[0] - sent.sent_at[0])
    ledger.figure("day_s", day)
    ledger.figure("fed_s", fed)
    ledger.figure("drained_s", drained)
    for brand in (A, C, B3, B4):
        lat, ready = latency[brand], ready_latency[brand]
        calls = stats["requests"].get(brand, 0) + stats["auth_calls"].get(brand, 0)
        wasted = (calls - 2 * fiscalised[brand]) / max(1, fiscalised[brand])
        ledger.figure(
            f"{brand}",
            f"n={fiscalised[brand]} p50={percentile(lat, 50):.1f}s p99={percentile(lat, 99):.1f}s"
            f" (ready at send: p50={percentile(ready, 50):.1f}s p99={percentile(ready, 99):.1f}s)"
            f" wasted_calls/result={wasted:.2f}",
        )
    total_calls = sum(stats["requests"].values()) + sum(stats["auth_calls"].values())
    total_fiscalised = sum(fiscalised.values())
    answered_429 = sum(1 for entry in stats["request_log"] if entry[4] == 429)
    ledger.figure("429s_budget (fake rate_limited)", sum(stats["rate_limited"].values()))
    ledger.figure("429s_answered (incl. injected)", answered_429)
    ledger.figure(
        "wasted_calls_per_result", (total_calls - 2 * total_fiscalised) / max(1, total_fiscalised)
    )
    for name in ("redis_restart_s", "sigterm_exit_s"):
        if name in events:
            ledger.figure(name, events[name])

    ledger.check(settled)
    assert alive(workers["w3"]) and alive(workers["w4"]), "a worker died during the day"
    assert not alive(workers["w2"]), "the SIGTERM'd worker never exited"
    logs = "".join(w.log() for w in workers.values())
    assert "Unrecoverable error" not in logs


def retrying(send: Callable[[], object], timeout: float = 30.0) -> None:
    """An adapter retries its XADD while Redis is away (restart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            send()
            return
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
