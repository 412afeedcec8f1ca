"""`fiscal-worker web`: the operator's console; `fiscal-worker web-user`: its users file."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from worker.cli._root import _fail, _redis, _settings, cli
from worker.web.auth import ROLES, hash_password, load_users, read_users_file, valid_name

DEFAULT_PORT = 9810
MIN_PASSWORD_CHARS = 8


@cli.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
    help="Port to listen on.",
)  # fmt: skip
@click.option(
    "--no-auth", is_flag=True,
    help="No login: everyone is an operator. Only with a loopback --host.",
)  # fmt: skip
def web(host: str, port: int, no_auth: bool) -> None:
    """The operator's web console: overview, dead letters, receipts, brands.

    Needs FISCAL_WEB_USERS_FILE (made with `fiscal-worker web-user`) or FISCAL_WEB_PASSWORD
    (one operator, `admin`), unless --no-auth on loopback.
    """
    import uvicorn

    from worker.web.app import create_app, is_loopback

    settings = _settings()
    users = load_users(settings)
    if no_auth:
        if not is_loopback(host):
            _fail(f"--no-auth binds to loopback only (127.0.0.1, ::1), not {host}", code=2)
        if users is not None:
            _fail("--no-auth with FISCAL_WEB_USERS_FILE or FISCAL_WEB_PASSWORD set", code=2)
    elif users is None:
        _fail(
            "the console needs credentials: set FISCAL_WEB_USERS_FILE (fiscal-worker web-user) "
            "or FISCAL_WEB_PASSWORD, or pass --no-auth with a loopback --host"
        )
    redis_client = _redis()
    redis_client.ping()  # unreachable Redis: one line and exit 1, before listening
    app = create_app(settings, redis_client, users)
    who = "no login (loopback only)" if users is None else f"{len(users)} user(s)"
    click.echo(f"fiscal-worker console on http://{_url_host(host)}:{port}/ ({who})", err=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        proxy_headers=True,
        forwarded_allow_ips=settings.web_forwarded_allow_ips,
        access_log=False,
        log_level="warning",
        server_header=False,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@cli.command("web-user")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default="viewer", show_default=True)
@click.option(
    "--file", "path", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="The users file (FISCAL_WEB_USERS_FILE); created if missing.",
)  # fmt: skip
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--delete", is_flag=True, help="Remove the user instead.")
def web_user(name: str, role: str, path: Path, password_stdin: bool, delete: bool) -> None:
    """Add, change or remove a console user in a users file (hashed passwords only)."""
    if not valid_name(name):
        raise click.BadParameter("1-64 printable characters, no outer spaces", param_hint="NAME")
    users: dict[str, dict[str, str]] = {}
    if path.exists():
        users = {u.name: {"password_hash": u.password_hash, "role": u.role}
                 for u in read_users_file(path).values()}  # fmt: skip
    if delete:
        if users.pop(name, None) is None:
            _fail(f"no user {name} in {path}")
        if not users:
            _fail("refusing to remove the last user (the console would not start)")
        _write_users(path, users)
        click.echo(f"removed {name} from {path}")
        return
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD_CHARS:
        _fail(f"the password must be at least {MIN_PASSWORD_CHARS} characters")
    users[name] = {"password_hash": hash_password(password), "role": role}
    _write_users(path, users)
    click.echo(f"{name} ({role}) written to {path}")


def _write_users(path: Path, users: dict[str, dict[str, str]]) -> None:
    """Replace the file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".users-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(users, out, indent=2, sort_keys=True)
            out.write("\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
