#!/usr/bin/env bash
# One command on a fresh machine: install, serve the bundled MoE with --model-impl adapmoe,
# answer one completion request, shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/serve_demo.py "$@"
