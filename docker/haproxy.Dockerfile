# HAProxy from Debian's packages (2.6 in bookworm, the version tests/test_deploy.py runs), for compose without an
# image registry: docker/compose.local.yaml builds it on the locally built base (docker/build-base.sh).
ARG BASE=diffuserve-base:bookworm
FROM ${BASE}
RUN apt-get update -q && apt-get install -y -q --no-install-recommends haproxy && rm -rf /var/lib/apt/lists/*
USER haproxy
ENTRYPOINT ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
