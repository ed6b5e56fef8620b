#!/usr/bin/env bash
# install-deps.sh: installs the Debian 12 packages evictd needs to build, test and run (no-op when all are present).
set -euo pipefail

PACKAGES=(
    build-essential cmake pkg-config
    libuv1-dev libpq-dev libhiredis-dev libjansson-dev libcmocka-dev
    postgresql redis-server
    python3 python3-psycopg2 python3-redis
    python3-yaml systemd   # tests/deploy: parse the YAML files, systemd-analyze verify the unit
    curl procps
    clang-format           # tests: the tree stays formatted (style/clang_format)
)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: all ${#PACKAGES[@]} packages already installed"
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"
