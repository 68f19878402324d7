#!/usr/bin/env bash
# Build the image's base locally from Debian's packages, for hosts that reach a Debian mirror but no image
# registry (air-gapped, or a registry mirror not yet set up): debootstrap a minimal Debian bookworm with Python 3.11
# and import it as a Docker image. Needs root, debootstrap and a Docker daemon; takes about a minute.
#   docker/build-base.sh                      # -> diffuserve-base:bookworm
#   docker build --network host --build-arg BASE=diffuserve-base:bookworm -t diffuserve .
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian), or a first argument naming the tag.
set -euo pipefail
TAG="${1:-diffuserve-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOT="$(mktemp -d)"
trap 'rm -rf "$ROOT"' EXIT
echo "debootstrap bookworm from $MIRROR into $ROOT" >&2
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
  bookworm "$ROOT" "$MIRROR" >&2
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
echo "importing as $TAG" >&2
tar -C "$ROOT" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - "$TAG" >/dev/null
echo "$TAG"
