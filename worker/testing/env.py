"""The environment of the processes a harness starts (workers, the CLI): the caller's
environment without any FISCAL_* setting of its shell, plus the settings of the run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from worker.settings import ENV_PREFIX


def clean_env() -> dict[str, str]:
    """This process's environment without any FISCAL_* variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def worker_env(
    *,
    redis_url: str,
    clopos_url: str,
    integrator_id: str,
    credentials_file: Path,
    settings: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """`clean_env()` plus `settings` (full FISCAL_* names), then where Redis and the Clopos
    API are and the credentials file; unbuffered, since harnesses read the worker's log."""
    env = clean_env()
    env.update(settings or {})
    env.update(
        {
            f"{ENV_PREFIX}REDIS_URL": redis_url,
            f"{ENV_PREFIX}CLOPOS_BASE_URL": clopos_url,
            f"{ENV_PREFIX}CLOPOS_INTEGRATOR_ID": integrator_id,
            f"{ENV_PREFIX}CLOPOS_CREDENTIALS_FILE": str(credentials_file),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def write_credentials(path: Path, brands: Mapping[str, tuple[str, str]]) -> Path:
    """The credentials file (0600): {brand: {"client_id", "client_secret"}} from
    {brand: (client_id, client_secret)}; returns `path`."""
    doc = {b: {"client_id": cid, "client_secret": s} for b, (cid, s) in brands.items()}
    path.touch(mode=0o600)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path
