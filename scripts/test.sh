#!/usr/bin/env bash
# Run the unit tests and re-execute every chapter notebook with nbval.
#
#   bash scripts/test.sh [extra pytest arguments, e.g. -m "not slow" or -x]
#
# tests/  unit tests, the browser test (builds the book, opens it in headless Chromium)
# book/   nbval re-executes each committed chapter in the venv's kernel (cwd book/) and
#         compares every output with the committed one. Only book/ is collected with
#         --nbval: notebooks anywhere else (runs/, temporary folders) are never run.
#         tests/nbval_sanitize.cfg masks what differs between runs of the same code
#         (memory addresses, progress bars); it never masks numbers.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

# The same kernel environment as `mechbook refresh`, which wrote the committed outputs:
# no tqdm bars on stderr, a fixed hash seed.
export TQDM_DISABLE=1 PYTHONHASHSEED=0 JUPYTER_PLATFORM_DIRS=1

# One run, one summary line. --nbval only collects .ipynb files, and there are none in tests/.
python -m pytest tests book --nbval --nbval-current-env \
    --nbval-sanitize-with tests/nbval_sanitize.cfg "$@"
