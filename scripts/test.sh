#!/usr/bin/env bash
# README's test command: install everything the tests need (idempotent) and run the whole suite.
# - .venv from requirements.txt (torch 2.13.0: the CPU build where no GPU is present);
# - Debian's chromium for the browser test, when it is missing and apt can install it (root or sudo).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m cuda` on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    (export DEBIAN_FRONTEND=noninteractive; $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install Debian's chromium; the browser test will fail" >&2
  else
    echo "warning: no apt-get here to install chromium; the browser test will fail" >&2
  fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/ruff check zipq_core zipq_mini studio tests bench scripts app.py
.venv/bin/python -m pytest -q "$@"
