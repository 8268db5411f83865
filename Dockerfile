# lpnet's image: the `lpnet` CLI (serve, worker, db, agent, ...) on Python 3.11, CPU-only torch.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch and torchvision first, from the CPU wheel index: the largest layer, rebuilt only when the pins
# change. They are the pins of pyproject.toml (other pairs break torchvision's operators).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

# Editable install with the server extra (the agent's included): `lpnet db upgrade` finds alembic.ini
# and migrations/ next to the package.
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY lpnet ./lpnet
COPY profiler ./profiler
COPY service ./service
RUN pip install -e '.[server]' \
    && useradd --create-home --uid 10001 lpnet \
    && mkdir -p /data /var/lib/lpnet-agent \
    && chown lpnet:lpnet /data /var/lib/lpnet-agent

USER lpnet
ENV LPNET_DATA_DIR=/data
EXPOSE 8000
CMD ["lpnet", "serve"]
