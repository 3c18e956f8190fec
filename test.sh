#!/usr/bin/env bash
# Set up .venv (first run only) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest "$@"
