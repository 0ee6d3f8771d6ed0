#!/usr/bin/env bash
# Start the annotator on the bundled sample images with the embedded default
# model. Sets everything up on first use (scripts/setup.sh); extra arguments
# go to `trimask serve` (e.g. --port 8001, or --images DIR for your own).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
if [ ! -f samples/.complete ]; then
  .venv/bin/trimask samples --out samples
fi
exec .venv/bin/trimask serve --images samples --annotations annotations "$@"
