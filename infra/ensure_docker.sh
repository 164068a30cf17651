#!/usr/bin/env bash
# Make sure a Docker engine answers here, for the docker tests (`make test` calls this):
# install docker.io and debootstrap from Debian when they are missing, start dockerd (overlay2)
# when it is not running. Idempotent: a second call finds the engine up and returns at once.
# Exits 1 naming the reason when it cannot (not root, no apt-get, dockerd does not start);
# the docker tests then skip or fail with that reason.
#
#   infra/ensure_docker.sh        # dockerd's log: DOCKERD_LOG (default /var/log/dockerd.log)
set -euo pipefail

LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"

engine_up() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

if engine_up && command -v debootstrap >/dev/null; then
  exit 0
fi
if (( EUID != 0 )); then
  echo "ensure_docker: no Docker engine (or no debootstrap) and not root, so neither can be installed or started" >&2
  exit 1
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if (( ${#missing[@]} )); then
  command -v apt-get >/dev/null || { echo "ensure_docker: ${missing[*]} missing and no apt-get to install them" >&2; exit 1; }
  echo "ensure_docker: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! engine_up; then
  echo "ensure_docker: starting dockerd (log: $LOG)"
  # Its own session: the daemon outlives this script and the test run that called it.
  setsid dockerd --storage-driver overlay2 >>"$LOG" 2>&1 < /dev/null &
  for _ in $(seq 60); do
    engine_up && break
    sleep 0.5
  done
  if ! engine_up; then
    echo "ensure_docker: dockerd did not answer within 30 s; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
fi
echo "ensure_docker: Docker $(docker version --format '{{.Server.Version}}') is up"
