#!/usr/bin/env bash
# Set up everything the tests need (python packages, default model, demo text, headless Chromium),
# then lint and run the whole test suite. Exits non-zero on a lint error or a failing test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .  # lint errors fail the run, as a failing test does
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=1200 "$@"
