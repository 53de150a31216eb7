#!/bin/bash
# docker-engine.sh: make sure a Docker engine answers, for `make images` on a machine that has none running
# (this project's CI machines: root, Debian bookworm, no systemd service). Idempotent: returns at once when
# `docker info` works. Otherwise installs Debian's docker.io if dockerd is missing and starts dockerd in the
# background with its own bridge and iptables rules off (builds use --network host; the realnode kit owns the
# host's iptables chains while it runs). Its log: $DOCKERD_LOG (default /var/tmp/dockerd.log); when it starts
# one, its PID is the last line of stdout (the node tests stop it again at the end).
set -euo pipefail
docker info >/dev/null 2>&1 && exit 0
[ "$(id -u)" = 0 ] || { echo "docker-engine.sh: no Docker engine answers; starting one needs root" >&2; exit 1; }
if ! command -v dockerd >/dev/null; then
  echo "docker-engine.sh: installing docker.io" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
log=${DOCKERD_LOG:-/var/tmp/dockerd.log}
setsid dockerd --bridge=none --iptables=false --ip-masq=false >"$log" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && { echo "docker-engine.sh: dockerd ready (log: $log)" >&2; echo "$pid"; exit 0; }
  sleep 1
done
tail -n 20 "$log" >&2
echo "docker-engine.sh: dockerd did not answer within 60 s" >&2
exit 1
