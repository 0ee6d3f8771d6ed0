#!/usr/bin/env bash
# Run every test: set up (scripts/setup.sh), install Debian's chromium for the
# browser tests when it is missing, then the frontend unit tests (Vitest) and
# the whole pytest suite (unit, API, parity, end-to-end in headless Chromium).
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh

if [ ! -x /usr/bin/chromium ]; then
  echo "[test] installing Debian's chromium for the browser tests" >&2
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi

echo "[test] frontend unit tests (vitest)" >&2
(cd frontend && npx vitest run --reporter=dot)

echo "[test] pytest" >&2
exec .venv/bin/python -m pytest "$@"
