#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check pipeline workers schemas tests bench
exec .venv/bin/python -m pytest -q --durations=12 "$@"
