#!/usr/bin/env bash
# The test command: install what is needed, lint, run the whole suite on 2 workers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
ruff check lora_jax tests examples
python -m pytest -q -n 2 tests "$@"
