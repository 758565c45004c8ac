#!/usr/bin/env bash
# The test command (README and CI run exactly this): lint, format and type checks (configured in
# pyproject.toml), then both test tiers (plain `pytest` runs the unit tier only). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -m "integration or not integration" "$@"
