#!/usr/bin/env bash
# Format the whole tree and apply ruff's safe fixes, the way .ci/run checks it (pyproject.toml [tool.ruff]).
# Run from anywhere: tools/format.sh. Then `tools/check.sh` (or .ci/run) must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff format .
ruff check --fix .
ruff format .  # fixes such as import sorting can leave lines the formatter lays out differently
