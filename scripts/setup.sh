#!/usr/bin/env bash
# Set up everything trimask needs, from nothing: .venv with PyTorch (CPU
# build 2.13.0 first, so nothing pulls CUDA wheels), the package and its test
# extra, the npm packages and the frontend build. Idempotent: each step is
# skipped when the inputs it depends on have not changed since it last ran.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf '[setup] %s\n' "$*" >&2; }
stamp_dir=.venv/.trimask-stamps

fingerprint() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

if [ ! -x .venv/bin/python ]; then
  command -v python3 >/dev/null || { echo "setup: python3 (3.11 or newer) is required" >&2; exit 1; }
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup: Python 3.11 or newer is required, found $(python3 --version)" >&2; exit 1; }
  say "creating .venv"
  python3 -m venv .venv
fi
mkdir -p "$stamp_dir"

py_fp=$(fingerprint pyproject.toml)
if [ "$(cat "$stamp_dir/python" 2>/dev/null)" != "$py_fp" ]; then
  say "installing Python packages (torch==2.13.0 first)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  # The official implementation, used only as the reference in parity tests;
  # --no-deps because its dependencies would pull torchvision.
  .venv/bin/python -m pip install -q --no-deps "segment-anything==1.0"
  echo "$py_fp" > "$stamp_dir/python"
fi

if [ "${TRIMASK_SKIP_FRONTEND:-0}" != 1 ]; then
  command -v npm >/dev/null || { echo "setup: Node.js 20+ with npm is required to build the frontend" >&2; exit 1; }
  npm_fp=$(fingerprint frontend/package.json frontend/package-lock.json)
  if [ ! -d frontend/node_modules ] || [ "$(cat "$stamp_dir/npm" 2>/dev/null)" != "$npm_fp" ]; then
    say "installing npm packages"
    (cd frontend && npm ci --no-audit --no-fund --loglevel=error)
    echo "$npm_fp" > "$stamp_dir/npm"
  fi
  src_fp=$( (cd frontend && find src index.html vite.config.ts tsconfig.json package-lock.json -type f 2>/dev/null | sort | xargs cat) | sha256sum | cut -c1-16)
  if [ ! -f frontend/dist/index.html ] || [ "$(cat "$stamp_dir/frontend" 2>/dev/null)" != "$src_fp" ]; then
    say "building the frontend"
    (cd frontend && npm run build --silent >/dev/null)
    echo "$src_fp" > "$stamp_dir/frontend"
  fi
fi
