#!/usr/bin/env bash
# Set up everything the tests need (python packages, default model, demo text, headless Chromium),
# then run the whole test suite. Exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=1200 "$@"
