"""fiscal-worker: puts every fiscal-device result on its Clopos receipt, exactly once in effect.

The core, in the order a result travels (flat modules):

    ingest_format  the stream entry: its rules, parse_entry(), submit() for Python adapters
    ingest         the consumer group: validate, record, acknowledge; bad entries dead-lettered
    store          the result's record and its place in the schedule: leases, fences, admission
    dispatcher     due results into the Celery queue, within its bound and the rate budget
    pipeline       one run of one result: lock, GET, decide, PATCH, finish / park / dead-letter
    decide         the pure table: what to send, given the receipt
    clopos/        the API: wire (HTTP, classify), auth (/v2/auth), tokens (shared), client

The policies it obeys: retry (backoff, windows), ratelimit (the shared per-brand budget),
breaker (circuit per brand, failed-call guard), idempotency (receipt lock, fiscalised marker).
What operators read: dlq (the dead-letter store), audit (per-receipt record), status, metrics
(the exporter; every process counts into Redis through telemetry), health (the liveness and
readiness probe); upgrade moves the keys of an older version's layout.
The frame: app (the Celery app, `worker.app:app`), service (ingest, dispatch and heartbeat
threads beside the pool), runtime (per-process objects), settings, keys (every Redis key),
scripts/ (every Lua script), errors, logs, redis_conn. The task is `tasks/fiscalise.py`.

Tooling, apart from the core and never imported by it: cli/ (the `fiscal-worker` command),
fake_clopos/ and demo/ (the `[demo]` extra), testing/ (the process harness of the tests,
benchmarks and demo). The public interface is written down in docs/interface.md.
"""
