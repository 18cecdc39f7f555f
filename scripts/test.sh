#!/usr/bin/env bash
# Install into .venv (idempotent) and run the whole test suite. README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/ruff check zipq_core tests bench scripts app.py
.venv/bin/python -m pytest -q "$@"
