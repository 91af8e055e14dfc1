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
#         (memory addresses, progress bars); it never masks numbers. The plugin
#         mechbook.book.nbval_tolerance passes float noise and nothing else, so the committed
#         outputs pass on any x86-64 CPU and thread count: a float printed with 5 or more
#         significant digits may move by 1e-4 relative (1e-6 absolute at zero, same sign);
#         text, whole numbers, head labels (4.10), versions, signs and numbers printed with
#         fewer digits compare exactly. Tables are checked by their unrounded content, which
#         the book's DataFrame display carries in the output's metadata. It runs c1 first.
#         Chapters b2, b3, b4, b6 and b7 load their committed searches and re-check a sample (their
#         printed check time is masked by tests/nbval_sanitize.cfg).
#         The plugin mechbook.book.nbval_results adds "<notebook>::published results" after each
#         chapter: what it published into $MECHBOOK_RESULTS must equal the committed results/ up
#         to float noise (mechbook.book.result_diff; a failure names file, column, row, both values).
#
# The test command writes nothing into the work tree: the chapters nbval re-executes
# publish their results into a temporary copy of results/ ($MECHBOOK_RESULTS), deleted
# at exit, and the book is built under _build/ (ignored by git).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

# setup.sh installed the lock, which holds every extra: nnsight ([ndif]) for the backend tests
# (tests/core/test_backends.py: nnsight on a local model, and its remote path with remote="local").

# The same kernel environment as `mechbook refresh`, which wrote the committed outputs:
# no tqdm bars on stderr, a fixed hash seed.
export TQDM_DISABLE=1 PYTHONHASHSEED=0 JUPYTER_PLATFORM_DIRS=1

results_copy="$(mktemp -d "${TMPDIR:-/tmp}/mechbook-test-results.XXXXXX")"
trap 'rm -rf "$results_copy"' EXIT
cp -a results/. "$results_copy/"
export MECHBOOK_RESULTS="$results_copy"

# The chapters find their searches in the copy of results/ (mechbook.book.searches), so they load
# them and re-check a fixed sample instead of searching again: b7's main cell checks its 27 node
# prunings in minutes. A chapter whose committed searches no longer match its inputs (another lock,
# changed prompts) computes them, and b7's cell then takes about 25 minutes on 2 cores; nbval's
# default cell timeout is 2000 s, so cells get 90 minutes (CI's whole budget) before nbval gives up.
# One run, one summary line. --nbval only collects .ipynb files, and there are none in tests/.
python -m pytest tests book --nbval --nbval-current-env -p mechbook.book.nbval_tolerance \
    -p mechbook.book.nbval_results --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=5400 "$@"
