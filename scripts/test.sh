#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite, including the integration tests on the real default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HYPOTHESIS_STORAGE_DIRECTORY="${TMPDIR:-/tmp}/lifealign-hypothesis"
python -m pytest -q -p no:cacheprovider "$@"
