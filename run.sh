#!/usr/bin/env bash
# The main job: set up .venv (first run only), then encode a few sentences with all-MiniLM-L6-v2.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
python -m minilm "$@"
