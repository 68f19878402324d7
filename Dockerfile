# diffuserve: CPU image by default; `--build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime` builds on a
# CUDA PyTorch base for GPUs (torch is then taken from the base image, not reinstalled).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv --system-site-packages
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index unless the base image already has it.
RUN python -c "import torch" 2>/dev/null || \
    pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
COPY tools ./tools
RUN pip install .

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
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"
ENTRYPOINT ["diffuserve", "serve"]
