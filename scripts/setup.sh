#!/usr/bin/env bash
# Create .venv and install diffuserve with its test extras (`--test`: and what the tests run beside it). Idempotent: a second run installs nothing new.
# torch is installed first and pinned, so that a machine without a GPU gets the CPU build (about 200 MB) instead
# of the multi-GB CUDA build that plain `pip install torch` resolves to on Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" install "torch==2.13.0"
  else
    # The CPU index is tried beside PyPI; where it is unreachable pip falls back to what PyPI or local wheels hold.
    "${PIP[@]}" install --retries 1 --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
  fi
fi
"${PIP[@]}" install -e ".[test]"
# --test: also what the tests run beside the server, from Debian's packages: haproxy (the load-balancer test runs it
# in front of two replicas), docker.io and debootstrap (the image test builds a base and the image, and starts a
# daemon if none runs), chromium (the playground test drives it through Playwright). Best effort: without root or
# apt those tests are skipped, and say so.
if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 &&
        apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } || echo "note: could not install ${missing[*]}" >&2
    else
      echo "note: ${missing[*]} not installed (needs root and apt-get); the tests that use them will skip" >&2
    fi
  fi
fi
