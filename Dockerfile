# bitrix24-exporter container image.
#   docker build -t bitrix24-exporter .
#   docker run -p 9877:9877 -v ./config.yaml:/etc/bitrix24-exporter/config.yaml:ro \
#     -e ACME_WEBHOOK=https://acme.bitrix24.com/rest/1/<secret>/ bitrix24-exporter
# Secrets: reference environment variables from the config (webhook: ${ACME_WEBHOOK}) or
# mount files and use webhook_file / client_secret_file (e.g. /run/secrets/acme-webhook).
# OAuth state_file needs a writable volume at /var/lib/bitrix24-exporter.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: install the package and its dependencies into a venv ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN /opt/venv/bin/pip install --no-cache-dir .

# --- runtime: the venv only, no build tools, non-root ----------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin exporter \
    && mkdir -p /etc/bitrix24-exporter /var/lib/bitrix24-exporter \
    && chown exporter:exporter /var/lib/bitrix24-exporter
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BITRIX24_EXPORTER_HEALTHCHECK_URL=http://127.0.0.1:9877/healthz
USER 10001:10001
WORKDIR /var/lib/bitrix24-exporter
EXPOSE 9877
# The slim image has no curl. Change BITRIX24_EXPORTER_HEALTHCHECK_URL along with
# --listen-address; with TLS or basic auth see docs/web-config.md#health-checks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['BITRIX24_EXPORTER_HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["bitrix24-exporter"]
CMD ["--config", "/etc/bitrix24-exporter/config.yaml"]
