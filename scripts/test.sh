#!/usr/bin/env bash
# The test command (README and CI run exactly this): lint, format and type checks (configured in
# pyproject.toml), then both test tiers on two workers (plain `pytest` runs the unit tier only). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# two workers, each taking whole test files (their module fixtures stay in one process)
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile -m "integration or not integration" "$@"
