# fiscal-worker: one image for the worker, the metrics exporter, Flower and the console.
#
#   docker build -t fiscal-worker .                              # worker + Flower ([ops])
#   docker build -t fiscal-worker-demo --build-arg EXTRAS=ops,demo .   # + fake API, adapter sim
#
# The default command is the worker; the exporter, Flower and the console override it (compose,
# ops/k8s/). Not built in CI: no image registry is reachable there (ops/DEPLOY.md).

# The Python the test suite runs on; pin a digest (python:3.11-slim-bookworm@sha256:...) where
# a registry is reachable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtualenv with the locked dependencies and the package ---------------------
FROM ${PYTHON_IMAGE} AS builder

# Which extras of pyproject.toml go in: ops (Flower) by default, ops,demo for the demo stack.
ARG EXTRAS=ops

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/fiscal-worker
ENV PATH=/opt/fiscal-worker/bin:$PATH

WORKDIR /src
# What the package is built from (a regular, non-editable install), and the lock.
COPY requirements.lock pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks

# requirements.lock pins exact versions but carries no hashes, so pip cannot check any
# (--require-hashes needs one on every line): the versions are enforced with -c instead.
# Every locked package ships a wheel, so no compiler is needed here either.
RUN pip install --no-cache-dir -c requirements.lock ".[${EXTRAS}]" \
    && pip check

# --- runtime: the virtualenv on a clean base, no build tools, a non-root user -------------
FROM ${PYTHON_IMAGE} AS runtime

# A numeric user, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 fiscal \
    && useradd --system --uid 10001 --gid fiscal --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin fiscal

COPY --from=builder /opt/fiscal-worker /opt/fiscal-worker

ENV PATH=/opt/fiscal-worker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FISCAL_HEALTH_FILE=/tmp/fiscal-worker-health.json

# Nothing is written outside /tmp (the health file): the root filesystem can be read-only.
WORKDIR /tmp
USER 10001:10001

# The worker's own probe: its loops made progress lately (worker/health.py). The exporter and
# Flower containers replace or disable it (docker-compose.yml); Kubernetes ignores it and
# runs the same command as its liveness probe.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "worker.health", "live"]

# Exec form: celery is PID 1 and gets SIGTERM itself (warm shutdown: running tasks finish).
ENTRYPOINT ["celery", "-A", "worker.app", "worker"]
CMD ["--loglevel", "INFO"]
