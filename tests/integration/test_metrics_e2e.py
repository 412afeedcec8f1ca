"""The exporter scraped over HTTP during a real run (real worker processes, the fake Clopos
over HTTP): the figures move. And the liveness probe of a real worker: a frozen worker
process fails it, a thawed one passes again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT, closed, free_port, wait_finished, wait_for, xadd

from worker.ingest_format import to_rfc3339

B = "openapitest"


@pytest.fixture
def exporter(env, tmp_path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "exporter.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "metrics", "--serve", str(port), "--host",
         "127.0.0.1"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=30, what="exporter serving")
    yield url
    process.terminate()
    process.wait(10)
    log.close()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def get(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_exporter_shows_the_figures_moving_during_a_real_run(r, fake, start_worker, exporter):
    start_worker(concurrency=2)
    before = scrape(exporter)
    assert get(before, "fiscal_results_ingested_total") == 0
    assert get(before, "fiscal_workers_alive") >= 1

    for receipt_id in range(301, 306):
        fake.add_receipt(B, closed(receipt_id))
        xadd(r, {"receipt_id": receipt_id, "brand": B, "fiscal_id": f"F-{receipt_id}",
                 "printed_at": to_rfc3339()})  # fmt: skip
    xadd(r, {"receipt_id": 399, "brand": "nobody", "fiscal_id": "F-399"})
    wait_finished(r)

    def patched() -> dict | None:
        samples = scrape(exporter)
        return (
            samples if get(samples, "fiscal_results_fiscalised_total", how="patched") == 5 else None
        )

    after = wait_for(patched, timeout=20, what="five fiscalised in the scrape")
    assert get(after, "fiscal_results_ingested_total") == 6
    assert get(after, "fiscal_results_dead_lettered_total", reason="unknown_brand") == 1
    assert get(after, "fiscal_dead_letters", reason="unknown_brand") == 1
    assert get(after, "fiscal_api_calls_total", endpoint="get_receipt", status="200") == 5
    assert get(after, "fiscal_api_calls_total", endpoint="patch_receipt", status="200") == 5
    assert get(after, "fiscal_api_calls_total", endpoint="auth", status="200") >= 1
    assert get(after, "fiscal_token_refreshes_total", outcome="ok") >= 1
    for since in ("stream", "printed"):
        assert get(after, "fiscal_e2e_latency_seconds_count", since=since) == 5
        assert get(after, "fiscal_e2e_latency_seconds_bucket", since=since, le="30.0") == 5
    assert get(after, "fiscal_results_unfinished") == 0
    assert get(after, "fiscal_brand_circuit_open", brand=B) == 0  # the brand is registered
    assert get(after, "fiscal_exporter_collect_seconds") < 1


def probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.health", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_a_frozen_worker_fails_its_liveness_probe_and_a_thawed_one_passes(
    env, start_worker, tmp_path: Path
):
    health_file = str(tmp_path / "health.json")
    worker = start_worker(FISCAL_HEALTH_FILE=health_file)
    probe_env = {**env, "FISCAL_HEALTH_FILE": health_file}

    def passes(*args: str) -> bool:
        return probe(probe_env, *args).returncode == 0

    wait_for(lambda: passes("ready"), timeout=20, what="the worker ready")

    def marked() -> set[str] | None:
        marks = set(json.loads(Path(health_file).read_text())["marks"])
        return marks if "consumer" in marks else None  # Celery's loop starts last

    marks = wait_for(marked, timeout=20, what="Celery's event loop marked")
    assert marks == {"ingest", "dispatch", "heartbeat", "sweep", "consumer"}

    # 15 s: above the slowest loop's interval (the sweep, 10 s), so only a hang fails it
    assert passes("live", "--within", "15")
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSTOP)  # hung: the process lives, nothing moves
    try:
        wait_for(lambda: not passes("live", "--within", "15"), timeout=40, what="probe fails")
        failed = probe(probe_env, "live", "--within", "15")
        assert failed.returncode == 1 and failed.stderr.startswith("not live:")
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    wait_for(lambda: passes("live", "--within", "15"), timeout=20, what="probe passes again")


def test_a_redis_outage_longer_than_the_liveness_bound_does_not_fail_liveness(
    env, redis_server, start_worker, tmp_path: Path
):
    health_file = str(tmp_path / "health.json")
    start_worker(FISCAL_HEALTH_FILE=health_file)
    probe_env = {**env, "FISCAL_HEALTH_FILE": health_file}

    def doc() -> dict:
        return json.loads(Path(health_file).read_text())

    wait_for(lambda: "consumer" in doc()["marks"], timeout=20, what="Celery's loop marked")
    redis_server.stop()
    try:
        # Celery's consumer waits in its reconnect loop: unmarked for longer than the bound
        def consumer_stale() -> bool:
            current = doc()
            return current["written"] - current["marks"]["consumer"] > 16

        wait_for(consumer_stale, timeout=40, what="the consumer unmarked for 16 s")
        # 15 s: above the sweep loop's 10 s interval, below the consumer's silence
        outage = probe(probe_env, "live", "--within", "15")
        assert outage.returncode == 0, outage.stderr
    finally:
        redis_server.start()
    wait_for(
        lambda: probe(probe_env, "ready", "--within", "15").returncode == 0,
        timeout=60,
        what="ready again once Redis is back",
    )
