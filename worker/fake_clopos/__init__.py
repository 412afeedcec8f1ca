"""A faithful fake of the Clopos Open API v2 (auth, GET and PATCH receipt) over real HTTP.

Starlette + uvicorn (the `demo` extra), no hand-written HTTP. Used in-process by tests
(`FakeClopos().start()` on a free port), by the demo and benchmarks, and standalone
(`serve()`, behind `fiscal-worker fake-clopos`). The behaviour follows the Clopos Open API
v2 docs; everything a test in another OS process needs to drive or observe is also
reachable over `/_fake/...`.

    model.py  the state and behaviour (brands, receipts, tokens, limits, faults, stats);
              the choices where the real API is silent, and the seed format
    app.py    the Starlette app: these routes over a model
    serving.py running it: `FakeClopos` (a model served from a thread), `serve()`

Routes (the base URL returned by `start()` is the API root):
    POST  /v2/auth                      token for (client_id, client_secret, brand, integrator_id)
    GET   /v2/receipts/{id}             x-token required; optional x-venue overrides the venue
    PATCH /v2/receipts/{id}             fiscal_id / lock / order_status / order_number only
    GET   /_fake/stats                  same JSON as `stats()`
    POST  /_fake/reset-stats, /_fake/reset-faults
    POST  /_fake/brands                 {"brand", "client_id", "client_secret", ...} -> add_brand
    POST  /_fake/receipts               {"brand": ..., "receipt": {...}} -> add or replace
    GET   /_fake/receipts/{brand}/{id}  stored copy (ignores venue and appear_after)
    POST  /_fake/faults                 {"kind": <kind>, ...keyword arguments of the method}
        kinds: fail_next, success_false, latency (set_latency), slow_next, appear_after,
        close_after, fail_brand, reject_auth, revoke_tokens, external_usage
        (set_external_usage)
    Control endpoints answer {"success": true, "data": ...} or 400 {"success": false,
    "error": "bad_request", "message": ...}; they bypass latency, limits and stats.
"""

from __future__ import annotations

from worker.fake_clopos.model import CloposModel, default_seed
from worker.fake_clopos.serving import FakeClopos, serve

__all__ = ["CloposModel", "FakeClopos", "default_seed", "serve"]
