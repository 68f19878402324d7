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
# --test: also Debian's haproxy, which the load-balancer test runs in front of two replicas (best effort: without
# root or apt the test is skipped, and says so).
if [ "${1:-}" = "--test" ] && ! command -v haproxy >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q haproxy >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 &&
      apt-get install -y -q haproxy >/dev/null 2>&1; } || echo "note: could not install haproxy" >&2
  else
    echo "note: haproxy is not installed (needs root and apt-get); tests/test_deploy.py will skip its LB test" >&2
  fi
fi
