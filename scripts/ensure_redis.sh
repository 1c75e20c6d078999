#!/usr/bin/env sh
# Make sure `redis-server` is on PATH for the backend tests and benchmarks (which start their
# own instance on a free loopback port). Installs it from apt only when it is missing.
set -eu
if command -v redis-server >/dev/null 2>&1; then
    redis-server --version
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
# The package may start a system service; the tests never use it (they start their own).
redis-server --version
