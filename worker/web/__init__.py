"""The operator's web console, `fiscal-worker web` (docs/console.md).

app.py      the Starlette app: routes, login, roles, CSRF, security headers
auth.py     users and roles, password hashes, sessions in Redis, the login slow-down
data.py     what the pages show, read from Redis
render.py   untrusted text made inert for a page
templates/  Jinja2 pages (server-rendered), static/ one stylesheet and one small script
"""
