#!/usr/bin/env bash
# Build a Debian bookworm base image without a container registry: debootstrap a minimal root
# file system (python3, venv, git) and `docker import` it. Local builds pass it as BASE_IMAGE;
# production builds use CUDA images from a registry instead.
#
#   infra/make_base_image.sh [IMAGE_NAME]        (default livethinking/debian-base:bookworm)
#
# Needs root, debootstrap and a running Docker engine. MIRROR overrides the Debian mirror
# (default: the first one apt is configured with here).
set -euo pipefail

NAME="${1:-livethinking/debian-base:bookworm}"
SUITE=bookworm
if [[ -z "${MIRROR:-}" ]]; then
  MIRROR="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "no Docker engine: start dockerd first" >&2; exit 1; }

ROOTFS="$(mktemp -d /tmp/rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

echo "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3-minimal,python3-venv,ca-certificates,git \
  "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null

# Where HTTPS passes a TLS-inspecting proxy, its CA (installed on this host as an extra
# certificate) must be trusted inside builds too, or pip cannot reach the package index.
shopt -s nullglob
extra=(/usr/local/share/ca-certificates/*.crt)
if (( ${#extra[@]} )); then
  cp "${extra[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" update-ca-certificates >/dev/null
fi

# Nothing of apt's download state belongs in an image.
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin

tar -C "$ROOTFS" --numeric-owner -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["/bin/bash"]' \
  - "$NAME" >/dev/null
echo "$NAME: $(docker image inspect --format '{{.Size}}' "$NAME" | awk '{printf "%.0f MB", $1/1e6}')"
