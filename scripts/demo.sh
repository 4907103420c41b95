#!/usr/bin/env bash
# Set up (if needed), then run the main job on the bundled demo photos with a local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/camlabel demo --out "${1:-runs/demo}"
