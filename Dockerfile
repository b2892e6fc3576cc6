# rpl-cds under gunicorn, as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/rpl-cds-metrics

RUN groupadd --system rplcds && useradd --system --gid rplcds --home-dir /app --shell /usr/sbin/nologin rplcds
WORKDIR /app
COPY pyproject.toml README.md gunicorn.conf.py ./
COPY service ./service
COPY cards ./cards
COPY fhir_mappings ./fhir_mappings
RUN pip install . && mkdir -p /app/instance && chown -R rplcds:rplcds /app/instance

USER rplcds
EXPOSE 8080
ENV RPL_CDS_BIND=0.0.0.0:8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "service:create_app()"]
