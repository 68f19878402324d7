# diffuserve. CPU image by default; the base is a build argument (docker/README.md):
#   --build-arg BASE=diffuserve-base:bookworm    a base built locally from Debian's packages (docker/build-base.sh),
#                                                for hosts without an image registry
#   --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime    GPUs (torch then comes from the base image)
# Python packages come from PyPI, or from a mirror: --build-arg PIP_INDEX_URL=...; wheels in docker/wheels/ are
# offered first (the CPU build of torch where download.pytorch.org is out of reach); CA certificates in
# docker/certs/ are trusted while building (a TLS-intercepting proxy's).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_INDEX_URL=${PIP_INDEX_URL}
RUN python3 -m venv /opt/venv --system-site-packages
ENV PATH=/opt/venv/bin:$PATH
COPY docker/wheels/ /wheels/
# A TLS-intercepting proxy's CA (docker/certs/*.crt) is trusted by pip in this stage only, beside pip's own bundle.
COPY docker/certs/ /certs/
RUN cat "$(python -c 'import pip._vendor.certifi as c; print(c.where())')" $(ls /certs/*.crt 2>/dev/null) \
    > /opt/build-ca.pem
ENV PIP_CERT=/opt/build-ca.pem
# torch first: the base image's if it has one, else a local CPU wheel, else the CPU index (plain PyPI would resolve
# to the multi-GB CUDA build). A local wheel's "+cpu" version sorts above PyPI's, so pip takes it.
RUN python -c "import torch" 2>/dev/null \
 || if ls /wheels/torch-*.whl >/dev/null 2>&1; then pip install --find-links /wheels "torch==2.13.0"; \
    else pip install --index-url "$TORCH_INDEX_URL" --extra-index-url "$PIP_INDEX_URL" "torch==2.13.0"; fi
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
COPY tools ./tools
RUN pip install --find-links /wheels .

FROM ${BASE} AS runtime
RUN useradd --create-home --uid 10001 diffuserve
COPY --from=build /opt/venv /opt/venv
COPY configs /app/configs
COPY models /app/models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 DIFFUSERVE_HOST=0.0.0.0 DIFFUSERVE_PORT=8000 \
    DIFFUSERVE_MODELS_DIR=/app/models
WORKDIR /app
USER diffuserve
EXPOSE 8000
# With no argument it serves the bundled tiny-text model; other model directories are mounted read-only,
# e.g. -v /models/LLaDA-8B-Instruct:/models/llada:ro and `docker run ... diffuserve /models/llada`.
# Healthy means ready: /ready is 200 once the model is loaded and warmed (until then the status stays "starting";
# failures count only after the start period, long enough for an 8B checkpoint), and 503 again while draining.
# Liveness alone (/health) is for orchestrators that restart on it (docker/k8s/deployment.yaml).
HEALTHCHECK --interval=5s --timeout=3s --start-period=600s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"
ENTRYPOINT ["diffuserve", "serve"]
