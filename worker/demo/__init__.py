"""`fiscal-worker demo`: the whole system on one machine, nothing installed, in under a minute.

What runs, all started here and all stopped on any exit (normal, error, Ctrl-C, SIGTERM):
    embedded Redis  a private, password-protected `redis-server` on a free port in a temp
                    dir; where none is installed, fakeredis's TCP server in a thread
    fake Clopos     worker.fake_clopos in this process, seeded with every kind of receipt
    worker          a real `celery -A worker.app worker` subprocess in its own process group
    adapter         threads writing ~200 results to the ingest stream over a few seconds:
                    duplicates (some at once, some later), an unknown brand, malformed entries
Then it waits until every result is settled, prints what happened with an exactly-once
check, and shows the dead-letter store through the real CLI. Exit status 0 when every
result was settled as planned and the check passed, 1 otherwise.

    plan.py    what is sent when, and what each send must end as (pure: `build_plan`)
    run.py     the imperative shell: the processes, the adapter, waiting (`run_demo`)
    report.py  the progress lines, the checks and the summary

Needs the `demo` extra: without starlette and uvicorn importing this package fails (the
fake API is imported at once); fakeredis is imported only when it is the broker.
"""

from __future__ import annotations

from worker.demo.run import run_demo

__all__ = ["run_demo"]
