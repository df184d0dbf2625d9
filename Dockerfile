# syntax=docker/dockerfile:1
# One image for the five mdp services; the command picks the service:
#   docker run --rm -e MDP_NATS_URL=nats://nats:4222 mdp:local mdp service router
# docker-compose.yml builds it and runs each service from it.

# --- build: a virtualenv with the project and its dependencies ------------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that editing the code does not reinstall
# them: install the project once with empty packages (this layer changes only with
# pyproject.toml and constraints.txt), then again below with the real code.
COPY pyproject.toml constraints.txt ./
# Versions pinned by constraints.txt (the ones CI tests: scripts/freeze_constraints.sh).
RUN mkdir -p mdp/shared mdp/services \
    && touch README.md mdp/shared/__init__.py mdp/services/__init__.py mdp/__init__.py \
    && pip install -c constraints.txt '.[ibkr,tracing]' \
    && pip uninstall -y mdp

COPY README.md ./
COPY mdp ./mdp
# --no-deps: they are all in the layer above already. The ibkr adapter's client (ib_async,
# from the extra) and OpenTelemetry (the tracing extra, off unless MDP_TRACING__ENABLED) must
# import in the image.
# hadolint ignore=DL3013
RUN pip install --no-deps '.[ibkr,tracing]' && mdp service --help >/dev/null \
    && python -c "import ib_async, mdp.services.provider.adapters.ibkr.adapter, opentelemetry.sdk"

# --- runtime: the virtualenv, the configuration files, a non-root user ----------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MDP_CONFIG_DIR=/app/configs \
    MDP_DATA_DIR=/app/var \
    MDP_METRICS_PORT=9100

RUN groupadd --system --gid 10001 mdp \
    && useradd --system --uid 10001 --gid mdp --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin mdp \
    && mkdir -p /app/var \
    && chown mdp:mdp /app/var

COPY --from=build /opt/venv /opt/venv
# data_providers.yaml and ingestion_policy.yaml (override keys with MDP_POLICY__* and
# MDP_PROVIDERS__*, or mount another directory on /app/configs).
COPY mdp/configs /app/configs

WORKDIR /app
# Numeric, so that a runtime can verify it is not root (Kubernetes runAsNonRoot).
USER 10001:10001

# Prometheus /metrics (MDP_METRICS_PORT; docker-compose.yml gives each service its own).
EXPOSE 9100

# Alive as long as /metrics answers (it is served from the start of the process).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['MDP_METRICS_PORT'], timeout=2)"]

# The service to run is the last argument: provider, router, aggregator, store or control.
CMD ["mdp", "service", "control"]
