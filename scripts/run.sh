#!/usr/bin/env bash
# Install into .venv (idempotent) and serve the app on the bundled mini model. README's first command.
# Extra arguments go to app.py, e.g. `bash scripts/run.sh --port 7861 --base mini`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec .venv/bin/python app.py --base mini "$@"
