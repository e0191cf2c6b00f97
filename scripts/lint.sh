#!/usr/bin/env bash
# Lint and type-check: ruff (rules in pyproject.toml) on the code and tests, mypy on the package.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check mixtral_offload_plugin langchain_integration webui_extension tests scripts
.venv/bin/mypy mixtral_offload_plugin
