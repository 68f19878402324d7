# Prometheus from Debian's packages, for compose without an image registry: docker/compose.local.yaml builds it on
# the locally built base (docker/build-base.sh).
ARG BASE=diffuserve-base:bookworm
FROM ${BASE}
RUN apt-get update -q && apt-get install -y -q --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus /prometheus
USER prometheus
ENTRYPOINT ["prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
