#!/usr/bin/env sh
# Make sure `redis-server` (and `redis-cli`, which builds the test Redis Cluster) are on PATH for
# the backend tests and benchmarks (which start their own instances on free loopback ports).
# Installs them from apt only when missing.
set -eu
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    redis-server --version
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server redis-tools
# The package may start a system service; the tests never use it (they start their own).
redis-server --version
