#!/usr/bin/env bash
# The static checks of .ci/run: lint, format, types (configured in pyproject.toml). A few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
