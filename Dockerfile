# One image for every role: seed (DHT) node, exchange replica, trader node.
#   docker build -t p2pex .
#   docker run --rm -p 7001:7001 -p 7001:7001/udp -v p2pex-data:/data p2pex
# Configuration is the P2PEX_* environment of `python cli.py node` (see cli.py).
# tests/test_image_build.py builds it without Docker (context, COPY, RUN, CMD, HEALTHCHECK);
# it refuses instructions tests/dockerbuild.py does not model.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md cli.py ./
COPY client ./client
COPY crdt ./crdt
COPY matching ./matching
COPY net ./net
RUN pip install . && rm -rf build *.egg-info \
    && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home --shell /usr/sbin/nologin p2pex \
    && mkdir /data && chown p2pex:p2pex /data

# Bind every interface inside the container; peers dial the name in
# P2PEX_ADVERTISE (e.g. the compose service name), never 0.0.0.0.
ENV P2PEX_HOST=0.0.0.0 P2PEX_PORT=7001 P2PEX_DATA_DIR=/data
USER p2pex
# HTTP (client and peer API) on TCP, the DHT on UDP, same number
EXPOSE 7001/tcp 7001/udp

# slim has no curl: probe /healthz with the standard library
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=5 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('P2PEX_PORT', '7001'), timeout=3)"]

# SIGTERM (docker stop) shuts the node down cleanly
CMD ["python", "cli.py", "node"]
