#!/usr/bin/env bash
# Build the whole book on the default model (gemma3-270m): HTML in _build/html.
#
#   bash scripts/build_book.sh
#
# 1. scripts/setup.sh (fast when already done)
# 2. execute every chapter notebook in book/ in place with papermill: working directory
#    book/, kernel python3, model_name gemma3-270m (each chapter's default). Each notebook
#    is written to a temporary file and renamed over the original only when every cell
#    ran, so a killed build leaves the committed notebooks intact. Execution timings and
#    papermill records are stripped, so unchanged code leaves `git diff` empty.
#    (This is `python -m mechbook refresh`, see lib/mechbook/cli.py.)
# 3. jupyter-book build . -W -n --keep-going  (warnings are errors)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export JUPYTER_PLATFORM_DIRS=1

start=$SECONDS
python -m mechbook refresh
jupyter-book build . -W -n --keep-going
echo "build_book: done in $((SECONDS - start)) s; open _build/html/index.html"
