#!/usr/bin/env bash
# The test command (README and CI run exactly this): lint, format and type checks (configured in
# pyproject.toml), then the suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
